//! A `backhaul-cloud serve` process for tests: its own SQLite file and keys in a temp dir, a free
//! loopback port, SIGKILL and restart on the same database.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{free_port, Process};

/// The device key and the fleet key every test cloud accepts.
pub const DEVICE: &str = "rpi-test-01";
pub const DEVICE_KEY: &str = "device-key-rpi-test-01-0123456789";
pub const FLEET_KEY: &str = "fleet-key-0123456789abcdef";

#[derive(Debug)]
pub struct Cloud {
    dir: tempfile::TempDir,
    config: PathBuf,
    env: Vec<(String, String)>,
    pub port: u16,
    pub process: Process,
}

/// Extra settings for a test cloud.
#[derive(Debug, Clone, Default)]
pub struct CloudOptions {
    /// `mqtt://127.0.0.1:PORT` to ingest over MQTT too.
    pub mqtt_url: Option<String>,
    /// Extra lines for the top of the config file.
    pub extra: String,
    /// Extra lines for its `[mqtt]` section.
    pub mqtt_extra: String,
    /// Where the database lives (default: the temp dir).
    pub database_dir: Option<PathBuf>,
    /// A database URL instead of SQLite (e.g. a private [`crate::postgres::Postgres`]).
    pub database_url: Option<String>,
    /// Extra environment (e.g. a failpoint).
    pub env: Vec<(String, String)>,
}

impl Cloud {
    pub fn start(options: CloudOptions) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("backhaul-cloud-").tempdir()?;
        let port = free_port()?;
        let db_dir = options.database_dir.clone().unwrap_or_else(|| dir.path().to_owned());
        let keys = dir.path().join("keys.toml");
        std::fs::write(&keys, format!("\"{DEVICE}\" = \"{DEVICE_KEY}\"\n\"*\" = \"{FLEET_KEY}\"\n"))?;
        let database =
            options.database_url.clone().unwrap_or_else(|| format!("sqlite:{}", db_dir.join("ingest.db").display()));
        let mut config = format!(
            "listen = \"127.0.0.1:{port}\"\ndatabase = \"{database}\"\n{}\n[auth]\nkeys_file = \"{}\"\n",
            options.extra,
            keys.display()
        );
        if let Some(url) = &options.mqtt_url {
            config.push_str(&format!(
                "\n[mqtt]\nurl = \"{url}\"\ntopic_prefix = \"backhaul\"\nshared_group = \"ingest\"\nclient_id = \"cloud-{port}\"\n{}\n",
                options.mqtt_extra
            ));
        }
        let config_path = dir.path().join("cloud.toml");
        std::fs::write(&config_path, config)?;
        let env: Vec<(String, String)> =
            [("BACKHAUL_LOG".to_owned(), "info".to_owned())].into_iter().chain(options.env.clone()).collect();
        let process = spawn(&config_path, &env)?;
        Ok(Self { dir, config: config_path, env, port, process })
    }

    /// A cloud with MQTT ingest from `broker` (and `env`), once it has subscribed.
    pub fn start_mqtt(broker: &crate::Mosquitto, env: Vec<(String, String)>) -> Result<Self> {
        let mut cloud = Self::start(CloudOptions { mqtt_url: Some(broker.url()), env, ..Default::default() })?;
        cloud.process.wait_for_any_line(Duration::from_secs(60), |l| l.contains("subscribed to batches and status"))?;
        Ok(cloud)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Its config file (for the `reprocess` command).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL, then start again on the same database and port (without extra environment such as
    /// a failpoint).
    pub fn kill9_and_restart(&mut self) -> Result<()> {
        self.process.kill9()?;
        self.env.retain(|(k, _)| k != "BACKHAUL_FAILPOINT");
        self.process = spawn(&self.config, &self.env)?;
        Ok(())
    }
}

impl Cloud {
    /// SIGKILL, then `between` with the cloud's temp dir (where its SQLite files are), then start
    /// again on the same config: e.g. to snapshot or restore the database as a backup would.
    pub fn kill9_then(&mut self, between: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        self.process.kill9()?;
        between(self.dir.path())?;
        self.process = spawn(&self.config, &self.env)?;
        Ok(())
    }

    /// SIGKILL, then start again on the same database and port with `env` added (e.g. a
    /// failpoint).
    pub fn restart_with(&mut self, env: &[(&str, &str)]) -> Result<()> {
        self.process.kill9()?;
        self.env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self.process = spawn(&self.config, &self.env)?;
        Ok(())
    }

    /// The row of `GET /api/v1/devices` for `device_id` (Null if the cloud has none).
    pub fn device(&self, device_id: &str) -> serde_json::Value {
        let (_, body) = get_json(&http(), self, "/api/v1/devices");
        body["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["device_id"] == device_id).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Waits until the cloud holds `detections` detections of `device_id`; returns its row.
    pub fn wait_detections(&self, device_id: &str, detections: u64, timeout: Duration) -> Result<serde_json::Value> {
        let mut last = serde_json::Value::Null;
        let r = crate::wait_for(&format!("{detections} detections of {device_id} in the cloud"), timeout, || {
            let d = self.device(device_id);
            let have = d["detections"].as_u64().unwrap_or(0);
            last = d.clone();
            if have > detections {
                return Some(Err(anyhow::anyhow!("more detections stored than produced: {d}")));
            }
            (have == detections).then(|| Ok(d))
        });
        match r {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.context(format!("last device row: {last}"))),
        }
    }
}

fn spawn(config: &Path, env: &[(String, String)]) -> Result<Process> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut p = Process::spawn("backhaul-cloud", &["serve", "--config", config.to_str().context("utf-8 path")?], &env)?;
    p.wait_for_line(Duration::from_secs(30), |l| l.starts_with("listening on "))?;
    Ok(p)
}

/// A blocking HTTP client that reads error statuses as responses.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// (status, body, Retry-After) of a POST to the bulk endpoint.
pub fn post_batch(
    agent: &ureq::Agent,
    cloud: &Cloud,
    key: Option<&str>,
    idempotency: Option<&str>,
    body: &[u8],
) -> (u16, String, Option<String>) {
    let mut req = agent.post(cloud.url("/api/v1/detections/bulk")).header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("X-API-Key", k);
    }
    if let Some(i) = idempotency {
        req = req.header("Idempotency-Key", i);
    }
    match req.send(body) {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            (status, r.body_mut().read_to_string().unwrap_or_default(), retry)
        }
        // The server may close the connection on an oversized body before reading it all.
        Err(e) => (0, e.to_string(), None),
    }
}

/// GET with the fleet key; returns (status, JSON body).
pub fn get_json(agent: &ureq::Agent, cloud: &Cloud, path: &str) -> (u16, serde_json::Value) {
    let mut r = agent.get(cloud.url(path)).header("X-API-Key", FLEET_KEY).call().expect("GET");
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}
