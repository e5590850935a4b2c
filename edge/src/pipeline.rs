//! The producing half of the edge: source → batch → durable queue, on one thread of its own.
//!
//! A batch is cut at `max_detections` or when its oldest detection is `max_age_ms` old, and
//! enqueued durably before anything else happens to it; the forwarder is told only after the
//! enqueue returned. The source's position goes into the same write, so after a kill -9 a
//! resumable source continues after the last durable batch.
//!
//! When the queue cannot take a batch (`on_full = "block"` timed out, or the disk is full), the
//! batch in hand is kept and offered again every second; the source waits meanwhile (a resumable
//! source loses nothing: its position was not stored). A storage failure is fatal: the process
//! exits and systemd restarts it on a queue reopened from disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
    loop {
        telemetry.beat_source();
        if stop.load(Ordering::Relaxed) {
            if let Some(cut) = batcher.flush() {
                store(queue, device, cut, telemetry, stop, true, enqueued)?;
            }
            return Ok(());
        }
        let now = Instant::now();
        let mut nap = MAX_NAP;
        if !done {
            for _ in 0..TURN {
                match source.next(now) {
                    Next::Detection(d, position) => {
                        telemetry.source_detections.fetch_add(1, Ordering::Relaxed);
                        if let Some(cut) = batcher.push(d, position, ms(now)) {
                            store(queue, device, cut, telemetry, stop, false, enqueued)?;
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
                            store(queue, device, cut, telemetry, stop, false, enqueued)?;
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
            store(queue, device, cut, telemetry, stop, false, enqueued)?;
        }
        if let Some(due) = batcher.due_at_ms() {
            nap = nap.min(Duration::from_millis(due.saturating_sub(now_ms)));
        }
        if !nap.is_zero() {
            std::thread::sleep(nap);
        }
    }
}

/// Enqueues a cut durably, waiting out a full queue or disk; gives up only on a stop (the batch's
/// source position is then not stored, so a resumable source produces it again).
fn store(
    queue: &Queue,
    device: &DeviceInfo,
    cut: Cut,
    telemetry: &Telemetry,
    stop: &AtomicBool,
    stopping: bool,
    enqueued: &dyn Fn(),
) -> Result<(), EnqueueError> {
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
        // Made once: every retry of this enqueue carries the same key.
        batch_id: Some(backhaul_shared::BatchId::new()),
    };
    loop {
        match queue.enqueue(batch.clone()) {
            Ok(_) => {
                enqueued();
                return Ok(());
            }
            Err(e @ (EnqueueError::Full { .. } | EnqueueError::DiskFull)) => {
                tracing::error!(error = %e, "the queue cannot take the batch in hand; the source waits and it is tried again");
                if stopping || stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                // Waiting for room is legitimate: keep the watchdog's heartbeat going.
                telemetry.beat_source();
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e @ EnqueueError::TooLarge { .. }) => {
                tracing::error!(error = %e, detections = batch.detections.len(), "batch discarded");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}
