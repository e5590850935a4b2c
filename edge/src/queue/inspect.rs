//! Looking without changing: stats, the newest batch time, disk usage (what the budget counts and
//! what `du` shows), `verify`, `export`, and the test hooks.

use std::io;
use std::path::Path;

use backhaul_shared::Timestamp;
use serde::Deserialize;

use super::layout::{self, StoredBatch};
use super::recover::recount;
use super::retain::is_acked;
use super::{
    chunks, hex, now_ms, Budget, ExportError, ExportedRecord, Queue, QueueError, State, Stats, Store, VerifyReport,
};

impl Queue {
    /// The newest time a batch in this queue carries, for the clock floor (`crate::clock`): the
    /// `timestamp` of the newest stored batch (pending or retained acked) and dead-lettered batch,
    /// and the time of the newest ack marker. `None` for an empty queue. Reads at most two records.
    pub fn newest_batch_time(&self) -> Result<Option<Timestamp>, QueueError> {
        #[derive(Deserialize)]
        struct TimeOnly {
            timestamp: Timestamp,
        }
        let guard = self.inner.store.read().unwrap_or_else(|p| p.into_inner());
        let store = Store::get(&guard)?;
        let mut newest: Option<Timestamp> = None;
        // The newest marker's ack time (acks are written about in seq order).
        if let Some((_, value)) =
            store.tree.range([layout::ACK_MARKER]..[layout::ACK_MARKER + 1]).next_back().transpose()?
        {
            let acked = layout::decode_ack_marker(&value);
            newest = newest.max(Timestamp::from_unix_millis(acked as i64));
        }
        for tree_byte in [layout::PENDING, layout::DEAD] {
            let Some((key, _)) = store.tree.range([tree_byte]..[tree_byte + 1]).next_back().transpose()? else {
                continue;
            };
            let Some(len) = chunks::prefix_len(&key).filter(|l| key.len() >= *l) else { continue };
            let Some(record) = chunks::get(&store.tree, &key[..len])? else { continue };
            // A damaged record says nothing here; it is quarantined when it is read for sending.
            let time = StoredBatch::decode(&record.value)
                .ok()
                .and_then(|b| serde_json::from_slice::<TimeOnly>(&b.json()).ok())
                .map(|t| t.timestamp);
            newest = newest.max(time);
        }
        Ok(newest)
    }

    /// The last source position stored with a batch.
    pub fn source_position(&self) -> Result<Option<Vec<u8>>, QueueError> {
        Ok(self.lock_state().latest_position.clone())
    }

    /// Counts by state and the budget's use.
    pub fn stats(&self) -> Result<Stats, QueueError> {
        // Before the store guard: the lock order is sync, store, state.
        let syncs_since_open = self.inner.sync.lock().unwrap_or_else(|p| p.into_inner()).syncs;
        let guard = self.read_store();
        let st = self.lock_state();
        let c = st.counters;
        let in_flight = st.in_flight.len() as u64;
        let max = self.inner.config.max_bytes;
        let budget_bytes = match (self.inner.config.budget, st.budget.logical_limit) {
            (Budget::Disk, 0) if max != u64::MAX => max / 20 * 9,
            (Budget::Disk, limit) if limit > 0 => limit,
            _ => max,
        };
        // The counters live in memory: they are reported even while the database is closed after
        // a disk error (a full disk is exactly when an operator looks); only the age needs it. The
        // age is read under the same lock, from the state the queue acts on: nothing unacked
        // means no age, and a batch whose ack is not written yet is not pending.
        let oldest_pending_age_s = match Store::get(&guard) {
            Ok(store) if c.pending_batches > 0 => {
                oldest_unacked_enqueued_ms(store, &st).map(|at| now_ms().saturating_sub(at) / 1000)
            }
            _ => None,
        };
        drop(st);
        Ok(Stats {
            pending: c.pending_batches.saturating_sub(in_flight),
            in_flight,
            acked_retained: c.acked_batches,
            bytes: c.pending_bytes + c.acked_bytes + c.dead_bytes,
            budget_bytes,
            pending_bytes: c.pending_bytes,
            acked_bytes: c.acked_bytes,
            oldest_pending_age_s,
            produced_batches: c.produced_batches,
            produced_detections: c.produced_detections,
            dropped_batches: c.dropped_batches,
            dropped_detections: c.dropped_detections,
            quarantined: c.quarantined,
            acked_total: c.acked_total,
            dead_letters: c.dead_batches,
            dead_lettered_total: c.dead_total,
            lost_batches: c.lost_batches,
            next_seq: c.next_seq,
            syncs_since_open,
        })
    }

    /// What `data_dir` occupies on its filesystem, bytes: the allocated size (`st_blocks` x 512,
    /// as `du` counts it) of every file and directory in it, sled's own overhead and set-aside
    /// (`corrupt-*`) databases included. [`Stats::bytes`] is what the budget counts; this is the
    /// card's view. A directory walk, taken only where it is shown (`/status`, `queue stats`),
    /// not by [`Queue::stats`], which the forwarder calls too.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.path.parent().map_or(0, allocated_bytes)
    }

    /// Reads every record and checks it. It changes nothing but writing the acks still in memory.
    pub fn verify(&self) -> Result<VerifyReport, QueueError> {
        // Write pending acks first, so the records on disk are what the counters describe.
        self.flush()?;
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut report = VerifyReport::default();
        let any_size = backhaul_shared::Limits { max_detections: usize::MAX };
        for record in chunks::records(store.tree.iter()) {
            let record = record?;
            let key = &record.prefix;
            match key.first() {
                Some(&layout::PENDING) | Some(&layout::ACKED) | Some(&layout::DEAD) => {
                    match StoredBatch::decode(&record.value) {
                        Ok(b) => match backhaul_shared::Batch::from_json(&b.json(), &any_size) {
                            Ok(batch) if batch.batch_id == b.batch_id && batch.seq == b.seq => report.ok += 1,
                            Ok(_) => {
                                report.bad.push(format!("{}: header and JSON disagree on batch_id or seq", hex(key)))
                            }
                            Err(e) => report.bad.push(format!("{}: stored JSON does not parse: {e}", hex(key))),
                        },
                        Err(e) => report.bad.push(format!("{}: {e}", hex(key))),
                    }
                }
                Some(&layout::QUARANTINE) => report.quarantined += 1,
                _ => {}
            }
        }
        let counted = recount(&store.tree, None, false)?.counters;
        let stored = self.lock_state().counters;
        if (counted.pending_batches, counted.acked_batches) != (stored.pending_batches, stored.acked_batches) {
            report.bad.push(format!(
                "counters disagree with the records: counters say {} pending and {} acked, records are {} and {}",
                stored.pending_batches, stored.acked_batches, counted.pending_batches, counted.acked_batches
            ));
        }
        Ok(report)
    }

    /// Every stored record, for `queue export`.
    pub fn export(&self, mut each: impl FnMut(ExportedRecord) -> io::Result<()>) -> Result<(), ExportError> {
        self.flush()?;
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        for record in chunks::records(store.tree.iter()) {
            let record = record.map_err(QueueError::from)?;
            let (key, value) = (&record.prefix, &record.value);
            let (state, acked_at_ms) = match key.first() {
                Some(&layout::PENDING) => {
                    let marker = layout::pending_key_seq(key)
                        .map(|seq| store.tree.get(layout::ack_marker_key(seq)))
                        .transpose()
                        .map_err(QueueError::from)?
                        .flatten();
                    match marker {
                        Some(m) => ("acked", Some(layout::decode_ack_marker(&m))),
                        None => ("pending", None),
                    }
                }
                Some(&layout::ACKED) => ("acked", layout::acked_key_time(key)),
                Some(&layout::DEAD) => ("dead_letter", None),
                Some(&layout::QUARANTINE) => ("quarantined", None),
                _ => continue,
            };
            let reason = match (key.first(), layout::pending_key_seq(key)) {
                (Some(&layout::DEAD), Some(seq)) => store
                    .tree
                    .get(layout::dead_reason_key(seq))
                    .map_err(QueueError::from)?
                    .map(|r| String::from_utf8_lossy(&r).into_owned()),
                _ => None,
            };
            let exported = match StoredBatch::decode(value) {
                Ok(b) => ExportedRecord {
                    reason,
                    state,
                    key: hex(key),
                    seq: Some(b.seq),
                    batch_id: Some(b.batch_id.to_string()),
                    enqueued_at_ms: Some(b.enqueued_at_ms),
                    acked_at_ms,
                    detections: Some(b.detections),
                    batch: serde_json::from_slice(&b.json()).ok(),
                    error: None,
                    raw_hex: None,
                },
                Err(e) => ExportedRecord {
                    reason,
                    state,
                    key: hex(key),
                    seq: None,
                    batch_id: None,
                    enqueued_at_ms: None,
                    acked_at_ms,
                    detections: None,
                    batch: None,
                    error: Some(e.to_string()),
                    raw_hex: Some(hex(value)),
                },
            };
            each(exported).map_err(ExportError::Write)?;
        }
        Ok(())
    }

    /// Test hook: writes raw bytes under a pending key, as a damaged disk would leave them.
    #[doc(hidden)]
    pub fn debug_overwrite_pending(&self, seq: u64, value: &[u8]) -> Result<(), QueueError> {
        {
            let guard = self.read_store();
            let store = Store::get(&guard)?;
            if let Some(old) = chunks::get(&store.tree, &layout::pending_key(seq))? {
                let mut write = sled::Batch::default();
                chunks::remove_into(&mut write, &old);
                store.tree.apply_batch(write)?;
            }
            chunks::insert(&store.tree, &layout::pending_key(seq), value)?;
        }
        self.flush()
    }

    /// Test hook: the raw stored value of a pending record.
    #[doc(hidden)]
    pub fn debug_pending_raw(&self, seq: u64) -> Result<Option<Vec<u8>>, QueueError> {
        let guard = self.read_store();
        Ok(chunks::get(&Store::get(&guard)?.tree, &layout::pending_key(seq))?.map(|r| r.value))
    }
}

/// When the oldest batch not yet acknowledged (pending or in flight) was enqueued, ms since the
/// epoch: the first record from the ack floor on with neither a marker nor an ack still waiting
/// in memory to be written (acks are written in groups, see
/// [`ACK_WRITE_GROUP`](super::ACK_WRITE_GROUP)). A record that fails its check is passed over too
/// (it is quarantined when it is handed out). `None` on a read error: the age is not known.
fn oldest_unacked_enqueued_ms(store: &Store, st: &State) -> Option<u64> {
    let mut last = None;
    let from = layout::pending_key(st.counters.ack_floor);
    for key in store.tree.range(from..=layout::pending_key(u64::MAX)).keys() {
        let key = key.ok()?;
        let seq = layout::pending_key_seq(&key)?;
        if last == Some(seq) || st.unwritten_acks.contains_key(&seq) || is_acked(&store.tree, seq).ok()? {
            last = Some(seq);
            continue; // another chunk of a record passed over, or an acked batch
        }
        last = Some(seq);
        let record = chunks::get(&store.tree, &layout::pending_key(seq)).ok()??;
        if let Ok(h) = StoredBatch::decode_header(&record.value) {
            return Some(h.enqueued_at_ms);
        }
    }
    None
}

/// What the disk budget counts: `data_dir`'s allocated bytes without the databases set aside as
/// `corrupt-*` (kept for an operator to inspect, not the queue's to prune).
pub(super) fn budget_disk_bytes(data_dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::symlink_metadata(data_dir).map_or(0, |m| m.blocks() * 512);
    let Ok(entries) = std::fs::read_dir(data_dir) else { return own };
    own + entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with("corrupt-"))
        .map(|e| allocated_bytes(&e.path()))
        .sum::<u64>()
}

/// The allocated size of `path` and everything under it, bytes (`st_blocks` x 512, what `du -B1`
/// reports); entries that vanish while it walks count 0.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            total += entries.filter_map(Result::ok).map(|e| allocated_bytes(&e.path())).sum::<u64>();
        }
    }
    total
}
