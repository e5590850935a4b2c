//! Cutting detections into batches: at `max_detections`, or when the oldest detection in hand is
//! `max_age_ms` old. A plain state machine with the clock passed in, so every rule is unit-tested
//! without waiting; the run loop calls [`Batcher::push`] per detection and [`Batcher::tick`] on a
//! timer.

use backhaul_shared::Detection;

/// A batch ready to enqueue, with the source position after its last detection.
#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    pub detections: Vec<Detection>,
    pub source_position: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct Batcher {
    max_detections: usize,
    max_age_ms: u64,
    pending: Vec<Detection>,
    /// When the first detection in hand arrived (ms, the caller's clock).
    opened_at_ms: Option<u64>,
    position: Option<Vec<u8>>,
}

impl Batcher {
    /// # Panics
    /// If `max_detections` is 0 (the config rejects it).
    pub fn new(max_detections: usize, max_age_ms: u64) -> Self {
        assert!(max_detections > 0, "max_detections must be at least 1");
        Self { max_detections, max_age_ms, pending: Vec::new(), opened_at_ms: None, position: None }
    }

    /// Adds a detection; returns a batch when this one fills it.
    pub fn push(&mut self, detection: Detection, position: Option<Vec<u8>>, now_ms: u64) -> Option<Cut> {
        self.opened_at_ms.get_or_insert(now_ms);
        self.pending.push(detection);
        if position.is_some() {
            self.position = position;
        }
        (self.pending.len() >= self.max_detections).then(|| self.cut())
    }

    /// A detection the source produced and the pipeline dropped: the next batch's position moves
    /// past it (so a resumed source does not produce it again), nothing else changes.
    pub fn skip(&mut self, position: Option<Vec<u8>>) {
        if position.is_some() {
            self.position = position;
        }
    }

    /// Returns the batch in hand if its oldest detection is `max_age_ms` old.
    pub fn tick(&mut self, now_ms: u64) -> Option<Cut> {
        let opened = self.opened_at_ms?;
        (now_ms.saturating_sub(opened) >= self.max_age_ms).then(|| self.cut())
    }

    /// When the batch in hand is due (for the run loop's timer), if any.
    pub fn due_at_ms(&self) -> Option<u64> {
        self.opened_at_ms.map(|t| t.saturating_add(self.max_age_ms))
    }

    /// Whatever is in hand (at shutdown).
    pub fn flush(&mut self) -> Option<Cut> {
        (!self.pending.is_empty()).then(|| self.cut())
    }

    fn cut(&mut self) -> Cut {
        self.opened_at_ms = None;
        Cut { detections: std::mem::take(&mut self.pending), source_position: self.position.take() }
    }
}

#[cfg(test)]
mod tests {
    use backhaul_shared::{Presence, Timestamp, Zone};

    use super::*;

    fn d(i: u64) -> Detection {
        Detection::Presence(Presence {
            device_hash: format!("{i:016x}"),
            rssi: -60,
            zone: Zone::Near,
            timestamp: Timestamp::from_unix_millis(i as i64).unwrap(),
        })
    }

    #[test]
    fn cuts_at_max_detections_in_order_with_the_last_position() {
        let mut b = Batcher::new(3, 5000);
        assert_eq!(b.push(d(1), Some(vec![1]), 0), None);
        assert_eq!(b.push(d(2), Some(vec![2]), 1), None);
        let cut = b.push(d(3), Some(vec![3]), 2).unwrap();
        assert_eq!(cut.detections, vec![d(1), d(2), d(3)]);
        assert_eq!(cut.source_position, Some(vec![3]));
        assert_eq!(b.flush(), None, "nothing left");
    }

    #[test]
    fn cuts_by_age_measured_from_the_first_detection() {
        let mut b = Batcher::new(500, 5000);
        assert_eq!(b.tick(10_000), None, "nothing in hand, nothing due");
        b.push(d(1), None, 1_000);
        b.push(d(2), None, 4_000);
        assert_eq!(b.due_at_ms(), Some(6_000));
        assert_eq!(b.tick(5_999), None);
        let cut = b.tick(6_000).unwrap();
        assert_eq!(cut.detections.len(), 2);
        assert_eq!(b.due_at_ms(), None);
        // The next batch's age starts at its own first detection.
        b.push(d(3), None, 7_000);
        assert_eq!(b.tick(11_999), None);
        assert!(b.tick(12_000).is_some());
    }

    #[test]
    fn a_skipped_detection_moves_the_position_only() {
        let mut b = Batcher::new(2, 5000);
        b.push(d(1), Some(vec![1]), 0);
        b.skip(Some(vec![2]));
        assert_eq!(b.due_at_ms(), Some(5000));
        let cut = b.push(d(3), None, 1).unwrap();
        assert_eq!((cut.detections, cut.source_position), (vec![d(1), d(3)], Some(vec![2])));
        b.skip(Some(vec![4]));
        assert_eq!(b.flush(), None, "a skip alone makes no batch");
    }

    #[test]
    fn flush_returns_what_is_in_hand() {
        let mut b = Batcher::new(10, 5000);
        b.push(d(1), Some(vec![9]), 0);
        let cut = b.flush().unwrap();
        assert_eq!((cut.detections.len(), cut.source_position), (1, Some(vec![9])));
    }
}
