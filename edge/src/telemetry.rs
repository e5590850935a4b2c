//! What the running service knows about itself, shared between its stages and the status endpoint:
//! counters and flags in atomics (written by one stage each, read by anyone), so no stage ever
//! waits on another to report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

/// Shared by the source, the forwarder, the link and the status endpoint.
#[derive(Debug)]
pub struct Telemetry {
    pub device_id: String,
    /// `mqtt` or `http`.
    pub mode: &'static str,
    pub started: Instant,
    /// The link to the cloud is up (MQTT connected; HTTP `/health` answered since the last failure).
    pub connected: AtomicBool,
    /// Times the link came up.
    pub link_ups: AtomicU64,
    /// When the last batch was acknowledged, ms since the epoch (0: never since start).
    pub last_ack_ms: AtomicU64,
    /// Batches handed to the link, and those among them that were sends of a batch already sent.
    pub sent_batches: AtomicU64,
    pub resent_batches: AtomicU64,
    /// Batches and detections acknowledged since start; duplicates among them (the cloud had it).
    pub acked_batches: AtomicU64,
    pub acked_detections: AtomicU64,
    pub acked_duplicates: AtomicU64,
    /// Batches the cloud refused for good since start (dead-lettered).
    pub rejected_batches: AtomicU64,
    /// Detections read from the source since start.
    pub source_detections: AtomicU64,
    /// The source has produced everything it will (a `count` reached, a replay's end).
    pub source_done: AtomicBool,
    /// Detections from the source that broke the wire contract and were dropped before batching,
    /// by reason (`backhaul_shared::batch::DETECTION_REASONS`), since start. A std Mutex: the
    /// pipeline's thread writes it only for a bad detection, the status endpoint reads it.
    pub dropped_invalid: Mutex<BTreeMap<&'static str, u64>>,
    /// BLE: scans restarted or adapters reopened after a stall or a failure.
    pub source_recoveries: AtomicU64,
    /// Replay: capture lines that were not advertisements, skipped.
    pub source_bad_lines: AtomicU64,
    /// The source's last error (BLE: adapter or bluetoothd trouble).
    pub source_error: Mutex<Option<String>>,
    /// Heartbeats: ms since `started` of each stage's last turn of its loop (for the watchdog).
    pub source_beat_ms: AtomicU64,
    pub forwarder_beat_ms: AtomicU64,
    /// The last link error, for `/status`.
    pub last_error: Mutex<Option<String>>,
    /// The largest batch payload the link can carry, bytes (0: no known limit): the broker's
    /// maximum packet size (MQTT 5 CONNACK) or `transport.mqtt.max_message_bytes`, less the
    /// PUBLISH overhead. Written by the forwarder, read by the pipeline, which cuts batches to fit.
    pub max_payload_bytes: AtomicU64,
    /// Batches sent and unanswered past the ack timeout, now; and since when (ms since the epoch).
    pub acks_overdue: AtomicU64,
    pub acks_overdue_since_ms: AtomicU64,
    /// Sends the broker refused (an MQTT 5 PUBACK reason code of 0x80 or more) since start.
    pub refused_batches: AtomicU64,
    /// Acks ignored since start (issue #16): without a valid MAC, and (valid) for a batch not in
    /// flight.
    pub acks_unverified: AtomicU64,
    pub acks_not_in_flight: AtomicU64,
    /// Queued batches too large for the link, cut into batches that fit (or, when they could not
    /// be cut, dead-lettered) since start.
    pub cut_batches: AtomicU64,
    /// Commands from the cloud (issue #18) run since start; delivered again and answered from the
    /// journal; ignored for a MAC that does not verify.
    pub commands_run: AtomicU64,
    pub commands_redelivered: AtomicU64,
    pub commands_unverified: AtomicU64,
    /// `flush`: the command stage numbers its requests (`flush_requests`); the pipeline cuts its
    /// open batch and sets `flushes_done` to the newest request it served, and
    /// `last_flush_detections` to how many detections that cut held.
    pub flush_requests: AtomicU64,
    pub flushes_done: AtomicU64,
    pub last_flush_detections: AtomicU64,
    /// `rescan`: wakes the BLE scanner, which reopens its adapter.
    pub rescan: tokio::sync::Notify,
    /// The send pace in force and where it comes from (the config, or an operator's `set_rate`).
    pub rate: Mutex<RateInForce>,
    /// Batches per second the backlog (pending + in flight) shrank over the last 10 s, in
    /// thousandths, negative when it grew (written by the status sampler once a second).
    pub drain_milli: std::sync::atomic::AtomicI64,
}

/// The send pace in force (`/status` `rate`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub struct RateInForce {
    pub rate_per_sec: u32,
    pub burst: u32,
    /// `config`, or `command {id} at {time}` (`data_dir/rate-override.json`).
    pub source: String,
}

/// How fast the backlog drains (`/status` `drain`; issue #18).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, Default)]
pub struct Drain {
    /// Batches per second the backlog (pending + in flight) shrank over the last 10 s: acks
    /// less what arrived (negative: it grew).
    pub rate: f64,
    /// Seconds until nothing is pending at that rate: 0 with nothing pending (only batches in
    /// flight: keeping up); absent while the backlog does not shrink.
    pub eta_s: Option<u64>,
}

impl Telemetry {
    pub fn new(device_id: &str, mode: &'static str) -> Self {
        Self {
            device_id: device_id.to_owned(),
            mode,
            started: Instant::now(),
            connected: AtomicBool::new(false),
            link_ups: AtomicU64::new(0),
            last_ack_ms: AtomicU64::new(0),
            sent_batches: AtomicU64::new(0),
            resent_batches: AtomicU64::new(0),
            acked_batches: AtomicU64::new(0),
            acked_detections: AtomicU64::new(0),
            acked_duplicates: AtomicU64::new(0),
            rejected_batches: AtomicU64::new(0),
            source_detections: AtomicU64::new(0),
            source_done: AtomicBool::new(false),
            dropped_invalid: Mutex::new(BTreeMap::new()),
            source_recoveries: AtomicU64::new(0),
            source_bad_lines: AtomicU64::new(0),
            source_error: Mutex::new(None),
            source_beat_ms: AtomicU64::new(0),
            forwarder_beat_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
            max_payload_bytes: AtomicU64::new(0),
            acks_overdue: AtomicU64::new(0),
            acks_overdue_since_ms: AtomicU64::new(0),
            refused_batches: AtomicU64::new(0),
            acks_unverified: AtomicU64::new(0),
            acks_not_in_flight: AtomicU64::new(0),
            cut_batches: AtomicU64::new(0),
            commands_run: AtomicU64::new(0),
            commands_redelivered: AtomicU64::new(0),
            commands_unverified: AtomicU64::new(0),
            flush_requests: AtomicU64::new(0),
            flushes_done: AtomicU64::new(0),
            last_flush_detections: AtomicU64::new(0),
            rescan: tokio::sync::Notify::new(),
            rate: Mutex::new(RateInForce::default()),
            drain_milli: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Records the pace in force: from the config (`by` None) or an operator's override.
    pub fn set_rate(&self, rate_per_sec: u32, burst: u32, by: Option<&crate::commands::RateOverride>) {
        let source = match by {
            None => "config".to_owned(),
            Some(o) => format!("command {} at {} (data_dir/rate-override.json)", o.command_id, o.set_at),
        };
        *self.rate.lock().unwrap_or_else(|p| p.into_inner()) = RateInForce { rate_per_sec, burst, source };
    }

    pub fn rate(&self) -> RateInForce {
        self.rate.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The drain rate, and the time until `pending` batches (with `in_flight` more out) are sent
    /// at it.
    pub fn drain(&self, pending: u64, in_flight: u64) -> Drain {
        let rate = self.drain_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        let eta_s = if pending == 0 {
            Some(0)
        } else if rate > 0.0 {
            Some(((pending + in_flight) as f64 / rate).ceil() as u64)
        } else {
            None
        };
        Drain { rate, eta_s }
    }

    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn since_start_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn beat_source(&self) {
        self.source_beat_ms.store(self.since_start_ms(), Ordering::Relaxed);
    }

    pub fn beat_forwarder(&self) {
        self.forwarder_beat_ms.store(self.since_start_ms(), Ordering::Relaxed);
    }

    pub fn set_error(&self, error: impl Into<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.into());
    }

    pub fn set_source_error(&self, error: impl Into<String>) {
        *self.source_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.into());
    }

    pub fn source_error(&self) -> Option<String> {
        self.source_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts a detection dropped for `reason`; returns the count for that reason so far.
    pub fn count_invalid(&self, reason: &'static str) -> u64 {
        let mut counts = self.dropped_invalid.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(reason).or_insert(0);
        *n += 1;
        *n
    }

    /// The dropped invalid detections by reason, since start.
    pub fn dropped_invalid(&self) -> BTreeMap<String, u64> {
        let counts = self.dropped_invalid.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    pub fn record_ack(&self, detections: Option<u32>, duplicate: bool) {
        self.acked_batches.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = detections {
            self.acked_detections.fetch_add(u64::from(d), Ordering::Relaxed);
        }
        if duplicate {
            self.acked_duplicates.fetch_add(1, Ordering::Relaxed);
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.last_ack_ms.store(now, Ordering::Relaxed);
    }
}
