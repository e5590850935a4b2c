//! The in-flight window: batches sent and not yet finally answered, at most `max_inflight`, with
//! when each was last sent so that an unanswered one is sent again after the ack timeout. Plain
//! state, the clock passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use backhaul_shared::BatchId;

use crate::queue::QueuedBatch;

/// One batch in flight.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// The batch as handed out by the queue (the payload is kept for resends).
    pub batch: QueuedBatch,
    /// When it was last sent.
    pub sent_at: Instant,
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
        self.entries.insert(batch.batch_id, InFlight { batch, sent_at: now });
    }

    pub fn remove(&mut self, id: &BatchId) -> Option<InFlight> {
        self.entries.remove(id)
    }

    /// The batches unanswered for `timeout`, oldest seq first; each is stamped as sent again now.
    pub fn take_overdue(&mut self, now: Instant, timeout: Duration) -> Vec<QueuedBatch> {
        let mut due: Vec<&mut InFlight> =
            self.entries.values_mut().filter(|e| now.saturating_duration_since(e.sent_at) >= timeout).collect();
        due.sort_by_key(|e| e.batch.seq);
        due.into_iter()
            .map(|e| {
                e.sent_at = now;
                e.batch.clone()
            })
            .collect()
    }

    /// When the oldest unanswered send becomes overdue.
    pub fn next_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.entries.values().map(|e| e.sent_at + timeout).min()
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
        // Stamped as sent again: the next deadline is the third batch's.
        assert_eq!(w.next_deadline(timeout), Some(t0 + Duration::from_secs(15)));
        assert_eq!(w.len(), 3);
        assert_eq!(w.clear(), 3);
        assert!(w.is_empty());
    }
}
