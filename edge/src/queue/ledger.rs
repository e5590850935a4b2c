//! The ledger: the counters ([`Counters`], persisted, see `layout`), the one function that
//! changes them ([`Counters::apply`] with a [`Change`]), and the one function that writes them,
//! always together with the change they describe ([`write_meta`]).

use super::layout::{self, Counters};
use super::retain::advance_ack_floor;
use super::{chunks, QueueError, State, Store};

/// Applies `write` together with every unwritten ack, the counters and the latest source position,
/// as one atomic sled batch. Every write of the counters goes through here, so the counters on disk
/// always describe the records on disk (up to the enqueues after `next_seq`, counted at open).
///
/// An ack is a marker (no read of the record) or, with `retain_acked = 0`, the record's removal.
/// After the write the ack floor is moved in memory; it is persisted with the next write (a lower
/// floor on disk is always true).
pub(super) fn write_meta(store: &Store, st: &mut State, mut write: sled::Batch) -> Result<(), QueueError> {
    for (&seq, &acked_at_ms) in &st.unwritten_acks {
        if st.retain_acked {
            write.insert(&layout::ack_marker_key(seq)[..], &layout::encode_ack_marker(acked_at_ms)[..]);
        } else if let Some(record) = chunks::get(&store.tree, &layout::pending_key(seq))? {
            chunks::remove_into(&mut write, &record);
        }
    }
    write.insert(layout::META_COUNTERS, st.counters.encode());
    if let Some(pos) = &st.latest_position {
        write.insert(layout::META_SOURCE_POSITION, pos.as_slice());
    }
    store.tree.apply_batch(write)?;
    st.unwritten_acks.clear();
    st.applied += 1;
    // The write is done: a failed walk only leaves the floor lower, which is still true.
    if let Err(e) = advance_ack_floor(&store.tree, &mut st.counters) {
        tracing::warn!(error = %e, "moving the queue's ack floor failed; a restart scans a little more");
    }
    Ok(())
}

/// Where a batch is counted: the three stores the byte budget counts, each with a batch count and
/// a byte count in [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// Under `p` + seq without an ack marker: waiting or in flight (`pending_batches`,
    /// `pending_bytes`).
    Pending,
    /// Acked and retained for replay: under `p` + seq with a marker, or under `h` in layout 1
    /// (`acked_batches`, `acked_bytes`).
    Acked,
    /// Dead-lettered, under `d` + seq (`dead_batches`, `dead_bytes`).
    Dead,
}

/// One change of the counters, applied by [`Counters::apply`]: the only way they change.
///
/// Bytes are logical bytes as the budget counts them: a record's keys and (framed, compressed)
/// value (`chunks::Record::stored_size`, or `chunks::stored_size` before it is written), plus an
/// ack marker's [`layout::ACK_MARKER_BYTES`] where the batch has one; the caller says how many.
/// A count that would go below zero stays at zero (the counters may be behind the records after a
/// crash: they are never allowed to wrap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// A batch stored under `seq`, by an enqueue or found at open past the persisted counters:
    /// pending +1 batch and `bytes`, produced +1 batch and `detections`, `next_seq` = `seq + 1`.
    Enqueued { seq: u64, bytes: u64, detections: u64 },
    /// A handed-out batch acked: pending −1 batch and `pending_bytes`, `acked_total` +1; with
    /// `retained_bytes` (record and marker, when `retain_acked` is not zero) retained acked +1 batch
    /// and those bytes.
    Acked { pending_bytes: u64, retained_bytes: Option<u64> },
    /// A pending batch moved to the dead letters: pending −1 batch and `bytes`, dead +1 batch and
    /// `bytes`, `dead_total` +1.
    DeadLettered { bytes: u64 },
    /// A pending batch dropped by `on_full = "drop_oldest"`: pending −1 batch and `bytes`, dropped
    /// +1 batch and `detections` (0 when its header does not read).
    Dropped { bytes: u64, detections: u64 },
    /// A record that failed its check moved to quarantine: `quarantined` +1, and −1 batch and
    /// `bytes` where it was counted (`None`: nowhere).
    Quarantined { from: Option<Held>, bytes: u64 },
    /// A retained acked batch pruned (record and marker): retained acked −1 batch and `bytes`.
    PrunedAcked { bytes: u64 },
    /// A dead letter pruned: dead −1 batch and `bytes`.
    PrunedDead { bytes: u64 },
    /// The retained acked batch `seq` put back to pending for a replay (its marker removed):
    /// retained acked −1 batch and `acked_bytes` (record and marker), pending +1 batch and
    /// `pending_bytes` (the record), the ack floor lowered to `seq` if it was above.
    Requeued { seq: u64, pending_bytes: u64, acked_bytes: u64 },
    /// A layout 1 acked record (`layout1_bytes` under `h`) moved back under `p` with a marker
    /// (`bytes`, record and marker): retained acked bytes −`layout1_bytes` +`bytes`; the batch
    /// count stays.
    Migrated { layout1_bytes: u64, bytes: u64 },
    /// The torn record of an enqueue cut by a crash, discarded at open: pending −1 batch and
    /// `bytes`, produced −1 batch (its detections were not counted: a torn record's header does not
    /// read), and `next_seq` = `seq` (reused) when its key says it.
    Discarded { seq: Option<u64>, bytes: u64 },
    /// A recount (the counters record missing or damaged) found a batch in `held`: +1 batch and
    /// `bytes` there, produced +1 batch and `detections` (0 when its header does not read).
    Counted { held: Held, bytes: u64, detections: u64 },
    /// A recount found a quarantined record: `quarantined` +1.
    CountedQuarantined,
    /// `next_seq` raised to at least this (a recount: one past the highest seq found).
    NextSeqAtLeast { next_seq: u64 },
    /// sled came back at open with less than the watermark says was durable: `lost_batches`
    /// +`batches`, `next_seq` and the produced counts raised to at least the watermark's (the lost
    /// seqs are not reused).
    Lost { batches: u64, next_seq: u64, produced_batches: u64, produced_detections: u64 },
    /// The ack floor raised to at least `to` (every batch below it has a marker).
    AckFloorRaised { to: u64 },
}

impl Counters {
    /// Applies one change (see [`Change`] for what each one moves). Counts and bytes taken away
    /// saturate at zero; nothing else is changed.
    pub(super) fn apply(&mut self, change: Change) {
        match change {
            Change::Enqueued { seq, bytes, detections } => {
                self.add(Held::Pending, bytes);
                self.produced_batches += 1;
                self.produced_detections += detections;
                self.next_seq = seq + 1;
            }
            Change::Acked { pending_bytes, retained_bytes } => {
                self.take(Held::Pending, pending_bytes);
                self.acked_total += 1;
                if let Some(bytes) = retained_bytes {
                    self.add(Held::Acked, bytes);
                }
            }
            Change::DeadLettered { bytes } => {
                self.take(Held::Pending, bytes);
                self.add(Held::Dead, bytes);
                self.dead_total += 1;
            }
            Change::Dropped { bytes, detections } => {
                self.take(Held::Pending, bytes);
                self.dropped_batches += 1;
                self.dropped_detections += detections;
            }
            Change::Quarantined { from, bytes } => {
                self.quarantined += 1;
                if let Some(held) = from {
                    self.take(held, bytes);
                }
            }
            Change::PrunedAcked { bytes } => self.take(Held::Acked, bytes),
            Change::PrunedDead { bytes } => self.take(Held::Dead, bytes),
            Change::Requeued { seq, pending_bytes, acked_bytes } => {
                self.take(Held::Acked, acked_bytes);
                self.add(Held::Pending, pending_bytes);
                self.ack_floor = self.ack_floor.min(seq);
            }
            Change::Migrated { layout1_bytes, bytes } => {
                self.acked_bytes = self.acked_bytes.saturating_sub(layout1_bytes) + bytes;
            }
            Change::Discarded { seq, bytes } => {
                self.take(Held::Pending, bytes);
                self.produced_batches = self.produced_batches.saturating_sub(1);
                if let Some(seq) = seq {
                    self.next_seq = seq;
                }
            }
            Change::Counted { held, bytes, detections } => {
                self.add(held, bytes);
                self.produced_batches += 1;
                self.produced_detections += detections;
            }
            Change::CountedQuarantined => self.quarantined += 1,
            Change::NextSeqAtLeast { next_seq } => self.next_seq = self.next_seq.max(next_seq),
            Change::Lost { batches, next_seq, produced_batches, produced_detections } => {
                self.lost_batches += batches;
                self.next_seq = self.next_seq.max(next_seq);
                self.produced_batches = self.produced_batches.max(produced_batches);
                self.produced_detections = self.produced_detections.max(produced_detections);
            }
            Change::AckFloorRaised { to } => self.ack_floor = self.ack_floor.max(to),
        }
    }

    /// The batch and byte counts of `held`.
    fn held(&mut self, held: Held) -> (&mut u64, &mut u64) {
        match held {
            Held::Pending => (&mut self.pending_batches, &mut self.pending_bytes),
            Held::Acked => (&mut self.acked_batches, &mut self.acked_bytes),
            Held::Dead => (&mut self.dead_batches, &mut self.dead_bytes),
        }
    }

    /// One more batch of `bytes` in `held`.
    fn add(&mut self, held: Held, bytes: u64) {
        let (batches, total) = self.held(held);
        *batches += 1;
        *total += bytes;
    }

    /// One batch of `bytes` less in `held`, saturating at zero.
    fn take(&mut self, held: Held, bytes: u64) {
        let (batches, total) = self.held(held);
        *batches = batches.saturating_sub(1);
        *total = total.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field different, so that a test sees which ones a change moved.
    fn base() -> Counters {
        Counters {
            next_seq: 1000,
            pending_batches: 10,
            pending_bytes: 10_000,
            acked_batches: 20,
            acked_bytes: 20_000,
            produced_batches: 30,
            produced_detections: 300,
            dropped_batches: 4,
            dropped_detections: 40,
            quarantined: 5,
            acked_total: 60,
            dead_batches: 7,
            dead_bytes: 7_000,
            dead_total: 8,
            lost_batches: 9,
            ack_floor: 900,
        }
    }

    fn applied(change: Change) -> Counters {
        let mut c = base();
        c.apply(change);
        c
    }

    #[test]
    fn an_enqueue_counts_a_pending_and_a_produced_batch_and_moves_next_seq() {
        let c = applied(Change::Enqueued { seq: 1000, bytes: 100, detections: 3 });
        let want = Counters {
            next_seq: 1001,
            pending_batches: 11,
            pending_bytes: 10_100,
            produced_batches: 31,
            produced_detections: 303,
            ..base()
        };
        assert_eq!(c, want);
        // At open, a record found past the counters sets next_seq past itself.
        assert_eq!(applied(Change::Enqueued { seq: 1005, bytes: 0, detections: 0 }).next_seq, 1006);
    }

    #[test]
    fn an_ack_moves_a_batch_from_pending_to_retained_or_nowhere() {
        let retained = applied(Change::Acked { pending_bytes: 100, retained_bytes: Some(117) });
        let want = Counters {
            pending_batches: 9,
            pending_bytes: 9_900,
            acked_batches: 21,
            acked_bytes: 20_117,
            acked_total: 61,
            ..base()
        };
        assert_eq!(retained, want);
        let not_retained = applied(Change::Acked { pending_bytes: 100, retained_bytes: None });
        assert_eq!(not_retained, Counters { pending_batches: 9, pending_bytes: 9_900, acked_total: 61, ..base() });
    }

    #[test]
    fn a_dead_letter_moves_a_batch_from_pending_to_dead() {
        let c = applied(Change::DeadLettered { bytes: 100 });
        let want = Counters {
            pending_batches: 9,
            pending_bytes: 9_900,
            dead_batches: 8,
            dead_bytes: 7_100,
            dead_total: 9,
            ..base()
        };
        assert_eq!(c, want);
    }

    #[test]
    fn a_drop_takes_a_pending_batch_and_counts_it_and_its_detections() {
        let c = applied(Change::Dropped { bytes: 100, detections: 3 });
        let want =
            Counters { pending_batches: 9, pending_bytes: 9_900, dropped_batches: 5, dropped_detections: 43, ..base() };
        assert_eq!(c, want);
    }

    #[test]
    fn a_quarantine_counts_it_and_takes_it_from_where_it_was() {
        let c = applied(Change::Quarantined { from: Some(Held::Pending), bytes: 100 });
        assert_eq!(c, Counters { quarantined: 6, pending_batches: 9, pending_bytes: 9_900, ..base() });
        let c = applied(Change::Quarantined { from: Some(Held::Acked), bytes: 117 });
        assert_eq!(c, Counters { quarantined: 6, acked_batches: 19, acked_bytes: 19_883, ..base() });
        let c = applied(Change::Quarantined { from: Some(Held::Dead), bytes: 100 });
        assert_eq!(c, Counters { quarantined: 6, dead_batches: 6, dead_bytes: 6_900, ..base() });
        let c = applied(Change::Quarantined { from: None, bytes: 100 });
        assert_eq!(c, Counters { quarantined: 6, ..base() });
    }

    #[test]
    fn pruning_takes_a_retained_or_dead_batch() {
        assert_eq!(
            applied(Change::PrunedAcked { bytes: 117 }),
            Counters { acked_batches: 19, acked_bytes: 19_883, ..base() }
        );
        assert_eq!(
            applied(Change::PrunedDead { bytes: 100 }),
            Counters { dead_batches: 6, dead_bytes: 6_900, ..base() }
        );
    }

    #[test]
    fn a_requeue_moves_a_batch_back_to_pending_and_lowers_the_floor() {
        let c = applied(Change::Requeued { seq: 500, pending_bytes: 100, acked_bytes: 117 });
        let want = Counters {
            acked_batches: 19,
            acked_bytes: 19_883,
            pending_batches: 11,
            pending_bytes: 10_100,
            ack_floor: 500,
            ..base()
        };
        assert_eq!(c, want);
        // Above the floor: the floor stays.
        assert_eq!(applied(Change::Requeued { seq: 950, pending_bytes: 0, acked_bytes: 0 }).ack_floor, 900);
    }

    #[test]
    fn a_migration_changes_only_the_retained_bytes() {
        let c = applied(Change::Migrated { layout1_bytes: 108, bytes: 117 });
        assert_eq!(c, Counters { acked_bytes: 20_009, ..base() });
    }

    #[test]
    fn a_discarded_torn_record_is_taken_back_and_its_seq_reused() {
        let c = applied(Change::Discarded { seq: Some(999), bytes: 4096 });
        let want = Counters { pending_batches: 9, pending_bytes: 5_904, produced_batches: 29, next_seq: 999, ..base() };
        assert_eq!(c, want);
        let c = applied(Change::Discarded { seq: None, bytes: 4096 });
        assert_eq!(c, Counters { next_seq: 1000, ..want });
    }

    #[test]
    fn a_recount_counts_each_record_where_it_is() {
        let c = applied(Change::Counted { held: Held::Pending, bytes: 100, detections: 3 });
        let want = Counters {
            pending_batches: 11,
            pending_bytes: 10_100,
            produced_batches: 31,
            produced_detections: 303,
            ..base()
        };
        assert_eq!(c, want);
        let c = applied(Change::Counted { held: Held::Acked, bytes: 117, detections: 0 });
        assert_eq!(c, Counters { acked_batches: 21, acked_bytes: 20_117, produced_batches: 31, ..base() });
        let c = applied(Change::Counted { held: Held::Dead, bytes: 100, detections: 1 });
        let want =
            Counters { dead_batches: 8, dead_bytes: 7_100, produced_batches: 31, produced_detections: 301, ..base() };
        assert_eq!(c, want);
        assert_eq!(applied(Change::CountedQuarantined), Counters { quarantined: 6, ..base() });
        assert_eq!(applied(Change::NextSeqAtLeast { next_seq: 2000 }), Counters { next_seq: 2000, ..base() });
        assert_eq!(applied(Change::NextSeqAtLeast { next_seq: 10 }), base(), "next_seq never goes back");
    }

    #[test]
    fn a_loss_is_counted_and_the_lost_seqs_are_not_reused() {
        let c = applied(Change::Lost { batches: 3, next_seq: 1004, produced_batches: 34, produced_detections: 10 });
        let want = Counters {
            lost_batches: 12,
            next_seq: 1004,
            produced_batches: 34,
            // Only ever raised.
            produced_detections: 300,
            ..base()
        };
        assert_eq!(c, want);
    }

    #[test]
    fn the_ack_floor_is_only_raised_by_a_raise() {
        assert_eq!(applied(Change::AckFloorRaised { to: 950 }), Counters { ack_floor: 950, ..base() });
        assert_eq!(applied(Change::AckFloorRaised { to: 10 }), base());
    }

    #[test]
    fn what_is_taken_saturates_at_zero() {
        let takes = [
            Change::Acked { pending_bytes: 100, retained_bytes: None },
            Change::DeadLettered { bytes: 100 },
            Change::Dropped { bytes: 100, detections: 1 },
            Change::Quarantined { from: Some(Held::Pending), bytes: 100 },
            Change::Quarantined { from: Some(Held::Acked), bytes: 100 },
            Change::Quarantined { from: Some(Held::Dead), bytes: 100 },
            Change::PrunedAcked { bytes: 100 },
            Change::PrunedDead { bytes: 100 },
            Change::Requeued { seq: 0, pending_bytes: 100, acked_bytes: 117 },
            Change::Migrated { layout1_bytes: 108, bytes: 117 },
            Change::Discarded { seq: None, bytes: 100 },
        ];
        for change in takes {
            let mut c = Counters::default();
            c.apply(change);
            // From empty, whatever was taken is zero: nothing wrapped around.
            for (name, v) in [
                ("pending_batches", c.pending_batches),
                ("pending_bytes", c.pending_bytes),
                ("acked_batches", c.acked_batches),
                ("acked_bytes", c.acked_bytes),
                ("dead_batches", c.dead_batches),
                ("dead_bytes", c.dead_bytes),
                ("produced_batches", c.produced_batches),
            ] {
                assert!(v <= 117, "{change:?} left {name} = {v}");
            }
        }
        // More bytes taken than counted: zero, and the batch count still moves by one.
        let mut c = Counters { pending_batches: 2, pending_bytes: 50, ..Counters::default() };
        c.apply(Change::Dropped { bytes: 100, detections: 0 });
        assert_eq!((c.pending_batches, c.pending_bytes, c.dropped_batches), (1, 0, 1));
    }

    #[test]
    fn a_batch_s_whole_life_leaves_the_stores_as_they_were() {
        let mut c = base();
        c.apply(Change::Enqueued { seq: c.next_seq, bytes: 100, detections: 3 });
        c.apply(Change::Acked { pending_bytes: 100, retained_bytes: Some(100 + layout::ACK_MARKER_BYTES) });
        c.apply(Change::Requeued { seq: 1000, pending_bytes: 100, acked_bytes: 100 + layout::ACK_MARKER_BYTES });
        c.apply(Change::DeadLettered { bytes: 100 });
        c.apply(Change::PrunedDead { bytes: 100 });
        let want = Counters {
            next_seq: 1001,
            produced_batches: 31,
            produced_detections: 303,
            acked_total: 61,
            dead_total: 9,
            ..base()
        };
        assert_eq!(c, want);
    }
}
