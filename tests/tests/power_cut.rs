//! Power cuts, simulated (issue #17): the queue's child process runs on the power-cut FUSE
//! filesystem (`backhaul_tests::powercut`: unsynced writes are forgotten at a cut), the power is
//! cut at a random write-like operation — in recovery, enqueue, ack, prune or flush — the child is
//! SIGKILLed, and what a disk would still hold is opened with the real filesystem:
//! - the queue always opens;
//! - every batch whose `enqueue` returned is there (pending, or acked and retained) with its
//!   batch_id, and nothing is counted lost (the watermark is not synced by itself, so under this
//!   model it never survives to count a loss: the batches must simply be there);
//! - nothing is quarantined.
//!
//! Each cut's disk is where the next run starts, so recovery after a cut is cut too. The default
//! run makes 150 cuts (under a minute); `--ignored` makes 1,000. Needs root and FUSE
//! (`fusermount3`, Debian's fuse3, which `./scripts/test` installs): elsewhere SKIPPED, loudly.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use backhaul_edge::queue::{Queue, QueueConfig};
use backhaul_tests::powercut::{mount, PowerCutFs, Snapshot};
use backhaul_tests::{find_program, wait_until, Process};

/// xorshift64*, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn fuse_available() -> bool {
    if !backhaul_tests::is_root()
        || !std::path::Path::new("/dev/fuse").exists()
        || find_program("fusermount3").is_none()
    {
        backhaul_tests::skip(
            "power cuts",
            "needs root, /dev/fuse and fusermount3 (Debian's fuse3; ./scripts/test installs it)",
        );
        return false;
    }
    true
}

#[derive(Default)]
struct Ledger {
    /// seq → batch_id of every batch whose enqueue returned.
    promised: BTreeMap<u64, String>,
    /// seqs acked (in memory, or found acked on disk after a cut): they may be pruned.
    acked: BTreeSet<u64>,
    /// Cuts by the operation they fell in.
    phases: BTreeMap<String, u64>,
    lost: u64,
    /// Promised batches gone without being counted lost (only the negative control may have any).
    unaccounted: u64,
    /// Promised batches gone, and counted lost, after cuts with background writeback.
    lost_in_writeback: u64,
    /// Cuts with (true) and without background writeback.
    writeback_cuts: BTreeMap<bool, u64>,
}

/// Runs `cuts` power cuts on a queue with `durability` ("fsync", the product's, or "flush") and
/// returns the ledger; with "fsync" any promised batch gone and not counted lost fails at once.
fn power_cuts(cuts: u64, durability: &str, with_writeback: bool) -> Option<Ledger> {
    if !fuse_available() {
        return None;
    }
    let seed = match std::env::var("BACKHAUL_POWER_CUT_SEED") {
        Ok(s) => s.parse().unwrap(),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1,
    };
    eprintln!("power-cut seed: {seed} (set BACKHAUL_POWER_CUT_SEED={seed} to repeat)");
    let mut rng = Rng(seed);
    let work = tempfile::tempdir().unwrap();
    let mountpoint = work.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let mut disk = Snapshot::default();
    let mut ledger = Ledger::default();
    // A quarter of the cuts fall while the queue opens (recovery: anywhere in the operations the
    // last open made), the rest in the work after it (anywhere in the operations 30 batches'
    // worth of work made, measured once without a cut).
    let (mut open_ops, mut span) = (0, 0);
    for cut in 0..=cuts {
        let (fs, power) = PowerCutFs::new(disk.clone());
        let session = mount(fs, &mountpoint).unwrap();
        let calibrating = cut == 0;
        let in_recovery = !calibrating && rng.below(4) == 0;
        let mut cut_at = if in_recovery { 1 + rng.below(open_ops) } else { u64::MAX };
        power.cut_at(cut_at);
        let go = work.path().join(format!("go-{cut}"));
        if in_recovery {
            // The open may make fewer operations than the last one: then the cut falls in the work.
            std::fs::write(&go, "").unwrap();
        }
        let data_dir = mountpoint.join("data");
        let mut child = Process::spawn(
            "queue-power-cut-child",
            &[data_dir.to_str().unwrap(), &rng.below(u64::MAX).to_string()],
            &[
                ("BACKHAUL_LOG", "error"),
                ("BACKHAUL_POWER_CUT_GO", go.to_str().unwrap()),
                ("BACKHAUL_POWER_CUT_DURABILITY", durability),
            ],
        )
        .unwrap();
        if !in_recovery {
            child.wait_for_line(Duration::from_secs(60), |l| l == "OPEN").unwrap();
            open_ops = power.ops().max(1);
            if !calibrating {
                cut_at = open_ops + 1 + rng.below(span);
                power.cut_at(cut_at);
            }
            std::fs::write(&go, "").unwrap();
        }
        if calibrating {
            for _ in 0..30 {
                child.wait_for_line(Duration::from_secs(60), |l| l.starts_with('E')).unwrap();
            }
            power.cut_now();
            span = (power.ops() - open_ops).max(10);
            eprintln!("calibration: {open_ops} write-like operations to open, {span} to make 30 batches after");
        } else if let Err(e) = wait_until("the power cut", Duration::from_secs(60), || power.cut_happened()) {
            panic!("cut {cut} at operation {cut_at} (seed {seed}): {e}\nchild:\n{}", child.output().join("\n"));
        }
        child.kill9().unwrap();
        // Every line, to the end of the pipes: the last promises are the likeliest to be lost.
        let lines = child.output_to_end(Duration::from_secs(30)).unwrap().to_vec();
        drop(child);
        // With `with_writeback`, half the cuts find some unsynced writes on the disk too.
        let writeback = with_writeback && rng.below(2) == 0;
        disk = if writeback { power.durable_with_writeback(&mut |n| rng.below(n)) } else { power.durable() };
        *ledger.writeback_cuts.entry(writeback).or_default() += 1;
        drop(session);

        let phase = lines.iter().rev().find_map(|l| l.strip_prefix("B ")).unwrap_or("start").to_owned();
        *ledger.phases.entry(if phase == "open" { "recovery".into() } else { phase }).or_default() += 1;
        for line in &lines {
            let mut parts = line.split(' ');
            match parts.next() {
                Some("E") => {
                    let seq: u64 = parts.next().unwrap().parse().unwrap();
                    ledger.promised.insert(seq, parts.next().unwrap().to_owned());
                }
                Some("A") => {
                    ledger.acked.insert(parts.next().unwrap().parse().unwrap());
                }
                _ => {}
            }
        }
        let strict = durability == "fsync";
        check(&disk, &mut ledger, cut, cut_at, seed, strict, writeback);
    }
    eprintln!(
        "{cuts} power cuts ({durability}): {} batches promised, {} acked, {} counted lost ({} after writeback), {} gone \
         uncounted; cuts with writeback: {:?}; cuts by operation: {:?}; disk {} KiB",
        ledger.promised.len(),
        ledger.acked.len(),
        ledger.lost,
        ledger.lost_in_writeback,
        ledger.unaccounted,
        ledger.writeback_cuts,
        ledger.phases,
        disk.bytes() / 1024
    );
    // Acks are written with the next metadata write (every 64 acks, a flush or a prune), so the
    // cuts of ack writes are among "flush" and "prune"; those write little, so only the long run
    // is sure to cut them.
    let phases: &[&str] = if cuts >= 1000 {
        &["recovery", "enqueue", "enqueue_many", "prune", "flush"]
    } else {
        &["recovery", "enqueue"]
    };
    for phase in phases {
        assert!(ledger.phases.contains_key(*phase), "no cut fell in {phase}: {:?}", ledger.phases);
    }
    Some(ledger)
}

/// Opens what the disk holds after a cut with the real filesystem and checks the promises.
fn check(disk: &Snapshot, ledger: &mut Ledger, cut: u64, cut_at: u64, seed: u64, strict: bool, writeback: bool) {
    let copy = tempfile::tempdir().unwrap();
    disk.materialize(copy.path()).unwrap();
    let data_dir = copy.path().join("data");
    let context = format!("cut {cut} at operation {cut_at}, writeback {writeback} (seed {seed})");
    let queue = Queue::open(&data_dir, QueueConfig { max_bytes: u64::MAX, ..QueueConfig::default() })
        .unwrap_or_else(|e| panic!("{context}: the queue does not open: {e}"));
    let mut found: BTreeMap<u64, (String, &'static str)> = BTreeMap::new();
    queue
        .export(|r| {
            assert!(r.error.is_none() && r.state != "quarantined", "{context}: damaged record {r:?}");
            if let (Some(seq), Some(id)) = (r.seq, r.batch_id.clone()) {
                found.insert(seq, (id, r.state));
            }
            Ok(())
        })
        .unwrap();
    let stats = queue.stats().unwrap();
    drop(queue);
    for (seq, (_, state)) in &found {
        if *state == "acked" {
            ledger.acked.insert(*seq);
        }
    }
    let missing: Vec<u64> = ledger
        .promised
        .iter()
        .filter(|(seq, id)| match found.get(seq) {
            Some((found_id, _)) => {
                assert_eq!(found_id, *id, "{context}: seq {seq} holds another batch");
                false
            }
            None => !ledger.acked.contains(seq),
        })
        .map(|(seq, _)| *seq)
        .collect();
    let newly_lost = stats.lost_batches.saturating_sub(ledger.lost);
    if strict && !writeback {
        // Only synced writes on the disk: every promised batch must simply be there.
        assert!(missing.is_empty(), "{context}: promised batches are gone: seqs {missing:?}");
        assert_eq!(newly_lost, 0, "{context}: the watermark counted batches lost");
    } else if strict {
        // Unsynced writes of sled's on the disk too can cost sled durable batches: each one
        // must then be counted lost by the (synced) watermark, never gone silently.
        assert!(
            missing.len() as u64 <= newly_lost,
            "{context}: {} promised batches are gone and {newly_lost} counted lost: seqs {missing:?}",
            missing.len()
        );
        ledger.lost_in_writeback += missing.len() as u64;
    }
    ledger.unaccounted += (missing.len() as u64).saturating_sub(newly_lost);
    assert_eq!(stats.quarantined, 0, "{context}");
    ledger.lost = ledger.lost.max(stats.lost_batches);
    // A batch counted lost is not promised any more (its seq stays a gap).
    for seq in missing {
        ledger.promised.remove(&seq);
    }
}

#[test]
fn power_cuts_anywhere_lose_no_batch_whose_enqueue_returned() {
    power_cuts(150, "fsync", false);
}

#[test]
#[ignore = "minutes: 1,000 power cuts; ./scripts/test --full"]
fn a_thousand_power_cuts_lose_no_batch_whose_enqueue_returned() {
    power_cuts(1000, "fsync", false);
}

/// KNOWN TO FAIL (issue #17, open): half of 1,000 cuts also find a random part of the unsynced
/// writes on the disk, as the kernel's background writeback can leave it. sled 0.34 then comes
/// back without batches it had made durable — one unsynced 24-byte write of its recovery reaching
/// the disk is enough — and the watermark counts the loss only when it is at the end of the log.
/// The contract (present, or counted lost) does not hold yet; this test is its
/// reproduction (the seed it prints repeats a run).
#[test]
#[ignore = "known to fail: sled loses durable batches when unsynced writes reach the disk (issue #17)"]
fn power_cuts_with_background_writeback_lose_nothing_uncounted() {
    power_cuts(1000, "fsync", true);
}

/// The negative control: the same cuts on a queue that skips its own fdatasync (sled's flush ends
/// in `sync_file_range`, which the model, like a real power cut, does not count as durable) must
/// lose promised batches, or the layer would be proving nothing.
#[test]
fn the_layer_catches_a_queue_that_does_not_sync() {
    let Some(ledger) = power_cuts(60, "flush", false) else { return };
    assert!(ledger.unaccounted > 0, "60 cuts of an unsynced queue lost nothing: the layer does not model power cuts");
}
