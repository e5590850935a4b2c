use std::collections::BTreeMap;

use backhaul_shared::{Batch, Limits, Presence, Zone};
use proptest::prelude::*;

use super::ledger::write_meta;
use super::recover::recount;
use super::retain::{is_acked, prune_acked_locked};
use super::write::WireParts;
use super::*;

pub(crate) fn new_batch(detections: usize) -> NewBatch {
    NewBatch {
        device_id: "rpi-test".into(),
        name: Some("Test".into()),
        location: None,
        timestamp: Timestamp::now(),
        detections: (0..detections)
            .map(|i| {
                Detection::Presence(Presence {
                    device_hash: format!("{i:016x}"),
                    rssi: -60,
                    zone: Zone::Near,
                    timestamp: Timestamp::now(),
                })
            })
            .collect(),
        source_position: None,
        batch_id: None,
        clock: Default::default(),
    }
}

/// Bytes the budget counts for one `new_batch(detections)` (records are compressed, so measure).
fn batch_bytes(detections: usize) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    q.enqueue(new_batch(detections)).unwrap();
    q.stats().unwrap().bytes
}

/// Flush durability and an exact logical budget (the disk budget has its own tests).
fn config() -> QueueConfig {
    QueueConfig { durability: Durability::Flush, budget: Budget::Logical, ..QueueConfig::default() }
}

fn open(dir: &Path, config: QueueConfig) -> Queue {
    Queue::open(dir, config).expect("queue opens")
}

#[test]
fn wire_json_is_byte_identical_to_batch_to_json() {
    let nb = new_batch(3);
    let id = BatchId::new();
    let json = WireParts::new(&nb, id).json(1842);
    let parsed = Batch::from_json(&json, &Limits::default()).unwrap();
    assert_eq!(parsed.seq, 1842);
    assert_eq!(parsed.batch_id, id);
    assert_eq!(parsed.to_json(), json);
    let bare = NewBatch { name: None, ..new_batch(0) };
    let json = WireParts::new(&bare, id).json(0);
    assert_eq!(Batch::from_json(&json, &Limits::default()).unwrap().to_json(), json);
    // An unsynced batch says so (after the detections, like Batch), and is still byte-identical.
    let unsynced = NewBatch { clock: Clock::Unsynced, ..new_batch(2) };
    let json = WireParts::new(&unsynced, id).json(7);
    let parsed = Batch::from_json(&json, &Limits::default()).unwrap();
    assert_eq!((parsed.clock, parsed.to_json()), (Clock::Unsynced, json.clone()));
    assert!(String::from_utf8(json).unwrap().ends_with(r#","clock":"unsynced"}"#));
}

#[test]
fn newest_batch_time_is_the_newest_batch_pending_acked_or_dead_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let at = |s: &str| -> Timestamp { s.parse().unwrap() };
    {
        let q = open(dir.path(), config());
        assert_eq!(q.newest_batch_time().unwrap(), None, "an empty queue knows no time");
        for t in ["2026-11-20T10:00:00Z", "2026-11-21T10:00:00Z"] {
            q.enqueue(NewBatch { timestamp: at(t), ..new_batch(1) }).unwrap();
        }
        assert_eq!(q.newest_batch_time().unwrap(), Some(at("2026-11-21T10:00:00Z")));
    }
    {
        // The newest batch acked (moved to the retained tree) and a newer one dead-lettered.
        let q = open(dir.path(), config());
        let first = q.next_batch().unwrap().unwrap();
        let second = q.next_batch().unwrap().unwrap();
        q.ack(second.batch_id).unwrap();
        q.dead_letter(first.batch_id, "test").unwrap();
        q.enqueue(NewBatch { timestamp: at("2026-11-22T10:00:00Z"), ..new_batch(1) }).unwrap();
        let third = q.next_batch().unwrap().unwrap();
        q.ack(third.batch_id).unwrap();
    }
    let q = open(dir.path(), config());
    assert_eq!(q.stats().unwrap().pending, 0);
    // The acked tree holds the newest batch; its ack time (now) is newer still.
    let newest = q.newest_batch_time().unwrap().unwrap();
    assert!(newest >= at("2026-11-22T10:00:00Z") && newest <= Timestamp::now(), "{newest}");
}

#[test]
fn enqueue_next_ack_in_order_and_restart_returns_in_flight_to_pending() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    let ids: Vec<_> = (0..5).map(|_| q.enqueue(new_batch(2)).unwrap()).collect();
    assert_eq!(ids.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);

    let a = q.next_batch().unwrap().unwrap();
    let b = q.next_batch().unwrap().unwrap();
    assert_eq!((a.seq, b.seq), (0, 1));
    assert_eq!(q.ack(a.batch_id).unwrap(), AckOutcome::Acked);
    assert_eq!(q.ack(a.batch_id).unwrap(), AckOutcome::Unknown, "a second ack is harmless");
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.in_flight, s.acked_retained), (3, 1, 1));

    drop(q);
    let q = open(dir.path(), config());
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.in_flight, s.acked_retained, s.next_seq), (4, 0, 1, 5));
    // seq 1 was in flight: it comes back first, byte-identical.
    let again = q.next_batch().unwrap().unwrap();
    assert_eq!(again, b);
}

#[test]
fn nack_puts_a_batch_back_before_newer_ones() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    for _ in 0..3 {
        q.enqueue(new_batch(1)).unwrap();
    }
    let a = q.next_batch().unwrap().unwrap();
    let b = q.next_batch().unwrap().unwrap();
    assert!(q.nack(a.batch_id));
    assert_eq!(q.next_batch().unwrap().unwrap().seq, a.seq);
    assert_eq!(q.next_batch().unwrap().unwrap().seq, 2);
    assert!(q.next_batch().unwrap().is_none());
    assert_eq!(q.nack_all(), 3);
    assert_eq!(q.next_batch().unwrap().unwrap().seq, 0);
    let _ = b;
}

#[test]
fn second_process_on_the_same_data_dir_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _q = open(dir.path(), config());
    let err = Queue::open(dir.path(), config()).unwrap_err();
    assert!(matches!(err, QueueOpenError::Locked { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()) && msg.contains("another backhaul-edge"), "{msg}");
}

#[test]
fn source_position_is_stored_with_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    assert_eq!(q.source_position().unwrap(), None);
    q.enqueue(NewBatch { source_position: Some(b"pos-1".to_vec()), ..new_batch(1) }).unwrap();
    q.enqueue(NewBatch { source_position: Some(b"pos-2".to_vec()), ..new_batch(1) }).unwrap();
    drop(q);
    let q = open(dir.path(), config());
    assert_eq!(q.source_position().unwrap().as_deref(), Some(&b"pos-2"[..]));
}

#[test]
fn drop_oldest_drops_and_counts_every_batch_and_detection() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 20 * batch_bytes(10);
    let cfg = QueueConfig { max_bytes: budget, retain_acked: Duration::ZERO, ..config() };
    let q = open(dir.path(), cfg);
    let mut last = 0;
    for _ in 0..100 {
        last = q.enqueue(new_batch(10)).unwrap().seq;
    }
    let s = q.stats().unwrap();
    assert!(s.bytes <= budget, "budget respected: {s:?}");
    assert!(s.dropped_batches > 0);
    assert_eq!(s.dropped_batches + s.pending, 100, "every batch is either pending or counted as dropped");
    assert_eq!(s.dropped_detections, s.dropped_batches * 10);
    assert_eq!(s.produced_batches, 100);
    // The survivors are the newest, in order: the drops are a gap at the front.
    let first = q.next_batch().unwrap().unwrap().seq;
    assert_eq!(first, s.dropped_batches);
    assert_eq!(last, 99);
    // The counters survive a restart.
    drop(q);
    let q = open(dir.path(), QueueConfig { max_bytes: budget, ..config() });
    let s2 = q.stats().unwrap();
    assert_eq!(
        (s2.dropped_batches, s2.dropped_detections, s2.pending),
        (s.dropped_batches, s.dropped_detections, s.pending)
    );
}

#[test]
fn drop_oldest_never_drops_a_batch_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 5 * batch_bytes(10);
    let q = open(dir.path(), QueueConfig { max_bytes: budget, retain_acked: Duration::ZERO, ..config() });
    q.enqueue(new_batch(10)).unwrap();
    let in_flight = q.next_batch().unwrap().unwrap();
    for _ in 0..50 {
        q.enqueue(new_batch(10)).unwrap();
    }
    assert_eq!(q.ack(in_flight.batch_id).unwrap(), AckOutcome::Acked);
}

#[test]
fn retained_acked_batches_are_pruned_before_pending_ones_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), QueueConfig { max_bytes: 15 * batch_bytes(10), ..config() });
    for _ in 0..10 {
        q.enqueue(new_batch(10)).unwrap();
        let b = q.next_batch().unwrap().unwrap();
        q.ack(b.batch_id).unwrap();
    }
    assert!(q.stats().unwrap().acked_retained > 0);
    // 10 more fit the budget only if retained history makes way.
    for _ in 0..10 {
        q.enqueue(new_batch(10)).unwrap();
    }
    let s = q.stats().unwrap();
    assert_eq!(s.dropped_batches, 0, "history went first: {s:?}");
    assert!(s.acked_retained < 10, "{s:?}");
}

#[test]
fn block_waits_for_acks_and_times_out_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = QueueConfig {
        max_bytes: 5 * batch_bytes(10),
        on_full: OnFull::Block,
        block_timeout: Duration::from_millis(200),
        retain_acked: Duration::ZERO,
        ..config()
    };
    let q = open(dir.path(), cfg);
    let mut n = 0;
    let err = loop {
        match q.enqueue(new_batch(10)) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 1000, "never blocked");
    };
    assert!(matches!(err, EnqueueError::Full { .. }), "{err}");
    assert!(err.to_string().contains("on_full"), "{err}");
    assert_eq!(q.stats().unwrap().dropped_batches, 0);

    // An ack from another thread lets a blocked enqueue through.
    let q2 = q.clone();
    let q3 = q.clone();
    let waiter = std::thread::spawn(move || q2.enqueue(new_batch(10)));
    let first = q3.next_batch().unwrap().unwrap();
    q3.ack(first.batch_id).unwrap();
    let r = waiter.join().unwrap();
    // Either it got in after the ack, or (slow machine) it timed out before the ack: both are
    // "block", never a drop.
    if let Err(e) = &r {
        assert!(matches!(e, EnqueueError::Full { .. }), "{e}");
    }
    assert_eq!(q.stats().unwrap().dropped_batches, 0);
}

#[test]
fn block_lets_an_enqueue_through_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = QueueConfig {
        max_bytes: 5 * batch_bytes(10),
        on_full: OnFull::Block,
        block_timeout: Duration::from_millis(100),
        retain_acked: Duration::ZERO,
        ..config()
    };
    // Fill until an enqueue blocks and times out.
    {
        let q = open(dir.path(), cfg.clone());
        while q.enqueue(new_batch(10)).is_ok() {}
    }
    // Reopen with a long wait: the next enqueue blocks until acks free space.
    let q = open(dir.path(), QueueConfig { block_timeout: Duration::from_secs(60), ..cfg });
    let q2 = q.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    // Twice the size of the batches that filled it: it cannot fit in what is left (sizes vary by
    // a few bytes with compression, so a same-size batch might).
    let waiter = std::thread::spawn(move || {
        let r = q2.enqueue(new_batch(20));
        tx.send(()).unwrap();
        r
    });
    // It is blocked: nothing arrives while no space is freed (a short bounded look; the assertion
    // holds however long it looks).
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "enqueue should block while full");
    for _ in 0..4 {
        let b = q.next_batch().unwrap().unwrap();
        q.ack(b.batch_id).unwrap();
    }
    rx.recv_timeout(Duration::from_secs(50)).expect("the acks unblock the enqueue");
    waiter.join().unwrap().unwrap();
    assert_eq!(q.stats().unwrap().dropped_batches, 0);
}

#[test]
fn a_batch_larger_than_the_budget_is_refused_not_dropping_everything() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 3 * batch_bytes(1);
    assert!(batch_bytes(2000) > budget);
    let q = open(dir.path(), QueueConfig { max_bytes: budget, ..config() });
    q.enqueue(new_batch(1)).unwrap();
    let err = q.enqueue(new_batch(2000)).unwrap_err();
    assert!(matches!(err, EnqueueError::TooLarge { .. }), "{err}");
    assert_eq!(q.stats().unwrap().pending, 1);
}

#[test]
fn a_record_corrupted_on_disk_is_quarantined_and_the_queue_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    for _ in 0..3 {
        q.enqueue(new_batch(2)).unwrap();
    }
    // Flip one bit in the middle record, as a failing SD card would.
    let mut raw = q.debug_pending_raw(1).unwrap().unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x10;
    q.debug_overwrite_pending(1, &raw).unwrap();
    drop(q);

    let q = open(dir.path(), config());
    let report = q.verify().unwrap();
    assert_eq!(report.bad.len(), 1, "{:?}", report.bad);
    assert!(report.bad[0].contains("checksum"), "{:?}", report.bad);

    assert_eq!(q.next_batch().unwrap().unwrap().seq, 0);
    assert_eq!(q.next_batch().unwrap().unwrap().seq, 2, "the damaged record is skipped");
    let s = q.stats().unwrap();
    assert_eq!((s.quarantined, s.in_flight, s.pending), (1, 2, 0));
    let mut quarantined = Vec::new();
    q.export(|r| {
        if r.state == "quarantined" {
            quarantined.push(r);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(quarantined.len(), 1);
    assert!(quarantined[0].raw_hex.is_some());
    let report = q.verify().unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    assert_eq!(report.quarantined, 1);
}

#[test]
fn an_unopenable_database_is_moved_aside_and_a_fresh_queue_starts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = open(dir.path(), config());
        q.enqueue(new_batch(2)).unwrap();
    }
    // Wreck sled's configuration and log headers.
    let db = dir.path().join("queue").join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::write(&db, vec![0xA5; len.max(4096)]).unwrap();
    std::fs::write(dir.path().join("queue").join("conf"), b"garbage\x00\xff").unwrap();

    let q = open(dir.path(), config());
    q.enqueue(new_batch(1)).unwrap();
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged database was moved aside");
}

#[test]
fn requeue_acked_replays_under_the_original_batch_id() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    let before = SystemTime::now() - Duration::from_secs(1);
    let e = q.enqueue(new_batch(3)).unwrap();
    let b = q.next_batch().unwrap().unwrap();
    q.ack(b.batch_id).unwrap();
    assert!(q.next_batch().unwrap().is_none());
    assert_eq!(q.requeue_acked(before, None).unwrap(), 1);
    let again = q.next_batch().unwrap().unwrap();
    assert_eq!((again.batch_id, again.seq, &again.payload), (e.batch_id, e.seq, &b.payload));
    // Nothing acked in a window in the future.
    assert_eq!(q.requeue_acked(SystemTime::now() + Duration::from_secs(60), None).unwrap(), 0);
}

#[test]
fn prune_removes_acked_batches_past_retention() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), QueueConfig { retain_acked: Duration::from_millis(1), ..config() });
    q.enqueue(new_batch(1)).unwrap();
    let b = q.next_batch().unwrap().unwrap();
    q.ack(b.batch_id).unwrap();
    backhaul_shared_wait(|| q.prune_acked().unwrap() == 1);
    assert_eq!(q.stats().unwrap().acked_retained, 0);
}

/// Polls until true (deadline 10 s).
fn backhaul_shared_wait(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn concurrent_producers_get_unique_contiguous_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), QueueConfig { durability: Durability::Fsync, ..QueueConfig::default() });
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let q = q.clone();
            std::thread::spawn(move || (0..50).map(|_| q.enqueue(new_batch(1)).unwrap().seq).collect::<Vec<_>>())
        })
        .collect();
    let mut all: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    all.sort_unstable();
    assert_eq!(all, (0..200).collect::<Vec<_>>());
}

// ---- the model test ----------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Enqueue(u8),
    Next,
    NextNewest,
    Ack(usize),
    Nack(usize),
    Restart,
    Prune,
    /// An operator's replay of everything acked: the retained batches become pending again.
    Requeue,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..5).prop_map(Op::Enqueue),
        3 => Just(Op::Next),
        1 => Just(Op::NextNewest),
        2 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::Nack),
        1 => Just(Op::Restart),
        1 => Just(Op::Prune),
        1 => Just(Op::Requeue),
    ]
}

/// The simplest queue that could work: ordered maps in memory.
#[derive(Debug, Default)]
struct Model {
    next_seq: u64,
    /// seq → (batch_id, detections)
    pending: BTreeMap<u64, (BatchId, u8)>,
    in_flight: BTreeMap<u64, BatchId>,
    /// Handed out, then nacked: comes back before anything newer.
    retry: BTreeMap<u64, BatchId>,
    /// Acked and retained: seq → (batch_id, detections).
    acked: BTreeMap<u64, (BatchId, u8)>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn queue_behaves_like_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = QueueConfig { max_bytes: u64::MAX, ..config() };
        let mut q = Some(open(dir.path(), cfg.clone()));
        let mut m = Model::default();
        // Once something newer was handed out, the cursor is past it: the model tracks the cursor.
        let mut cursor = 0u64;
        for op in ops {
            let queue = q.as_ref().unwrap();
            match op {
                Op::Enqueue(n) => {
                    let e = queue.enqueue(new_batch(n as usize)).unwrap();
                    prop_assert_eq!(e.seq, m.next_seq);
                    m.pending.insert(e.seq, (e.batch_id, n));
                    m.next_seq += 1;
                }
                Op::Next => {
                    let got = queue.next_batch().unwrap();
                    let want = if let Some((&seq, _)) = m.retry.iter().next() {
                        m.retry.remove(&seq);
                        Some(seq)
                    } else {
                        let next = m.pending.range(cursor..).map(|(s, _)| *s).find(|s| !m.in_flight.contains_key(s));
                        if let Some(seq) = next {
                            cursor = cursor.max(seq + 1);
                        }
                        next
                    };
                    if let Some(seq) = want {
                        m.in_flight.insert(seq, m.pending[&seq].0);
                    }
                    prop_assert_eq!(got.as_ref().map(|b| b.seq), want);
                    if let Some(b) = got {
                        let (id, n) = m.pending[&b.seq];
                        prop_assert_eq!(b.batch_id, id);
                        prop_assert_eq!(b.detections, u32::from(n));
                        let parsed = Batch::from_json(&b.payload, &Limits::default()).unwrap();
                        prop_assert_eq!(parsed.seq, b.seq);
                        prop_assert_eq!(parsed.batch_id, id);
                    }
                }
                Op::NextNewest => {
                    let got = queue.next_newest_batch().unwrap();
                    let want = m.pending.keys().rev().copied().find(|s| !m.in_flight.contains_key(s));
                    if let Some(seq) = want {
                        m.retry.remove(&seq);
                        m.in_flight.insert(seq, m.pending[&seq].0);
                    }
                    prop_assert_eq!(got.map(|b| b.seq), want);
                }
                Op::Ack(i) => {
                    if m.in_flight.is_empty() { continue; }
                    let (&seq, &id) = m.in_flight.iter().nth(i % m.in_flight.len()).unwrap();
                    prop_assert_eq!(queue.ack(id).unwrap(), AckOutcome::Acked);
                    m.in_flight.remove(&seq);
                    let batch = m.pending.remove(&seq).unwrap();
                    m.acked.insert(seq, batch);
                }
                Op::Nack(i) => {
                    if m.in_flight.is_empty() { continue; }
                    let (&seq, &id) = m.in_flight.iter().nth(i % m.in_flight.len()).unwrap();
                    prop_assert!(queue.nack(id));
                    m.in_flight.remove(&seq);
                    m.retry.insert(seq, id);
                }
                Op::Restart => {
                    drop(q.take()); // release the lock before reopening
                    q = Some(open(dir.path(), cfg.clone()));
                    m.in_flight.clear();
                    m.retry.clear();
                    cursor = 0;
                }
                Op::Prune => {
                    // retain_acked is 24 h: nothing is old enough.
                    prop_assert_eq!(queue.prune_acked().unwrap(), 0);
                }
                Op::Requeue => {
                    let n = queue.requeue_acked(std::time::SystemTime::UNIX_EPOCH, None).unwrap();
                    prop_assert_eq!(n, m.acked.len() as u64);
                    for (seq, batch) in std::mem::take(&mut m.acked) {
                        m.pending.insert(seq, batch);
                        m.retry.insert(seq, batch.0);
                    }
                }
            }
            let s = q.as_ref().unwrap().stats().unwrap();
            prop_assert_eq!(s.in_flight, m.in_flight.len() as u64);
            prop_assert_eq!(s.pending + s.in_flight, m.pending.len() as u64);
            prop_assert_eq!(s.acked_retained, m.acked.len() as u64);
            prop_assert_eq!(s.next_seq, m.next_seq);
        }
        let report = q.as_ref().unwrap().verify().unwrap();
        prop_assert!(report.bad.is_empty(), "{:?}", report.bad);
        // The byte counts too, against a recount of the records and markers.
        let queue = q.as_ref().unwrap();
        let counted = {
            let guard = queue.read_store();
            recount(&Store::get(&guard).unwrap().tree, None, false).unwrap().counters
        };
        let kept = queue.lock_state().counters;
        prop_assert_eq!(
            (kept.pending_bytes, kept.acked_bytes),
            (counted.pending_bytes, counted.acked_bytes)
        );
    }
}

#[test]
fn an_enqueue_torn_by_a_crash_is_discarded_and_its_seq_reused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = open(dir.path(), config());
        q.enqueue(NewBatch { source_position: Some(b"pos-0".to_vec()), ..new_batch(500) }).unwrap();
        {
            // Counters on disk as of seq 0, so the open below counts seq 1 in its tail scan.
            let guard = q.read_store();
            write_meta(Store::get(&guard).unwrap(), &mut q.lock_state(), sled::Batch::default()).unwrap();
        }
        q.enqueue(NewBatch { source_position: Some(b"pos-1".to_vec()), ..new_batch(500) }).unwrap();
        // What a crash in the middle of writing seq 1's chunks leaves: its first chunk only.
        let guard = q.read_store();
        let store = Store::get(&guard).unwrap();
        let record = chunks::get(&store.tree, &layout::pending_key(1)).unwrap().unwrap();
        assert!(record.keys.len() > 1, "a 500-detection batch spans several chunks");
        let mut write = sled::Batch::default();
        for k in &record.keys[1..] {
            write.remove(k.clone());
        }
        store.tree.apply_batch(write).unwrap();
        store.db.flush().unwrap();
        // No clean close: forget the queue without writing its counters.
        drop(guard);
        std::mem::forget(q);
    }
    // sled's lock is held by the forgotten handle in this process; a new process would not see it,
    // so open the same files through a copy.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join("queue"), &copy.path().join("queue"));
    let q = open(copy.path(), config());
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.next_seq, s.quarantined), (1, 1, 0), "{s:?}");
    assert_eq!(q.source_position().unwrap().as_deref(), Some(&b"pos-0"[..]), "the source resumes after seq 0");
    assert_eq!(q.enqueue(new_batch(1)).unwrap().seq, 1, "the torn batch's seq is reused: no gap");
    assert!(q.verify().unwrap().bad.is_empty());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn enqueue_many_stores_in_order_with_one_sync() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), QueueConfig { durability: Durability::Fsync, ..QueueConfig::default() });
    let before = q.stats().unwrap().syncs_since_open;
    let done = q.enqueue_many((0..8).map(|_| new_batch(3)).collect()).unwrap();
    assert_eq!(done.iter().map(|e| e.seq).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
    assert_eq!(q.stats().unwrap().syncs_since_open - before, 1, "one sync for the lot");
    for e in &done {
        assert_eq!(q.next_batch().unwrap().unwrap().batch_id, e.batch_id);
    }
}

#[test]
fn a_batch_not_yet_synced_is_not_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    q.enqueue(new_batch(1)).unwrap();
    q.enqueue(new_batch(1)).unwrap();
    // As if seq 1 were written but its sync had not finished.
    q.lock_state().durable_next_seq = 1;
    assert_eq!(q.next_batch().unwrap().unwrap().seq, 0);
    assert!(q.next_batch().unwrap().is_none(), "seq 1 could still be lost in a crash: not sent");
    q.flush().unwrap();
    assert_eq!(q.next_batch().unwrap().unwrap().seq, 1);
}

#[test]
fn a_late_ack_of_a_quarantined_batch_does_not_count_it_twice() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    q.enqueue(new_batch(2)).unwrap();
    q.enqueue(new_batch(2)).unwrap();
    let first = q.next_batch().unwrap().unwrap();
    assert!(q.nack(first.batch_id));
    let mut raw = q.debug_pending_raw(0).unwrap().unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 1;
    q.debug_overwrite_pending(0, &raw).unwrap();
    assert_eq!(q.next_batch().unwrap().unwrap().seq, 1, "seq 0 is quarantined on the way");
    assert_eq!(q.ack(first.batch_id).unwrap(), AckOutcome::Unknown);
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.in_flight, s.quarantined, s.acked_retained), (0, 1, 1, 0), "{s:?}");
    assert!(q.verify().unwrap().bad.is_empty());
}

#[test]
fn dead_letter_moves_a_refused_batch_out_of_pending_with_its_reason_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    let first = q.enqueue(new_batch(3)).unwrap();
    let second = q.enqueue(new_batch(2)).unwrap();
    let b = q.next_batch().unwrap().unwrap();
    assert_eq!(b.seq, first.seq);
    assert_eq!(q.dead_letter(b.batch_id, "HTTP 422: conflict").unwrap(), AckOutcome::Acked);
    assert_eq!(q.dead_letter(b.batch_id, "again").unwrap(), AckOutcome::Unknown, "only once");
    assert_eq!(q.ack(b.batch_id).unwrap(), AckOutcome::Unknown, "a late ack does not count it again");
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.dead_letters, s.dead_lettered_total), (1, 1, 1));
    assert!(s.bytes > 0);
    drop(q);
    let q = open(dir.path(), config());
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.dead_letters), (1, 1), "counted the same after a restart");
    assert_eq!(q.next_batch().unwrap().unwrap().seq, second.seq, "never handed out again");
    assert!(q.next_batch().unwrap().is_none());
    let mut exported = Vec::new();
    q.export(|r| {
        exported.push((r.state, r.reason.clone()));
        Ok(())
    })
    .unwrap();
    assert!(exported.contains(&("dead_letter", Some("HTTP 422: conflict".to_owned()))), "{exported:?}");
    assert!(q.verify().unwrap().bad.is_empty());
}

#[test]
fn dead_letters_are_removed_before_pending_batches_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let size = batch_bytes(20);
    let q = open(dir.path(), QueueConfig { max_bytes: size * 3 + size / 2, ..config() });
    q.enqueue(new_batch(20)).unwrap();
    let b = q.next_batch().unwrap().unwrap();
    q.dead_letter(b.batch_id, "rejected").unwrap();
    q.enqueue(new_batch(20)).unwrap();
    q.enqueue(new_batch(20)).unwrap();
    let r = q.enqueue(new_batch(20)).unwrap();
    assert_eq!(r.dropped, 0, "the dead letter made room, not a pending batch");
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.dead_letters, s.dropped_batches), (3, 0, 0));
}

#[test]
fn next_newest_hands_out_the_newest_durable_batch_and_the_oldest_still_comes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    let seqs: Vec<u64> = (0..5).map(|_| q.enqueue(new_batch(600)).unwrap().seq).collect();
    assert_eq!(q.next_newest_batch().unwrap().unwrap().seq, seqs[4]);
    assert_eq!(q.next_newest_batch().unwrap().unwrap().seq, seqs[3]);
    assert_eq!(q.next_batch().unwrap().unwrap().seq, seqs[0]);
    assert_eq!(q.next_batch().unwrap().unwrap().seq, seqs[1]);
    let b = q.next_batch().unwrap().unwrap();
    assert_eq!(b.seq, seqs[2]);
    assert!(q.next_batch().unwrap().is_none(), "the newest ones are in flight");
    assert!(q.next_newest_batch().unwrap().is_none());
    q.ack(b.batch_id).unwrap();
    assert_eq!(q.nack_all(), 4);
    assert_eq!(q.next_newest_batch().unwrap().unwrap().seq, seqs[4], "a nacked batch comes back");
    assert_eq!(q.next_batch().unwrap().unwrap().seq, seqs[0]);
}

#[test]
fn a_sled_that_comes_back_with_less_than_it_had_is_noticed_and_counted() {
    // The watermark of a queue that made 5 batches durable, then a sled that returns only 3 (as
    // sled's recovery does when it stops at a damaged log entry).
    // (The watermark is written with Durability::Fsync only.)
    let fsync = QueueConfig { durability: Durability::Fsync, ..QueueConfig::default() };
    let had = tempfile::tempdir().unwrap();
    let q = open(had.path(), fsync.clone());
    for i in 0..5u64 {
        q.enqueue(NewBatch { source_position: Some(i.to_le_bytes().to_vec()), ..new_batch(2) }).unwrap();
    }
    drop(q);
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), fsync.clone());
    for i in 0..3u64 {
        q.enqueue(NewBatch { source_position: Some(i.to_le_bytes().to_vec()), ..new_batch(2) }).unwrap();
    }
    drop(q);
    std::fs::copy(had.path().join("queue.watermark"), dir.path().join("queue.watermark")).unwrap();
    let q = open(dir.path(), fsync.clone());
    let s = q.stats().unwrap();
    assert_eq!((s.lost_batches, s.next_seq, s.pending), (2, 5, 3), "{s:?}");
    assert_eq!(s.produced_batches, 5);
    assert_eq!(
        q.source_position().unwrap(),
        Some(4u64.to_le_bytes().to_vec()),
        "the source goes on after the lost ones"
    );
    assert_eq!(q.enqueue(new_batch(1)).unwrap().seq, 5, "lost seqs are not reused: the cloud sees the gap");
    drop(q);
    let s = open(dir.path(), fsync.clone()).stats().unwrap();
    assert_eq!(s.lost_batches, 2, "counted once, also after another restart");

    // Missing batches that had all been acked are not lost: the cloud has them.
    let delivered = tempfile::tempdir().unwrap();
    let q = open(delivered.path(), fsync.clone());
    for _ in 0..5 {
        q.enqueue(new_batch(2)).unwrap();
    }
    while let Some(b) = q.next_batch().unwrap() {
        q.ack(b.batch_id).unwrap();
    }
    q.flush().unwrap();
    q.enqueue(new_batch(1)).unwrap(); // a sync after the acks: the watermark says 1 pending
    drop(q);
    let fresh = tempfile::tempdir().unwrap();
    drop(open(fresh.path(), fsync.clone()));
    std::fs::copy(delivered.path().join("queue.watermark"), fresh.path().join("queue.watermark")).unwrap();
    let s = open(fresh.path(), fsync).stats().unwrap();
    assert_eq!((s.lost_batches, s.next_seq), (1, 6), "at most the pending one: {s:?}");
}

/// Regression: a batch handed out by `next_newest_batch`, nacked (link down) and handed out again
/// by `next_batch` moved the cursor past the older batches not handed out yet, so `next_batch`
/// never returned them (found by the chaos suite: 7 batches stuck until a restart).
#[test]
fn a_retried_newest_batch_does_not_make_next_batch_skip_older_ones() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    let seqs: Vec<u64> = (0..5).map(|_| q.enqueue(new_batch(2)).unwrap().seq).collect();
    assert_eq!(q.next_newest_batch().unwrap().unwrap().seq, seqs[4]);
    assert_eq!(q.nack_all(), 1);
    assert_eq!(q.next_batch().unwrap().unwrap().seq, seqs[4], "the retried one first");
    let rest: Vec<u64> = std::iter::from_fn(|| q.next_batch().unwrap().map(|b| b.seq)).collect();
    assert_eq!(rest, seqs[..4].to_vec(), "then every older one, none skipped");
}

#[test]
fn the_data_dir_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    // A new data_dir (and its missing parent), created under the test's umask (022 here).
    let data_dir = dir.path().join("var/backhaul");
    drop(Queue::open(&data_dir, QueueConfig::default()).unwrap());
    assert_eq!(mode(&data_dir), 0o700);
    assert_eq!(mode(&data_dir.join("lock")), 0o600);
    assert_eq!(mode(&data_dir.join("queue.watermark")), 0o600);
    // An existing world-readable one of its own (empty, or with the queue in it) is made private.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(Queue::open(&open, QueueConfig::default()).unwrap());
    assert_eq!(mode(&open), 0o700);
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(Queue::open(&open, QueueConfig::default()).unwrap());
    assert_eq!(mode(&open), 0o700, "again, with the queue in it");
    // A shared directory (like /var/lib) is never chmodded.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("someone-else"), b"x").unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(Queue::open(&shared, QueueConfig::default()).unwrap());
    assert_eq!(mode(&shared), 0o755);
}

/// Regression (issue #13, kind 7): the age came from the first record on disk, where acks are
/// written in groups, so with everything acked it kept climbing until the next group was written.
#[test]
fn oldest_pending_age_ignores_acks_not_written_yet_and_agrees_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    for _ in 0..3 {
        q.enqueue(new_batch(2)).unwrap();
    }
    let handed: Vec<_> = (0..3).map(|_| q.next_batch().unwrap().unwrap()).collect();
    assert!(q.stats().unwrap().oldest_pending_age_s.is_some(), "in flight is not acknowledged yet");
    q.ack(handed[0].batch_id).unwrap();
    q.ack(handed[2].batch_id).unwrap();
    let s = q.stats().unwrap();
    assert!(!q.lock_state().unwritten_acks.is_empty(), "the acks are still in memory");
    assert_eq!((s.pending, s.in_flight, s.oldest_pending_age_s.is_some()), (0, 1, true));
    q.ack(handed[1].batch_id).unwrap();
    let live = q.stats().unwrap();
    assert_eq!((live.pending, live.in_flight, live.oldest_pending_age_s), (0, 0, None));
    drop(q);
    let offline = open(dir.path(), config()).stats().unwrap();
    assert_eq!(
        (offline.pending, offline.in_flight, offline.acked_retained, offline.bytes, offline.oldest_pending_age_s),
        (live.pending, live.in_flight, live.acked_retained, live.bytes, live.oldest_pending_age_s)
    );
}

#[test]
fn disk_bytes_is_what_du_says_data_dir_occupies() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    for _ in 0..200 {
        q.enqueue(new_batch(50)).unwrap();
    }
    q.flush().unwrap();
    let stats = q.stats().unwrap();
    assert!(q.disk_bytes() > stats.bytes / 2, "sled's files hold the records: {stats:?}");
    drop(q);
    // Closed, nothing writes between the two looks: the same walk, the same blocks.
    let du = std::process::Command::new("du").arg("-s").arg("-B1").arg(dir.path()).output().unwrap();
    let du: u64 = String::from_utf8_lossy(&du.stdout).split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(allocated_bytes(dir.path()), du);
}

/// A data_dir written by the release before ack markers (queue layout 1, commit 25f61a6, by
/// `edge/tests/fixtures/make_layout1.rs.txt`): 40 batches; 0-24 acked and retained (moved to `h`),
/// 25-27 dead-lettered, 28-29 in flight at close, 30-39 pending.
#[test]
fn a_queue_written_by_layout_1_is_migrated_at_open_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let untar = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(fixtures.join("queue-layout1.tar.gz"))
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(untar.success());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("queue-layout1.json")).unwrap()).unwrap();
    let ids: Vec<String> =
        manifest["batches"].as_array().unwrap().iter().map(|b| b["batch_id"].as_str().unwrap().to_owned()).collect();
    // The acks are days old by the time this runs: keep them.
    let cfg = QueueConfig { retain_acked: Duration::from_secs(100 * 365 * 86400), ..config() };
    let legacy_keys = |q: &Queue| {
        let guard = q.read_store();
        Store::get(&guard).unwrap().tree.scan_prefix([layout::ACKED]).count()
    };
    {
        let q = open(dir.path(), cfg.clone());
        assert_eq!(legacy_keys(&q), 0, "every `h` record was moved");
        let s = q.stats().unwrap();
        assert_eq!(
            (s.pending, s.in_flight, s.acked_retained, s.dead_letters, s.next_seq, s.produced_batches),
            (12, 0, 25, 3, 40, 40),
            "{s:?}"
        );
        assert_eq!(s.produced_detections, 2502);
        // The byte counts agree with a recount of the migrated records.
        let counted = {
            let guard = q.read_store();
            recount(&Store::get(&guard).unwrap().tree, None, false).unwrap().counters
        };
        assert_eq!(
            (s.pending_bytes, s.acked_bytes, s.bytes - s.pending_bytes - s.acked_bytes),
            (counted.pending_bytes, counted.acked_bytes, counted.dead_bytes)
        );
        assert!(q.verify().unwrap().bad.is_empty());
        // The pending ones come out in order with their batch_ids, none of the acked ones.
        let mut sent = Vec::new();
        while let Some(b) = q.next_batch().unwrap() {
            assert_eq!(b.batch_id.to_string(), ids[b.seq as usize]);
            sent.push(b.seq);
        }
        assert_eq!(sent, (28..40).collect::<Vec<_>>());
        assert_eq!(q.source_position().unwrap(), Some(b"pos-39".to_vec()));
        let mut states = std::collections::BTreeMap::new();
        q.export(|r| {
            *states.entry(r.state).or_insert(0) += 1;
            if r.state == "acked" {
                assert!(r.acked_at_ms.is_some_and(|t| t > 1_700_000_000_000), "{r:?}");
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(states, [("acked", 25), ("dead_letter", 3), ("pending", 12)].into_iter().collect());
    }
    // Opened again: nothing to migrate; a replay of everything acked gives back the 25 batches.
    let q = open(dir.path(), cfg);
    assert_eq!(q.stats().unwrap().acked_retained, 25);
    assert_eq!(q.requeue_acked(SystemTime::UNIX_EPOCH, None).unwrap(), 25);
    let mut replayed = Vec::new();
    while let Some(b) = q.next_batch().unwrap() {
        assert_eq!(b.batch_id.to_string(), ids[b.seq as usize]);
        replayed.push(b.seq);
    }
    assert_eq!(replayed, (0..25).chain(28..40).collect::<Vec<_>>());
}

#[test]
fn an_ack_writes_a_marker_and_leaves_the_record_where_it_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    let seqs: Vec<u64> = (0..5).map(|_| q.enqueue(new_batch(50)).unwrap().seq).collect();
    let before: Vec<_> = seqs.iter().map(|&s| q.debug_pending_raw(s).unwrap().unwrap()).collect();
    for _ in 0..3 {
        let b = q.next_batch().unwrap().unwrap();
        q.ack(b.batch_id).unwrap();
    }
    q.flush().unwrap();
    {
        let guard = q.read_store();
        let tree = &Store::get(&guard).unwrap().tree;
        for &seq in &seqs {
            assert_eq!(is_acked(tree, seq).unwrap(), seq < 3, "seq {seq}");
        }
        assert_eq!(tree.scan_prefix([layout::ACKED]).count(), 0, "nothing is moved");
    }
    for (&seq, raw) in seqs.iter().zip(&before) {
        assert_eq!(q.debug_pending_raw(seq).unwrap().as_ref(), Some(raw), "record {seq} untouched");
    }
    assert_eq!(q.lock_state().counters.ack_floor, 3);
}

#[test]
fn after_a_restart_the_pending_scan_starts_at_the_ack_floor_and_a_replay_lowers_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = open(dir.path(), config());
        for _ in 0..300 {
            q.enqueue(new_batch(1)).unwrap();
        }
        for _ in 0..250 {
            let b = q.next_batch().unwrap().unwrap();
            q.ack(b.batch_id).unwrap();
        }
    }
    {
        let q = open(dir.path(), config());
        assert_eq!(q.lock_state().counters.ack_floor, 250);
        assert_eq!(q.lock_state().cursor, 250);
        assert_eq!(q.next_batch().unwrap().unwrap().seq, 250);
        // A replay puts batches acked from now on back... and everything acked ever: all 250.
        assert_eq!(q.requeue_acked(SystemTime::UNIX_EPOCH, None).unwrap(), 250);
        assert_eq!(q.lock_state().counters.ack_floor, 0);
        // Not sent before a restart.
    }
    let q = open(dir.path(), config());
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.acked_retained), (300, 0), "{s:?}");
    let mut seqs = Vec::new();
    while let Some(b) = q.next_batch().unwrap() {
        seqs.push(b.seq);
    }
    assert_eq!(seqs, (0..300).collect::<Vec<_>>(), "the replayed batches are still sent after a restart");
}

#[test]
fn pruning_removes_marker_and_record_together_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    for _ in 0..10 {
        q.enqueue(new_batch(5)).unwrap();
    }
    for _ in 0..6 {
        let b = q.next_batch().unwrap().unwrap();
        q.ack(b.batch_id).unwrap();
    }
    let used = q.stats().unwrap().bytes;
    let n = {
        let guard = q.read_store();
        let store = Store::get(&guard).unwrap();
        let mut st = q.lock_state();
        // One byte to free: the oldest batch goes, whole.
        prune_acked_locked(store, &mut st, None, Some(1)).unwrap()
    };
    assert_eq!(n, 1);
    let s = q.stats().unwrap();
    assert_eq!((s.acked_retained, s.pending + s.in_flight), (5, 4));
    assert!(s.bytes < used);
    {
        let guard = q.read_store();
        let tree = &Store::get(&guard).unwrap().tree;
        assert!(!is_acked(tree, 0).unwrap());
        assert!(chunks::get(tree, &layout::pending_key(0)).unwrap().is_none());
        assert!(is_acked(tree, 1).unwrap());
        assert!(chunks::get(tree, &layout::pending_key(1)).unwrap().is_some());
    }
    assert!(q.verify().unwrap().bad.is_empty());
}

#[test]
fn enqueue_many_into_a_full_blocking_queue_stores_the_first_ones_durably_and_says_how_many() {
    let dir = tempfile::tempdir().unwrap();
    let per = batch_bytes(5);
    let cfg = QueueConfig {
        max_bytes: per * 2 + per / 2,
        on_full: OnFull::Block,
        block_timeout: Duration::from_millis(100),
        ..config()
    };
    let q = open(dir.path(), cfg.clone());
    let batches: Vec<NewBatch> = (0..4).map(|_| NewBatch { batch_id: Some(BatchId::new()), ..new_batch(5) }).collect();
    let err = q.enqueue_many(batches.clone()).unwrap_err();
    assert!(matches!(err, EnqueueError::Full { stored: 2, .. }), "{err}");
    // The two are durable and handed out; a retry with the rest stores nothing twice.
    assert_eq!(q.stats().unwrap().pending, 2);
    let first = q.next_batch().unwrap().unwrap();
    assert_eq!(first.batch_id, batches[0].batch_id.unwrap());
    q.ack(first.batch_id).unwrap();
    drop(q);
    let q = open(dir.path(), QueueConfig { retain_acked: Duration::ZERO, ..cfg });
    let done = q.enqueue_many(batches[2..3].to_vec()).unwrap();
    assert_eq!(done[0].seq, 2);
    assert_eq!(q.stats().unwrap().produced_batches, 3);
}

/// Fills a queue with `max_bytes` on disk (`Budget::Disk`) with 500-detection batches, acking every
/// other one (retained), until `fills` times the budget was written: first the retained acked
/// batches are pruned for room, then (the acks cannot keep up) pending ones are dropped. Returns
/// the largest `data_dir` seen on disk (sampled every 20 batches) and the last stats.
fn fill_disk_budget(max: u64, fills: u64) -> (u64, Stats) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = QueueConfig { max_bytes: max, budget: Budget::Disk, ..config() };
    let q = open(dir.path(), cfg);
    let mut peak = 0;
    for i in 1u64.. {
        q.enqueue(new_batch(500)).unwrap();
        if i % 2 == 0 {
            if let Some(b) = q.next_batch().unwrap() {
                q.ack(b.batch_id).unwrap();
            }
        }
        if i % 20 == 0 {
            peak = peak.max(allocated_bytes(dir.path()));
            let s = q.stats().unwrap();
            // About 13 logical bytes a detection: stop after `fills` budgets' worth.
            if s.produced_detections * 13 > max * fills {
                assert!(s.dropped_batches > 0 && s.acked_retained < 10, "both phases were reached: {s:?}");
                return (peak, s);
            }
        }
    }
    unreachable!()
}

#[test]
fn the_disk_budget_steers_the_logical_limit_by_what_data_dir_occupies() {
    // A small budget, for speed: sled's fixed and garbage overhead weigh most here (1.4x was
    // measured at 16 MiB on an idle machine, 1.53x once in a CI run, with
    // the other tests running beside it; 0.92-1.12x at 64 MiB, the ignored test below). The same
    // workload under `Budget::Logical` would fill 16 MiB of records, about twice that on disk.
    let max = 16 << 20;
    let (peak, s) = fill_disk_budget(max, 3);
    eprintln!("max_bytes {max}: data_dir peaked at {peak} bytes ({:.3}x)", peak as f64 / max as f64);
    assert!(peak <= max / 4 * 7, "data_dir reached {peak} bytes on disk for max_bytes = {max}: {s:?}");
    // The limit reacted to the disk: below the 45% of max_bytes it starts at, never below a third.
    assert!(s.budget_bytes < max / 20 * 9 && s.budget_bytes >= max / 3, "{s:?}");
    assert!(s.bytes <= s.budget_bytes + 64 * 1024, "{s:?}");
    // Logical: the same workload holds twice as much on disk.
    let logical = QueueConfig { max_bytes: max, budget: Budget::Logical, ..config() };
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), logical);
    assert_eq!(q.stats().unwrap().budget_bytes, max);
}

#[test]
#[ignore = "minutes in a debug build: ./scripts/test --full"]
fn the_disk_budget_keeps_data_dir_within_ten_percent_of_max_bytes() {
    let max = 64 << 20;
    let (peak, s) = fill_disk_budget(max, 3);
    // The issue's target is 10%; sled's garbage spikes past it in some runs (README, "Disk budget").
    assert!(peak <= max / 20 * 23, "data_dir reached {peak} bytes on disk for max_bytes = {max}: {s:?}");
    eprintln!("max_bytes {max}: data_dir peaked at {peak} bytes ({:.3}x); {s:?}", peak as f64 / max as f64);
}

/// Review finding (issue #17): an `enqueue_many` whose batch B pruned for room wrote the counters
/// past its earlier batch A; a disk error then reopened the database before the call returned.
/// The reopen's tail scan starts at the counters, so only the call's own record of what it applied
/// keeps the retry from storing A a second time under a new seq.
#[test]
fn a_retry_after_a_reopen_finds_a_batch_applied_before_the_counters_moved_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(dir.path(), config());
    let a = NewBatch { batch_id: Some(BatchId::new()), ..new_batch(3) };
    let first = q.enqueue_many(vec![a.clone()]).unwrap()[0];
    {
        // As the interrupted call left it: A applied and not returned, counters written past it.
        let guard = q.read_store();
        let mut st = q.lock_state();
        st.unsynced.insert(first.batch_id, first.seq);
        write_meta(Store::get(&guard).unwrap(), &mut st, sled::Batch::default()).unwrap();
    }
    q.reopen().unwrap();
    let again = q.enqueue_many(vec![a]).unwrap();
    assert_eq!(again[0].seq, first.seq, "found, not stored twice");
    let s = q.stats().unwrap();
    assert_eq!((s.produced_batches, s.next_seq, s.pending), (1, 1, 1), "{s:?}");
    assert!(q.lock_state().unsynced.is_empty() && q.lock_state().recovered.is_empty());
}
