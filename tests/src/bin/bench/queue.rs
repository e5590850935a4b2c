//! The durable queue on its own: raw fsync baseline, durable enqueue, a backlog's open and drain.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use backhaul_edge::queue::{Durability, Queue, QueueConfig};
use serde_json::{json, Value};

use crate::util::*;
use crate::{child, child_pinned, median, s, Targets};

pub fn queue_benchmarks(dir: &Path, runs: usize, quick: bool, targets: &mut Targets) -> Result<()> {
    let secs = if quick { "0.5" } else { "3" };
    let d = dir.display().to_string();

    let fsync = child(&[s("fsync"), s(&d), s(secs)], runs)?;
    let fsync_rate = median(&fsync, "ops_per_s");
    println!();
    println!("| scenario | batches/s | detections/s | vs raw fsync | batches per sync | disk bytes written / payload byte | peak RSS MiB |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!("| baseline: raw 512 B append + fdatasync | {fsync_rate:.0} | | 1.0x | 1 | | |");
    // The last two: Pi-class, the producers and sled's threads all on one core.
    let cases = [
        ("1", "1", "1", false),
        ("1", "4", "1", false),
        ("1", "4", "8", false),
        ("50", "1", "1", false),
        ("50", "4", "1", false),
        ("500", "1", "1", false),
        ("500", "4", "1", false),
        ("50", "1", "1", true),
        ("500", "4", "1", true),
    ];
    for (detections, producers, many, pin) in cases {
        let args = [s("enqueue"), s(&d), s(detections), s(producers), s(secs), s(many)];
        let r = if pin { child_pinned("0", &args, runs)? } else { child(&args, runs)? };
        let bps = median(&r, "batches_per_s");
        let how = if many == "1" { String::new() } else { format!(", enqueue_many of {many}") };
        let pinned = if pin { ", Pi-class: one core (`taskset -c 0`)" } else { "" };
        if detections == "1" && producers == "4" {
            targets.add(
                "#3",
                &format!("group commit ≥ 5x the raw fsync rate, 4 producers, 1 det/batch{how}"),
                format!("{:.1}x ({bps:.0} vs {fsync_rate:.0}/s)", bps / fsync_rate),
                Some(bps / fsync_rate >= 5.0),
            );
        }
        println!(
            "| enqueue durable, {detections} det/batch, {producers} producer(s){how}{pinned} | {bps:.0} | {:.0} | {:.1}x | {:.1} | {:.2} | {:.1} |",
            median(&r, "detections_per_s"),
            bps / fsync_rate,
            median(&r, "batches_per_sync"),
            median(&r, "write_amplification"),
            median(&r, "peak_rss_mib"),
        );
    }

    let total = if quick { "50000" } else { "1000000" };
    println!();
    println!("| backlog of {total} detections (500/batch) | value |");
    println!("| --- | ---: |");
    let r = child(&[s("backlog"), s(&d), s(total), s("500")], runs)?;
    let r0 = child(&[s("backlog"), s(&d), s(total), s("500"), s("retain0")], runs)?;
    println!("| fill: detections/s (durable enqueue, 1 producer) | {:.0} |", median(&r, "fill_detections_per_s"));
    println!("| fill: disk bytes written / payload byte | {:.2} |", median(&r, "fill_write_amplification"));
    println!("| queue size on disk, MiB | {:.1} |", median(&r, "disk_mib"));
    println!("| open after restart, ms | {:.0} |", median(&r, "open_ms"));
    println!("| RSS right after open, MiB | {:.1} |", median(&r, "rss_after_open_mib"));
    println!("| peak RSS while filling, MiB | {:.1} |", median(&r, "fill_peak_rss_mib"));
    let open_ms = median(&r, "open_ms");
    targets.add(
        "#3",
        &format!("open a {total}-detection backlog in under 1 s"),
        format!("{open_ms:.0} ms"),
        Some(open_ms < 1000.0),
    );
    if !quick {
        // About 1 GiB of wire JSON: the backlog of a long outage. One run: it takes a while.
        let big = child(&[s("backlog"), s(&d), s("7500000"), s("500")], 1)?;
        println!(
            "| 7,500,000-detection backlog (~1 GiB of JSON): queue size on disk, MiB | {:.0} |",
            median(&big, "disk_mib")
        );
        println!("| ... open after restart, ms | {:.0} |", median(&big, "open_ms"));
        println!("| ... peak RSS while filling, MiB | {:.1} |", median(&big, "fill_peak_rss_mib"));
        println!(
            "| ... peak RSS while opening and draining (acked kept 24 h), MiB | {:.1} |",
            median(&big, "drain_peak_rss_mib")
        );
        println!("| ... drain detections/s | {:.0} |", median(&big, "drain_detections_per_s"));
        for (phase, key) in [("filling", "fill_peak_rss_mib"), ("draining, acked kept 24 h", "drain_peak_rss_mib")] {
            let mib = median(&big, key);
            targets.add(
                "#3",
                &format!("queue process under 32 MiB RSS with a 1 GB backlog, {phase}"),
                format!("{mib:.1} MiB"),
                Some(mib < 32.0),
            );
        }
    }
    for (label, r) in [("acked kept 24 h (default)", &r), ("retain_acked = 0", &r0)] {
        println!("| drain (next + ack), {label}: batches/s | {:.0} |", median(r, "drain_batches_per_s"));
        println!("| drain (next + ack), {label}: detections/s | {:.0} |", median(r, "drain_detections_per_s"));
        println!("| peak RSS while opening and draining, {label}, MiB | {:.1} |", median(r, "drain_peak_rss_mib"));
    }
    Ok(())
}

/// The disk's raw durable-write rate: append 512 bytes, fdatasync, repeat.
pub fn raw_fsync(dir: &Path, seconds: f64) -> Result<Value> {
    use std::io::Write;
    let path = dir.join(format!("fsync-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let block = [0xABu8; 512];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(seconds) {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(json!({ "ops_per_s": n as f64 / elapsed }))
}

/// Durable enqueues from `producers` threads for `seconds`, `many` batches per call.
pub fn enqueue(dir: &Path, detections: usize, producers: usize, seconds: f64, many: usize) -> Result<Value> {
    let data = tempfile::tempdir_in(dir)?;
    let queue = Queue::open(data.path(), QueueConfig { max_bytes: u64::MAX, ..QueueConfig::default() })?;
    let template = sample_batch(detections, 1);
    let per_batch = payload_len(&template);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let written_before = disk_write_bytes();
    let start = Instant::now();
    let handles: Vec<_> = (0..producers)
        .map(|_| {
            let (queue, stop, count, template) = (queue.clone(), stop.clone(), count.clone(), template.clone());
            std::thread::spawn(move || -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    if many == 1 {
                        queue.enqueue(template.clone())?;
                    } else {
                        queue.enqueue_many(vec![template.clone(); many])?;
                    }
                    count.fetch_add(many as u64, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("producer panicked"))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed);
    let written = disk_write_bytes() - written_before;
    let syncs = queue.stats()?.syncs_since_open;
    Ok(json!({
        "batches_per_sync": n as f64 / syncs.max(1) as f64,
        "batches_per_s": n as f64 / elapsed,
        "detections_per_s": (n * detections as u64) as f64 / elapsed,
        "write_amplification": written as f64 / (n * per_batch) as f64,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// Fills a backlog of `total` detections, then (in a fresh process) opens it and drains it.
pub fn backlog(dir: &Path, total: u64, per_batch: usize, retain0: bool) -> Result<Value> {
    let data = tempfile::tempdir_in(dir)?;
    let batches = total / per_batch as u64;
    let fill = {
        let queue = Queue::open(data.path(), QueueConfig { max_bytes: u64::MAX, ..QueueConfig::default() })?;
        let written_before = disk_write_bytes();
        let mut payload = 0;
        let start = Instant::now();
        for i in 0..batches {
            let b = sample_batch(per_batch, i);
            if i == 0 {
                payload = payload_len(&b);
            }
            queue.enqueue(b)?;
        }
        queue.flush()?;
        let elapsed = start.elapsed().as_secs_f64();
        let written = disk_write_bytes() - written_before;
        json!({
            "fill_detections_per_s": total as f64 / elapsed,
            "fill_write_amplification": written as f64 / (payload * batches) as f64,
            "fill_peak_rss_mib": peak_rss_mib(),
        })
    };
    let disk_mib = dir_size(data.path()) as f64 / (1 << 20) as f64;
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(["scenario", "backlog-drain"])
        .arg(data.path())
        .args(retain0.then_some("retain0"))
        .output()?;
    if !out.status.success() {
        bail!("drain failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut drain: Value = serde_json::from_slice(&out.stdout)?;
    let obj = drain.as_object_mut().context("object")?;
    for (k, v) in fill.as_object().context("object")? {
        obj.insert(k.clone(), v.clone());
    }
    obj.insert("disk_mib".into(), json!(disk_mib));
    Ok(drain)
}

pub fn backlog_drain(data: &Path, retain0: bool) -> Result<Value> {
    let start = Instant::now();
    let retain_acked = if retain0 { Duration::ZERO } else { QueueConfig::default().retain_acked };
    let queue = Queue::open(
        data,
        QueueConfig { max_bytes: u64::MAX, durability: Durability::Fsync, retain_acked, ..QueueConfig::default() },
    )?;
    let open_ms = start.elapsed().as_secs_f64() * 1000.0;
    let rss_after_open_mib = current_rss_mib();
    let start = Instant::now();
    let (mut batches, mut detections) = (0u64, 0u64);
    while let Some(b) = queue.next_batch()? {
        queue.ack(b.batch_id)?;
        batches += 1;
        detections += u64::from(b.detections);
    }
    queue.flush()?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(json!({
        "open_ms": open_ms,
        "rss_after_open_mib": rss_after_open_mib,
        "drain_batches_per_s": batches as f64 / elapsed,
        "drain_detections_per_s": detections as f64 / elapsed,
        "drain_peak_rss_mib": peak_rss_mib(),
    }))
}
