//! Crash-test child: enqueues batches into the durable queue in a loop, printing `E <seq> <batch_id>`
//! after each enqueue returned (that is, after it is durable), and acking every third batch it handed
//! out, printing `A <seq>`. The parent SIGKILLs it at random moments and checks that every printed seq
//! is still there.
//!
//! Its batches carry a source position (the batch's index), and it resumes after the stored one, as
//! the simulated and replay sources do: so batch `n` must always be the one with seq `n`.
//!
//! Usage: queue-crash-child DATA_DIR DETECTIONS_PER_BATCH

use std::io::Write;
use std::path::PathBuf;

use backhaul_edge::queue::{Queue, QueueConfig};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let data_dir = PathBuf::from(args.next().expect("DATA_DIR"));
    let detections: usize = args.next().expect("DETECTIONS_PER_BATCH").parse()?;
    let queue = Queue::open(&data_dir, QueueConfig { max_bytes: u64::MAX, ..QueueConfig::default() })?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "OPEN")?;
    out.flush()?;
    // A resumable source: continue after the position stored with the last durable batch.
    let mut n = match queue.source_position()? {
        Some(pos) => u64::from_le_bytes(pos.as_slice().try_into()?) + 1,
        None => 0,
    };
    loop {
        let batch = backhaul_tests::numbered_batch("crash-test", n, detections as u64);
        let e = queue.enqueue(batch)?;
        writeln!(out, "E {} {}", e.seq, e.batch_id)?;
        out.flush()?;
        n += 1;
        if n.is_multiple_of(3) {
            if let Some(b) = queue.next_batch()? {
                queue.ack(b.batch_id)?;
                writeln!(out, "A {}", b.seq)?;
                out.flush()?;
            }
        }
    }
}
