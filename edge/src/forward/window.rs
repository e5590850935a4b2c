//! The in-flight window: batches sent and not yet finally answered, at most `max_inflight`, with
//! when each was first and last sent, so that an unanswered one is sent again after the ack
//! timeout, and again after twice that, four times, … (capped at [`MAX_DOUBLINGS`] doublings):
//! a link that is up but never answers (an ACL that drops our publishes, a cloud that is down) is
//! not flooded with the same batches. Plain state, the clock passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use backhaul_shared::BatchId;

use crate::queue::QueuedBatch;

/// The wait before a resend doubles after each unanswered send, at most this many times (with
/// the default 30 s ack timeout: 30 s, 1 min, 2 min, … up to 16 min).
pub const MAX_DOUBLINGS: u32 = 5;

/// One batch in flight.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// The batch as handed out by the queue (the payload is kept for resends).
    pub batch: QueuedBatch,
    /// When it was first sent (since it was last handed out by the queue).
    pub first_sent_at: Instant,
    /// When it was last sent.
    pub sent_at: Instant,
    /// How many times it was sent (1 after the first send).
    pub sends: u32,
}

impl InFlight {
    /// When it is due to be sent again.
    fn due_at(&self, timeout: Duration) -> Instant {
        self.sent_at + timeout * 2u32.pow(self.sends.saturating_sub(1).min(MAX_DOUBLINGS))
    }
}

/// Batches sent and unanswered for longer than the ack timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overdue {
    pub count: usize,
    /// When the oldest of them became overdue (its first send + the timeout).
    pub since: Instant,
}

#[derive(Debug)]
pub struct Window {
    max: usize,
    entries: HashMap<BatchId, InFlight>,
}

impl Window {
    pub fn new(max_inflight: usize) -> Self {
        Self { max: max_inflight.max(1), entries: HashMap::new() }
    }

    pub fn has_room(&self) -> bool {
        self.entries.len() < self.max
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn insert(&mut self, batch: QueuedBatch, now: Instant) {
        self.entries.insert(batch.batch_id, InFlight { batch, first_sent_at: now, sent_at: now, sends: 1 });
    }

    pub fn contains(&self, id: &BatchId) -> bool {
        self.entries.contains_key(id)
    }

    pub fn remove(&mut self, id: &BatchId) -> Option<InFlight> {
        self.entries.remove(id)
    }

    /// The batches due to be sent again (see the module docs), oldest seq first; each is stamped
    /// as sent again now.
    pub fn take_overdue(&mut self, now: Instant, timeout: Duration) -> Vec<QueuedBatch> {
        let mut due: Vec<&mut InFlight> = self.entries.values_mut().filter(|e| now >= e.due_at(timeout)).collect();
        due.sort_by_key(|e| e.batch.seq);
        due.into_iter()
            .map(|e| {
                e.sent_at = now;
                e.sends = e.sends.saturating_add(1);
                e.batch.clone()
            })
            .collect()
    }

    /// When the next batch is due to be sent again.
    pub fn next_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.entries.values().map(|e| e.due_at(timeout)).min()
    }

    /// The batches first sent more than `timeout` ago and still unanswered.
    pub fn overdue(&self, now: Instant, timeout: Duration) -> Option<Overdue> {
        let mut overdue = self.entries.values().filter(|e| now.saturating_duration_since(e.first_sent_at) >= timeout);
        let first = overdue.next()?;
        let (count, oldest) =
            overdue.fold((1, first.first_sent_at), |(n, oldest), e| (n + 1, oldest.min(e.first_sent_at)));
        Some(Overdue { count, since: oldest + timeout })
    }

    /// The batch in flight with the largest payload, and that size.
    pub fn largest(&self) -> Option<(BatchId, usize)> {
        self.entries.values().map(|e| (e.batch.batch_id, e.batch.payload.len())).max_by_key(|&(_, len)| len)
    }

    /// Empties the window (the link went down: everything in it is sent again).
    pub fn clear(&mut self) -> usize {
        let n = self.entries.len();
        self.entries.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64) -> QueuedBatch {
        QueuedBatch { seq, batch_id: BatchId::new(), detections: 1, enqueued_at_ms: 0, payload: b"{}".to_vec() }
    }

    #[test]
    fn holds_at_most_max_inflight() {
        let mut w = Window::new(2);
        let now = Instant::now();
        let (a, b) = (batch(1), batch(2));
        w.insert(a.clone(), now);
        assert!(w.has_room());
        w.insert(b, now);
        assert!(!w.has_room());
        assert_eq!(w.remove(&a.batch_id).map(|e| e.batch.seq), Some(1));
        assert!(w.has_room());
        assert!(w.remove(&a.batch_id).is_none(), "answered once");
    }

    #[test]
    fn unanswered_batches_are_resent_after_the_timeout_oldest_first() {
        let mut w = Window::new(8);
        let t0 = Instant::now();
        w.insert(batch(5), t0);
        w.insert(batch(3), t0);
        w.insert(batch(9), t0 + Duration::from_secs(5));
        let timeout = Duration::from_secs(10);
        assert_eq!(w.next_deadline(timeout), Some(t0 + timeout));
        assert!(w.take_overdue(t0 + Duration::from_secs(9), timeout).is_empty());
        let due: Vec<u64> = w.take_overdue(t0 + timeout, timeout).iter().map(|b| b.seq).collect();
        assert_eq!(due, vec![3, 5]);
        // Sent again: the next deadline is the third batch's (its first), not theirs (doubled).
        assert_eq!(w.next_deadline(timeout), Some(t0 + Duration::from_secs(15)));
        assert_eq!(w.len(), 3);
        assert_eq!(w.clear(), 3);
        assert!(w.is_empty());
    }

    #[test]
    fn resends_of_the_same_batch_back_off_exponentially_up_to_a_cap() {
        let mut w = Window::new(1);
        let t0 = Instant::now();
        w.insert(batch(1), t0);
        let timeout = Duration::from_secs(1);
        let mut t = t0;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            let next = w.next_deadline(timeout).unwrap();
            gaps.push((next - t).as_secs());
            t = next;
            assert_eq!(w.take_overdue(t, timeout).len(), 1);
        }
        assert_eq!(gaps, vec![1, 2, 4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn overdue_counts_batches_unanswered_past_the_timeout_since_the_oldest() {
        let mut w = Window::new(8);
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        assert_eq!(w.overdue(t0, timeout), None);
        w.insert(batch(1), t0);
        w.insert(batch(2), t0 + Duration::from_secs(4));
        w.insert(batch(3), t0 + Duration::from_secs(20));
        assert_eq!(w.overdue(t0 + Duration::from_secs(9), timeout), None);
        let o = w.overdue(t0 + Duration::from_secs(15), timeout).unwrap();
        assert_eq!(o, Overdue { count: 2, since: t0 + timeout });
        // Resending does not make a batch less overdue.
        w.take_overdue(t0 + Duration::from_secs(15), timeout);
        assert_eq!(w.overdue(t0 + Duration::from_secs(15), timeout).map(|o| o.count), Some(2));
    }
}
