//! The queue survives SIGKILL at random moments: a child process enqueues in a loop and prints each
//! seq once `enqueue` returned; the parent kills it, reopens the queue and checks that every printed
//! seq is present and intact, in order, with its batch_id.

use std::collections::BTreeMap;
use std::time::Duration;

use backhaul_edge::queue::{Queue, QueueConfig};
use backhaul_shared::{Batch, Limits};
use backhaul_tests::Process;

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn from_time() -> Self {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
        Self::new(seed)
    }

    fn new(seed: u64) -> Self {
        eprintln!("crash test seed: {seed} (set BACKHAUL_CRASH_SEED={seed} to repeat)");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn crash_cycles(cycles: usize, detections: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_owned();
    let mut rng = match std::env::var("BACKHAUL_CRASH_SEED") {
        Ok(s) => Rng::new(s.parse().unwrap()),
        Err(_) => Rng::from_time(),
    };
    // seq → batch_id of every enqueue the child reported as returned.
    let mut promised: BTreeMap<u64, String> = BTreeMap::new();
    let mut kills_mid_write = 0;
    for cycle in 0..cycles {
        let mut child =
            Process::spawn("queue-crash-child", &[&data_dir, detections], &[("BACKHAUL_LOG", "warn")]).unwrap();
        child.wait_for_line(Duration::from_secs(20), |l| l == "OPEN").unwrap();
        // Let it write a random number of batches, then kill it at a random moment within the next one.
        let wait_lines = rng.below(20) + 1;
        for _ in 0..wait_lines {
            child.wait_for_line(Duration::from_secs(20), |l| l.starts_with("E ")).ok();
        }
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        child.kill9().unwrap();
        for line in child.output() {
            let mut parts = line.split(' ');
            if parts.next() == Some("E") {
                let seq: u64 = parts.next().unwrap().parse().unwrap();
                promised.insert(seq, parts.next().unwrap().to_owned());
            }
        }
        kills_mid_write += 1;

        // Everything promised is there, intact.
        let queue = Queue::open(dir.path(), QueueConfig { max_bytes: u64::MAX, ..QueueConfig::default() }).unwrap();
        let mut stored: BTreeMap<u64, String> = BTreeMap::new();
        queue
            .export(|r| {
                assert!(r.error.is_none(), "cycle {cycle}: damaged record {:?}", r.error);
                let seq = r.seq.unwrap();
                let batch: Batch =
                    Batch::from_json(&serde_json::to_vec(&r.batch.unwrap()).unwrap(), &Limits::default()).unwrap();
                assert_eq!(batch.seq, seq);
                // The child's n-th batch carries hashes n*1000.. and must have seq n.
                match &batch.detections[0] {
                    backhaul_shared::Detection::Presence(p) => {
                        assert_eq!(p.device_hash, format!("{:016x}", seq * 1000))
                    }
                    other => panic!("unexpected detection {other:?}"),
                }
                assert_eq!(batch.batch_id.to_string(), *r.batch_id.as_ref().unwrap());
                stored.insert(seq, r.batch_id.unwrap());
                Ok(())
            })
            .unwrap();
        for (seq, id) in &promised {
            assert_eq!(stored.get(seq), Some(id), "cycle {cycle}: seq {seq} was promised durable but is missing");
        }
        // In order with no holes: seqs are 0..n (a batch that was durable but not yet printed is fine).
        let seqs: Vec<u64> = stored.keys().copied().collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "cycle {cycle}: seqs have a hole");
        // The source position is the one stored with the newest batch: nothing produced twice,
        // nothing skipped.
        let position = u64::from_le_bytes(queue.source_position().unwrap().unwrap().as_slice().try_into().unwrap());
        assert_eq!(Some(&position), stored.keys().last(), "cycle {cycle}: source position is not the newest batch's");
        let report = queue.verify().unwrap();
        assert!(report.bad.is_empty(), "cycle {cycle}: {:?}", report.bad);
        assert_eq!(queue.stats().unwrap().quarantined, 0);
    }
    assert!(
        promised.len() >= cycles,
        "the child made progress: {} batches over {kills_mid_write} kills",
        promised.len()
    );
}

#[test]
fn every_returned_enqueue_survives_sigkill_50_cycles() {
    // 200 detections: several chunks per record, so kills land between a record's chunks too.
    crash_cycles(50, "200");
}

#[test]
#[ignore = "long: run with `cargo test -p backhaul-tests --test queue_crash -- --ignored`"]
fn every_returned_enqueue_survives_sigkill_500_cycles_large_batches() {
    crash_cycles(500, "500");
}
