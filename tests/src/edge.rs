//! A `backhaul-edge run` process for tests: a simulated source, its own data_dir and config in a
//! temp dir, its status endpoint on a free loopback port; SIGKILL and restart on the same data_dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{free_port, wait_for, Process};

/// How a test edge is set up. `Default` is a fast simulated device over MQTT.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    pub device_id: String,
    /// `mqtt` or `http`.
    pub mode: &'static str,
    pub mqtt_url: String,
    pub http_url: String,
    /// Detections over the device's life (0 = forever), and per second.
    pub count: u64,
    pub rate: f64,
    pub seed: u64,
    pub max_detections: usize,
    pub max_age_ms: u64,
    pub rate_per_sec: u32,
    pub burst: u32,
    pub max_inflight: u32,
    /// The `[source]` section's lines instead of the simulated source's.
    pub source: Option<String>,
    /// Extra `[decode]` lines.
    pub decode: String,
    /// Extra `[queue]` lines.
    pub queue: String,
    /// Where the data_dir goes (default: in the edge's temp dir).
    pub data_dir: Option<PathBuf>,
    /// Extra `[transport]` lines.
    pub transport: String,
    /// Extra `[transport.mqtt]` lines.
    pub mqtt: String,
    /// Extra `[transport.http]` lines.
    pub http: String,
    pub env: Vec<(String, String)>,
    /// A program and its first arguments to run instead of the workspace's `backhaul-edge`
    /// (e.g. `qemu-aarch64-static -L /usr/aarch64-linux-gnu target/aarch64-.../backhaul-edge`);
    /// `run --config FILE` follows them.
    pub launcher: Option<Vec<String>>,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        Self {
            device_id: crate::cloud::DEVICE.into(),
            mode: "mqtt",
            mqtt_url: "mqtt://127.0.0.1:1".into(),
            http_url: "http://127.0.0.1:1".into(),
            count: 1000,
            rate: 10_000.0,
            seed: 1,
            max_detections: 50,
            max_age_ms: 200,
            rate_per_sec: 10_000,
            burst: 1000,
            max_inflight: 32,
            source: None,
            decode: String::new(),
            queue: String::new(),
            data_dir: None,
            transport: String::new(),
            mqtt: String::new(),
            http: String::new(),
            env: Vec::new(),
            launcher: None,
        }
    }
}

#[derive(Debug)]
pub struct Edge {
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    launcher: Option<Vec<String>>,
    pub status_port: u16,
    pub process: Process,
}

impl Edge {
    pub fn start(o: EdgeOptions) -> Result<Self> {
        Self::start_with(o, |_| Ok(()))
    }

    /// Like [`Edge::start`], calling `prepare` with the (empty) data_dir first, e.g. to fill its
    /// queue.
    pub fn start_with(o: EdgeOptions, prepare: impl FnOnce(&Path) -> Result<()>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("backhaul-edge-").tempdir()?;
        let data_dir = o.data_dir.clone().unwrap_or_else(|| dir.path().join("data"));
        prepare(&data_dir)?;
        let status_port = free_port()?;
        let config = format!(
            "device_id = \"{device}\"\nname = \"Test Pi\"\nlocation = \"Lab\"\ndata_dir = \"{data}\"\n\
             status_listen = \"127.0.0.1:{status_port}\"\n\n\
             [source]\n{source}\n\n[decode]\n{decode}\n\n\
             [batch]\nmax_detections = {md}\nmax_age_ms = {ma}\n\n\
             [queue]\n{queue}\n\n\
             [transport]\nmode = \"{mode}\"\nrate_per_sec = {rps}\nburst = {burst}\nmax_inflight = {mi}\n\
             ack_timeout = \"5s\"\nbackoff_max = \"500ms\"\n{transport}\n\n\
             [transport.mqtt]\nurl = \"{mqtt}\"\nkeep_alive = \"5s\"\nstatus_interval = \"2s\"\n{mqtt_extra}\n\n\
             [transport.http]\nurl = \"{http}\"\ntimeout = \"10s\"\n{http_extra}\n",
            device = o.device_id,
            data = data_dir.display(),
            source = o.source.clone().unwrap_or_else(|| format!(
                "kind = \"simulated\"\nrate = {:?}\ncount = {}\ndevices = 20\nseed = {}",
                o.rate, o.count, o.seed
            )),
            decode = o.decode,
            md = o.max_detections,
            ma = o.max_age_ms,
            queue = o.queue,
            mode = o.mode,
            rps = o.rate_per_sec,
            burst = o.burst,
            mi = o.max_inflight,
            transport = o.transport,
            mqtt = o.mqtt_url,
            mqtt_extra = o.mqtt,
            http = o.http_url,
            http_extra = o.http,
        );
        let config_path = dir.path().join("edge.toml");
        std::fs::write(&config_path, config)?;
        let key = if o.device_id == crate::cloud::DEVICE { crate::cloud::DEVICE_KEY } else { crate::cloud::FLEET_KEY };
        let env: Vec<(String, String)> =
            [("BACKHAUL_LOG".to_owned(), "info".to_owned()), ("BACKHAUL_API_KEY".to_owned(), key.to_owned())]
                .into_iter()
                .chain(o.env)
                .collect();
        let process = spawn(&config_path, &env, status_port, o.launcher.as_deref())?;
        Ok(Self { dir, data_dir, config: config_path, env, launcher: o.launcher, status_port, process })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// The temp dir holding the config (and, by default, the data_dir).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// `GET /status` as JSON.
    pub fn status(&self) -> Result<Value> {
        status(self.status_port)
    }

    /// `GET /metrics` (the Prometheus text).
    pub fn metrics(&self) -> Result<String> {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
        Ok(agent.get(format!("http://127.0.0.1:{}/metrics", self.status_port)).call()?.body_mut().read_to_string()?)
    }

    /// Polls `/status` until `pred` holds; returns that status.
    pub fn wait_status(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let mut last = Value::Null;
        let r = wait_for(what, timeout, || match self.status() {
            Ok(s) if pred(&s) => Some(s),
            Ok(s) => {
                last = s;
                None
            }
            Err(_) => None,
        });
        r.with_context(|| format!("last status: {last}"))
    }

    /// Waits until the edge produced exactly `detections` and has nothing pending or in flight;
    /// returns that status.
    pub fn wait_drained(&self, detections: u64, timeout: Duration) -> Result<Value> {
        self.wait_status(&format!("the edge to produce {detections} detections and drain"), timeout, |s| {
            num(s, "/produced/detections") == detections
                && num(s, "/queue/pending") == 0
                && num(s, "/queue/in_flight") == 0
        })
    }

    /// The environment the next (re)start runs with (e.g. to remove a failpoint).
    pub fn env_mut(&mut self) -> &mut Vec<(String, String)> {
        &mut self.env
    }

    /// SIGTERM (a clean stop: the acks in memory are written), and stay down until
    /// [`Edge::restart`].
    pub fn stop(&mut self) -> Result<()> {
        if let Some(child) = self.process.child() {
            crate::sigterm(child)?;
        }
        self.process.wait_exit(Duration::from_secs(30))?;
        Ok(())
    }

    /// SIGKILL, and stay down until [`Edge::restart`].
    pub fn kill9(&mut self) -> Result<()> {
        self.process.kill9()
    }

    /// Starts again on the same data_dir and config (after [`Edge::kill9`]).
    pub fn restart(&mut self) -> Result<()> {
        self.process = spawn(&self.config, &self.env, self.status_port, self.launcher.as_deref())?;
        Ok(())
    }

    /// SIGKILL, then start again on the same data_dir and config.
    pub fn kill9_and_restart(&mut self) -> Result<()> {
        self.process.kill9()?;
        self.process = spawn(&self.config, &self.env, self.status_port, self.launcher.as_deref())?;
        Ok(())
    }
}

/// `GET http://127.0.0.1:{port}/status`.
pub fn status(port: u16) -> Result<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
    let body = agent.get(format!("http://127.0.0.1:{port}/status")).call()?.body_mut().read_to_string()?;
    Ok(serde_json::from_str(&body)?)
}

fn spawn(config: &Path, env: &[(String, String)], status_port: u16, launcher: Option<&[String]>) -> Result<Process> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let run = ["run", "--config", config.to_str().context("utf-8 path")?];
    let mut p = match launcher {
        None => Process::spawn("backhaul-edge", &run, &env)?,
        Some([program, first @ ..]) => {
            let args: Vec<&str> = first.iter().map(String::as_str).chain(run).collect();
            Process::spawn_program("backhaul-edge", Path::new(program), &args, &env)?
        }
        Some([]) => anyhow::bail!("an empty launcher"),
    };
    let up = wait_for("the edge's status endpoint", Duration::from_secs(30), || status(status_port).ok());
    if up.is_err() {
        let out = p.output().join("\n");
        anyhow::bail!("backhaul-edge did not come up; its output:\n{out}");
    }
    Ok(p)
}

/// A number at `pointer` in a JSON value (0 if absent).
pub fn num(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}
