//! The forwarder: drains the durable queue to the cloud and deletes a batch only when it is
//! acknowledged.
//!
//! # Shape
//! One blocking thread runs [`Forwarder::run`]: it takes batches from the [`Queue`] (sled blocks,
//! so never on an async runtime), paces them ([`pace`]), hands them to a [`Transport`] (MQTT in
//! [`mqtt`], HTTP in [`http`]) and applies what comes back. Everything else talks to it over one
//! channel of [`Event`]s: the source says a batch was enqueued, the transport's own threads report
//! connections, acks and HTTP answers, `main` says stop. The thread never blocks on I/O: a
//! transport's `send` only hands the batch over.
//!
//! # Rules
//! - At most `max_inflight` batches are unanswered ([`window`]); a batch leaves the queue only on
//!   a final answer: acked (the cloud's `stored`/`duplicate`, over HTTP in a 2xx whose body is the
//!   cloud's answer for that batch, or with `ack = "broker"` a PUBACK without a refusal), or refused for good (a `rejected` ack, HTTP 400/413/422), which
//!   moves it to the dead-letter tree. More than a few refusals in a row pause sending instead
//!   (a configuration mismatch must not move the whole queue to the dead-letter tree).
//! - A refusal by the broker (an MQTT 5 PUBACK reason code of 0x80 or more) is never a delivery:
//!   the batch goes back to the queue and sending pauses with backoff, like refusal after refusal
//!   by the cloud (an ACL is a configuration mistake, not a bad batch).
//! - A batch larger than the link can carry ([`Transport::max_payload`]: the broker's maximum
//!   packet size, `transport.mqtt.max_message_bytes`) is dead-lettered with a reason naming the
//!   limit instead of being sent (the broker would close the connection, and the batch would
//!   block the queue forever); the pipeline cuts new batches to fit (the limit is shared through
//!   [`Telemetry::max_payload_bytes`]).
//! - Batches unanswered past the ack timeout are *acks overdue*: counted in `/status` and
//!   `/metrics` with since when, and `last_error` says what to check; each one is sent again
//!   with exponential backoff ([`window`]), not every `ack_timeout` forever.
//! - Link down: everything in flight goes back to the queue and is sent again after the
//!   reconnect (rumqttc does not resend when the broker lost the session, and a broker that lost
//!   its queue must lose nothing). With MQTT, a batch without an answer after `ack_timeout` is sent
//!   again. Duplicates are absorbed by the cloud (`batch_id` is the idempotency key).
//! - An ack for a batch that went back to the queue still acks it (the queue knows every batch
//!   handed out since it was opened).
//! - Only the queue's durable batches are handed out, so nothing is sent that a crash could take
//!   back.

pub mod http;
pub mod mqtt;
pub mod pace;
pub mod window;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backhaul_shared::batch::Limits;
use backhaul_shared::{Batch, BatchId, DeviceStatus};
use sha2::{Digest, Sha256};

use crate::queue::{AckOutcome, NewBatch, Queue, QueueError, QueuedBatch};
use crate::telemetry::Telemetry;
use backhaul_shared::link::Backoff;
use pace::{End, Pacer};
use window::Window;

/// What a transport reports about the batches it was given and its link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The link is up: sending may start (again).
    LinkUp,
    /// The link is down. With `resend_in_flight`, nothing will ever answer the batches in flight
    /// (an MQTT connection is gone): they go back to the queue. HTTP answers every request, so it
    /// says false.
    LinkDown { error: String, resend_in_flight: bool },
    /// Final success: delete from the queue. `duplicate`: the cloud had it already.
    Acked { batch_id: BatchId, duplicate: bool },
    /// Refused for good: dead-letter it.
    Rejected { batch_id: BatchId, reason: String },
    /// Not delivered this time (HTTP 408/429/5xx, a network error): back to the queue.
    Retry { batch_id: BatchId },
    /// Refused by the link for a reason that is not the batch's (an MQTT 5 PUBACK reason code of
    /// 0x80 or more, e.g. an ACL): back to the queue, and sending pauses with backoff. `error`
    /// says what to check.
    Refused { batch_id: BatchId, error: String },
    /// An ack whose MAC is missing (`signed` false) or wrong (issue #16): not from the cloud, or
    /// not for this device's key. Counted and logged, never applied.
    Unverified { batch_id: BatchId, signed: bool },
}

/// A way to the cloud. Its methods never block: I/O happens on the transport's own threads or
/// tasks, which report through [`Event::Link`] events that [`Transport::handle`] turns into
/// [`Outcome`]s.
pub trait Transport {
    /// What the transport's threads report.
    type Event: Send + 'static;
    /// Whether it can take a batch now (connected, a worker free).
    fn ready(&self) -> bool;
    /// Hands a batch over; false if it could not take it (it goes back to the queue).
    fn send(&mut self, batch: &QueuedBatch) -> bool;
    /// Turns a report of the transport's threads into outcomes.
    fn handle(&mut self, event: Self::Event, out: &mut Vec<Outcome>);
    /// Runs the transport's timers (HTTP health probes); returns when it next wants a call.
    fn tick(&mut self, now: Instant) -> Option<Instant>;
    /// How long a sent batch may go unanswered before it is sent again (None: the transport
    /// answers every send itself).
    fn ack_timeout(&self) -> Option<Duration>;
    /// The largest batch payload (wire JSON, bytes) the link can carry now; `None`: no known
    /// limit.
    fn max_payload(&self) -> Option<usize> {
        None
    }
    /// What to check when batches go unanswered past [`Transport::ack_timeout`].
    fn missing_acks_hint(&self) -> String {
        "check the link and the cloud".into()
    }
    /// Publishes a sealed command result (MQTT, issue #18); false if it could not (not
    /// connected): the cloud publishes the command again later and gets the result again.
    fn publish_command_result(&mut self, _payload: Vec<u8>) -> bool {
        false
    }
    /// Publishes the device's status, if the transport carries one (MQTT, retained).
    fn publish_status(&mut self, status: &DeviceStatus);
    /// Closing: publishes the last status and disconnects.
    fn close(&mut self, status: &DeviceStatus);
}

/// What the forwarder's thread is told.
#[derive(Debug)]
pub enum Event<E> {
    /// A batch was enqueued (there is something to send).
    Enqueued,
    /// A report of the transport's threads.
    Link(E),
    /// Stop: finish the batches in flight for a moment, write the acks, disconnect.
    Shutdown,
    /// An operator's `set_rate` (issue #18): the new pace, from now on.
    SetRate { rate_per_sec: u32, burst: u32 },
    /// A command result for the transport to publish (MQTT; issue #18). Published from this
    /// thread because it is the one that publishes: rumqttc's packet ids are paired with batches
    /// in publish order.
    CommandResult(Vec<u8>),
}

/// The forwarder's settings.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    pub max_inflight: usize,
    pub rate_per_sec: u32,
    pub burst: u32,
    /// How often the device status is published (MQTT).
    pub status_every: Duration,
    /// How long a stop waits for answers to the batches in flight.
    pub stop_grace: Duration,
}

/// Drains the queue through a transport. See the module docs.
#[derive(Debug)]
pub struct Forwarder<T: Transport> {
    queue: Queue,
    transport: T,
    events: Receiver<Event<T::Event>>,
    window: Window,
    pacer: Pacer,
    telemetry: Arc<Telemetry>,
    config: ForwarderConfig,
    connected: bool,
    /// The queue may hold a batch to send (cleared when it hands out none).
    backlog: bool,
    /// When the queue last failed, to pause before trying it again.
    queue_failed_at: Option<Instant>,
    /// Final refusals since the last ack; past [`REJECTIONS_BEFORE_PAUSE`] sending pauses.
    rejections_in_a_row: u32,
    paused_until: Option<Instant>,
    pause_backoff: Backoff,
    next_status: Instant,
    /// Acks are overdue and `last_error` says so (logged once per episode).
    overdue_reported: bool,
    /// When the link last came up, and whether anything was acked since.
    link_up_at: Option<Instant>,
    acked_on_link: bool,
    /// Batches in flight when a short-lived connection dropped, and how many times in a row
    /// (see [`Forwarder::suspect_oversized`]).
    suspects: HashMap<BatchId, u32>,
    /// A payload limit learned from such drops.
    learned_max_payload: Option<usize>,
    /// The current pause is for refusal after refusal by the cloud.
    paused_for_rejections: bool,
}

/// A connection that drops this soon after it came up, before any ack, makes the largest batch
/// in flight a suspect of being over the broker's limit.
const SHORT_CONNECTION: Duration = Duration::from_secs(10);
/// Drops in a row with the same suspect before it is taken as too large.
const STRIKES: u32 = 3;
/// No payload limit below this is ever learned (`transport.mqtt.max_message_bytes`'s minimum).
const MIN_LEARNED_PAYLOAD: usize = crate::config::MIN_MESSAGE_BYTES as usize;

/// Test-only fault injection: `BACKHAUL_FAILPOINT=freeze_forwarder_after:MS` wedges the forwarder
/// thread MS milliseconds after it starts (for the watchdog test); `panic_forwarder_after:MS` makes
/// it panic then (for the test that a panic in any thread stops the process).
fn failpoint_freeze_after() -> Option<Duration> {
    crate::failpoint_after("freeze_forwarder_after:")
}

/// Final refusals in a row that are dead-lettered; the next one pauses sending instead (a whole
/// queue refused for one configuration mistake must not end up in the dead-letter tree).
const REJECTIONS_BEFORE_PAUSE: u32 = 5;

/// How long the forwarder waits before using the queue again after a storage error.
const QUEUE_RETRY: Duration = Duration::from_secs(1);

impl<T: Transport> Forwarder<T> {
    pub fn new(
        queue: Queue,
        transport: T,
        events: Receiver<Event<T::Event>>,
        telemetry: Arc<Telemetry>,
        config: ForwarderConfig,
    ) -> Self {
        Self {
            queue,
            window: Window::new(config.max_inflight),
            pacer: Pacer::new(config.rate_per_sec, config.burst),
            transport,
            events,
            telemetry,
            connected: false,
            backlog: true,
            queue_failed_at: None,
            rejections_in_a_row: 0,
            paused_until: None,
            pause_backoff: Backoff::new(Duration::from_secs(5), Duration::from_secs(600)),
            next_status: Instant::now(),
            overdue_reported: false,
            link_up_at: None,
            acked_on_link: false,
            suspects: HashMap::new(),
            learned_max_payload: None,
            paused_for_rejections: false,
            config,
        }
    }

    /// Runs until [`Event::Shutdown`] (or every sender is gone). Queue errors are logged and
    /// retried: the link and the cloud must never stop because of a passing disk problem.
    pub fn run(mut self) {
        let mut outcomes = Vec::new();
        let mut stop_at: Option<Instant> = None;
        let freeze_at = failpoint_freeze_after().map(|d| Instant::now() + d);
        let panic_at = crate::failpoint_after("panic_forwarder_after:").map(|d| Instant::now() + d);
        loop {
            let now = Instant::now();
            if panic_at.is_some_and(|t| now >= t) {
                panic!("FAILPOINT panic_forwarder: the forwarder thread panics on purpose");
            }
            if freeze_at.is_some_and(|t| now >= t) {
                tracing::error!("FAILPOINT freeze_forwarder: the forwarder thread is wedged on purpose");
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            self.telemetry.beat_forwarder();
            let mut wake = now + Duration::from_secs(1); // heartbeat at least every second
            if let Some(t) = self.transport.tick(now) {
                wake = wake.min(t);
            }
            if self.connected {
                self.resend_overdue(now);
            }
            self.report_overdue(now);
            if let Some(deadline) = self.transport.ack_timeout().and_then(|t| self.window.next_deadline(t)) {
                wake = wake.min(deadline);
            }
            if stop_at.is_none() {
                if let Some(wait) = self.fill(now) {
                    wake = wake.min(now + wait);
                }
                if now >= self.next_status {
                    if let Some(status) = self.device_status(true) {
                        self.transport.publish_status(&status);
                    }
                    self.next_status = now + self.config.status_every;
                }
                wake = wake.min(self.next_status);
            }
            if let Some(stop) = stop_at {
                if self.window.is_empty() || now >= stop {
                    break;
                }
                wake = wake.min(stop);
            }
            let first = match self.events.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(e) => Some(e),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(Event::Shutdown),
            };
            let mut next = first;
            while let Some(event) = next {
                match event {
                    Event::Enqueued => self.backlog = true,
                    Event::Link(e) => self.transport.handle(e, &mut outcomes),
                    Event::SetRate { rate_per_sec, burst } => {
                        self.pacer = Pacer::new(rate_per_sec, burst);
                        tracing::info!(rate_per_sec, burst, "send pace changed");
                    }
                    Event::CommandResult(payload) => {
                        if !self.transport.publish_command_result(payload) {
                            tracing::info!("a command result could not be published now; it is sent again when the cloud asks again");
                        }
                    }
                    Event::Shutdown => {
                        if stop_at.is_none() {
                            tracing::info!(in_flight = self.window.len(), "forwarder stopping");
                            stop_at = Some(Instant::now() + self.config.stop_grace);
                        }
                    }
                }
                next = self.events.try_recv().ok();
            }
            for outcome in outcomes.drain(..) {
                self.apply(outcome);
            }
        }
        // Acks to disk, so a restart does not send them again.
        if let Err(e) = self.queue.flush() {
            tracing::warn!(error = %e, "writing the last acks failed; those batches are sent again after the restart");
        }
        let status = self.device_status(false).unwrap_or_default();
        self.transport.close(&status);
        tracing::info!("forwarder stopped");
    }

    /// Hands batches to the transport while the link, the window and the pace allow. Returns how
    /// long until the pace allows the next one, if that is what stopped it.
    fn fill(&mut self, now: Instant) -> Option<Duration> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Some(until - now);
            }
            // Sending again; after refusal after refusal by the cloud, the next refusal pauses
            // again, for longer (a pause for the broker's refusal or a size limit leaves the
            // cloud's count alone).
            self.paused_until = None;
            if std::mem::take(&mut self.paused_for_rejections) {
                self.rejections_in_a_row = REJECTIONS_BEFORE_PAUSE;
            }
        }
        if let Some(t) = self.queue_failed_at {
            if now.duration_since(t) < QUEUE_RETRY {
                return Some(QUEUE_RETRY - now.duration_since(t));
            }
            self.queue_failed_at = None;
        }
        while self.connected && self.backlog && self.window.has_room() && self.transport.ready() {
            if let Err(wait) = self.pacer.take() {
                return Some(wait);
            }
            // The other end if this one has nothing (they see the same batches, but let neither
            // one's view decide alone that the queue is empty).
            let (first, second) = match self.pacer.next_end() {
                End::Oldest => (Queue::next_batch as fn(&Queue) -> _, Queue::next_newest_batch as fn(&Queue) -> _),
                End::Newest => (Queue::next_newest_batch as fn(&Queue) -> _, Queue::next_batch as fn(&Queue) -> _),
            };
            let batch: Result<Option<QueuedBatch>, QueueError> = match first(&self.queue) {
                Ok(None) => second(&self.queue),
                other => other,
            };
            let batch = match batch {
                Ok(Some(b)) if self.max_payload().is_some_and(|max| b.payload.len() > max) => {
                    if let Err(wait) = self.cut_to_fit(b) {
                        return Some(wait);
                    }
                    continue;
                }
                Ok(Some(b)) => b,
                Ok(None) => {
                    self.backlog = false;
                    break;
                }
                Err(e) => {
                    self.queue_error("taking a batch to send", &e);
                    return Some(QUEUE_RETRY);
                }
            };
            if self.transport.send(&batch) {
                self.telemetry.sent_batches.fetch_add(1, Ordering::Relaxed);
                self.window.insert(batch, now);
            } else {
                self.queue.nack(batch.batch_id);
                break;
            }
        }
        None
    }

    fn resend_overdue(&mut self, now: Instant) {
        let Some(timeout) = self.transport.ack_timeout() else { return };
        for batch in self.window.take_overdue(now, timeout) {
            tracing::info!(seq = batch.seq, batch_id = %batch.batch_id, ?timeout, "no ack in time; sending the batch again");
            if self.transport.send(&batch) {
                self.telemetry.sent_batches.fetch_add(1, Ordering::Relaxed);
                self.telemetry.resent_batches.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A queued batch the link cannot carry (queued before the limit was known, e.g. by an edge
    /// that started offline): its detections are enqueued again as batches that fit, at the end
    /// of the queue, and the original is dead-lettered (kept for inspection, never sent) with a
    /// reason naming the limit and the new batches. The new batches' keys derive from the
    /// original's ([`derived_key`]): if a crash comes between the two writes, the same cut made
    /// again after the restart has the same keys, and the cloud stores each once.
    ///
    /// Nothing is lost to a limit: a batch that cannot be cut to fit (one detection is already
    /// too large, or its payload is unreadable) stays queued and sending pauses, as for any
    /// configuration mistake; so does a cut the queue has no room for now. `Err`: how long
    /// `fill` should wait.
    fn cut_to_fit(&mut self, batch: QueuedBatch) -> Result<(), Duration> {
        let max = self.max_payload().unwrap_or(0);
        let limit = format!(
            "the batch is {} bytes, over the largest message the link can carry ({max} bytes of payload: the \
             broker's maximum packet size from its CONNACK, transport.mqtt.max_message_bytes, or learned from \
             connections that dropped right after a batch this size was sent)",
            batch.payload.len()
        );
        let pieces = Batch::from_json(&batch.payload, &Limits::default()).ok().and_then(|b| {
            let original = b.batch_id;
            let mut i = 0u32;
            let mut new_key = || {
                i += 1;
                derived_key(original, i)
            };
            let whole = NewBatch {
                device_id: b.device_id,
                name: b.name,
                location: b.location,
                timestamp: b.timestamp,
                detections: b.detections,
                source_position: None,
                batch_id: None,
                clock: b.clock,
            };
            crate::pipeline::split_to_fit(whole, max, &mut new_key)
        });
        let Some(pieces) = pieces.filter(|p| p.len() > 1) else {
            self.queue.nack(batch.batch_id);
            self.pause(format!(
                "{limit}, and it cannot be cut to fit (a single detection is larger): raise the broker's \
                 max_packet_size or transport.mqtt.max_message_bytes; batches stay queued"
            ));
            return Err(self.paused_until.map_or(QUEUE_RETRY, |t| t.saturating_duration_since(Instant::now())));
        };
        // Only into room the budget has now: the forwarder must not wait for space that only its
        // own acks would free.
        let need: u64 = batch.payload.len() as u64 + 4096;
        let room = self.queue.stats().map(|s| self.queue.config().max_bytes.saturating_sub(s.bytes));
        if room.map_or(true, |room| room < need) {
            self.queue.nack(batch.batch_id);
            tracing::warn!(
                seq = batch.seq,
                "no room in the queue's budget to cut a batch too large to send; retrying later"
            );
            return Err(QUEUE_RETRY);
        }
        let done = match self.queue.enqueue_many(pieces) {
            Ok(done) => done,
            Err(e) => {
                self.queue.nack(batch.batch_id);
                tracing::error!(error = %e, "enqueueing the cut of a batch too large to send failed; retrying in {QUEUE_RETRY:?}");
                self.queue_failed_at = Some(Instant::now());
                return Err(QUEUE_RETRY);
            }
        };
        let (first, last) = (done.first().map_or(0, |e| e.seq), done.last().map_or(0, |e| e.seq));
        self.backlog = true;
        let reason = format!(
            "{limit}: its detections were enqueued again as {} batches that fit, seq {first}..={last}",
            done.len()
        );
        tracing::warn!(seq = batch.seq, batch_id = %batch.batch_id, "{reason}");
        match self.queue.dead_letter(batch.batch_id, &reason) {
            Ok(AckOutcome::Acked) => {
                self.telemetry.cut_batches.fetch_add(1, Ordering::Relaxed);
                self.telemetry.set_error(format!("batch seq {}: {reason}", batch.seq));
            }
            Ok(AckOutcome::Unknown) => {}
            Err(e) => {
                self.queue.nack(batch.batch_id);
                self.queue_error("dead-lettering a batch too large to send", &e);
            }
        }
        Ok(())
    }

    /// The largest batch payload the link can carry: the transport's limit, or a smaller one
    /// learned from connections that dropped after a batch was sent ([`Self::suspect_oversized`]).
    fn max_payload(&self) -> Option<usize> {
        match (self.transport.max_payload(), self.learned_max_payload) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A broker that does not say its maximum packet size (MQTT 3.1.1, or an MQTT 5 broker that
    /// leaves it out) closes the connection on a bigger PUBLISH, and the batch would be sent
    /// again after every reconnect, forever. So when a connection drops within
    /// [`SHORT_CONNECTION`] of coming up, before any ack, the largest batch in flight is a
    /// suspect; after [`STRIKES`] such drops in a row it is taken as over the broker's limit: the
    /// limit is learned as one byte below its size, and it is cut to fit (see
    /// [`Self::cut_to_fit`]), as every later batch that size or more. Only when no limit is known
    /// (the broker's or the config's), never below [`MIN_LEARNED_PAYLOAD`], and a drop after a
    /// connection that lasted, after an ack, or a failed connect attempt (the broker was away)
    /// clears the suspicion; the limit learned lasts until the process restarts.
    fn suspect_oversized(&mut self) {
        let Some(up_at) = self.link_up_at.take() else {
            // A connect attempt that failed: the broker was away (killed, restarting), so the
            // drops before were not a broker refusing a packet: a broker that does stays up.
            self.suspects.clear();
            return;
        };
        if self.acked_on_link || up_at.elapsed() >= SHORT_CONNECTION {
            self.suspects.clear();
            return;
        }
        if self.transport.max_payload().is_some() {
            return; // the broker said its limit (or the config did): a drop is something else
        }
        let Some((batch_id, size)) = self.window.largest() else { return };
        let strikes = self.suspects.entry(batch_id).or_insert(0);
        *strikes += 1;
        if *strikes < STRIKES {
            return;
        }
        self.suspects.clear();
        let learned = size.saturating_sub(1);
        if learned < MIN_LEARNED_PAYLOAD {
            return; // not a size problem: no broker limit is that small
        }
        if self.max_payload().is_none_or(|m| learned < m) {
            self.learned_max_payload = Some(learned);
            self.telemetry.max_payload_bytes.store(learned as u64, Ordering::Relaxed);
            tracing::warn!(
                size,
                "the connection dropped {STRIKES} times right after a batch of {size} bytes was sent, before any \
                 ack: taken as over the broker's maximum packet size; batches are cut below it (set \
                 transport.mqtt.max_message_bytes to the broker's limit to skip this)"
            );
        }
    }

    /// Publishes the acks overdue to `/status` and `/metrics`, and says once per episode what to
    /// check.
    fn report_overdue(&mut self, now: Instant) {
        let overdue = self.transport.ack_timeout().and_then(|t| self.window.overdue(now, t));
        let Some(overdue) = overdue else {
            self.telemetry.acks_overdue.store(0, Ordering::Relaxed);
            self.overdue_reported = false;
            return;
        };
        self.telemetry.acks_overdue.store(overdue.count as u64, Ordering::Relaxed);
        let since = SystemTime::now() - now.saturating_duration_since(overdue.since);
        let since_ms = since.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.telemetry.acks_overdue_since_ms.store(since_ms, Ordering::Relaxed);
        if !self.overdue_reported && self.connected {
            self.overdue_reported = true;
            let error = format!(
                "connected, but {} batch(es) have had no ack for over {:?}: {}; they are sent again with backoff",
                overdue.count,
                self.transport.ack_timeout().unwrap_or_default(),
                self.transport.missing_acks_hint()
            );
            tracing::warn!("{error}");
            self.telemetry.set_error(error);
        }
    }

    /// Pauses sending with backoff (unless already paused), saying why.
    fn pause(&mut self, error: String) {
        let now = Instant::now();
        if self.paused_until.is_some_and(|t| now < t) {
            return; // the other answers to the same sends say the same thing
        }
        let pause = self.pause_backoff.next_random(None);
        self.paused_until = Some(now + pause);
        let error = format!("{error}; sending paused for {pause:?}");
        tracing::error!("{error}");
        self.telemetry.set_error(error);
    }

    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::LinkUp => {
                // (MQTT put everything in flight back with the LinkDown that always comes first;
                // HTTP requests in flight still get their own answers.)
                self.connected = true;
                self.link_up_at = Some(Instant::now());
                self.acked_on_link = false;
                let max = self.max_payload().map_or(0, |m| m as u64);
                self.telemetry.max_payload_bytes.store(max, Ordering::Relaxed);
                self.backlog = true;
                self.telemetry.connected.store(true, Ordering::Relaxed);
                self.telemetry.link_ups.fetch_add(1, Ordering::Relaxed);
                if let Some(status) = self.device_status(true) {
                    self.transport.publish_status(&status);
                }
            }
            Outcome::LinkDown { error, resend_in_flight } => {
                if self.connected {
                    tracing::warn!(%error, in_flight = self.window.len(), "link to the cloud down; batches stay queued");
                }
                self.connected = false;
                self.telemetry.connected.store(false, Ordering::Relaxed);
                self.telemetry.set_error(error);
                if resend_in_flight {
                    self.suspect_oversized();
                    self.requeue_in_flight();
                }
            }
            Outcome::Unverified { batch_id, signed } => {
                let n = self.telemetry.acks_unverified.fetch_add(1, Ordering::Relaxed) + 1;
                // Warned about at the first and then every 1000th: a flood must not flood the log.
                if n == 1 || n.is_multiple_of(1000) {
                    let why = if signed {
                        "ignored an ack whose MAC does not verify: BACKHAUL_API_KEY is not the key the cloud signs \
                         this device's acks with (its own entry in the cloud's keys file if it has one, else the \
                         fleet key `*`), or something other than the cloud publishes on this device's acks topic \
                         (check the broker's ACL)"
                    } else {
                        "ignored an unsigned ack: the cloud is older than this edge (upgrade the cloud first), or \
                         it has no key for this device (add one to its keys file), or something other than the \
                         cloud publishes on this device's acks topic (check the broker's ACL)"
                    };
                    tracing::warn!(%batch_id, ignored_so_far = n, "{why}");
                }
            }
            // Only acks for batches in flight are applied (issue #16): one for a batch not sent, or
            // answered already, or sent before the link last went down (it will be sent again and
            // acked as a duplicate), changes nothing.
            Outcome::Acked { batch_id, .. } | Outcome::Rejected { batch_id, .. }
                if !self.window.contains(&batch_id) =>
            {
                self.telemetry.acks_not_in_flight.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%batch_id, "ack for a batch not in flight (already acked, or sent before the link went down): ignored");
            }
            Outcome::Acked { batch_id, duplicate } => {
                let entry = self.window.remove(&batch_id);
                self.acked_on_link = true;
                self.suspects.remove(&batch_id);
                self.backlog = true;
                self.rejections_in_a_row = 0;
                self.pause_backoff.reset();
                match self.queue.ack(batch_id) {
                    Ok(AckOutcome::Acked) => {
                        self.telemetry.record_ack(entry.map(|e| e.batch.detections), duplicate);
                    }
                    Ok(AckOutcome::Unknown) => {
                        tracing::debug!(%batch_id, "ack for a batch not in flight (already acked, or sent before a restart)");
                    }
                    Err(e) => self.queue_error("recording an ack (the batch will be sent again)", &e),
                }
            }
            Outcome::Rejected { batch_id, reason } => {
                self.backlog = true;
                self.window.remove(&batch_id);
                self.rejections_in_a_row += 1;
                if self.rejections_in_a_row > REJECTIONS_BEFORE_PAUSE {
                    // Refusing batch after batch is a configuration mismatch (batches larger than
                    // the cloud's body limit, an incompatible cloud), not bad batches: keep them.
                    self.queue.nack(batch_id);
                    self.paused_for_rejections = true;
                    self.pause(format!(
                        "the cloud refused {REJECTIONS_BEFORE_PAUSE} batches in a row (last: {reason}); batches stay \
                         queued: check batch.max_detections against the cloud's max_body_bytes and max_detections, \
                         and that edge and cloud speak the same schema"
                    ));
                    return;
                }
                match self.queue.dead_letter(batch_id, &reason) {
                    Ok(AckOutcome::Acked) => {
                        self.telemetry.rejected_batches.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(AckOutcome::Unknown) => {}
                    Err(e) => self.queue_error("dead-lettering a refused batch", &e),
                }
            }
            Outcome::Retry { batch_id } => {
                if self.window.remove(&batch_id).is_some() {
                    self.queue.nack(batch_id);
                }
                self.backlog = true;
            }
            Outcome::Refused { batch_id, error } => {
                if self.window.remove(&batch_id).is_some() {
                    self.queue.nack(batch_id);
                }
                self.backlog = true;
                self.telemetry.refused_batches.fetch_add(1, Ordering::Relaxed);
                self.pause(error);
            }
        }
    }

    /// Everything in flight goes back to the queue, to be sent again (oldest first).
    fn requeue_in_flight(&mut self) {
        let n = self.window.clear();
        let back = self.queue.nack_all();
        if n > 0 || back > 0 {
            tracing::info!(batches = back.max(n), "batches in flight go back to the queue and are sent again");
        }
        self.backlog = true;
    }

    fn queue_error(&mut self, doing: &str, e: &QueueError) {
        tracing::error!(error = %e, "queue failed while {doing}; retrying in {QUEUE_RETRY:?}");
        self.queue_failed_at = Some(Instant::now());
    }

    fn device_status(&self, online: bool) -> Option<DeviceStatus> {
        let stats = self.queue.stats().ok()?;
        let drain = self.telemetry.drain(stats.pending, stats.in_flight);
        let dropped_invalid = self.telemetry.dropped_invalid();
        Some(DeviceStatus {
            online,
            queue_depth: Some(stats.pending + stats.in_flight),
            oldest_pending_age_s: stats.oldest_pending_age_s,
            dropped_batches: Some(stats.dropped_batches),
            dropped_detections: Some(stats.dropped_detections),
            uptime_s: Some(self.telemetry.uptime_s()),
            produced_batches: Some(stats.produced_batches),
            produced_detections: Some(stats.produced_detections),
            in_flight: Some(stats.in_flight),
            quarantined: Some(stats.quarantined),
            lost_batches: Some(stats.lost_batches),
            dead_lettered: Some(stats.dead_lettered_total),
            dropped_invalid: Some(dropped_invalid.values().sum()),
            drain_rate: Some(drain.rate),
            eta_s: drain.eta_s,
            link: Some(self.telemetry.mode.to_owned()),
            dropped_invalid_by_reason: Some(dropped_invalid),
            source_recoveries: Some(self.telemetry.source_recoveries.load(Ordering::Relaxed)),
            source_error: self.telemetry.source_error(),
        })
    }
}

/// The `n`-th key of a batch cut from `original`: the original's ULID time and, as its random
/// part, the first 80 bits of SHA-256(original, n). The same cut gives the same keys.
pub fn derived_key(original: BatchId, n: u32) -> BatchId {
    let mut bytes = original.to_bytes();
    let digest = Sha256::new().chain_update(bytes).chain_update(b"cut").chain_update(n.to_be_bytes()).finalize();
    bytes[6..].copy_from_slice(&digest[..10]);
    BatchId::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::queue::{Durability, NewBatch, QueueConfig};

    /// A transport whose cloud refuses every batch for good, answering at once.
    struct RefusingCloud {
        events: mpsc::Sender<Event<BatchId>>,
    }

    impl Transport for RefusingCloud {
        type Event = BatchId;
        fn ready(&self) -> bool {
            true
        }
        fn send(&mut self, batch: &QueuedBatch) -> bool {
            self.events.send(Event::Link(batch.batch_id)).is_ok()
        }
        fn handle(&mut self, batch_id: BatchId, out: &mut Vec<Outcome>) {
            out.push(Outcome::Rejected { batch_id, reason: "HTTP 413: body too large".into() });
        }
        fn tick(&mut self, _now: Instant) -> Option<Instant> {
            None
        }
        fn ack_timeout(&self) -> Option<Duration> {
            None
        }
        fn publish_status(&mut self, _status: &DeviceStatus) {}
        fn close(&mut self, _status: &DeviceStatus) {}
    }

    #[test]
    fn refusal_after_refusal_pauses_sending_instead_of_dead_lettering_the_whole_queue() {
        let dir = tempfile::tempdir().unwrap();
        let queue =
            Queue::open(dir.path(), QueueConfig { durability: Durability::Flush, ..QueueConfig::default() }).unwrap();
        for _ in 0..20 {
            queue
                .enqueue(NewBatch {
                    device_id: "pi".into(),
                    name: None,
                    location: None,
                    timestamp: backhaul_shared::Timestamp::now(),
                    detections: Vec::new(),
                    source_position: None,
                    batch_id: None,
                    clock: Default::default(),
                })
                .unwrap();
        }
        let (tx, rx) = mpsc::channel();
        let telemetry = Arc::new(Telemetry::new("pi", "test"));
        let config = ForwarderConfig {
            max_inflight: 4,
            rate_per_sec: 1000,
            burst: 1000,
            status_every: Duration::from_secs(3600),
            stop_grace: Duration::from_millis(100),
        };
        let forwarder =
            Forwarder::new(queue.clone(), RefusingCloud { events: tx.clone() }, rx, telemetry.clone(), config);
        tx.send(Event::Link(BatchId::new())).unwrap(); // an answer for nothing: ignored
        let mut f = forwarder;
        f.apply(Outcome::LinkUp);
        let handle = std::thread::spawn(move || f.run());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !telemetry.last_error().is_some_and(|e| e.contains("paused")) {
            assert!(Instant::now() < deadline, "sending never paused");
            std::thread::sleep(Duration::from_millis(10));
        }
        tx.send(Event::Shutdown).unwrap();
        handle.join().unwrap();
        let stats = queue.stats().unwrap();
        assert_eq!(stats.dead_letters, u64::from(REJECTIONS_BEFORE_PAUSE), "{stats:?}");
        assert_eq!(stats.pending + stats.in_flight, 20 - u64::from(REJECTIONS_BEFORE_PAUSE), "the rest stays queued");
    }

    #[test]
    fn a_failed_connect_attempt_clears_the_suspicion_of_an_oversized_batch() {
        let dir = tempfile::tempdir().unwrap();
        let queue =
            Queue::open(dir.path(), QueueConfig { durability: Durability::Flush, ..QueueConfig::default() }).unwrap();
        let (tx, rx) = mpsc::channel();
        let config = ForwarderConfig {
            max_inflight: 4,
            rate_per_sec: 1000,
            burst: 1000,
            status_every: Duration::from_secs(3600),
            stop_grace: Duration::from_millis(100),
        };
        let telemetry = Arc::new(Telemetry::new("pi", "test"));
        let mut f = Forwarder::new(queue, RefusingCloud { events: tx }, rx, telemetry, config);
        // Two short drops with the same batch in flight, then a broker that was not there.
        f.suspects.insert(BatchId::new(), STRIKES - 1);
        f.apply(Outcome::LinkDown { error: "connection refused".into(), resend_in_flight: true });
        assert!(f.suspects.is_empty(), "a broker that was away refused no packet");
        assert!(f.learned_max_payload.is_none());
    }

    #[test]
    fn keys_derived_for_a_cut_are_the_same_every_time_and_keep_the_original_time() {
        let original = BatchId::new();
        let (a, b) = (derived_key(original, 1), derived_key(original, 2));
        assert_eq!(a, derived_key(original, 1), "a cut made again after a crash has the same keys");
        assert_ne!(a, b);
        assert_ne!(a, original);
        assert_eq!(a.timestamp_ms(), original.timestamp_ms());
        assert_ne!(derived_key(BatchId::new(), 1), a, "another batch's cut has other keys");
    }
}
