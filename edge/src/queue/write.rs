//! Writes: enqueue (one batch or several under one sync), making room within the byte budget
//! (pruning, `drop_oldest`, `block`), the logical limit the disk budget steers, and the group
//! commit that makes writes durable (sled's flush, our fdatasync, the watermark).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use backhaul_shared::{BatchId, Clock, Detection, Timestamp};
use serde::Serialize;

use super::inspect::budget_disk_bytes;
use super::layout::{self, StoredBatch};
use super::ledger::{write_meta, Change};
use super::retain::{is_acked, prune_acked_locked, prune_dead_locked};
use super::{
    chunks, now_ms, Budget, Durability, EnqueueError, Enqueued, NewBatch, OnFull, Queue, QueueError, State, Store,
    BUDGET_MEASURE_EVERY, BUDGET_SHRINK_COOLDOWN,
};

impl Queue {
    /// Stores a batch durably and returns its seq and batch_id.
    pub fn enqueue(&self, batch: NewBatch) -> Result<Enqueued, EnqueueError> {
        let mut done = self.enqueue_many(vec![batch])?;
        Ok(done.remove(0))
    }

    /// Stores several batches, in order, with one disk sync for all of them; returns once all are
    /// durable. For a producer that has more than one batch ready (a replay at full speed).
    ///
    /// Errors: [`EnqueueError::TooLarge`] is found before anything is written. On
    /// [`EnqueueError::Full`] (`on_full = "block"` timed out), the first `stored` batches are
    /// stored and durable; retry with the rest. On [`EnqueueError::DiskFull`] some may be stored;
    /// a retry with the same `batch_id`s finds them instead of storing them twice. Under
    /// `drop_oldest`, a full budget may drop an earlier batch of the same call, counted as any drop.
    pub fn enqueue_many(&self, batches: Vec<NewBatch>) -> Result<Vec<Enqueued>, EnqueueError> {
        // Under the disk budget the logical limit can be as low as a third of max_bytes.
        let max_bytes = match self.inner.config.budget {
            Budget::Disk if self.inner.config.max_bytes != u64::MAX => self.inner.config.max_bytes / 3,
            _ => self.inner.config.max_bytes,
        };
        let prepared = batches
            .into_iter()
            .map(|batch| {
                let prepared = Prepared::new(batch);
                if prepared.estimate > max_bytes {
                    return Err(EnqueueError::TooLarge { size: prepared.estimate, max_bytes });
                }
                Ok(prepared)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match self.try_enqueue(&prepared) {
                // A full disk behaves like on_full = "block" (dropping batches would not shrink
                // sled's files): wait for space, up to block_timeout, reopening the database, which
                // sled poisons after a failed write.
                Err(EnqueueError::DiskFull) if started.elapsed() < self.inner.config.block_timeout => {
                    std::thread::sleep(pause.min(self.inner.config.block_timeout.saturating_sub(started.elapsed())));
                    pause = (pause * 2).min(Duration::from_secs(1));
                    if let Err(e) = self.reopen() {
                        tracing::warn!(error = %e, "reopening the queue after a full disk failed; retrying");
                    }
                }
                other => return other,
            }
        }
    }

    fn try_enqueue(&self, prepared: &[Prepared]) -> Result<Vec<Enqueued>, EnqueueError> {
        let enqueued_at_ms = now_ms();
        let mut done = Vec::with_capacity(prepared.len());
        let mut full = None;
        let (epoch, ticket) = 'apply: {
            let guard = self.read_store();
            let store = Store::get(&guard).map_err(storage_error)?;
            let mut st = self.lock_state();
            for p in prepared {
                // Stored by an attempt cut short by a disk error, and found on disk at the reopen.
                if let Some(&seq) = st.recovered.get(&p.batch_id) {
                    done.push(Enqueued { seq, batch_id: p.batch_id, dropped: 0 });
                    continue;
                }
                let (st_back, dropped) = match self.make_room(store, st, p.estimate) {
                    Ok(r) => r,
                    // The ones before it are applied: make them durable and say how many.
                    Err(EnqueueError::Full { used, max_bytes, waited, .. }) if !done.is_empty() => {
                        full = Some(EnqueueError::Full { used, max_bytes, waited, stored: done.len() });
                        let st = self.lock_state();
                        break 'apply (st.epoch, st.applied);
                    }
                    Err(e) => return Err(e),
                };
                st = st_back;
                let seq = st.counters.next_seq;
                let record = StoredBatch {
                    batch_id: p.batch_id,
                    seq,
                    enqueued_at_ms,
                    detections: p.detections,
                    source_position: p.source_position.clone(),
                    head: p.parts.head.clone(),
                    tail: Vec::new(),
                }
                .encode_compressed(&p.parts.tail_lz4);
                // Plain inserts: the counters on disk are brought up to date at open by counting
                // the records past their `next_seq` (sled's `apply_batch` would cost two extra log
                // buffer writes, each waited for with sync_file_range).
                st.unsynced.insert(p.batch_id, seq);
                chunks::insert(&store.tree, &layout::pending_key(seq), &record).map_err(|e| storage_error(e.into()))?;
                st.counters.apply(Change::Enqueued {
                    seq,
                    bytes: chunks::stored_size(9, record.len()),
                    detections: u64::from(p.detections),
                });
                if let Some(pos) = &p.source_position {
                    st.latest_position = Some(pos.clone());
                }
                st.applied += 1;
                // Bound what the next open must count (see `load_counters`).
                if st.counters.next_seq.is_multiple_of(META_EVERY_ENQUEUES) {
                    write_meta(store, &mut st, sled::Batch::default()).map_err(storage_error)?;
                }
                done.push(Enqueued { seq, batch_id: p.batch_id, dropped });
            }
            (st.epoch, st.applied)
        };
        self.sync_to(epoch, ticket).map_err(storage_error)?;
        {
            // Durable now: a later retry with these keys is a new call's business.
            let mut st = self.lock_state();
            for d in &done {
                st.unsynced.remove(&d.batch_id);
                st.recovered.remove(&d.batch_id);
            }
        }
        match full {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Frees budget for `needed` bytes as the policy says. Returns the guard (Block waits on it).
    fn make_room<'a>(
        &'a self,
        store: &Store,
        mut st: MutexGuard<'a, State>,
        needed: u64,
    ) -> Result<(MutexGuard<'a, State>, u64), EnqueueError> {
        let used = |st: &State| st.counters.pending_bytes + st.counters.acked_bytes + st.counters.dead_bytes;
        let max = self.logical_limit(&mut st);
        st.budget.written_since += needed;
        if used(&st) + needed <= max {
            return Ok((st, 0));
        }
        // Delivered batches go first, then dead letters (refused for good, kept only for inspection).
        let over = used(&st) + needed - max;
        prune_acked_locked(store, &mut st, None, Some(over)).map_err(storage_error)?;
        if used(&st) + needed <= max {
            return Ok((st, 0));
        }
        let over = used(&st) + needed - max;
        prune_dead_locked(store, &mut st, over).map_err(storage_error)?;
        if used(&st) + needed <= max {
            return Ok((st, 0));
        }
        match self.inner.config.on_full {
            OnFull::DropOldest => {
                let over = used(&st) + needed - max;
                let dropped = drop_oldest_locked(store, &mut st, over).map_err(storage_error)?;
                // What is left is in flight (bounded by max_inflight): go over budget by that much
                // rather than refuse a new batch.
                Ok((st, dropped))
            }
            OnFull::Block => {
                let started = Instant::now();
                let timeout = self.inner.config.block_timeout;
                tracing::warn!(
                    used = used(&st),
                    max_bytes = max,
                    "queue full; enqueue waits for acks (on_full = block)"
                );
                loop {
                    let left = timeout.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(EnqueueError::Full {
                            used: used(&st),
                            max_bytes: max,
                            waited: started.elapsed(),
                            stored: 0,
                        });
                    }
                    st = self.inner.space.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
                    let over = (used(&st) + needed).saturating_sub(max);
                    prune_acked_locked(store, &mut st, None, Some(over)).map_err(storage_error)?;
                    if used(&st) + needed <= max {
                        return Ok((st, 0));
                    }
                }
            }
        }
    }

    /// The logical limit of the records' bytes, measuring the disk when it is due (see "Byte
    /// budget" in the module docs).
    fn logical_limit(&self, st: &mut State) -> u64 {
        let max = self.inner.config.max_bytes;
        if self.inner.config.budget == Budget::Logical || max == u64::MAX {
            return max;
        }
        let b = &mut st.budget;
        if b.logical_limit == 0 {
            b.logical_limit = max / 20 * 9;
        }
        let due = b.measured_at.is_none_or(|t| t.elapsed() >= BUDGET_MEASURE_EVERY) || b.written_since >= max / 64;
        if !due {
            return b.logical_limit;
        }
        let used = st.counters.pending_bytes + st.counters.acked_bytes + st.counters.dead_bytes;
        let disk = self.inner.path.parent().map_or(0, budget_disk_bytes);
        let b = &mut st.budget;
        b.measured_at = Some(Instant::now());
        b.written_since = 0;
        if disk == 0 {
            return b.logical_limit; // the walk failed: nothing to steer by
        }
        let target = max / 20 * 17;
        let grown = b
            .last_shrink
            .is_none_or(|(at, then)| at.elapsed() >= BUDGET_SHRINK_COOLDOWN && disk > then.saturating_add(max / 64));
        if disk > max / 20 * 19 && disk > b.disk_bytes && grown {
            // Near the budget and growing: shrink the limit in proportion.
            b.logical_limit =
                u64::try_from(u128::from(b.logical_limit) * u128::from(target) / u128::from(disk)).unwrap_or(0);
            b.last_shrink = Some((Instant::now(), disk));
        } else if disk < max / 5 * 4 {
            // Room: grow into it at the measured ratio of disk to logical bytes.
            let ratio = (disk as f64 / used.max(1) as f64).clamp(1.0, 4.0);
            let grow = ((target - disk) as f64 / ratio) as u64;
            b.logical_limit = b.logical_limit.max(used.saturating_add(grow));
        }
        b.logical_limit = b.logical_limit.clamp(max / 3, max);
        b.disk_bytes = disk;
        b.logical_limit
    }

    /// Makes everything applied up to `ticket` durable, sharing the sync with concurrent callers.
    pub(super) fn sync_to(&self, epoch: u64, ticket: u64) -> Result<(), QueueError> {
        let mut sync = self.inner.sync.lock().unwrap_or_else(|p| p.into_inner());
        if self.lock_state().epoch != epoch {
            return Err(QueueError::Reopened);
        }
        if sync.durable >= ticket {
            return Ok(()); // someone else's sync covered our write
        }
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let (target, next_seq, watermark) = {
            let st = self.lock_state();
            let c = &st.counters;
            let watermark = layout::Watermark {
                next_seq: c.next_seq,
                pending_batches: c.pending_batches,
                produced_batches: c.produced_batches,
                produced_detections: c.produced_detections,
                source_position: st.latest_position.clone(),
            };
            (st.applied, c.next_seq, watermark)
        };
        store.db.flush()?;
        if self.inner.config.durability == Durability::Fsync {
            // Blob files first: the log that points to them must not be durable before they are.
            sync_new_blobs(&self.inner.path.join("blobs"), &mut sync.blobs_synced)?;
            store.log_file.sync_data()?;
        }
        if let Some(file) = sync.watermark.as_ref().filter(|_| self.inner.config.durability == Durability::Fsync) {
            // Synced after sled's log (see `layout::Watermark`): it never claims more than sled
            // had made durable, and it survives the power cuts that can cost sled data (issue
            // #17). A failure only weakens the check.
            let bytes = watermark.encode();
            let written = std::os::unix::fs::FileExt::write_all_at(file, &bytes, 0)
                .and_then(|()| file.set_len(bytes.len() as u64))
                .and_then(|()| file.sync_data());
            if let Err(e) = written {
                tracing::warn!(error = %e, "writing queue.watermark failed; a sled that loses data at the next start may go unnoticed");
            }
        }
        sync.durable = target;
        sync.syncs += 1;
        let mut st = self.lock_state();
        st.durable_next_seq = st.durable_next_seq.max(next_seq);
        Ok(())
    }

    /// Writes the counters (with any acks in memory) and makes them durable.
    pub(super) fn write_counters(&self) -> Result<(), QueueError> {
        let (epoch, ticket) = {
            let guard = self.read_store();
            let store = Store::get(&guard)?;
            let mut st = self.lock_state();
            write_meta(store, &mut st, sled::Batch::default())?;
            (st.epoch, st.applied)
        };
        self.sync_to(epoch, ticket)
    }

    /// Writes pending acks and makes every write so far durable.
    pub fn flush(&self) -> Result<(), QueueError> {
        let (epoch, ticket) = {
            let guard = self.read_store();
            let store = Store::get(&guard)?;
            let mut st = self.lock_state();
            if !st.unwritten_acks.is_empty() {
                write_meta(store, &mut st, sled::Batch::default())?;
            }
            st.applied += 1;
            (st.epoch, st.applied)
        };
        self.sync_to(epoch, ticket)
    }
}

/// Drops the oldest pending batches that are not in flight until `to_free` bytes are freed.
fn drop_oldest_locked(store: &Store, st: &mut State, to_free: u64) -> Result<u64, QueueError> {
    let mut freed = 0;
    let mut write = sled::Batch::default();
    let mut counters = st.counters;
    let mut dropped = Vec::new();
    let from = layout::pending_key(st.counters.ack_floor);
    for record in chunks::records(store.tree.range(from..=layout::pending_key(u64::MAX))) {
        if freed >= to_free {
            break;
        }
        let record = record?;
        let Some(seq) = layout::pending_key_seq(&record.prefix) else { continue };
        if st.in_flight.contains(&seq) || st.unwritten_acks.contains_key(&seq) || is_acked(&store.tree, seq)? {
            continue;
        }
        let size = record.stored_size();
        let detections = match StoredBatch::decode_header(&record.value) {
            Ok(b) => {
                st.handed.remove(&b.batch_id);
                u64::from(b.detections)
            }
            // Unreadable anyway: count the batch, its detections are unknown.
            Err(_) => 0,
        };
        chunks::remove_into(&mut write, &record);
        counters.apply(Change::Dropped { bytes: size, detections });
        freed += size;
        dropped.push((seq, detections));
    }
    if dropped.is_empty() {
        return Ok(0);
    }
    st.counters = counters;
    write_meta(store, st, write)?;
    for (seq, _) in &dropped {
        st.retry.remove(seq);
    }
    // A full queue drops on every enqueue: a warning at most every 10 s (the counts are in
    // /status and /metrics), the rest at debug level, to spare the SD card.
    static LAST_WARN_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = now_ms();
    let last = LAST_WARN_MS.load(std::sync::atomic::Ordering::Relaxed);
    let detections = dropped.iter().map(|d| d.1).sum::<u64>();
    let (first_seq, last_seq) = (dropped.first().map(|d| d.0), dropped.last().map(|d| d.0));
    if now.saturating_sub(last) >= 10_000 {
        LAST_WARN_MS.store(now, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            batches = dropped.len(),
            detections,
            first_seq,
            last_seq,
            total_dropped = counters.dropped_batches,
            "queue over its byte budget: dropped the oldest pending batches (on_full = drop_oldest); \
             further drops in the next 10 s are logged at debug level and counted in /status"
        );
    } else {
        tracing::debug!(batches = dropped.len(), detections, first_seq, last_seq, "dropped the oldest pending batches");
    }
    Ok(dropped.len() as u64)
}

/// The counters are written at least every this many enqueues, so that an open after a crash
/// counts at most this many records past them.
const META_EVERY_ENQUEUES: u64 = 1024;

fn storage_error(e: QueueError) -> EnqueueError {
    // Unavailable: a reopen after a disk error failed, most likely for the same reason.
    // Reopened: the write was lost with the failed database; the caller's retry loop redoes it.
    if e.is_disk_full() || matches!(e, QueueError::Unavailable | QueueError::Reopened) {
        tracing::error!(error = %e, "the disk holding the queue is full; the batch was not stored");
        EnqueueError::DiskFull
    } else {
        EnqueueError::Storage(e)
    }
}

/// A batch made ready for the lock: id assigned, JSON serialized and compressed, size known.
struct Prepared {
    batch_id: BatchId,
    detections: u32,
    parts: WireParts,
    source_position: Option<Vec<u8>>,
    /// Bytes the budget will count (the seq's digits are in the fixed-size header).
    estimate: u64,
}

impl Prepared {
    fn new(batch: NewBatch) -> Self {
        let batch_id = batch.batch_id.unwrap_or_default();
        let parts = WireParts::new(&batch, batch_id);
        let position_len = batch.source_position.as_ref().map_or(0, Vec::len);
        Self {
            batch_id,
            detections: u32::try_from(batch.detections.len()).unwrap_or(u32::MAX),
            estimate: chunks::stored_size(9, parts.stored_len() + position_len + 64),
            parts,
            source_position: batch.source_position,
        }
    }
}

/// The batch's wire JSON split around `seq`, serialized before the seq is known (outside the lock),
/// so that under the lock only a concatenation remains. The field order is the one of
/// [`backhaul_shared::Batch`], and the result is byte-identical to `Batch::to_json`.
pub(super) struct WireParts {
    /// `{"schema":1,"batch_id":"…","device_id":"…"`
    head: Vec<u8>,
    /// `"name":…,"location":…,"timestamp":"…","detections":[…]}`
    #[cfg_attr(not(test), allow(dead_code))]
    tail: Vec<u8>,
    /// `tail`, LZ4-compressed outside the lock.
    tail_lz4: Vec<u8>,
}

impl WireParts {
    pub(super) fn new(b: &NewBatch, batch_id: BatchId) -> Self {
        #[derive(Serialize)]
        struct Head<'a> {
            schema: u32,
            batch_id: BatchId,
            device_id: &'a str,
        }
        #[derive(Serialize)]
        struct Tail<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            name: &'a Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            location: &'a Option<String>,
            timestamp: Timestamp,
            detections: &'a [Detection],
            #[serde(skip_serializing_if = "Clock::is_synced")]
            clock: Clock,
        }
        let mut head = serde_json::to_vec(&Head {
            schema: backhaul_shared::batch::SCHEMA_VERSION,
            batch_id,
            device_id: &b.device_id,
        })
        .expect("serializes");
        head.pop(); // the closing brace
        let mut tail = serde_json::to_vec(&Tail {
            name: &b.name,
            location: &b.location,
            timestamp: b.timestamp,
            detections: &b.detections,
            clock: b.clock,
        })
        .expect("serializes");
        tail.remove(0); // the opening brace
        let tail_lz4 = layout::compress_tail(&tail);
        Self { head, tail, tail_lz4 }
    }

    /// Bytes stored for the batch's JSON (head plain, tail compressed).
    fn stored_len(&self) -> usize {
        self.head.len() + self.tail_lz4.len()
    }

    #[cfg(test)]
    pub(super) fn json(&self, seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.head.len() + self.tail.len() + 32);
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b",\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.push(b',');
        out.extend_from_slice(&self.tail);
        out
    }
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsyncs the blob files not synced yet, then the blob directory. (With records in 4 KiB chunks
/// sled should never write a blob; this is the safety net if it does.)
fn sync_new_blobs(dir: &Path, synced: &mut std::collections::HashSet<u64>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut present = std::collections::HashSet::new();
    let mut any = false;
    for entry in entries {
        let entry = entry?;
        let Some(n) = entry.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else { continue };
        present.insert(n);
        if !synced.contains(&n) {
            match File::open(entry.path()) {
                Ok(f) => f.sync_data()?,
                // sled deletes blobs whose page was rewritten: nothing left to sync.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            any = true;
        }
    }
    if any {
        sync_dir(dir)?;
    }
    *synced = present;
    Ok(())
}
