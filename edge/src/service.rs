//! `backhaul-edge run`: the binary's wiring of the stages, and nothing else.
//!
//! Threads: the pipeline (source → batch → queue), the forwarder (queue → transport), the
//! transport's own (MQTT link / HTTP workers), the command stage (`backhaul_edge::commands`), and
//! this one, which serves the status endpoint on a
//! small tokio runtime and waits for SIGTERM or Ctrl-C. A stop: the source stops and its batch in
//! hand is enqueued, the forwarder waits briefly for answers to what is in flight, writes the
//! acks, says "offline" and disconnects; the queue closes with the last handle.
//!
//! systemd (`Type=notify`): `READY=1` once the queue is open, the status endpoint bound and the
//! stages started; `WATCHDOG=1` at half the watchdog interval, only while [`watchdog::check`] finds
//! every stage beating; `STATUS=` with the queue depth and the link; `STOPPING=1` on SIGTERM.
//! Without `NOTIFY_SOCKET` all of it is a no-op.
//!
//! A panic in any thread (a stage, the MQTT link's event loop, an HTTP worker, the status server)
//! stops the whole process at once with [`PANIC_EXIT_CODE`] and a log line naming the thread
//! ([`exit_on_any_panic`]): a process that lives on with one thread dead would never deliver again,
//! and systemd (`Restart=always`) restarts a process that exits, not one that limps. Exiting
//! without unwinding the other threads is safe for the queue: it is crash-safe by design (every
//! enqueue that returned is durable, a batch is deleted only after its ack, kill -9 is tested), so
//! the worst case is that acks not yet written are sent again and absorbed by the cloud's
//! idempotency, and the batch in hand is produced again by a resumable source.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use backhaul_edge::batch::Batcher;
use backhaul_edge::commands::{Answers, Effects, Incoming, Journal, RateOverride, Stage};
use backhaul_edge::config::{AckMode, EdgeConfig, ReplayPace, Secrets, SourceKind, TransportMode};
use backhaul_edge::decode::presence::{AddressHasher, Zones};
use backhaul_edge::decode::{Decoder, PresenceSettings, Thingy52Settings};
use backhaul_edge::forward::http::{CommandClient, HttpSettings, HttpTransport};
use backhaul_edge::forward::mqtt::protocol::publish_overhead;
use backhaul_edge::forward::mqtt::{MqttSettings, MqttTransport};
use backhaul_edge::forward::{Event, Forwarder, ForwarderConfig, Transport};
use backhaul_edge::pipeline::{self, DeviceInfo};
use backhaul_edge::queue::Queue;
use backhaul_edge::source::replay::Replay;
use backhaul_edge::source::simulated::Simulated;
use backhaul_edge::source::Source;
use backhaul_edge::status::{self, StatusSource};
use backhaul_edge::telemetry::Telemetry;
use backhaul_edge::watchdog;
use backhaul_shared::Topics;
use sd_notify::NotifyState;

/// The exit code of a process stopped by a panic (`EX_SOFTWARE`).
pub const PANIC_EXIT_CODE: i32 = 70;

/// Installs a panic hook that logs the panicking thread's name, the message and where, then exits
/// the process with [`PANIC_EXIT_CODE`] (see the module docs for why that is safe).
pub fn exit_on_any_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // The standard report first (stderr, with a backtrace when RUST_BACKTRACE is set): it
        // needs no lock that the panicking code might hold.
        default_hook(info);
        if backhaul_shared::panics::is_caught() {
            return; // expected and caught by its caller (sled on damaged files)
        }
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let message = backhaul_shared::panics::message(info.payload());
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        tracing::error!(
            thread = name,
            panic = %message,
            %at,
            exit_code = PANIC_EXIT_CODE,
            "thread `{name}` panicked: backhaul-edge exits so that systemd restarts it (the queue is crash-safe)"
        );
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

/// Runs the service until SIGTERM or Ctrl-C.
pub fn run(config: EdgeConfig, secrets: Secrets) -> Result<()> {
    let queue = Queue::open(&config.data_dir, config.queue.queue_config())?;
    // The clock floor: no time stamped from now on is older than the queue's newest batch.
    if let Some(newest) = queue.newest_batch_time().context("reading the queue's newest batch time")? {
        backhaul_edge::clock::raise_floor(newest);
    }
    let clock = backhaul_edge::clock::status();
    tracing::info!(floor = %clock.floor, synced = clock.synced, "clock floor (the build time or the newest batch in the queue)");
    let mode = match config.transport.mode {
        TransportMode::Mqtt => "mqtt",
        TransportMode::Http => "http",
    };
    let telemetry = Arc::new(Telemetry::new(&config.device_id, mode));
    if let (TransportMode::Mqtt, Some(max)) = (config.transport.mode, config.transport.mqtt.max_message_bytes) {
        // Until a broker says its own limit: batches are cut to fit ours from the start.
        let topic = Topics::new(config.transport.mqtt.topic_prefix.clone()).batches(&config.device_id);
        let max_payload = max.0.saturating_sub(publish_overhead(&topic) as u64);
        telemetry.max_payload_bytes.store(max_payload, Ordering::Relaxed);
    }
    let mut source = make_source(&config, &secrets, &queue, &telemetry)?;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind(&config.status_listen)).with_context(|| {
        format!(
            "listening on status_listen {}: is another backhaul-edge running? Pick another port with status_listen",
            config.status_listen
        )
    })?;

    // An operator's `set_rate` (issue #18) wins over the config, across restarts. A damaged
    // override must not keep an unattended device down: the config's rate is used, loudly.
    let rate_override = RateOverride::load(&config.data_dir).unwrap_or_else(|e| {
        tracing::error!(error = %e, "ignoring the rate override; using transport.rate_per_sec and burst");
        None
    });
    let (rate_per_sec, burst) = match &rate_override {
        Some(o) => {
            tracing::info!(
                rate_per_sec = o.rate_per_sec,
                burst = o.burst,
                command_id = %o.command_id,
                set_at = %o.set_at,
                config_rate = config.transport.rate_per_sec,
                "send rate from an operator's set_rate command (data_dir/rate-override.json), not the config"
            );
            (o.rate_per_sec, o.burst)
        }
        None => (config.transport.rate_per_sec, config.transport.burst),
    };
    telemetry.set_rate(rate_per_sec, burst, rate_override.as_ref());
    let journal = Journal::open(&config.data_dir)
        .with_context(|| format!("opening the command journal in {}/commands", config.data_dir.display()))?;
    let (commands_tx, commands_rx) = mpsc::channel::<Incoming>();

    let forwarder_config = ForwarderConfig {
        max_inflight: config.transport.max_inflight as usize,
        rate_per_sec,
        burst,
        status_every: config.transport.mqtt.status_interval.0,
        stop_grace: Duration::from_secs(3),
    };
    let (forwarder_handle, notify, answers): (std::thread::JoinHandle<()>, Notify, Answers) =
        match config.transport.mode {
            TransportMode::Mqtt => {
                let (tx, rx) = mpsc::channel();
                let mut settings = mqtt_settings(&config, &secrets)?;
                settings.commands = Some(commands_tx.clone());
                let transport = MqttTransport::start(settings, tx.clone())?;
                let notify = notifier(tx);
                let publish = {
                    let notify = notify.clone();
                    Box::new(move |payload| notify(Control::CommandResult(payload)))
                };
                (
                    spawn_forwarder(queue.clone(), transport, rx, telemetry.clone(), forwarder_config)?,
                    notify,
                    Answers::Mqtt { publish },
                )
            }
            TransportMode::Http => {
                let (tx, rx) = mpsc::channel();
                let settings = http_settings(&config, &secrets);
                let client = CommandClient::new(settings.clone(), &config.device_id)
                    .map_err(anyhow::Error::msg)
                    .context("transport.tls")?;
                let transport = HttpTransport::start(settings, tx.clone())?;
                (
                    spawn_forwarder(queue.clone(), transport, rx, telemetry.clone(), forwarder_config)?,
                    notifier(tx),
                    Answers::Http { client: Box::new(client), poll: config.transport.http.command_poll.0 },
                )
            }
        };

    let stop = Arc::new(AtomicBool::new(false));
    let pipeline_handle = {
        let (queue, telemetry, stop, notify) = (queue.clone(), telemetry.clone(), stop.clone(), notify.clone());
        let device = DeviceInfo {
            device_id: config.device_id.clone(),
            name: config.name.clone(),
            location: config.location.clone(),
        };
        let mut batcher = Batcher::new(config.batch.max_detections, config.batch.max_age_ms);
        std::thread::Builder::new().name("pipeline".into()).spawn(move || {
            let enqueued = || notify(Control::Enqueued);
            pipeline::run(source.as_mut(), &mut batcher, &queue, &device, &telemetry, &stop, &enqueued)
        })?
    };

    tracing::info!(
        device_id = %config.device_id,
        mode,
        status = %config.status_listen,
        data_dir = %config.data_dir.display(),
        "backhaul-edge running"
    );
    let status_source = StatusSource::new(queue.clone(), telemetry.clone());
    let commands_handle = {
        let stage = Stage {
            journal,
            effects: Effects {
                queue: queue.clone(),
                telemetry: telemetry.clone(),
                status: status_source.clone(),
                data_dir: config.data_dir.clone(),
                source_kind: match config.source.kind {
                    SourceKind::Ble => "ble",
                    SourceKind::Simulated => "simulated",
                    SourceKind::Replay => "replay",
                },
                wake_forwarder: {
                    let notify = notify.clone();
                    Box::new(move || notify(Control::Enqueued))
                },
                set_rate: {
                    let notify = notify.clone();
                    Box::new(move |rate_per_sec, burst| notify(Control::SetRate { rate_per_sec, burst }))
                },
            },
            answers,
            device_id: config.device_id.clone(),
            key: secrets.api_key.as_ref().map(|k| k.expose().as_bytes().to_vec()),
            fetch_error: None,
        };
        std::thread::Builder::new().name("commands".into()).spawn(move || stage.run(commands_rx))?
    };
    let limits = watchdog::Limits::new(config.queue.block_timeout.0, sd_notify::watchdog_enabled());
    backhaul_shared::link::notify(&[NotifyState::Ready]);
    let pipeline_result = runtime.block_on(async {
        let pinger = tokio::spawn(watchdog_loop(status_source.clone(), limits));
        let sampler = {
            let s = status_source.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    // It reads the queue, which can wait for a sync: never on this runtime, which
                    // also serves /status and pings the watchdog.
                    let s = s.clone();
                    let _ = tokio::task::spawn_blocking(move || s.sample()).await;
                }
            })
        };
        let server = tokio::spawn(async move {
            let listener = status::CappedListener::new(listener);
            if let Err(e) = axum::serve(listener, status::router(status_source)).await {
                tracing::error!(error = %e, "the status endpoint failed");
            }
        });
        // Until a stop is asked, or the pipeline ends on a storage failure (fatal).
        let pipeline_failed = async {
            while !pipeline_handle.is_finished() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("stopping: enqueueing the batch in hand, finishing what is in flight"),
            _ = pipeline_failed => {}
        }
        backhaul_shared::link::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
        stop.store(true, Ordering::Relaxed);
        pinger.abort();
        sampler.abort();
        server.abort();
        let result = tokio::task::spawn_blocking(move || pipeline_handle.join()).await;
        match result {
            Ok(Ok(r)) => r.context("the queue failed to store a batch (the service exits so systemd restarts it on a reopened queue)"),
            Ok(Err(_)) => Err(anyhow::anyhow!("the pipeline thread panicked")),
            Err(e) => Err(anyhow::anyhow!("joining the pipeline: {e}")),
        }
    });
    // The command stage first (a command in hand finishes), then the forwarder after the
    // pipeline, so the batch in hand is on disk first.
    let _ = commands_tx.send(Incoming::Shutdown);
    if commands_handle.join().is_err() {
        tracing::error!("the command stage panicked");
    }
    notify(Control::Shutdown);
    if forwarder_handle.join().is_err() {
        tracing::error!("the forwarder thread panicked");
    }
    drop(queue);
    pipeline_result?;
    tracing::info!("stopped");
    Ok(())
}

/// What the other stages tell the forwarder, whatever its transport.
enum Control {
    /// A batch was enqueued (or requeued by a replay).
    Enqueued,
    Shutdown,
    /// An operator's `set_rate`.
    SetRate {
        rate_per_sec: u32,
        burst: u32,
    },
    /// A sealed command result to publish (MQTT).
    CommandResult(Vec<u8>),
}

type Notify = Arc<dyn Fn(Control) + Send + Sync>;

fn notifier<E: Send + 'static>(tx: mpsc::Sender<Event<E>>) -> Notify {
    Arc::new(move |control| {
        let _ = tx.send(match control {
            Control::Enqueued => Event::Enqueued,
            Control::Shutdown => Event::Shutdown,
            Control::SetRate { rate_per_sec, burst } => Event::SetRate { rate_per_sec, burst },
            Control::CommandResult(payload) => Event::CommandResult(payload),
        });
    })
}

fn spawn_forwarder<T: Transport + Send + 'static>(
    queue: Queue,
    transport: T,
    rx: mpsc::Receiver<Event<T::Event>>,
    telemetry: Arc<Telemetry>,
    config: ForwarderConfig,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("forwarder".into())
        .spawn(move || Forwarder::new(queue, transport, rx, telemetry, config).run())
}

/// The BLE scanner's settings from the config.
#[cfg(feature = "ble")]
pub fn ble_settings(config: &EdgeConfig) -> backhaul_edge::source::ble::BleSettings {
    backhaul_edge::source::ble::BleSettings {
        adapter: config.source.adapter.clone(),
        services: config.source.services.clone(),
        stall_after: Duration::from_secs(config.source.stall_after_s.max(1)),
    }
}

#[cfg_attr(not(feature = "ble"), allow(unused_variables))]
fn make_source(
    config: &EdgeConfig,
    secrets: &Secrets,
    queue: &Queue,
    telemetry: &Arc<Telemetry>,
) -> Result<Box<dyn Source>> {
    let s = &config.source;
    match s.kind {
        SourceKind::Simulated => {
            let position = queue.source_position()?;
            let sim = Simulated::resume(s.seed, s.devices, s.count, position.as_deref())
                .map_err(anyhow::Error::msg)
                .context("the queue's stored source position does not fit the simulated source (was source.kind changed? move the data_dir aside to start over)")?;
            if position.is_some() {
                tracing::info!(next_index = sim.next_index(), "simulated source resumes after the last durable batch");
            }
            Ok(Box::new(sim.with_rate(s.rate)))
        }
        SourceKind::Replay => {
            let path = s.path.as_deref().context("source.path: the replay source needs a capture file")?;
            let position = queue.source_position()?;
            let replay = Replay::resume(path, decoder(config, secrets)?, position.as_deref(), s.pace == ReplayPace::Recorded)
                .map_err(anyhow::Error::msg)
                .context("source.kind = \"replay\" (if the stored position is not from this capture, move the data_dir aside to start over)")?;
            Ok(Box::new(replay.with_telemetry(telemetry.clone())))
        }
        #[cfg(feature = "ble")]
        SourceKind::Ble => {
            use backhaul_edge::source::ble::{Ble, Scanner};
            let scanner = Scanner::start(ble_settings(config), telemetry.clone())?;
            Ok(Box::new(Ble::new(scanner, decoder(config, secrets)?)))
        }
        #[cfg(not(feature = "ble"))]
        SourceKind::Ble => anyhow::bail!(
            "source.kind = \"ble\": this backhaul-edge was built without BLE (cargo feature `ble`); use \"replay\" or \"simulated\""
        ),
    }
}

/// The decoders the config asks for.
pub fn decoder(config: &EdgeConfig, secrets: &Secrets) -> Result<Decoder> {
    let d = &config.decode;
    let presence = if d.profiles.iter().any(|p| p == "presence") {
        let secret = secrets.hash_secret.as_ref().context("the presence profile needs a hash secret")?;
        let hasher = AddressHasher::new(secret.expose().as_bytes(), d.hash_rotation.map(|r| r.0))
            .context("the hash secret is empty")?;
        Some(PresenceSettings {
            hasher,
            zones: Zones { near_dbm: d.near_dbm, medium_dbm: d.medium_dbm },
            smoothing: d.smoothing.0,
        })
    } else {
        None
    };
    let thingy52 = d
        .profiles
        .iter()
        .any(|p| p == "thingy52")
        .then_some(Thingy52Settings { company_id: d.company_id, payload_len: d.payload_len });
    Ok(Decoder::new(presence, thingy52, Duration::from_secs(d.dedup_window_s)))
}

fn mqtt_settings(config: &EdgeConfig, secrets: &Secrets) -> Result<MqttSettings> {
    let m = &config.transport.mqtt;
    let (host, port, _tls) = m.broker().map_err(anyhow::Error::msg).context("transport.mqtt.url")?;
    Ok(MqttSettings {
        endpoint: backhaul_shared::link::MqttEndpoint {
            host,
            port,
            username: m.username.clone(),
            password: secrets.mqtt_password.as_ref().map(|s| s.expose().to_owned()),
            tls: secrets.tls.as_ref().map(|t| t.rustls_config("transport.tls")).transpose()?,
        },
        client_id: m.client_id.clone().unwrap_or_else(|| format!("backhaul-edge-{}", config.device_id)),
        topics: Topics::new(m.topic_prefix.clone()),
        device_id: config.device_id.clone(),
        ack_on_puback: m.ack == AckMode::Broker,
        ack_timeout: config.transport.ack_timeout.0,
        backoff_max: config.transport.backoff_max.0,
        max_inflight: config.transport.max_inflight as usize,
        keep_alive: m.keep_alive.0,
        protocol: m.protocol,
        max_message_bytes: m.max_message_bytes.map(|b| usize::try_from(b.0).unwrap_or(usize::MAX)),
        ack_key: secrets.api_key.as_ref().map(|s| s.expose().as_bytes().to_vec()),
        commands: None,
    })
}

fn http_settings(config: &EdgeConfig, secrets: &Secrets) -> HttpSettings {
    let h = &config.transport.http;
    HttpSettings {
        base_url: h.url.clone(),
        api_key: secrets.api_key.as_ref().map(|s| s.expose().to_owned()),
        workers: (h.workers as usize).min(config.transport.max_inflight as usize).max(1),
        timeout: h.timeout.0,
        backoff_max: config.transport.backoff_max.0,
        tls: secrets.tls.clone(),
        device_id: Some(config.device_id.clone()),
    }
}

/// Pings the systemd watchdog at half its interval while every stage beats, and keeps `STATUS=`
/// current. The judgement is [`watchdog::check`]; a stalled stage is logged once per stall.
async fn watchdog_loop(source: StatusSource, limits: watchdog::Limits) {
    let interval = sd_notify::watchdog_enabled().map(|d| d / 2).unwrap_or(Duration::from_secs(5));
    let interval = interval.max(Duration::from_millis(100));
    let mut every = tokio::time::interval(interval);
    let mut stalled = false;
    loop {
        every.tick().await;
        let t = &source.telemetry;
        let now_ms = t.started.elapsed().as_millis() as u64;
        let beats = (t.source_beat_ms.load(Ordering::Relaxed), t.forwarder_beat_ms.load(Ordering::Relaxed));
        match watchdog::check(&limits, now_ms, beats.0, beats.1) {
            Ok(()) => {
                stalled = false;
                let s = source.clone();
                let status = tokio::task::spawn_blocking(move || s.report()).await.ok().and_then(Result::ok);
                let line = match status {
                    Some(r) => format!(
                        "queue: {} pending, {} in flight; link {} {}",
                        r.queue.pending,
                        r.queue.in_flight,
                        r.link.mode,
                        if r.link.connected { "up" } else { "down" }
                    ),
                    None => "queue unreadable".to_owned(),
                };
                backhaul_shared::link::notify(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
            }
            Err((stage, silent)) => {
                if !stalled {
                    tracing::error!(
                        stage = stage.name(),
                        ?silent,
                        "a stage stopped making progress: no more watchdog pings, systemd will restart the service"
                    );
                    backhaul_shared::link::notify(&[NotifyState::Status(&format!(
                        "{} stalled for {silent:?}",
                        stage.name()
                    ))]);
                }
                stalled = true;
            }
        }
    }
}

/// SIGTERM (systemd stop) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
