//! Reads: handing batches out (oldest first, or newest first for live data), and what comes
//! back: ack, nack, dead letter. A record that fails its check on the way out is quarantined.

use backhaul_shared::BatchId;

use super::layout::{self, StoredBatch, StoredError};
use super::ledger::{write_meta, Change, Held};
use super::retain::is_acked;
use super::{chunks, hex, now_ms, AckOutcome, Queue, QueueError, QueuedBatch, State, Store, ACK_WRITE_GROUP};

impl Queue {
    /// Hands out the oldest pending batch that is not in flight, or `None`.
    pub fn next_batch(&self) -> Result<Option<QueuedBatch>, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        loop {
            let (record, from_retry) = if let Some(seq) = st.retry.pop_first() {
                match chunks::get(&store.tree, &layout::pending_key(seq))? {
                    Some(r) => (r, true),
                    None => continue, // dropped or acked meanwhile
                }
            } else {
                let from = layout::pending_key(st.cursor);
                match chunks::records(store.tree.range(from..=layout::pending_key(u64::MAX))).next() {
                    Some(r) => (r?, false),
                    None => return Ok(None),
                }
            };
            let Some(seq) = layout::pending_key_seq(&record.prefix) else { continue };
            if seq >= st.durable_next_seq {
                // Not synced yet: a crash could still take it back. Its enqueue is about to return.
                return Ok(None);
            }
            // Only the scan moves the cursor: a retried batch may lie past records not visited yet
            // (one handed out by `next_newest_batch`), which must not be skipped.
            if !from_retry {
                st.cursor = st.cursor.max(seq + 1);
                while st.newest_handed.first_key_value().is_some_and(|(_, &hi)| hi < st.cursor) {
                    st.newest_handed.pop_first();
                }
            }
            if st.in_flight.contains(&seq) || st.unwritten_acks.contains_key(&seq) || is_acked(&store.tree, seq)? {
                continue;
            }
            if let Some(batch) = hand_out_locked(store, &mut st, seq, &record)? {
                return Ok(Some(batch));
            }
        }
    }

    /// Marks a batch acknowledged: it leaves pending (kept for replay for `retain_acked`).
    ///
    /// The marker is written to disk with the next group of acks ([`ACK_WRITE_GROUP`]), the next
    /// [`Queue::flush`], [`Queue::prune_acked`], or any other write of the counters; an ack lost
    /// in a crash only means the batch is sent again, which the cloud absorbs as a duplicate.
    pub fn ack(&self, batch_id: BatchId) -> Result<AckOutcome, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        let Some((seq, value_len)) = st.handed.remove(&batch_id) else { return Ok(AckOutcome::Unknown) };
        st.in_flight.remove(&seq);
        st.retry.remove(&seq);
        let bytes = chunks::stored_size(9, value_len);
        // Retained: the record stays, with a marker.
        let retained_bytes = st.retain_acked.then_some(bytes + layout::ACK_MARKER_BYTES);
        st.counters.apply(Change::Acked { pending_bytes: bytes, retained_bytes });
        st.unwritten_acks.insert(seq, now_ms());
        if st.unwritten_acks.len() >= ACK_WRITE_GROUP {
            write_meta(store, &mut st, sled::Batch::default())?;
        }
        drop(st);
        self.inner.space.notify_all();
        Ok(AckOutcome::Acked)
    }

    /// Moves a handed-out batch that the cloud refused for good (a `rejected` ack, HTTP 400, 413,
    /// 422) from pending to the dead-letter tree, with `reason`; it is counted, kept for inspection
    /// (`queue export`) within the byte budget, and never sent again. Written at once (it is rare).
    pub fn dead_letter(&self, batch_id: BatchId, reason: &str) -> Result<AckOutcome, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        let Some(&(seq, _)) = st.handed.get(&batch_id) else { return Ok(AckOutcome::Unknown) };
        if st.unwritten_acks.contains_key(&seq) {
            return Ok(AckOutcome::Unknown); // acked meanwhile: the earlier answer stands
        }
        let Some(record) = chunks::get(&store.tree, &layout::pending_key(seq))? else {
            st.handed.remove(&batch_id);
            return Ok(AckOutcome::Unknown);
        };
        let size = record.stored_size();
        let mut write = sled::Batch::default();
        chunks::move_into(&mut write, &record, &layout::dead_key(seq));
        let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
        write.insert(&layout::dead_reason_key(seq)[..], reason.as_bytes());
        // The counters change only if the write does (write_meta writes st.counters).
        let before = st.counters;
        st.counters.apply(Change::DeadLettered { bytes: size });
        if let Err(e) = write_meta(store, &mut st, write) {
            st.counters = before;
            return Err(e);
        }
        st.handed.remove(&batch_id);
        st.in_flight.remove(&seq);
        st.retry.remove(&seq);
        tracing::error!(
            seq,
            %batch_id,
            reason = %reason,
            dead_letters = st.counters.dead_batches,
            "batch moved to the dead-letter tree, never sent again (the reason says why; inspect with `backhaul-edge queue export`)"
        );
        drop(st);
        self.inner.space.notify_all();
        Ok(AckOutcome::Acked)
    }

    /// Hands out the newest durable pending batch that is not in flight, or `None`: the forwarder
    /// alternates this with [`Queue::next_batch`] so live data is not stuck behind a backlog.
    pub fn next_newest_batch(&self) -> Result<Option<QueuedBatch>, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        let Some(last) = st.durable_next_seq.checked_sub(1) else { return Ok(None) };
        loop {
            let retry_newest = st.retry.last().copied();
            let walked = newest_unhanded(store, &mut st, last, retry_newest)?;
            let Some(seq) = walked.or(retry_newest) else { return Ok(None) };
            st.retry.remove(&seq);
            mark_handed(&mut st.newest_handed, seq);
            // Gone: dropped meanwhile (a retried seq); a damaged one is quarantined and skipped.
            let Some(record) = chunks::get(&store.tree, &layout::pending_key(seq))? else { continue };
            if let Some(batch) = hand_out_locked(store, &mut st, seq, &record)? {
                return Ok(Some(batch));
            }
        }
    }

    /// Puts an in-flight batch back to pending (e.g. after a reconnect); it is handed out again
    /// before newer batches.
    pub fn nack(&self, batch_id: BatchId) -> bool {
        let mut st = self.lock_state();
        let Some(&(seq, _)) = st.handed.get(&batch_id) else { return false };
        if st.in_flight.remove(&seq) {
            st.retry.insert(seq);
            true
        } else {
            false
        }
    }

    /// Puts every in-flight batch back to pending.
    pub fn nack_all(&self) -> usize {
        let mut st = self.lock_state();
        let seqs = std::mem::take(&mut st.in_flight);
        let n = seqs.len();
        st.retry.extend(seqs);
        n
    }
}

/// The newest durable batch at or above the cursor that is neither in flight nor acked, and newer
/// than `retry_newest`: the keys walked backwards from `last`, jumping over the ranges already
/// handed out from this end ([`State::newest_handed`]), so that draining a backlog from the newest
/// end does not walk its acked batches again on every call. Below the cursor every batch was
/// visited by the scan: it is acked, in flight, or in `retry`. Batches passed over are added to
/// the ranges.
fn newest_unhanded(
    store: &Store,
    st: &mut State,
    last: u64,
    retry_newest: Option<u64>,
) -> Result<Option<u64>, QueueError> {
    let mut upper = last;
    let mut passed = Vec::new();
    let found = 'walk: loop {
        if upper < st.cursor || retry_newest.is_some_and(|r| r >= upper) {
            break None;
        }
        if let Some((&lo, &hi)) = st.newest_handed.range(..=upper).next_back() {
            if hi >= upper {
                match lo.checked_sub(1) {
                    Some(below) => {
                        upper = below;
                        continue;
                    }
                    None => break None,
                }
            }
        }
        let lower = st.newest_handed.range(..upper).next_back().map_or(0, |(_, &hi)| hi + 1).max(st.cursor);
        let mut to = layout::pending_key(upper).to_vec();
        to.extend_from_slice(&[0xff, 0xff]);
        for key in store.tree.range(layout::pending_key(lower).to_vec()..=to).keys().rev() {
            let key = key?;
            let Some(seq) = layout::pending_key_seq(&key).filter(|_| key.len() == 11 && key[9..] == [0, 0]) else {
                continue;
            };
            if retry_newest.is_some_and(|r| r >= seq) {
                break 'walk None;
            }
            if st.in_flight.contains(&seq) || st.unwritten_acks.contains_key(&seq) || is_acked(&store.tree, seq)? {
                passed.push(seq);
                continue;
            }
            break 'walk Some(seq);
        }
        match lower.checked_sub(1) {
            Some(below) if lower > st.cursor => upper = below,
            _ => break None,
        }
    };
    for seq in passed {
        mark_handed(&mut st.newest_handed, seq);
    }
    Ok(found)
}

/// Adds `seq` to the disjoint ranges (lo → hi, inclusive), merging neighbours.
fn mark_handed(ranges: &mut std::collections::BTreeMap<u64, u64>, seq: u64) {
    let (mut lo, mut hi) = (seq, seq);
    if let Some((&l, &h)) = ranges.range(..=seq).next_back() {
        if h >= seq {
            return;
        }
        if h + 1 == seq {
            lo = l;
        }
    }
    if let Some(h) = seq.checked_add(1).and_then(|next| ranges.remove(&next)) {
        hi = h;
    }
    ranges.insert(lo, hi);
}

/// Decodes a pending record and marks it in flight; a record that fails its check is quarantined
/// (and `None` returned, so the caller looks further).
fn hand_out_locked(
    store: &Store,
    st: &mut State,
    seq: u64,
    record: &chunks::Record,
) -> Result<Option<QueuedBatch>, QueueError> {
    match StoredBatch::decode(&record.value) {
        Ok(b) => {
            st.in_flight.insert(seq);
            st.handed.insert(b.batch_id, (seq, record.value.len()));
            Ok(Some(QueuedBatch {
                seq,
                batch_id: b.batch_id,
                detections: b.detections,
                enqueued_at_ms: b.enqueued_at_ms,
                payload: b.json(),
            }))
        }
        Err(e) => {
            quarantine_locked(store, st, record, &e)?;
            Ok(None)
        }
    }
}

/// Moves a record that failed its check to quarantine, counted and logged.
pub(super) fn quarantine_locked(
    store: &Store,
    st: &mut State,
    record: &chunks::Record,
    error: &StoredError,
) -> Result<(), QueueError> {
    let key = &record.prefix;
    if let (Some(&layout::PENDING), Some(seq)) = (key.first(), layout::pending_key_seq(key)) {
        // A late ack of it must not count it again.
        st.handed.retain(|_, (s, _)| *s != seq);
        st.in_flight.remove(&seq);
        st.retry.remove(&seq);
    }
    let size = record.stored_size();
    let mut write = sled::Batch::default();
    let marker = layout::pending_key_seq(key).map(layout::ack_marker_key);
    let (from, bytes) = match key.first() {
        Some(&layout::PENDING) if marker.map(|m| store.tree.contains_key(m)).transpose()? == Some(true) => {
            // A retained acked batch (read by a replay): its marker goes with it.
            write.remove(&marker.expect("checked")[..]);
            (Some(Held::Acked), size + layout::ACK_MARKER_BYTES)
        }
        Some(&layout::PENDING) => (Some(Held::Pending), size),
        Some(&layout::ACKED) => (Some(Held::Acked), size),
        Some(&layout::DEAD) => (Some(Held::Dead), size),
        _ => (None, 0),
    };
    let mut counters = st.counters;
    counters.apply(Change::Quarantined { from, bytes });
    chunks::move_into(&mut write, record, &layout::quarantine_key(key));
    st.counters = counters;
    write_meta(store, st, write)?;
    tracing::error!(
        key = %hex(key),
        error = %error,
        quarantined_total = counters.quarantined,
        "queue record failed its integrity check: moved to quarantine (inspect with `backhaul-edge queue export`); the queue goes on"
    );
    Ok(())
}

/// A dead letter's reason is kept up to this many characters.
const MAX_REASON_CHARS: usize = 512;
