//! The operator CLI (issue #18; SPEC.md "Wave 2 additions"): `devices`, `gaps`, `command`,
//! `commands`, `dead-letters`, `stats`. Each talks to a running cloud's HTTP API (`--url`, or
//! `BACKHAUL_URL`) with a fleet key from `BACKHAUL_API_KEY`, and prints a table, or the API's JSON
//! with `--json`. Exit 1 with the cloud's error (what happened, what to do) on any answer but 2xx.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the API is, and how to print.
#[derive(Debug, Args)]
pub struct Api {
    /// The cloud's HTTP address.
    #[arg(long, global = true, env = "BACKHAUL_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// What `command DEVICE` sends.
#[derive(Debug, Subcommand)]
pub enum Send {
    /// Requeue the device's retained, already acked batches acked in [since, until), online.
    Replay {
        /// RFC 3339, e.g. 2026-11-30T08:00:00Z.
        #[arg(long)]
        since: String,
        #[arg(long)]
        until: Option<String>,
    },
    /// Set the device's send rate (batches per second), kept across its restarts.
    SetRate {
        rate_per_sec: u32,
        /// Burst (batches); default: twice the rate (at most 1,000,000).
        #[arg(long)]
        burst: Option<u32>,
    },
    /// Cut the device's open batch now.
    Flush,
    /// Ask the device for its status.
    Ping,
    /// Restart the device's BLE scan.
    Rescan,
}

struct Client {
    agent: ureq::Agent,
    url: String,
    key: String,
}

impl Client {
    fn new(api: &Api) -> Result<Self> {
        let key = std::env::var("BACKHAUL_API_KEY").ok().filter(|k| !k.trim().is_empty()).context(
            "set BACKHAUL_API_KEY to a fleet key (the \"*\" entry of the cloud's keys file); it is never taken from \
             the command line, where ps and the shell's history would show it",
        )?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Ok(Self { agent, url: api.url.trim_end_matches('/').to_owned(), key: key.trim().to_owned() })
    }

    fn answer(&self, what: &str, r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value> {
        let mut r = r.with_context(|| format!("{what}: cannot reach the cloud at {} (is --url right?)", self.url))?;
        let code = r.status().as_u16();
        let body = r.body_mut().read_to_string().unwrap_or_default();
        let value: Value = serde_json::from_str(&body).unwrap_or(Value::String(body.clone()));
        if !(200..300).contains(&code) {
            match value["error"].as_str() {
                Some(message) => bail!("{what}: the cloud answered HTTP {code}: {message}"),
                None => bail!(
                    "{what}: HTTP {code} from {}, without the cloud's JSON error: is --url (or BACKHAUL_URL) the \
                     cloud's address, scheme, host and port only (no path)? Body: {:?}",
                    self.url,
                    body.chars().take(200).collect::<String>()
                ),
            }
        }
        Ok(value)
    }

    fn get(&self, path: &str) -> Result<Value> {
        let r = self.agent.get(format!("{}{path}", self.url)).header("X-API-Key", &self.key).call();
        self.answer(&format!("GET {path}"), r)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self
            .agent
            .post(format!("{}{path}", self.url))
            .header("X-API-Key", &self.key)
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes());
        self.answer(&format!("POST {path}"), r)
    }
}

use backhaul_shared::command::path_segment as segment;

/// A plain text table: a header, then rows, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print(api: &Api, value: &Value, human: impl FnOnce(&Value) -> String) {
    if api.json {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    } else {
        print!("{}", human(value));
    }
}

pub fn devices(api: Api) -> Result<()> {
    let c = Client::new(&api)?;
    let v = c.get("/api/v1/devices")?;
    print(&api, &v, |v| {
        let rows: Vec<Vec<String>> = v["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                vec![
                    cell(&d["device_id"]),
                    if d["online"].as_bool() == Some(true) { "yes".into() } else { "no".into() },
                    cell(&d["last_seen"]),
                    cell(&d["batches"]),
                    cell(&d["detections"]),
                    cell(&d["gaps"]),
                    cell(&d["backlog"]["batches"]),
                    match d["backlog"]["eta_s"].as_u64() {
                        Some(s) => format!("{s}s"),
                        None if d["backlog"].is_object() => "not draining".into(),
                        None => "-".into(),
                    },
                    match d["ledger"]["balanced"].as_bool() {
                        Some(true) => "yes".into(),
                        Some(false) => format!("NO ({:+})", d["ledger"]["difference"].as_i64().unwrap_or(0)),
                        None => "-".into(),
                    },
                ]
            })
            .collect();
        table(
            &["DEVICE", "ONLINE", "LAST SEEN", "BATCHES", "DETECTIONS", "GAPS", "QUEUED", "DRAIN ETA", "BALANCED"],
            &rows,
        )
    });
    Ok(())
}

pub fn gaps(api: Api, device: String) -> Result<()> {
    let c = Client::new(&api)?;
    let v = c.get(&format!("/api/v1/devices/{}/gaps", segment(&device)))?;
    print(&api, &v, |v| {
        let rows: Vec<Vec<String>> = v["gaps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| {
                let (first, last) = (g["first"].as_i64().unwrap_or(0), g["last"].as_i64().unwrap_or(0));
                vec![first.to_string(), last.to_string(), (last - first + 1).to_string()]
            })
            .collect();
        let mut out = table(&["FIRST SEQ", "LAST SEQ", "MISSING"], &rows);
        out.push_str(&format!("{} seq numbers missing for {device}\n", v["missing"]));
        out
    });
    Ok(())
}

pub fn command(api: Api, device: String, send: Send) -> Result<()> {
    let body = match send {
        Send::Replay { since, until } => {
            let mut b = json!({ "kind": "replay", "since": since });
            if let Some(u) = until {
                b["until"] = json!(u);
            }
            b
        }
        Send::SetRate { rate_per_sec, burst } => json!({
            "kind": "set_rate",
            "rate_per_sec": rate_per_sec,
            "burst": burst.unwrap_or(rate_per_sec.saturating_mul(2).min(backhaul_shared::command::RATE_RANGE.1)),
        }),
        Send::Flush => json!({ "kind": "flush" }),
        Send::Ping => json!({ "kind": "ping" }),
        Send::Rescan => json!({ "kind": "rescan" }),
    };
    let c = Client::new(&api)?;
    let v = c.post(&format!("/api/v1/devices/{}/commands", segment(&device)), &body)?;
    print(&api, &v, |v| {
        format!(
            "command {} queued for {device}; `backhaul-cloud commands {device}` shows its result\n",
            cell(&v["command_id"])
        )
    });
    Ok(())
}

pub fn commands(api: Api, device: String) -> Result<()> {
    let c = Client::new(&api)?;
    let v = c.get(&format!("/api/v1/devices/{}/commands?limit=1000", segment(&device)))?;
    print(&api, &v, |v| {
        let rows: Vec<Vec<String>> = v["commands"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                vec![
                    cell(&c["command_id"]),
                    cell(&c["kind"]),
                    cell(&c["status"]),
                    cell(&c["created_at"]),
                    cell(&c["done_at"]),
                    cell(&c["result"]).chars().take(120).collect(),
                ]
            })
            .collect();
        table(&["COMMAND", "KIND", "STATUS", "CREATED", "DONE", "RESULT"], &rows)
    });
    Ok(())
}

pub fn dead_letters(api: Api, limit: u32) -> Result<()> {
    let c = Client::new(&api)?;
    let v = c.get(&format!("/api/v1/dead-letters?limit={limit}"))?;
    print(&api, &v, |v| {
        let rows: Vec<Vec<String>> = v["dead_letters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                vec![
                    cell(&d["received_at"]),
                    cell(&d["via"]),
                    cell(&d["device_id"]),
                    cell(&d["size"]),
                    cell(&d["error"]).chars().take(100).collect(),
                ]
            })
            .collect();
        table(&["RECEIVED", "VIA", "DEVICE", "BYTES", "ERROR"], &rows)
    });
    Ok(())
}

pub fn stats(api: Api) -> Result<()> {
    let c = Client::new(&api)?;
    let v = c.get("/api/v1/stats")?;
    print(&api, &v, |v| {
        let rows: Vec<Vec<String>> =
            v.as_object().into_iter().flatten().map(|(k, n)| vec![k.clone(), cell(n)]).collect();
        table(&["COUNTER", "VALUE"], &rows)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_and_segments_are_encoded() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
        assert_eq!(segment("rpi 1/ü"), "rpi%201%2F%C3%BC");
    }
}
