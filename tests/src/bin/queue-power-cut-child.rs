//! Power-cut test child (issue #17): runs the queue's whole life on a data_dir on the power-cut
//! FUSE filesystem (`backhaul_tests::powercut`): open (recovery of whatever the last cut left),
//! then enqueues (single and grouped), acks, prunes and flushes in a seeded random order, printing
//! `B <op>` before each operation and its result once it returned:
//! `E <seq> <batch_id>` per durable batch, `A <seq>` per ack, `P <pruned>`, `F`.
//! On an error (the power is cut: every write fails) it prints `X <op> <error>` and exits 3.
//! With `BACKHAUL_POWER_CUT_GO=FILE` it waits after `OPEN` until FILE exists (the test sets the
//! cut point relative to the operations the open made).
//!
//! With `BACKHAUL_POWER_CUT_DURABILITY=flush` the queue skips its own syncs
//! (`Durability::Flush`): the negative control, which must lose batches at some cut.
//!
//! Usage: queue-power-cut-child DATA_DIR SEED

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use backhaul_edge::queue::{Durability, NewBatch, Queue, QueueConfig};

/// Batch `n`: 1 to 7 detections.
fn batch(n: u64) -> NewBatch {
    backhaul_tests::numbered_batch("power-cut-test", n, 1 + n % 7)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let data_dir = PathBuf::from(args.next().expect("DATA_DIR"));
    let mut rng: u64 = args.next().expect("SEED").parse::<u64>().expect("SEED is a number") | 1;
    let mut below = |n: u64| {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut say = |line: String| {
        writeln!(out, "{line}").and_then(|()| out.flush()).expect("stdout");
    };
    let fail = |op: &str, e: &dyn std::fmt::Display, say: &mut dyn FnMut(String)| -> ! {
        say(format!("X {op} {e}"));
        std::process::exit(3)
    };
    // Acked batches are kept 1 ms, so a prune has work to do.
    let durability = match std::env::var("BACKHAUL_POWER_CUT_DURABILITY").as_deref() {
        Ok("flush") => Durability::Flush,
        _ => Durability::Fsync,
    };
    let config = QueueConfig {
        max_bytes: u64::MAX,
        retain_acked: Duration::from_millis(1),
        durability,
        ..QueueConfig::default()
    };
    say("B open".into());
    let queue = Queue::open(&data_dir, config).unwrap_or_else(|e| fail("open", &e, &mut say));
    say("OPEN".into());
    if let Some(go) = std::env::var_os("BACKHAUL_POWER_CUT_GO") {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !std::path::Path::new(&go).exists() {
            if std::time::Instant::now() > deadline {
                fail("go", &"the test never said go", &mut say);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let mut n = match queue.source_position() {
        Ok(Some(pos)) => u64::from_le_bytes(pos.as_slice().try_into().expect("8 bytes")) + 1,
        Ok(None) => 0,
        Err(e) => fail("source_position", &e, &mut say),
    };
    loop {
        match below(100) {
            0..=54 => {
                say("B enqueue".into());
                let e = queue.enqueue(batch(n)).unwrap_or_else(|e| fail("enqueue", &e, &mut say));
                say(format!("E {} {}", e.seq, e.batch_id));
                n += 1;
            }
            55..=64 => {
                say("B enqueue_many".into());
                let batches = (n..n + 3).map(batch).collect();
                for e in queue.enqueue_many(batches).unwrap_or_else(|e| fail("enqueue_many", &e, &mut say)) {
                    say(format!("E {} {}", e.seq, e.batch_id));
                }
                n += 3;
            }
            65..=89 => {
                say("B ack".into());
                match queue.next_batch() {
                    Ok(Some(b)) => {
                        queue.ack(b.batch_id).unwrap_or_else(|e| fail("ack", &e, &mut say));
                        say(format!("A {}", b.seq));
                    }
                    Ok(None) => {}
                    Err(e) => fail("next_batch", &e, &mut say),
                }
            }
            90..=96 => {
                say("B prune".into());
                let pruned = queue.prune_acked().unwrap_or_else(|e| fail("prune", &e, &mut say));
                say(format!("P {pruned}"));
            }
            _ => {
                say("B flush".into());
                queue.flush().unwrap_or_else(|e| fail("flush", &e, &mut say));
                say("F".into());
            }
        }
    }
}
