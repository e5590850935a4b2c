//! The producing half of the edge: source → batch → durable queue, on one thread of its own.
//!
//! Every detection is checked against the wire contract before it is batched, with the rules the
//! cloud applies to a batch (`backhaul_shared::batch::validate_detection`, one definition for
//! both). One the cloud would refuse (an RSSI of +127, HCI's "not available") is dropped and
//! counted by reason (`/status` `dropped_invalid`), so it cannot get its whole batch refused and
//! dead-lettered with the good detections in it.
//!
//! A batch is cut at `max_detections` or when its oldest detection is `max_age_ms` old, and
//! enqueued durably before anything else happens to it; the forwarder is told only after the
//! enqueue returned. Every batch cut in one turn of the loop (a burst: up to 10,000 detections)
//! is enqueued together with [`Queue::enqueue_many`], under one disk sync (issue #17). The source's position goes into the same write, so after a kill -9 a
//! resumable source continues after the last durable batch.
//!
//! A cut bigger than the link can carry ([`Telemetry::max_payload_bytes`], from the broker's
//! maximum packet size or `transport.mqtt.max_message_bytes`) is split into batches that fit,
//! enqueued together under one sync; only the last carries the source position, so a crash
//! between them at worst produces the first ones' detections again (at least once).
//!
//! When the queue cannot take a batch (`on_full = "block"` timed out, or the disk is full), the
//! batch in hand is kept and offered again every second; the source waits meanwhile (a resumable
//! source loses nothing: its position was not stored). A storage failure is fatal: the process
//! exits and systemd restarts it on a queue reopened from disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backhaul_shared::batch::{validate_detection, DetectionError};
use backhaul_shared::BatchId;

use crate::batch::{Batcher, Cut};
use crate::queue::{EnqueueError, NewBatch, Queue};
use crate::source::{Next, Source};
use crate::telemetry::Telemetry;

/// What every batch of this device carries.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub device_id: String,
    pub name: Option<String>,
    pub location: Option<String>,
}

/// Longest the loop sleeps, so a stop is seen promptly and the heartbeat keeps beating.
const MAX_NAP: Duration = Duration::from_millis(200);
/// Detections taken in one turn of the loop before looking at the clock and the stop flag again.
const TURN: usize = 10_000;

/// Runs until `stop` is set; then enqueues the batch in hand and returns. `enqueued` is called
/// after every durable enqueue (it wakes the forwarder).
pub fn run(
    source: &mut dyn Source,
    batcher: &mut Batcher,
    queue: &Queue,
    device: &DeviceInfo,
    telemetry: &Telemetry,
    stop: &AtomicBool,
    enqueued: &dyn Fn(),
) -> Result<(), EnqueueError> {
    let clock = Instant::now();
    let ms = |t: Instant| t.duration_since(clock).as_millis() as u64;
    let mut done = false;
    // Batches cut in this turn, enqueued together at its end.
    let mut ready = Vec::new();
    // Test-only fault injection (see `crate::failpoint_after`).
    let panic_at = crate::failpoint_after("panic_source_after:").map(|d| clock + d);
    loop {
        telemetry.beat_source();
        if panic_at.is_some_and(|t| Instant::now() >= t) {
            panic!("FAILPOINT panic_source: the pipeline thread panics on purpose");
        }
        if stop.load(Ordering::Relaxed) {
            if let Some(cut) = batcher.flush() {
                prepare(device, cut, telemetry, &mut ready);
            }
            return commit(queue, &mut ready, telemetry, stop, true, enqueued);
        }
        // An operator's `flush` command (issue #18): cut the open batch now.
        let asked = telemetry.flush_requests.load(Ordering::SeqCst);
        if asked > telemetry.flushes_done.load(Ordering::SeqCst) {
            let cut = batcher.flush();
            let detections = cut.as_ref().map_or(0, |c| c.detections.len() as u64);
            if let Some(cut) = cut {
                prepare(device, cut, telemetry, &mut ready);
                commit(queue, &mut ready, telemetry, stop, false, enqueued)?;
            }
            telemetry.last_flush_detections.store(detections, Ordering::SeqCst);
            telemetry.flushes_done.store(asked, Ordering::SeqCst);
        }
        let now = Instant::now();
        let mut nap = MAX_NAP;
        if !done {
            for _ in 0..TURN {
                match source.next(now) {
                    Next::Detection(d, position) => {
                        telemetry.source_detections.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = validate_detection(&d) {
                            drop_invalid(&e, telemetry);
                            batcher.skip(position);
                            continue;
                        }
                        if let Some(cut) = batcher.push(d, position, ms(now)) {
                            prepare(device, cut, telemetry, &mut ready);
                        }
                    }
                    Next::Wait(w) => {
                        nap = nap.min(w);
                        break;
                    }
                    Next::Done => {
                        done = true;
                        // Nothing more will come: no reason to wait for the batch's age.
                        if let Some(cut) = batcher.flush() {
                            prepare(device, cut, telemetry, &mut ready);
                        }
                        telemetry.source_done.store(true, Ordering::Relaxed);
                        tracing::info!("the source has produced everything it will");
                        break;
                    }
                }
            }
        }
        let now_ms = ms(Instant::now());
        if let Some(cut) = batcher.tick(now_ms) {
            prepare(device, cut, telemetry, &mut ready);
        }
        commit(queue, &mut ready, telemetry, stop, false, enqueued)?;
        if let Some(due) = batcher.due_at_ms() {
            nap = nap.min(Duration::from_millis(due.saturating_sub(now_ms)));
        }
        if !nap.is_zero() {
            std::thread::sleep(nap);
        }
    }
}

/// Counts a detection the cloud would refuse. Logged as a warning the first time per reason (a
/// radio that reports +127 does so all day), then at debug level; `/status` has the counts.
fn drop_invalid(e: &DetectionError, telemetry: &Telemetry) {
    let n = telemetry.count_invalid(e.reason);
    if n == 1 {
        tracing::warn!(reason = e.reason, error = %e, "dropped a detection that breaks the wire contract (the cloud would refuse its batch); further ones are counted in /status dropped_invalid");
    } else {
        tracing::debug!(reason = e.reason, error = %e, dropped = n, "dropped a detection that breaks the wire contract");
    }
}

/// Makes a cut into the batches to enqueue (split to fit the link), each with its idempotency key
/// made once, so every retry of its enqueue carries the same key.
fn prepare(device: &DeviceInfo, cut: Cut, telemetry: &Telemetry, ready: &mut Vec<NewBatch>) {
    // From the clock floor while the wall clock is below it (a Pi without an RTC): crate::clock.
    let (timestamp, clock) = crate::clock::stamp_batch();
    let batch = NewBatch {
        device_id: device.device_id.clone(),
        name: device.name.clone(),
        location: device.location.clone(),
        timestamp,
        clock,
        detections: cut.detections,
        source_position: cut.source_position,
        batch_id: Some(BatchId::new()),
    };
    let max_payload = usize::try_from(telemetry.max_payload_bytes.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
    if max_payload == 0 {
        ready.push(batch);
        return;
    }
    match split_to_fit(batch.clone(), max_payload, &mut BatchId::new) {
        Some(parts) => ready.extend(parts),
        None => {
            tracing::error!(
                max_payload,
                "a single detection is larger than the largest message the link can carry: the batch is kept \
                 whole and stays queued (the forwarder pauses and says so); raise the broker's max_packet_size \
                 or transport.mqtt.max_message_bytes"
            );
            ready.push(batch);
        }
    }
}

/// Enqueues every batch in `ready` durably, in order, under one sync, waiting out a full queue or
/// disk; gives up only on a stop (the batches not stored then carry source positions that were not
/// stored either, so a resumable source produces them again). `ready` is empty afterwards.
fn commit(
    queue: &Queue,
    ready: &mut Vec<NewBatch>,
    telemetry: &Telemetry,
    stop: &AtomicBool,
    stopping: bool,
    enqueued: &dyn Fn(),
) -> Result<(), EnqueueError> {
    while !ready.is_empty() {
        match queue.enqueue_many(ready.clone()) {
            Ok(_) => {
                ready.clear();
                enqueued();
            }
            Err(e @ (EnqueueError::Full { .. } | EnqueueError::DiskFull)) => {
                // The first `stored` are durable: never enqueue them again. (After a disk error
                // the queue finds earlier attempts by their keys.)
                if let EnqueueError::Full { stored, .. } = e {
                    if stored > 0 {
                        ready.drain(..stored.min(ready.len()));
                        enqueued();
                    }
                }
                tracing::error!(error = %e, batches = ready.len(), "the queue cannot take the batches in hand; the source waits and they are tried again");
                if stopping || stop.load(Ordering::Relaxed) {
                    ready.clear();
                    return Ok(());
                }
                // Waiting for room is legitimate: keep the watchdog's heartbeat going.
                telemetry.beat_source();
                std::thread::sleep(Duration::from_secs(1));
            }
            // Found before anything was written: one at a time, so only the batch that can never
            // fit is discarded.
            Err(EnqueueError::TooLarge { .. }) => {
                for batch in std::mem::take(ready) {
                    if enqueue_durably(queue, batch, telemetry, stop, stopping)? {
                        enqueued();
                    } else if stopping || stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Enqueues one batch, waiting out a full queue or disk. `Ok(false)`: not stored, because of a
/// stop or because it can never fit the byte budget (logged).
fn enqueue_durably(
    queue: &Queue,
    batch: NewBatch,
    telemetry: &Telemetry,
    stop: &AtomicBool,
    stopping: bool,
) -> Result<bool, EnqueueError> {
    loop {
        match queue.enqueue(batch.clone()) {
            Ok(_) => return Ok(true),
            Err(e @ (EnqueueError::Full { .. } | EnqueueError::DiskFull)) => {
                tracing::error!(error = %e, "the queue cannot take the batch in hand; the source waits and it is tried again");
                if stopping || stop.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                // Waiting for room is legitimate: keep the watchdog's heartbeat going.
                telemetry.beat_source();
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e @ EnqueueError::TooLarge { .. }) => {
                tracing::error!(error = %e, detections = batch.detections.len(), "batch discarded");
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
}

/// An upper bound of a batch's wire JSON size, bytes: its detections' JSON, and the envelope
/// (schema, ids, seq, times, clock: under 256 bytes) with its strings escaped at worst 2 bytes a
/// byte (control characters are refused by the config, and serde_json escapes only `"` and `\`
/// of the rest).
pub fn wire_size_bound(batch: &NewBatch) -> usize {
    let strings = batch.device_id.len()
        + batch.name.as_ref().map_or(0, String::len)
        + batch.location.as_ref().map_or(0, String::len);
    let detections = serde_json::to_vec(&batch.detections).map_or(usize::MAX, |v| v.len());
    detections.saturating_add(256 + 2 * strings)
}

/// Splits a batch into batches whose wire JSON fits in `max_payload` bytes, in order, each with
/// its own idempotency key from `new_key` (called in a fixed order, so a deterministic `new_key`
/// gives the same keys for the same input); a batch that fits is returned as it is. The source
/// position goes with the last. `None` when a single detection cannot fit alone (the limit is a
/// configuration mistake; nothing is dropped for it).
pub fn split_to_fit(
    batch: NewBatch,
    max_payload: usize,
    new_key: &mut dyn FnMut() -> BatchId,
) -> Option<Vec<NewBatch>> {
    if wire_size_bound(&batch) <= max_payload {
        return Some(vec![batch]);
    }
    if batch.detections.len() <= 1 {
        return None;
    }
    let mut first = batch.clone();
    let mut second = batch;
    let tail = first.detections.split_off(first.detections.len() / 2);
    second.detections = tail;
    first.source_position = None;
    first.batch_id = Some(new_key());
    second.batch_id = Some(new_key());
    let mut out = split_to_fit(first, max_payload, new_key)?;
    out.extend(split_to_fit(second, max_payload, new_key)?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use backhaul_shared::batch::Clock;

    fn batch(detections: usize) -> NewBatch {
        NewBatch {
            source_position: Some(vec![7]),
            batch_id: Some(BatchId::new()),
            ..crate::queue::tests::new_batch(detections)
        }
    }

    /// A burst: `n` detections at once, then nothing ever again.
    struct Burst {
        left: usize,
        position: u64,
    }

    impl Source for Burst {
        fn next(&mut self, _now: Instant) -> Next {
            if self.left == 0 {
                return Next::Done;
            }
            self.left -= 1;
            self.position += 1;
            let d = crate::queue::tests::new_batch(1).detections.remove(0);
            Next::Detection(d, Some(self.position.to_le_bytes().to_vec()))
        }
    }

    #[test]
    fn the_batches_of_a_burst_share_one_disk_sync() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path(), crate::queue::QueueConfig::default()).unwrap();
        let syncs_at_open = queue.stats().unwrap().syncs_since_open;
        let telemetry = Telemetry::new("rpi-test", "test");
        let device = DeviceInfo { device_id: "rpi-test".into(), name: None, location: None };
        let stop = AtomicBool::new(false);
        let wakes = std::sync::atomic::AtomicU64::new(0);
        let enqueued = || {
            wakes.fetch_add(1, Ordering::Relaxed);
            // Stop once everything is in: the source said Done.
            if telemetry.source_done.load(Ordering::Relaxed) {
                stop.store(true, Ordering::Relaxed);
            }
        };
        let mut batcher = Batcher::new(100, 60_000);
        run(&mut Burst { left: 5_000, position: 0 }, &mut batcher, &queue, &device, &telemetry, &stop, &enqueued)
            .unwrap();
        let s = queue.stats().unwrap();
        assert_eq!((s.produced_batches, s.produced_detections), (50, 5_000), "{s:?}");
        assert_eq!(queue.source_position().unwrap(), Some(5_000u64.to_le_bytes().to_vec()));
        // One sync (and one wake of the forwarder) for the 50 batches of the burst, not 50.
        let syncs = s.syncs_since_open - syncs_at_open;
        assert!(syncs <= 2, "{syncs} syncs for one burst of 50 batches");
        assert_eq!(wakes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_cut_too_large_for_the_link_is_split_into_batches_that_fit_in_order() {
        let b = batch(100);
        let whole = wire_size_bound(&b);
        let max = whole / 3;
        let parts = split_to_fit(b.clone(), max, &mut BatchId::new).unwrap();
        assert!(parts.len() >= 3, "{}", parts.len());
        for p in &parts {
            assert!(wire_size_bound(p) <= max);
            let json = backhaul_shared::Batch {
                schema: 1,
                batch_id: p.batch_id.unwrap(),
                device_id: p.device_id.clone(),
                seq: u64::MAX,
                name: p.name.clone(),
                location: p.location.clone(),
                timestamp: p.timestamp,
                detections: p.detections.clone(),
                clock: Clock::Unsynced,
            }
            .to_json();
            assert!(json.len() <= wire_size_bound(p), "the bound holds: {} > {}", json.len(), wire_size_bound(p));
        }
        let all: Vec<_> = parts.iter().flat_map(|p| p.detections.clone()).collect();
        assert_eq!(all, b.detections, "every detection, in order");
        let keys: std::collections::HashSet<_> = parts.iter().map(|p| p.batch_id).collect();
        assert_eq!(keys.len(), parts.len(), "each its own key");
        assert!(parts[..parts.len() - 1].iter().all(|p| p.source_position.is_none()));
        assert_eq!(parts.last().unwrap().source_position, Some(vec![7]), "the position goes with the last");
        assert_eq!(
            split_to_fit(b.clone(), whole, &mut BatchId::new).unwrap().len(),
            1,
            "a batch that fits is left alone"
        );
        assert!(split_to_fit(batch(1), 10, &mut BatchId::new).is_none(), "a detection that cannot fit is no cut");
        assert!(split_to_fit(b, 10, &mut BatchId::new).is_none(), "nothing is dropped for a limit that small");
    }
}
