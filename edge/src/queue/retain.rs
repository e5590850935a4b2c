//! What is kept after delivery: ack markers and the ack floor, pruning retained acked batches and
//! dead letters, putting acked batches back for an operator's replay, and the migration of a
//! layout 1 queue (acked batches moved under `h`) to markers.

use std::time::SystemTime;

use super::layout::{self, Counters, StoredBatch};
use super::ledger::{write_meta, Change};
use super::read::quarantine_locked;
use super::{chunks, now_ms, Queue, QueueError, State, Store};

impl Queue {
    /// Removes acked batches older than `retain_acked`. Returns how many.
    pub fn prune_acked(&self) -> Result<u64, QueueError> {
        let cutoff = now_ms().saturating_sub(self.inner.config.retain_acked.as_millis() as u64);
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        let n = prune_acked_locked(store, &mut st, Some(cutoff), None)?;
        drop(st);
        if n > 0 {
            self.inner.space.notify_all();
        }
        Ok(n)
    }

    /// Puts batches acked in `[since, until)` (ack time) back to pending under their original
    /// `batch_id` and `seq`, for an operator's replay: their markers are removed and the ack floor
    /// lowered to the oldest of them, so a restart before they are sent finds them too. Walks every
    /// marker (one per retained batch). Returns how many.
    pub fn requeue_acked(&self, since: SystemTime, until: Option<SystemTime>) -> Result<u64, QueueError> {
        let ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let (since, until) = (ms(since), until.map(ms).unwrap_or(u64::MAX));
        let ticket = {
            let guard = self.read_store();
            let store = Store::get(&guard)?;
            let mut st = self.lock_state();
            if !st.unwritten_acks.is_empty() {
                write_meta(store, &mut st, sled::Batch::default())?;
            }
            let mut seqs = Vec::new();
            for item in store.tree.range(layout::ack_marker_key(0)..=layout::ack_marker_key(u64::MAX)) {
                let (key, value) = item?;
                let acked_at = layout::decode_ack_marker(&value);
                if let Some(seq) = layout::pending_key_seq(&key).filter(|_| (since..until).contains(&acked_at)) {
                    seqs.push(seq);
                }
            }
            // Damaged records are quarantined first, so the requeue below is one atomic write.
            let mut found = Vec::new();
            for seq in seqs {
                let Some(record) = chunks::get(&store.tree, &layout::pending_key(seq))? else { continue };
                match StoredBatch::decode_header(&record.value) {
                    Ok(_) => found.push((seq, record.stored_size())),
                    Err(e) => quarantine_locked(store, &mut st, &record, &e)?,
                }
            }
            if found.is_empty() {
                return Ok(0);
            }
            let mut write = sled::Batch::default();
            let mut counters = st.counters;
            // The ack floor goes down to the oldest of them.
            for &(seq, size) in &found {
                write.remove(&layout::ack_marker_key(seq)[..]);
                counters.apply(Change::Requeued {
                    seq,
                    pending_bytes: size,
                    acked_bytes: size + layout::ACK_MARKER_BYTES,
                });
            }
            let before = st.counters;
            st.counters = counters;
            if let Err(e) = write_meta(store, &mut st, write) {
                st.counters = before;
                return Err(e);
            }
            st.retry.extend(found.iter().map(|f| f.0));
            tracing::info!(batches = found.len(), "requeued acked batches for replay");
            (st.epoch, st.applied, found.len() as u64)
        };
        self.sync_to(ticket.0, ticket.1)?;
        Ok(ticket.2)
    }
}

/// Removes retained acked batches (record and marker together) oldest seq first: those acked
/// before `before_ms` (stopping at the first marker acked later: while a backlog drains from both
/// ends, or after a replay, an old seq acked late holds back the pruning by age of the seqs after
/// it until it is old enough itself; pruning for room ignores age), or until `bytes` are freed. In atomic writes of at most [`PRUNE_STEP`] batches with the counters.
pub(super) fn prune_acked_locked(
    store: &Store,
    st: &mut State,
    before_ms: Option<u64>,
    bytes: Option<u64>,
) -> Result<u64, QueueError> {
    // Acks still in memory first, so that what is pruned is everything acked.
    if !st.unwritten_acks.is_empty() {
        write_meta(store, st, sled::Batch::default())?;
    }
    let (mut n, mut freed) = (0u64, 0u64);
    let mut from = 0;
    loop {
        let mut write = sled::Batch::default();
        let mut counters = st.counters;
        let mut step = 0;
        let mut done = true;
        for item in store.tree.range(layout::ack_marker_key(from)..=layout::ack_marker_key(u64::MAX)) {
            if bytes.is_some_and(|b| freed >= b) {
                break;
            }
            let (key, value) = item?;
            let Some(seq) = layout::pending_key_seq(&key) else { continue };
            if before_ms.is_some_and(|before| layout::decode_ack_marker(&value) >= before) {
                break;
            }
            if step == PRUNE_STEP {
                done = false;
                from = seq;
                break;
            }
            write.remove(key);
            let size = match chunks::get(&store.tree, &layout::pending_key(seq))? {
                Some(record) => {
                    chunks::remove_into(&mut write, &record);
                    record.stored_size()
                }
                None => 0, // a marker whose record is gone (quarantined): only the marker is left
            };
            counters.apply(Change::PrunedAcked { bytes: size + layout::ACK_MARKER_BYTES });
            freed += size + layout::ACK_MARKER_BYTES;
            n += 1;
            step += 1;
        }
        if step > 0 {
            st.counters = counters;
            write_meta(store, st, write)?;
        }
        if done {
            return Ok(n);
        }
    }
}

/// Removes dead letters oldest first until `bytes` are freed (the budget needs the room); one
/// atomic write with the counters.
pub(super) fn prune_dead_locked(store: &Store, st: &mut State, bytes: u64) -> Result<u64, QueueError> {
    let mut write = sled::Batch::default();
    let mut counters = st.counters;
    let (mut n, mut freed) = (0u64, 0u64);
    let mut upto = layout::dead_key(u64::MAX).to_vec();
    upto.extend_from_slice(&[0xff, 0xff]); // the last key's chunks too
    for record in chunks::records(store.tree.range(layout::dead_key(0).to_vec()..upto)) {
        if freed >= bytes {
            break;
        }
        let record = record?;
        let size = record.stored_size();
        chunks::remove_into(&mut write, &record);
        if let Some(seq) = layout::pending_key_seq(&record.prefix) {
            write.remove(&layout::dead_reason_key(seq)[..]);
        }
        counters.apply(Change::PrunedDead { bytes: size });
        freed += size;
        n += 1;
    }
    if n > 0 {
        st.counters = counters;
        write_meta(store, st, write)?;
        tracing::warn!(batches = n, "queue over its byte budget: removed the oldest dead-lettered batches");
    }
    Ok(n)
}

/// Whether the batch `seq` has an ack marker on disk.
pub(super) fn is_acked(tree: &sled::Tree, seq: u64) -> sled::Result<bool> {
    tree.contains_key(layout::ack_marker_key(seq))
}

/// Moves `c.ack_floor` up to the first batch without an ack marker (or to `next_seq` if there is
/// none). Walks keys only, from the old floor: each acked batch is passed once, and the walk stops
/// at the first pending one.
pub(super) fn advance_ack_floor(tree: &sled::Tree, c: &mut Counters) -> sled::Result<()> {
    let mut last = None;
    for key in tree.range(layout::pending_key(c.ack_floor)..=layout::pending_key(u64::MAX)).keys() {
        let key = key?;
        let Some(seq) = layout::pending_key_seq(&key) else { continue };
        if last == Some(seq) {
            continue;
        }
        last = Some(seq);
        if !is_acked(tree, seq)? {
            c.apply(Change::AckFloorRaised { to: seq });
            return Ok(());
        }
    }
    c.apply(Change::AckFloorRaised { to: c.next_seq });
    Ok(())
}

/// Batches per atomic write when pruning and when migrating layout 1.
const PRUNE_STEP: usize = 4096;

const MIGRATE_STEP: usize = 1024;

/// Migrates the acked batches of layout 1 (moved to `h` + acked_at + seq) to layout 2: back under
/// `p` + seq with an ack marker. Atomic steps of [`MIGRATE_STEP`] batches, each with the counters,
/// so a crash during it leaves a queue that opens and goes on migrating. Returns how many moved.
pub(super) fn migrate_layout1(tree: &sled::Tree, c: &mut Counters) -> sled::Result<u64> {
    let mut moved = 0u64;
    loop {
        let records = chunks::records(tree.range([layout::ACKED]..[layout::ACKED + 1]))
            .take(MIGRATE_STEP)
            .collect::<sled::Result<Vec<_>>>()?;
        if records.is_empty() {
            break;
        }
        let mut write = sled::Batch::default();
        for record in &records {
            let key = &record.prefix;
            let (Some(acked_at), Some(seq)) = (layout::acked_key_time(key), key.get(9..17)) else { continue };
            let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
            chunks::move_into(&mut write, record, &layout::pending_key(seq));
            write.insert(&layout::ack_marker_key(seq)[..], &layout::encode_ack_marker(acked_at)[..]);
            c.apply(Change::Migrated {
                layout1_bytes: record.stored_size(),
                bytes: chunks::stored_size(9, record.value.len()) + layout::ACK_MARKER_BYTES,
            });
        }
        write.insert(layout::META_COUNTERS, c.encode());
        tree.apply_batch(write)?;
        moved += records.len() as u64;
    }
    if moved > 0 {
        tracing::info!(batches = moved, "migrated the queue's retained acked batches to ack markers (layout 2)");
    }
    Ok(moved)
}
