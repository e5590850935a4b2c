//! The `backhaul-edge` command line (SPEC.md, "Edge command line"). Glue only: the work is in the
//! library's modules.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

mod service;

use anyhow::{Context, Result};
use backhaul_edge::queue::{Durability, Queue, QueueConfig};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "backhaul-edge",
    version,
    about = "Store-and-forward of BLE detections from a Raspberry Pi to the cloud"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (systemd Type=notify).
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show the running service's queue and link state (from its loopback status endpoint).
    Status {
        /// Read status_listen from this config (default: 127.0.0.1:9901).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The status endpoint's address, e.g. 127.0.0.1:9901 (overrides --config).
        #[arg(long, value_name = "ADDR")]
        addr: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the queue offline (stop the service first).
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Requeue retained, already acked batches under their original batch_id (offline, on the
    /// data_dir, for now: stop the service first).
    Replay {
        /// Batches acked at or after this time (RFC 3339, e.g. 2026-11-21T10:00:00Z).
        #[arg(long, value_name = "TIME")]
        since: String,
        /// ... and before this time (default: now).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        #[arg(long, value_name = "DIR", default_value = "/var/lib/backhaul")]
        data_dir: PathBuf,
    },
    /// Watch BLE advertisements (raw addresses shown here, on the Pi only: nothing is sent), and
    /// optionally record them as JSON lines for the replay source.
    Scan {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Write every advertisement heard to FILE (the capture format of `source.kind = "replay"`).
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
        /// Take the adapter, service filter and Thingy:52 settings from this config.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write a commented config for this Pi and generate its hash secret (mode 0600); nothing
    /// that exists is overwritten, so running it again changes nothing. The API key is taken from
    /// BACKHAUL_API_KEY or --api-key-file when given.
    Init {
        /// Default: this machine's host name.
        #[arg(long, value_name = "ID")]
        device_id: Option<String>,
        /// Default: from the URL's scheme (mqtt:// mqtts:// http:// https://).
        #[arg(long, value_enum)]
        mode: Option<backhaul_edge::config::TransportMode>,
        /// The broker (mqtt://, mqtts://) or the cloud (http://, https://).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        #[arg(long, value_name = "FILE", default_value = "/etc/backhaul/edge.toml")]
        config: PathBuf,
        /// Where hash_secret and api_key go (created mode 0700). The systemd unit loads them from
        /// /etc/backhaul/credentials, the default.
        #[arg(long, value_name = "DIR", default_value = "/etc/backhaul/credentials")]
        credentials_dir: PathBuf,
        #[arg(long, value_name = "DIR", default_value = "/var/lib/backhaul")]
        data_dir: PathBuf,
        /// A file holding this device's API key (the cloud's keys file entry), copied to
        /// credentials_dir/api_key; `-` reads it from standard input.
        #[arg(long, value_name = "FILE")]
        api_key_file: Option<PathBuf>,
    },
    /// Validate a config and print the effective settings, secrets masked.
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum QueueAction {
    /// Counts by state, bytes, oldest pending age, drops, quarantined.
    Stats {
        #[arg(long, value_name = "DIR", default_value = "/var/lib/backhaul")]
        data_dir: PathBuf,
    },
    /// Read every record and check its checksum; exit 1 if any is damaged.
    Verify {
        #[arg(long, value_name = "DIR", default_value = "/var/lib/backhaul")]
        data_dir: PathBuf,
    },
    /// Write every record as a JSON line to stdout.
    Export {
        #[arg(long, value_name = "DIR", default_value = "/var/lib/backhaul")]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    backhaul_shared::logging::init("info");
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("backhaul-edge: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "ble"))]
fn scan(_seconds: u64, _record: Option<PathBuf>, _config: Option<PathBuf>) -> Result<ExitCode> {
    anyhow::bail!("this backhaul-edge was built without BLE (cargo feature `ble`)")
}

#[cfg(feature = "ble")]
fn scan(seconds: u64, record: Option<PathBuf>, config: Option<PathBuf>) -> Result<ExitCode> {
    use backhaul_edge::decode::thingy52;
    use backhaul_edge::source::ble::{BleSettings, Scanner};
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    let (settings, company_id, payload_len) = match &config {
        Some(file) => {
            let c = backhaul_edge::config::EdgeConfig::load(file)?.0.config;
            (service::ble_settings(&c), c.decode.company_id, c.decode.payload_len)
        }
        None => {
            (BleSettings { adapter: None, services: Vec::new(), stall_after: Duration::from_secs(120) }, 0xFFFF, 14)
        }
    };
    let telemetry = std::sync::Arc::new(backhaul_edge::telemetry::Telemetry::new("scan", "none"));
    let scanner = Scanner::start(settings, telemetry.clone())?;
    let mut out = match &record {
        // Never over an existing capture (a replay may stand in it), and readable by the owner
        // only: it holds raw addresses.
        Some(path) => Some(std::io::BufWriter::new({
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| {
                format!("creating {} (an existing capture is never overwritten: choose a new name)", path.display())
            })?
        })),
        None => None,
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut heard, mut advertisers) = (0u64, HashSet::new());
    while let Some(adv) = scanner.next(deadline.saturating_duration_since(Instant::now())) {
        heard += 1;
        advertisers.insert(adv.address.clone());
        let mut what = Vec::new();
        if let Some(name) = &adv.name {
            what.push(format!("\"{name}\""));
        }
        for (company, data) in &adv.manufacturer_data {
            if *company == company_id && data.len() == payload_len {
                let r = thingy52::decode(data);
                what.push(format!(
                    "thingy52: {:?} °C, {:?} %, {:?} ppm, window {:?}, battery {:?} %",
                    r.temp, r.humidity, r.co2_ppm, r.window_open, r.battery
                ));
            } else {
                what.push(format!("mfr 0x{company:04x}: {}", hex_bytes(data)));
            }
        }
        for (uuid, data) in &adv.service_data {
            what.push(format!("svc {uuid}: {}", hex_bytes(data)));
        }
        println!("{}  {}  {:>4} dBm  {}", adv.t, adv.address, adv.rssi, what.join("  "));
        if let Some(out) = &mut out {
            serde_json::to_writer(&mut *out, &adv)?;
            out.write_all(b"\n")?;
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    if let Some(mut out) = out {
        out.flush()?;
    }
    eprintln!(
        "heard {heard} advertisements from {} advertisers in {seconds} s{}",
        advertisers.len(),
        record.map(|p| format!("; recorded to {}", p.display())).unwrap_or_default()
    );
    if heard == 0 {
        if let Some(e) = telemetry.source_error() {
            eprintln!("backhaul-edge scan: nothing heard: {e}");
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "ble")]
fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let (loaded, secrets) = backhaul_edge::config::EdgeConfig::load(&config)?;
            service::exit_on_any_panic();
            service::run(loaded.config, secrets)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config, addr, json } => status(config, addr, json),
        Command::Scan { seconds, record, config } => scan(seconds, record, config),
        Command::CheckConfig { config } => {
            let (loaded, secrets) = backhaul_edge::config::EdgeConfig::load(&config)?;
            println!("# {}: valid", config.display());
            for (key, var) in &loaded.from_env {
                println!("# {key} set by environment variable {var}");
            }
            print!("{}", loaded.config.effective(&secrets));
            // An operator's set_rate (issue #18) wins over the config's rate while it is there.
            match backhaul_edge::commands::RateOverride::load(&loaded.config.data_dir) {
                Ok(Some(o)) => println!(
                    "# in force instead of transport.rate_per_sec and burst: rate_per_sec = {}, burst = {} (set by \
                     command {} at {}, kept in {}; remove that file to use the config's)",
                    o.rate_per_sec,
                    o.burst,
                    o.command_id,
                    o.set_at,
                    backhaul_edge::commands::RateOverride::path(&loaded.config.data_dir).display()
                ),
                Ok(None) => {}
                Err(e) => println!("# warning: {e}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue { action } => queue_command(action),
        Command::Init { device_id, mode, url, config, credentials_dir, data_dir, api_key_file } => {
            let api_key = match (api_key_file, std::env::var("BACKHAUL_API_KEY").ok()) {
                (Some(_), Some(_)) => anyhow::bail!(
                    "both --api-key-file and BACKHAUL_API_KEY give an API key: pass one (--api-key-file - reads it \
                     from standard input, out of sight of ps and the shell's history)"
                ),
                (Some(file), None) if file.as_os_str() == "-" => {
                    use std::io::IsTerminal;
                    if std::io::stdin().is_terminal() {
                        anyhow::bail!(
                            "--api-key-file - reads the key from standard input, which is a terminal here: pipe it in, \
                             e.g. printf '%s' \"$KEY\" | sudo backhaul-edge init ... --api-key-file -"
                        );
                    }
                    let mut key = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut key)
                        .context("reading the API key from standard input (--api-key-file -)")?;
                    if key.trim().is_empty() {
                        anyhow::bail!("--api-key-file -: standard input was empty (pipe the key in)");
                    }
                    Some(key.trim().to_owned())
                }
                (Some(file), None) => Some(
                    std::fs::read_to_string(&file)
                        .with_context(|| format!("reading --api-key-file {}", file.display()))?
                        .trim()
                        .to_owned(),
                ),
                (None, key) => key.map(|k| k.trim().to_owned()),
            };
            // Written into the config as absolute paths: the service does not run where init did.
            let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let report = backhaul_edge::init::init(&backhaul_edge::init::InitOptions {
                device_id,
                mode,
                url,
                config: absolute(config),
                credentials_dir: absolute(credentials_dir),
                data_dir: absolute(data_dir),
                api_key,
            })?;
            for line in report.lines {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay { since, until, data_dir } => {
            let since = parse_time(&since).context("--since")?;
            let until = until.as_deref().map(parse_time).transpose().context("--until")?;
            if until.is_some_and(|u| u <= since) {
                anyhow::bail!("--until is not after --since: the window is empty; give one that ends after it starts");
            }
            let queue = open_offline(&data_dir)?;
            let n = queue.requeue_acked(since, until)?;
            println!(
                "requeued {n} acked batches under their original batch_id; they are sent again when the service runs"
            );
            if n == 0 {
                eprintln!(
                    "nothing acked in that window is still retained: acked batches are kept for queue.retain_acked, \
                     and pruned sooner when queue.max_bytes needs the room (`backhaul-edge queue stats` shows \
                     acked_retained); check --since and --until"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn status(config: Option<PathBuf>, addr: Option<String>, json: bool) -> Result<ExitCode> {
    let addr = match (addr, config) {
        (Some(a), _) => a,
        (None, Some(file)) => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let table: toml::Table = text.parse().with_context(|| format!("{} is not valid TOML", file.display()))?;
            std::env::var("BACKHAUL_STATUS_LISTEN").ok().unwrap_or_else(|| {
                table.get("status_listen").and_then(|v| v.as_str()).unwrap_or("127.0.0.1:9901").to_owned()
            })
        }
        (None, None) => std::env::var("BACKHAUL_STATUS_LISTEN").unwrap_or_else(|_| "127.0.0.1:9901".to_owned()),
    };
    let url = format!("http://{addr}/status");
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(std::time::Duration::from_secs(5))).build().into();
    let body = agent.get(&url).call().and_then(|mut r| r.body_mut().read_to_string()).with_context(|| {
        format!("asking {url}: is backhaul-edge running (systemctl status backhaul-edge)? Is its status_listen {addr}?")
    })?;
    if json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let report: backhaul_edge::status::StatusReport =
        serde_json::from_str(&body).with_context(|| format!("{url} did not answer with a status report"))?;
    print!("{}", backhaul_edge::status::render(&report));
    Ok(ExitCode::SUCCESS)
}

fn parse_time(s: &str) -> Result<SystemTime> {
    let t: backhaul_shared::Timestamp = s.parse().map_err(anyhow::Error::msg)?;
    let micros = u64::try_from(t.unix_micros()).context("times before 1970 are not supported")?;
    Ok(SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(micros))
}

fn open_offline(data_dir: &std::path::Path) -> Result<Queue> {
    if !data_dir.join("queue").exists() {
        anyhow::bail!("no queue in {} (is --data-dir the service's data_dir?)", data_dir.display());
    }
    // Offline tools must not shrink anything: no budget, keep every acked batch.
    let config = QueueConfig {
        max_bytes: u64::MAX,
        retain_acked: std::time::Duration::MAX / 2,
        durability: Durability::Fsync,
        ..QueueConfig::default()
    };
    Ok(Queue::open(data_dir, config)?)
}

fn queue_command(action: QueueAction) -> Result<ExitCode> {
    match action {
        QueueAction::Stats { data_dir } => {
            let queue = open_offline(&data_dir)?;
            let mut stats = serde_json::to_value(queue.stats()?)?;
            stats["disk_bytes"] = queue.disk_bytes().into();
            // Opened without a budget and just now: these describe this tool, not the service.
            if let Some(fields) = stats.as_object_mut() {
                fields.remove("budget_bytes");
                fields.remove("syncs_since_open");
            }
            println!("{}", serde_json::to_string_pretty(&stats)?);
            Ok(ExitCode::SUCCESS)
        }
        QueueAction::Verify { data_dir } => {
            let report = open_offline(&data_dir)?.verify()?;
            println!(
                "{} records intact, {} quarantined earlier, {} damaged",
                report.ok,
                report.quarantined,
                report.bad.len()
            );
            for line in &report.bad {
                println!("damaged: {line}");
            }
            Ok(if report.bad.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        QueueAction::Export { data_dir } => {
            let queue = open_offline(&data_dir)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            queue.export(|record| {
                serde_json::to_writer(&mut out, &record)?;
                out.write_all(b"\n")
            })?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
