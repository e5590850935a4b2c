//! The `backhaul-cloud` command line (SPEC.md, "Cloud command line and configuration"). Glue only.

mod demo;
mod operator;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use backhaul_cloud::config::{ApiKeys, CloudConfig};
use backhaul_cloud::http::{router, App};
use backhaul_cloud::ingest::Ingest;
use backhaul_cloud::progress::Ingresses;
use backhaul_cloud::store::Store;
use backhaul_shared::Limits;
use clap::{Parser, Subcommand};
use tokio::sync::{watch, Semaphore};

#[derive(Debug, Parser)]
#[command(name = "backhaul-cloud", version, about = "Cloud ingest for backhaul: stores every batch exactly once")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve MQTT and HTTP ingest.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Checks a config, its API keys and every TLS certificate and key it names, without serving;
    /// prints what would be used (never a key or a password).
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Re-derives the stored batches' time index (first and last detection time) from their
    /// payloads, after a decoder fix; nothing is stored twice. Safe while `serve` runs on the same
    /// database. Exit 1 if a stored batch no longer decodes.
    Reprocess {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only batches received at or after this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only this device's batches.
        #[arg(long, value_name = "DEVICE_ID")]
        device: Option<String>,
    },
    /// The devices: online, last seen, batches, detections, gaps, queued (operator CLI: a running
    /// cloud's HTTP API with the fleet key in BACKHAUL_API_KEY).
    Devices {
        #[command(flatten)]
        api: operator::Api,
    },
    /// A device's missing seq ranges.
    Gaps {
        device: String,
        #[command(flatten)]
        api: operator::Api,
    },
    /// Sends a command to a device (it runs once, online; `commands DEVICE` shows the result).
    #[command(name = "command")]
    Send {
        device: String,
        #[command(subcommand)]
        send: operator::Send,
        #[command(flatten)]
        api: operator::Api,
    },
    /// A device's commands and their results.
    Commands {
        device: String,
        #[command(flatten)]
        api: operator::Api,
    },
    /// The newest dead letters (unusable messages kept for inspection).
    DeadLetters {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        api: operator::Api,
    },
    /// The cloud's counters.
    Stats {
        #[command(flatten)]
        api: operator::Api,
    },
    /// A newcomer's first command: the cloud, a private Mosquitto and a few simulated Pis.
    Demo {
        /// How long the Pis produce.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// How many simulated Pis.
        #[arg(long, default_value_t = 3)]
        devices: usize,
        /// Detections per second per Pi.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Use HTTP even if Mosquitto is installed.
        #[arg(long)]
        http: bool,
        /// Do not kill a Pi and the broker mid-run.
        #[arg(long)]
        no_chaos: bool,
        /// Every link over TLS with client certificates: a private CA made with openssl in the
        /// temp dir (deploy/pki), Mosquitto's TLS listener with the shipped ACL, or HTTPS with --http.
        #[arg(long)]
        tls: bool,
    },
}

fn main() -> ExitCode {
    backhaul_shared::logging::init("info");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check_config(config),
        Command::Reprocess { config, since, device } => reprocess(config, since, device),
        Command::Devices { api } => operator::devices(api),
        Command::Gaps { device, api } => operator::gaps(api, device),
        Command::Send { device, send, api } => operator::command(api, device, send),
        Command::Commands { device, api } => operator::commands(api, device),
        Command::DeadLetters { limit, api } => operator::dead_letters(api, limit),
        Command::Stats { api } => operator::stats(api),
        Command::Demo { seconds, devices, rate, http, no_chaos, tls } => {
            return match demo::run(demo::DemoOptions { seconds, devices: devices.max(1), rate, http, no_chaos, tls }) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("backhaul-cloud demo: error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backhaul-cloud: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(config_file: PathBuf) -> Result<()> {
    let config = CloudConfig::load(&config_file)?.config;
    let keys = ApiKeys::load(config.auth.keys_file.as_deref(), std::env::var("BACKHAUL_API_KEYS").ok().as_deref())?;
    let now = backhaul_shared::tls::now();
    println!("config {}: ok", config_file.display());
    println!("listen: {}{}", config.listen, if config.tls.is_some() { " (HTTPS)" } else { " (plain HTTP)" });
    println!("database: {}", redact(&config.database));
    println!("API keys: {}", keys.len());
    if let Some(tls) = &config.tls {
        let (_, warnings) = tls.load(now)?;
        println!(
            "tls: certificate {} ({}); client certificates {}",
            tls.cert_file.display(),
            if warnings.is_empty() { "valid" } else { "see warnings" },
            match &tls.client_ca_file {
                Some(f) => format!("required, issued by {}", f.display()),
                None => "not asked for".into(),
            }
        );
        for w in warnings {
            println!("warning: {w}");
        }
    }
    if config.compat.any() {
        let compat = backhaul_cloud::compat::Compat::new(config.compat.clone());
        let group = config.mqtt.as_ref().map_or("ingest", |m| m.shared_group.as_str());
        println!("compat (seed senders' MQTT topics): {}", compat.filters(group).join(", "));
    }
    if let Some(m) = &config.mqtt {
        println!(
            "mqtt: {}{}",
            m.url,
            if m.username.is_some() { " (with a username; password from BACKHAUL_MQTT_PASSWORD)" } else { "" }
        );
        if let Some(material) = m.tls_material()? {
            println!(
                "mqtt.tls: {} trusted root(s){}, client certificate {}{}",
                material.roots.len(),
                if material.webpki { " + Mozilla's" } else { "" },
                if material.identity.is_some() { "set (key never shown)" } else { "not set" },
                material.server_name.as_deref().map(|n| format!(", server_name {n}")).unwrap_or_default()
            );
            for w in material.warnings {
                println!("warning: {w}");
            }
        }
    }
    Ok(())
}

fn reprocess(config_file: PathBuf, since: Option<String>, device: Option<String>) -> Result<()> {
    let config = CloudConfig::load(&config_file)?.config;
    let since_us = since
        .map(|s| {
            s.parse::<backhaul_shared::Timestamp>()
                .map(|t| t.unix_micros())
                .map_err(|e| anyhow::anyhow!("--since `{s}` is not an RFC 3339 time like 2026-11-29T00:00:00Z: {e}"))
        })
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let store = Store::connect(&config.database)
            .await
            .with_context(|| format!("opening the database {} (key `database`)", redact(&config.database)))?;
        let done = store.reprocess(since_us, device.as_deref()).await.context("reprocessing")?;
        println!("reprocessed {} batches: their time index was re-derived from their payloads", done.reindexed);
        if done.reindexed + done.skipped + done.undecodable == 0 {
            eprintln!(
                "note: no stored batch matched{}{}; check the device id and the time",
                device.as_deref().map(|d| format!(" --device `{d}`")).unwrap_or_default(),
                if since_us.is_some() { " and --since" } else { "" }
            );
        }
        if done.skipped > 0 {
            println!(
                "skipped {} batches stored before the payload was kept (schema 4): their detection rows are \
                 their only copy and were left as they are",
                done.skipped
            );
        }
        if done.undecodable > 0 {
            anyhow::bail!(
                "{} stored batches no longer decode (their batch_ids are in the log above): they stay stored, \
                 their detections are left out of reads; report it with the log",
                done.undecodable
            );
        }
        Ok(())
    })
}

fn serve(config_file: PathBuf) -> Result<()> {
    log_panics();
    let loaded = CloudConfig::load(&config_file)?;
    let config = loaded.config;
    let keys = ApiKeys::load(config.auth.keys_file.as_deref(), std::env::var("BACKHAUL_API_KEYS").ok().as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let store = Store::connect(&config.database)
            .await
            .with_context(|| format!("opening the database {} (key `database`)", redact(&config.database)))?;
        let rates = backhaul_cloud::ratelimit::DeviceLimits::new(config.device_rate_per_sec, config.device_burst);
        let ingest = Arc::new(Ingest::new(store, Limits { max_detections: config.max_detections }, rates));
        let ingresses = Arc::new(Ingresses::new(config.ingest_stall_after.0));
        let max_body_bytes = usize::try_from(config.max_body_bytes.0).unwrap_or(usize::MAX);
        let commands_queued = Arc::new(tokio::sync::Notify::new());
        let app = Arc::new(App {
            ingest: ingest.clone(),
            keys: keys.clone(),
            permits: Semaphore::new(config.max_concurrent_ingest),
            fail_next_bulk: backhaul_cloud::http::failpoint_bulk_500().into(),
            ingresses: ingresses.clone(),
            max_body_bytes,
            body_read_timeout: config.body_read_timeout.0,
            client_certificates: config.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()),
            commands_queued: commands_queued.clone(),
            max_live_clients: config.live_clients() as u64,
        });
        let tls = match &config.tls {
            None => None,
            Some(settings) => {
                let (server, warnings) = settings.load(backhaul_shared::tls::now()).context("key `tls`")?;
                for w in warnings {
                    tracing::warn!("{w}");
                }
                let state: backhaul_cloud::serve::TlsState = Arc::new(std::sync::RwLock::new(server));
                Some((settings.clone(), state))
            }
        };
        // SIGHUP is handled from before READY whether or not there is a [tls] to reload: its
        // default action would end the process without draining what is in hand.
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        tokio::spawn(reload_tls_on_sighup(hangup, tls.clone()));
        let tls = tls.map(|(_, state)| state);
        let listener = tokio::net::TcpListener::bind(config.listen_addr()?)
            .await
            .with_context(|| format!("listening on {} (key `listen`): is another service using it?", config.listen))?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        // The broker link's TLS, loaded once, before READY: a bad file stops the start here.
        let mqtt_tls = match &config.mqtt {
            Some(m) => match m.tls_material().context("key `mqtt.tls`")? {
                Some(material) => {
                    for w in &material.warnings {
                        tracing::warn!("{w}");
                    }
                    Some(material.rustls_config("mqtt.tls")?)
                }
                None => None,
            },
            None => None,
        };
        let mqtt = config.mqtt.clone().map(|m| {
            let password = std::env::var("BACKHAUL_MQTT_PASSWORD").ok();
            let settings = backhaul_cloud::mqtt::Settings {
                max_message_bytes: max_body_bytes,
                progress: ingresses.clone(),
                keys,
                tls: mqtt_tls,
                commands_queued: commands_queued.clone(),
                compat: Arc::new(backhaul_cloud::compat::Compat::new(config.compat.clone())),
            };
            tokio::spawn(backhaul_cloud::mqtt::run(ingest.clone(), m, password, settings, stop_rx.clone()))
        });
        tracing::info!(%addr, mqtt = config.mqtt.is_some(), compat = ?config.compat, "backhaul-cloud serving");
        println!("listening on {addr}");
        backhaul_shared::link::notify(&[sd_notify::NotifyState::Ready]);
        let pinger = tokio::spawn(watchdog_loop(ingest.clone(), ingresses.clone()));
        // Duplicate and conflict counts are held in memory between writes: written every 5 s, so
        // that a replica that only sees resends shows them in every replica's stats. Its own task,
        // never aborted: a write that waits must not hold up the watchdog, and the flush at the
        // stop waits for one in progress.
        {
            let ingest = ingest.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
                for round in 0u64.. {
                    every.tick().await;
                    if let Err(e) = ingest.flush_counts().await {
                        tracing::warn!(error = %e, "writing the duplicate counts failed (kept; tried again in 5 s)");
                    }
                    // About once a minute: commands no device answered in time fail (issue #18).
                    if round % 12 == 0 {
                        let before = backhaul_shared::Timestamp::now().unix_micros()
                            - backhaul_cloud::store::EXPIRE_AFTER.as_micros() as i64;
                        match ingest.commands().expire(before).await {
                            Ok(0) => {}
                            Ok(n) => tracing::warn!(commands = n, "commands unanswered past their time to live failed as expired"),
                            Err(e) => tracing::warn!(error = %e, "expiring old commands failed; tried again in a minute"),
                        }
                    }
                }
            });
        }
        let limits = backhaul_cloud::serve::Limits {
            max_connections: config.max_connections,
            header_read_timeout: config.header_read_timeout.0,
        };
        let server = backhaul_cloud::serve::serve(listener, router(app), limits, tls, stop_rx.clone());
        let server = tokio::spawn(async move {
            server.await;
            anyhow::Ok(())
        });
        // Every long-lived task runs until the stop is asked: one that ends before died (a panic,
        // or an error it cannot get over). Ingest must not stay dead with the process up, so the
        // service then stops with an error and systemd restarts it.
        let (mut server, mut mqtt, mut pinger) = (Some(server), mqtt, Some(pinger));
        let died = tokio::select! {
            _ = shutdown_signal() => None,
            r = async { server.as_mut().expect("set").await } => {
                server = None;
                Some(task_ended("the HTTP server", r))
            }
            r = async { mqtt.as_mut().expect("set").await }, if mqtt.is_some() => {
                mqtt = None;
                Some(task_ended("MQTT ingest", r))
            }
            r = async { pinger.as_mut().expect("set").await } => {
                pinger = None;
                Some(task_ended("the watchdog task", r.map(Ok::<(), anyhow::Error>)))
            }
        };
        backhaul_shared::link::notify(&[sd_notify::NotifyState::Stopping]);
        if let Some(task) = pinger {
            task.abort();
        }
        let _ = stop_tx.send(true);
        // The dashboards' live streams end now, not at the HTTP drain's deadline.
        ingest.live.close();
        if let Some(e) = died {
            tracing::error!(error = %format!("{e:#}"), "a task of the service died: stopping with an error so that systemd restarts it");
            // What is still up finishes what it has in hand, briefly; its own errors are secondary.
            let rest = async {
                if let Some(s) = server {
                    let _ = s.await;
                }
                if let Some(m) = mqtt {
                    let _ = m.await;
                }
            };
            if tokio::time::timeout(std::time::Duration::from_secs(5), rest).await.is_err() {
                tracing::warn!("the other tasks did not stop within 5 s; exiting anyway");
            }
            let _ = ingest.flush_counts().await;
            return Err(e);
        }
        tracing::info!("shutting down: finishing the requests and messages in hand");
        // Bounded (systemd's TimeoutStopSec is 30 s): with the database down, a message in hand
        // would be retried forever. What is not PUBACKed by then is redelivered after the restart.
        let finish = async {
            if let Some(s) = server {
                s.await
                    .map_err(|e| task_ended::<anyhow::Error>("the HTTP server", Err(e)))?
                    .context("the HTTP server")?;
            }
            if let Some(m) = mqtt {
                m.await.map_err(|e| task_ended::<anyhow::Error>("MQTT ingest", Err(e)))?.context("MQTT ingest")?;
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(STOP_GRACE, finish).await {
            Ok(r) => r?,
            Err(_) => anyhow::bail!(
                "the requests and messages in hand did not finish within {STOP_GRACE:?} (is the database \
                 answering?); stopping anyway: the broker redelivers what was not PUBACKed"
            ),
        }
        ingest.flush_counts().await.context("writing the last duplicate counts")?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Loads `[tls]` again on every SIGHUP (a renewed certificate; `systemctl reload`); new
/// connections use it, the open ones keep theirs. A file that does not load is logged and the old
/// certificate stays. Without `[tls]` a SIGHUP is logged and changes nothing.
async fn reload_tls_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    tls: Option<(backhaul_shared::tls::ServerTls, backhaul_cloud::serve::TlsState)>,
) {
    let Some((settings, state)) = tls else {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: nothing to reload ([tls] is not set); the service goes on");
        }
        return;
    };
    while hup.recv().await.is_some() {
        match settings.load(backhaul_shared::tls::now()) {
            Ok((server, warnings)) => {
                for w in warnings {
                    tracing::warn!("{w}");
                }
                *state.write().unwrap_or_else(|p| p.into_inner()) = server;
                tracing::info!(cert_file = %settings.cert_file.display(), "TLS certificate reloaded (SIGHUP)");
            }
            Err(e) => {
                tracing::error!(error = %e, "reloading the TLS certificate failed (SIGHUP); still serving the old one")
            }
        }
    }
}

/// The error for a long-lived task that ended before the stop: its panic, its error, or that it
/// returned when it never should.
fn task_ended<E>(what: &str, r: Result<Result<(), E>, tokio::task::JoinError>) -> anyhow::Error
where
    E: Into<anyhow::Error>,
{
    match r {
        Err(e) => anyhow::anyhow!("{what} panicked: {}", backhaul_cloud::mqtt::panic_message(e)),
        Ok(Err(e)) => e.into().context(format!("{what} failed")),
        Ok(Ok(())) => anyhow::anyhow!("{what} ended unexpectedly"),
    }
}

/// Logs every panic, with the thread and where, before the default hook prints it: a panic in a
/// task is otherwise only seen if someone awaits that task.
fn log_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = backhaul_shared::panics::message(info.payload());
        let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
        let location = info.location().map(|l| l.to_string()).unwrap_or_default();
        tracing::error!(thread, location, "panic: {message}");
        default(info);
    }));
}

/// `WATCHDOG=1` at half the watchdog interval while the database answers and no ingress is stalled
/// (`ingest_stall_after`); a wedged database, runtime or ingress stops the pings and systemd
/// restarts the service.
async fn watchdog_loop(ingest: Arc<Ingest>, ingresses: Arc<Ingresses>) {
    let watchdog = sd_notify::watchdog_enabled();
    // Without a watchdog, stalls are still looked for (and logged) every 5 s.
    let period =
        watchdog.map_or(std::time::Duration::from_secs(5), |i| (i / 2).max(std::time::Duration::from_millis(100)));
    let mut every = tokio::time::interval(period);
    loop {
        every.tick().await;
        backhaul_cloud::failpoint::panic_in("watchdog");
        let stalls = ingresses.stalls();
        if !stalls.is_empty() {
            for (_, why) in stalls {
                tracing::error!("{why}");
            }
        } else if watchdog.is_some() {
            if ingest.ping().await {
                backhaul_shared::link::notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::error!("the database does not answer: no watchdog ping");
            }
        }
    }
}

/// How long a stop waits for the requests and messages in hand.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// SIGTERM (systemd stop) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A database URL without its password.
fn redact(url: &str) -> String {
    let url = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    };
    match url.find("password=") {
        Some(i) => {
            let end = url[i..].find('&').map_or(url.len(), |e| i + e);
            format!("{}password=***{}", &url[..i], &url[end..])
        }
        None => url,
    }
}
