//! The loopback status endpoint (`status_listen`): `GET /status` as JSON (SPEC.md, "Edge command
//! line") and `GET /metrics` in the Prometheus text format, from the queue's counters and the
//! [`Telemetry`]. Unauthenticated, so the config only allows loopback addresses.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::queue::Queue;
use crate::telemetry::Telemetry;

pub use listener::{CappedListener, MAX_STATUS_CONNECTIONS, STATUS_CONNECTION_LIFETIME};

mod listener {
    //! The status endpoint's listener: at most [`MAX_STATUS_CONNECTIONS`] connections open at
    //! once, each closed [`STATUS_CONNECTION_LIFETIME`] after it was accepted, idle or not. More
    //! clients wait in the kernel's accept queue, which takes none of the process's file
    //! descriptors: idle clients can never starve the queue of the descriptors its syncs need
    //! (issue #14: about 1,000 idle connections under the default limit of 1,024 open files made
    //! the queue's sync fail with EMFILE, and the edge exit).

    use std::future::Future;
    use std::io;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{OwnedSemaphorePermit, Semaphore};
    use tokio::time::Sleep;

    /// Most status connections open at once (a person, a Prometheus scraper and the watchdog's
    /// own reads need a handful).
    pub const MAX_STATUS_CONNECTIONS: usize = 32;
    /// How long a status connection may stay open, idle or not.
    pub const STATUS_CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

    /// See the module docs.
    #[derive(Debug)]
    pub struct CappedListener {
        inner: TcpListener,
        slots: Arc<Semaphore>,
    }

    impl CappedListener {
        pub fn new(inner: TcpListener) -> Self {
            Self { inner, slots: Arc::new(Semaphore::new(MAX_STATUS_CONNECTIONS)) }
        }
    }

    impl axum::serve::Listener for CappedListener {
        type Io = CappedStream;
        type Addr = SocketAddr;

        async fn accept(&mut self) -> (CappedStream, SocketAddr) {
            // A free slot first: until then nothing is accepted (the kernel queues the clients).
            let slot = match self.slots.clone().acquire_owned().await {
                Ok(slot) => slot,
                Err(_) => unreachable!("the semaphore is never closed"),
            };
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            let deadline = Box::pin(tokio::time::sleep(STATUS_CONNECTION_LIFETIME));
            (CappedStream { stream, deadline, _slot: slot }, addr)
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            self.inner.local_addr()
        }
    }

    /// A status connection: it frees its slot when dropped, and fails its reads and writes once
    /// its lifetime is over (the server then closes it).
    #[derive(Debug)]
    pub struct CappedStream {
        stream: TcpStream,
        deadline: Pin<Box<Sleep>>,
        _slot: OwnedSemaphorePermit,
    }

    impl CappedStream {
        fn expired(&mut self, cx: &mut Context<'_>) -> bool {
            self.deadline.as_mut().poll(cx).is_ready()
        }
    }

    fn lifetime_over() -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, "the status connection's lifetime is over")
    }

    impl AsyncRead for CappedStream {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if self.expired(cx) {
                return Poll::Ready(Err(lifetime_over()));
            }
            Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CappedStream {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            if self.expired(cx) {
                return Poll::Ready(Err(lifetime_over()));
            }
            Pin::new(&mut self.stream).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub device_id: String,
    pub uptime_s: u64,
    pub queue: QueueStatus,
    pub link: LinkStatus,
    /// Since the queue was created (survives restarts).
    pub produced: Produced,
    /// Since this process started.
    pub sent: Sent,
    pub source: SourceStatus,
    pub rates: Rates,
    /// Detections from the source dropped before batching because the cloud would refuse them, by
    /// reason (`rssi_out_of_range`, ...), since this process started.
    #[serde(default)]
    pub dropped_invalid: BTreeMap<String, u64>,
    /// The wall clock against the clock floor (`crate::clock`). Defaulted when absent, so this
    /// `backhaul-edge status` still reads a service from before the field.
    #[serde(default)]
    pub clock: ClockReport,
    /// The send pace in force and where it comes from (issue #18: `set_rate` overrides the config).
    #[serde(default)]
    pub rate: crate::telemetry::RateInForce,
    /// Commands from the cloud since start (issue #18).
    #[serde(default)]
    pub commands: CommandsReport,
    /// How fast the backlog drains and when it will be empty (SPEC.md "Wave 2 additions").
    #[serde(default)]
    pub drain: crate::telemetry::Drain,
}

/// `commands` in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct CommandsReport {
    /// Run (each once).
    pub run: u64,
    /// Delivered again and answered from the journal, not run again.
    pub redelivered: u64,
    /// Ignored: not signed with this device's key.
    pub unverified: u64,
}

/// `clock` in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ClockReport {
    /// The wall clock is at or above the floor: times come from it. `false`: times are the floor
    /// plus monotonic time, and batches are marked `"clock": "unsynced"`.
    pub synced: bool,
    /// The newest time known to have passed (RFC 3339; empty from a service that did not say).
    pub floor: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueStatus {
    /// Batches waiting (not in flight).
    pub pending: u64,
    pub in_flight: u64,
    pub acked_retained: u64,
    /// Batches dropped by the byte budget (`drop_oldest`), ever; and their detections.
    pub dropped: u64,
    pub dropped_detections: u64,
    pub quarantined: u64,
    /// Batches the cloud refused for good, kept for inspection.
    pub dead_letters: u64,
    /// Batches lost in damaged queue files, found at a start.
    pub lost: u64,
    /// Logical bytes of the stored batches (keys and compressed records).
    pub bytes: u64,
    /// What `bytes` may reach now: the limit the disk budget steers so that data_dir stays within
    /// `max_bytes` on disk (`queue::Stats::budget_bytes`).
    #[serde(default)]
    pub budget_bytes: u64,
    /// `queue.max_bytes`: the budget of data_dir on disk.
    pub max_bytes: u64,
    /// What data_dir occupies on disk (allocated size), bytes: see `queue::Stats::disk_bytes`.
    #[serde(default)]
    pub disk_bytes: u64,
    pub oldest_pending_age_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkStatus {
    pub mode: String,
    pub connected: bool,
    /// When the last batch was acknowledged (RFC 3339), since start.
    pub last_ack: Option<String>,
    pub last_ack_age_s: Option<u64>,
    /// Times the link came up since start.
    pub link_ups: u64,
    pub last_error: Option<String>,
    /// Batches sent and unanswered past the ack timeout (MQTT): the link is up but nothing acks.
    pub acks_overdue: AcksOverdue,
    /// The largest batch payload the link can carry, bytes (the broker's maximum packet size or
    /// `transport.mqtt.max_message_bytes`, less the PUBLISH overhead); absent: no known limit.
    pub max_payload_bytes: Option<u64>,
    /// Acks ignored since start (issue #16).
    #[serde(default)]
    pub acks_ignored: AcksIgnored,
}

/// `link.acks_ignored`: acks the edge did not apply, since start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AcksIgnored {
    /// Without a valid MAC: not published by the cloud, or signed with another key.
    pub unverified: u64,
    /// Valid, for a batch not in flight (answered already, or sent before the link went down).
    pub not_in_flight: u64,
}

/// `link.acks_overdue` (SPEC.md, wave 2 additions).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AcksOverdue {
    pub count: u64,
    /// When the oldest of them became overdue (RFC 3339); absent when none is.
    pub since: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Produced {
    pub batches: u64,
    pub detections: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sent {
    pub batches: u64,
    pub resent: u64,
    pub acked_batches: u64,
    pub acked_detections: u64,
    pub acked_duplicates: u64,
    pub rejected: u64,
    /// Sends the broker refused (an MQTT 5 PUBACK reason code of 0x80 or more); the batches
    /// stayed queued.
    pub refused: u64,
    /// Queued batches too large for the link, cut into batches that fit (the original
    /// dead-lettered with the reason), since start.
    pub cut: u64,
}

/// The source, since this process started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceStatus {
    pub detections: u64,
    /// It has produced everything it will (a `count` reached, a capture replayed).
    pub done: bool,
    /// BLE: scans restarted or adapters reopened after a stall or failure.
    pub recoveries: u64,
    pub last_error: Option<String>,
    /// Replay: capture lines that were not advertisements (not JSON, not UTF-8), skipped.
    #[serde(default)]
    pub bad_lines: u64,
}

/// Over the last few seconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Rates {
    pub source_detections_per_s: f64,
    pub acked_batches_per_s: f64,
    pub acked_detections_per_s: f64,
}

/// Samples of the running totals, for rates over a sliding window.
#[derive(Debug, Default)]
pub struct RateMeter {
    samples: VecDeque<(Instant, [u64; 3])>,
}

/// The window rates are measured over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

impl RateMeter {
    /// Records the totals (source detections, acked batches, acked detections) at `now`.
    pub fn sample(&mut self, now: Instant, totals: [u64; 3]) {
        self.samples.push_back((now, totals));
        while self.samples.len() > 2 && self.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    pub fn rates(&self) -> Rates {
        let (Some((t0, a)), Some((t1, b))) = (self.samples.front(), self.samples.back()) else {
            return Rates::default();
        };
        let dt = t1.duration_since(*t0).as_secs_f64();
        if dt <= 0.0 {
            return Rates::default();
        }
        let r = |i: usize| ((b[i].saturating_sub(a[i])) as f64 / dt * 10.0).round() / 10.0;
        Rates { source_detections_per_s: r(0), acked_batches_per_s: r(1), acked_detections_per_s: r(2) }
    }
}

/// Samples of the backlog (pending + in flight batches), for the rate at which it drains over
/// the same window as [`RateMeter`] (issue #18: an ETA that also counts what keeps arriving).
#[derive(Debug, Default)]
pub struct BacklogMeter {
    samples: VecDeque<(Instant, u64)>,
}

impl BacklogMeter {
    pub fn sample(&mut self, now: Instant, backlog: u64) {
        self.samples.push_back((now, backlog));
        while self.samples.len() > 2 && self.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Batches per second the backlog shrank over the window (negative: it grew); 0 without two
    /// samples.
    pub fn drain_rate(&self) -> f64 {
        let (Some((t0, a)), Some((t1, b))) = (self.samples.front(), self.samples.back()) else { return 0.0 };
        let dt = t1.duration_since(*t0).as_secs_f64();
        if dt <= 0.0 {
            return 0.0;
        }
        ((*a as f64 - *b as f64) / dt * 10.0).round() / 10.0
    }
}

/// What the endpoint reads.
#[derive(Debug, Clone)]
pub struct StatusSource {
    pub queue: Queue,
    pub telemetry: Arc<Telemetry>,
    pub rates: Arc<Mutex<RateMeter>>,
    pub backlog: Arc<Mutex<BacklogMeter>>,
}

impl StatusSource {
    pub fn new(queue: Queue, telemetry: Arc<Telemetry>) -> Self {
        Self {
            queue,
            telemetry,
            rates: Arc::new(Mutex::new(RateMeter::default())),
            backlog: Arc::new(Mutex::new(BacklogMeter::default())),
        }
    }

    fn totals(&self) -> [u64; 3] {
        let t = &self.telemetry;
        [
            t.source_detections.load(Ordering::Relaxed),
            t.acked_batches.load(Ordering::Relaxed),
            t.acked_detections.load(Ordering::Relaxed),
        ]
    }

    /// Samples the totals for the rates (call about once a second).
    pub fn sample(&self) {
        let now = Instant::now();
        self.rates.lock().unwrap_or_else(|p| p.into_inner()).sample(now, self.totals());
        if let Ok(stats) = self.queue.stats() {
            let mut meter = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
            meter.sample(now, stats.pending + stats.in_flight);
            let rate = meter.drain_rate();
            self.telemetry.drain_milli.store((rate * 1000.0).round() as i64, Ordering::Relaxed);
        }
    }

    /// The report. Blocking: it reads the queue.
    pub fn report(&self) -> Result<StatusReport, crate::queue::QueueError> {
        let s = self.queue.stats()?;
        let disk_bytes = self.queue.disk_bytes();
        let t = &self.telemetry;
        let last_ack_ms = t.last_ack_ms.load(Ordering::Relaxed);
        let now_ms = backhaul_shared::Timestamp::now().unix_millis().max(0) as u64;
        let last_ack = (last_ack_ms > 0)
            .then(|| backhaul_shared::Timestamp::from_unix_millis(last_ack_ms as i64))
            .flatten()
            .map(|ts| ts.to_string());
        Ok(StatusReport {
            device_id: t.device_id.clone(),
            uptime_s: t.uptime_s(),
            queue: QueueStatus {
                pending: s.pending,
                in_flight: s.in_flight,
                acked_retained: s.acked_retained,
                dropped: s.dropped_batches,
                dropped_detections: s.dropped_detections,
                quarantined: s.quarantined,
                dead_letters: s.dead_letters,
                lost: s.lost_batches,
                bytes: s.bytes,
                budget_bytes: s.budget_bytes,
                max_bytes: self.queue.config().max_bytes,
                disk_bytes,
                oldest_pending_age_s: s.oldest_pending_age_s,
            },
            link: LinkStatus {
                mode: t.mode.to_owned(),
                connected: t.connected.load(Ordering::Relaxed),
                last_ack,
                last_ack_age_s: (last_ack_ms > 0).then(|| now_ms.saturating_sub(last_ack_ms) / 1000),
                link_ups: t.link_ups.load(Ordering::Relaxed),
                last_error: t.last_error(),
                acks_overdue: {
                    let count = t.acks_overdue.load(Ordering::Relaxed);
                    let since_ms = t.acks_overdue_since_ms.load(Ordering::Relaxed);
                    AcksOverdue {
                        count,
                        since: (count > 0)
                            .then(|| backhaul_shared::Timestamp::from_unix_millis(since_ms as i64))
                            .flatten()
                            .map(|ts| ts.to_string()),
                    }
                },
                max_payload_bytes: Some(t.max_payload_bytes.load(Ordering::Relaxed)).filter(|&m| m > 0),
                acks_ignored: AcksIgnored {
                    unverified: t.acks_unverified.load(Ordering::Relaxed),
                    not_in_flight: t.acks_not_in_flight.load(Ordering::Relaxed),
                },
            },
            produced: Produced { batches: s.produced_batches, detections: s.produced_detections },
            sent: Sent {
                batches: t.sent_batches.load(Ordering::Relaxed),
                resent: t.resent_batches.load(Ordering::Relaxed),
                acked_batches: t.acked_batches.load(Ordering::Relaxed),
                acked_detections: t.acked_detections.load(Ordering::Relaxed),
                acked_duplicates: t.acked_duplicates.load(Ordering::Relaxed),
                rejected: t.rejected_batches.load(Ordering::Relaxed),
                refused: t.refused_batches.load(Ordering::Relaxed),
                cut: t.cut_batches.load(Ordering::Relaxed),
            },
            source: SourceStatus {
                detections: t.source_detections.load(Ordering::Relaxed),
                done: t.source_done.load(Ordering::Relaxed),
                recoveries: t.source_recoveries.load(Ordering::Relaxed),
                last_error: t.source_error(),
                bad_lines: t.source_bad_lines.load(Ordering::Relaxed),
            },
            rates: self.rates.lock().unwrap_or_else(|p| p.into_inner()).rates(),
            dropped_invalid: t.dropped_invalid(),
            clock: {
                let c = crate::clock::status();
                ClockReport { synced: c.synced, floor: c.floor.to_string() }
            },
            rate: t.rate(),
            drain: t.drain(s.pending, s.in_flight),
            commands: CommandsReport {
                run: t.commands_run.load(Ordering::Relaxed),
                redelivered: t.commands_redelivered.load(Ordering::Relaxed),
                unverified: t.commands_unverified.load(Ordering::Relaxed),
            },
        })
    }
}

/// A label value in the Prometheus text format: backslash, double quote and line feed escaped
/// (a `device_id` may hold the first two).
fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The Prometheus text format of a report.
pub fn prometheus(r: &StatusReport) -> String {
    let mut out = String::new();
    let device_id = label_value(&r.device_id);
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP backhaul_edge_{name} {help}\n# TYPE backhaul_edge_{name} {kind}");
        let _ = writeln!(out, "backhaul_edge_{name}{{device_id=\"{device_id}\"}} {value}");
    };
    let q = &r.queue;
    metric("queue_pending_batches", "gauge", "Batches waiting to be sent.", q.pending as f64);
    metric("queue_in_flight_batches", "gauge", "Batches sent and not yet acknowledged.", q.in_flight as f64);
    metric("queue_acked_retained_batches", "gauge", "Acknowledged batches kept for replay.", q.acked_retained as f64);
    metric(
        "queue_bytes",
        "gauge",
        "Logical bytes of the stored batches (keys and compressed records).",
        q.bytes as f64,
    );
    metric(
        "queue_budget_bytes",
        "gauge",
        "What queue_bytes may reach now: the limit steered so that data_dir stays within max_bytes on disk.",
        q.budget_bytes as f64,
    );
    metric(
        "queue_disk_bytes",
        "gauge",
        "Bytes data_dir occupies on disk (allocated size, sled's overhead included).",
        q.disk_bytes as f64,
    );
    metric("queue_max_bytes", "gauge", "The queue's budget: bytes data_dir may occupy on disk.", q.max_bytes as f64);
    metric(
        "queue_oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest batch not yet acknowledged.",
        q.oldest_pending_age_s.unwrap_or(0) as f64,
    );
    metric("queue_dropped_batches_total", "counter", "Batches dropped by the byte budget.", q.dropped as f64);
    metric(
        "queue_dropped_detections_total",
        "counter",
        "Detections dropped by the byte budget.",
        q.dropped_detections as f64,
    );
    metric("queue_quarantined_total", "counter", "Records that failed their checksum.", q.quarantined as f64);
    metric("queue_dead_letters", "gauge", "Batches the cloud refused for good, kept.", q.dead_letters as f64);
    metric(
        "queue_lost_batches_total",
        "counter",
        "Batches lost in damaged queue files, found at a start.",
        q.lost as f64,
    );
    metric(
        "produced_batches_total",
        "counter",
        "Batches enqueued since the queue was created.",
        r.produced.batches as f64,
    );
    metric(
        "produced_detections_total",
        "counter",
        "Detections enqueued since the queue was created.",
        r.produced.detections as f64,
    );
    metric(
        "clock_synced",
        "gauge",
        "1 while the wall clock is at or above the clock floor; 0 while times come from the floor.",
        if r.clock.synced { 1.0 } else { 0.0 },
    );
    metric("link_connected", "gauge", "1 when the link to the cloud is up.", u8::from(r.link.connected) as f64);
    metric("link_ups_total", "counter", "Times the link came up since start.", r.link.link_ups as f64);
    metric(
        "link_acks_overdue_batches",
        "gauge",
        "Batches sent and unanswered past the ack timeout.",
        r.link.acks_overdue.count as f64,
    );
    metric(
        "acks_unverified_total",
        "counter",
        "Acks ignored since start because their MAC was missing or wrong (not from the cloud, or another key).",
        r.link.acks_ignored.unverified as f64,
    );
    metric(
        "refused_batches_total",
        "counter",
        "Sends the broker refused (MQTT 5 PUBACK reason code 0x80 or more) since start.",
        r.sent.refused as f64,
    );
    metric(
        "cut_batches_total",
        "counter",
        "Queued batches too large for the link, cut into batches that fit, since start.",
        r.sent.cut as f64,
    );
    metric("sent_batches_total", "counter", "Batch sends since start, resends included.", r.sent.batches as f64);
    metric("resent_batches_total", "counter", "Resends after an ack timeout since start.", r.sent.resent as f64);
    metric("acked_batches_total", "counter", "Batches acknowledged since start.", r.sent.acked_batches as f64);
    metric("acked_detections_total", "counter", "Detections acknowledged since start.", r.sent.acked_detections as f64);
    metric("rejected_batches_total", "counter", "Batches dead-lettered since start.", r.sent.rejected as f64);
    metric("source_detections_total", "counter", "Detections from the source since start.", r.source.detections as f64);
    metric(
        "source_recoveries_total",
        "counter",
        "BLE scan restarts and adapter reopenings since start.",
        r.source.recoveries as f64,
    );
    metric(
        "source_bad_lines_total",
        "counter",
        "Replay: capture lines that were not advertisements, skipped, since start.",
        r.source.bad_lines as f64,
    );
    metric("uptime_seconds", "gauge", "Seconds since the process started.", r.uptime_s as f64);
    metric(
        "drain_rate_batches_per_second",
        "gauge",
        "Batches per second the backlog shrank over the last 10 s (acks less arrivals; negative: it grew).",
        r.drain.rate,
    );
    // Absent while the backlog does not shrink: -1 then (Prometheus has no null).
    metric(
        "drain_eta_seconds",
        "gauge",
        "Seconds until nothing is pending at the drain rate; -1 while the backlog does not shrink.",
        r.drain.eta_s.map_or(-1.0, |s| s as f64),
    );
    // One series per reason, every known reason from the start (a counter that appears only at
    // its first increment hides that increment from rate()).
    let name = "backhaul_edge_dropped_invalid_detections_total";
    let _ = writeln!(
        out,
        "# HELP {name} Detections dropped before batching because the cloud would refuse them, by reason, since start.\n# TYPE {name} counter"
    );
    let known = backhaul_shared::batch::DETECTION_REASONS.iter().map(|r| (*r, 0));
    let mut by_reason: BTreeMap<&str, u64> = known.collect();
    by_reason.extend(r.dropped_invalid.iter().map(|(k, v)| (k.as_str(), *v)));
    for (reason, n) in by_reason {
        let _ = writeln!(out, "{name}{{device_id=\"{device_id}\",reason=\"{}\"}} {n}", label_value(reason));
    }
    out
}

/// The router: `/status` and `/metrics`.
pub fn router(source: StatusSource) -> Router {
    Router::new().route("/status", get(status_json)).route("/metrics", get(metrics)).with_state(source)
}

async fn report(source: &StatusSource) -> Result<StatusReport, Response> {
    let s = source.clone();
    // The queue blocks (sled): off the runtime's workers.
    match tokio::task::spawn_blocking(move || s.report()).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => {
            Err((StatusCode::SERVICE_UNAVAILABLE, format!("the queue cannot be read: {e}\n")).into_response())
        }
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()),
    }
}

async fn status_json(State(source): State<StatusSource>) -> Response {
    match report(&source).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => e,
    }
}

async fn metrics(State(source): State<StatusSource>) -> Response {
    match report(&source).await {
        Ok(r) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus(&r)).into_response(),
        Err(e) => e,
    }
}

/// A report for a person (`backhaul-edge status`).
pub fn render(r: &StatusReport) -> String {
    let q = &r.queue;
    let age = |s: Option<u64>| {
        s.map_or_else(|| "-".to_owned(), |s| humantime::format_duration(Duration::from_secs(s)).to_string())
    };
    let mut out = String::new();
    let _ = writeln!(out, "device     {}   up {}", r.device_id, age(Some(r.uptime_s)));
    let _ = writeln!(
        out,
        "link       {} {}   last ack {}{}",
        r.link.mode,
        if r.link.connected { "connected" } else { "DOWN" },
        r.link.last_ack.as_deref().unwrap_or("never (since start)"),
        r.link.last_ack_age_s.map(|s| format!(" ({} ago)", age(Some(s)))).unwrap_or_default()
    );
    if r.link.acks_ignored.unverified > 0 {
        let _ = writeln!(
            out,
            "           {} acks ignored: no valid MAC (check BACKHAUL_API_KEY against the cloud's keys file, \
             the cloud's version, the broker's ACL; the log says which)",
            r.link.acks_ignored.unverified
        );
    }
    if r.link.acks_overdue.count > 0 {
        let _ = writeln!(
            out,
            "           {} batches with acks overdue since {}",
            r.link.acks_overdue.count,
            r.link.acks_overdue.since.as_deref().unwrap_or("-")
        );
    }
    // Also while connected: a broker's refusal or a cut batch leaves the link up.
    if let Some(e) = &r.link.last_error {
        let _ = writeln!(out, "           last error: {e}");
    }
    if !r.clock.synced && !r.clock.floor.is_empty() {
        let _ = writeln!(
            out,
            "clock      UNSYNCED: the wall clock is below the floor {}; times are estimates (is NTP running?)",
            r.clock.floor
        );
    }
    let _ = writeln!(
        out,
        "queue      {} pending, {} in flight, oldest {}; {} of {} bytes of batches; {} of {} bytes on disk",
        q.pending,
        q.in_flight,
        age(q.oldest_pending_age_s),
        q.bytes,
        if q.budget_bytes > 0 { q.budget_bytes } else { q.max_bytes },
        q.disk_bytes,
        q.max_bytes
    );
    let _ = writeln!(
        out,
        "           {} acked kept for replay, {} dropped ({} detections), {} quarantined, {} dead letters, {} lost in damaged files",
        q.acked_retained, q.dropped, q.dropped_detections, q.quarantined, q.dead_letters, q.lost
    );
    let _ = writeln!(
        out,
        "produced   {} batches, {} detections (since the queue was created)",
        r.produced.batches, r.produced.detections
    );
    let _ = writeln!(
        out,
        "since start {} sent ({} resent), {} acked ({} duplicates), {} refused by the cloud, {} refused by the \
         broker, {} cut to fit the link",
        r.sent.batches,
        r.sent.resent,
        r.sent.acked_batches,
        r.sent.acked_duplicates,
        r.sent.rejected,
        r.sent.refused,
        r.sent.cut
    );
    if r.source.recoveries > 0 || r.source.last_error.is_some() {
        let _ = writeln!(
            out,
            "source     {} recoveries; last error: {}",
            r.source.recoveries,
            r.source.last_error.as_deref().unwrap_or("-")
        );
    }
    if r.source.bad_lines > 0 {
        let _ = writeln!(out, "source     {} capture lines skipped (not advertisements)", r.source.bad_lines);
    }
    if !r.dropped_invalid.is_empty() {
        let reasons: Vec<String> = r.dropped_invalid.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let _ = writeln!(out, "invalid    dropped before batching: {}", reasons.join(", "));
    }
    let _ = writeln!(
        out,
        "rates      {} detections/s in, {} batches/s ({} detections/s) acked",
        r.rates.source_detections_per_s, r.rates.acked_batches_per_s, r.rates.acked_detections_per_s
    );
    let eta = match r.drain.eta_s {
        Some(0) => "nothing to drain".to_owned(),
        Some(s) => format!("drained in about {}", age(Some(s))),
        None => "not draining".to_owned(),
    };
    let _ = writeln!(
        out,
        "send rate  {} batches/s, burst {} (from {}); {eta}",
        r.rate.rate_per_sec, r.rate.burst, r.rate.source
    );
    if r.commands.run + r.commands.redelivered + r.commands.unverified > 0 {
        let _ = writeln!(
            out,
            "commands   {} run, {} delivered again (not run again), {} ignored (not signed with this device's key)",
            r.commands.run, r.commands.redelivered, r.commands.unverified
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_for_the_prometheus_text_format() {
        assert_eq!(label_value("rpi-entrance-01"), "rpi-entrance-01");
        assert_eq!(label_value("dev\"a\\b\nc"), r#"dev\"a\\b\nc"#);
    }

    #[test]
    fn rates_are_measured_over_the_sliding_window() {
        let mut m = RateMeter::default();
        let t0 = Instant::now();
        assert_eq!(m.rates(), Rates::default());
        m.sample(t0, [0, 0, 0]);
        m.sample(t0 + Duration::from_secs(2), [200, 10, 500]);
        assert_eq!(
            m.rates(),
            Rates { source_detections_per_s: 100.0, acked_batches_per_s: 5.0, acked_detections_per_s: 250.0 }
        );
        // Old samples leave the window.
        m.sample(t0 + Duration::from_secs(30), [200, 10, 500]);
        m.sample(t0 + Duration::from_secs(31), [200, 10, 500]);
        assert_eq!(m.rates().acked_batches_per_s, 0.0);
    }

    #[test]
    fn the_drain_rate_is_how_fast_the_backlog_shrinks_whatever_keeps_arriving() {
        let mut m = BacklogMeter::default();
        let t0 = Instant::now();
        assert_eq!(m.drain_rate(), 0.0);
        m.sample(t0, 100);
        m.sample(t0 + Duration::from_secs(4), 80);
        assert_eq!(m.drain_rate(), 5.0);
        let mut growing = BacklogMeter::default();
        growing.sample(t0, 117);
        growing.sample(t0 + Duration::from_secs(3), 147);
        assert_eq!(growing.drain_rate(), -10.0, "acked, but more arrives than leaves");
        let t = crate::telemetry::Telemetry::new("pi", "test");
        t.drain_milli.store(-10_000, Ordering::Relaxed);
        assert_eq!(t.drain(147, 0).eta_s, None, "a growing backlog never drains");
        t.drain_milli.store(5_000, Ordering::Relaxed);
        assert_eq!(t.drain(18, 2).eta_s, Some(4));
        t.drain_milli.store(0, Ordering::Relaxed);
        assert_eq!(t.drain(0, 3).eta_s, Some(0), "only in flight: keeping up");
    }
}
