//! A real full disk: the queue's data_dir on a small tmpfs that the test mounts (root only; skipped
//! with a loud message where mounting is not permitted).

use std::time::Duration;

use backhaul_edge::queue::{EnqueueError, NewBatch, OnFull, Queue, QueueConfig};
use backhaul_tests::{presence_batch, Tmpfs};

fn batch(n: usize) -> NewBatch {
    presence_batch("disk-full", n)
}

#[test]
fn full_disk_blocks_enqueue_and_recovers_when_space_returns() {
    let Some(fs) = Tmpfs::mount("3m") else { return };
    let data_dir = fs.path().join("data");
    // Ballast that the test deletes to give space back.
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 1 << 20]).unwrap();

    let config = QueueConfig {
        max_bytes: u64::MAX,
        on_full: OnFull::Block,
        block_timeout: Duration::from_millis(500),
        ..QueueConfig::default()
    };
    let queue = Queue::open(&data_dir, config.clone()).unwrap();
    let mut stored = Vec::new();
    let err = loop {
        let started = std::time::Instant::now();
        match queue.enqueue(batch(50)) {
            Ok(e) => stored.push(e),
            Err(e) => {
                // Like on_full = "block": it waited for space before giving up.
                assert!(started.elapsed() >= Duration::from_millis(500), "gave up after {:?}", started.elapsed());
                break e;
            }
        }
        assert!(stored.len() < 100_000, "the disk never filled");
    };
    eprintln!("after {} batches: {err}", stored.len());
    assert!(matches!(err, EnqueueError::DiskFull), "{err}");

    // Space comes back: the queue goes on, and nothing it promised is lost.
    std::fs::remove_file(&ballast).unwrap();
    let more = queue.enqueue(batch(50)).expect("enqueue works again once space returns");
    stored.push(more);
    drop(queue);
    let queue = Queue::open(&data_dir, config).unwrap();
    let report = queue.verify().unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    let mut seen = std::collections::BTreeMap::new();
    queue
        .export(|r| {
            seen.insert(r.seq.unwrap(), r.batch_id.unwrap());
            Ok(())
        })
        .unwrap();
    for e in &stored {
        assert_eq!(seen.get(&e.seq), Some(&e.batch_id.to_string()), "seq {} lost", e.seq);
    }
}
