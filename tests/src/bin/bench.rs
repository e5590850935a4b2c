//! The benchmark command. Every scenario runs in its own child process (so peak RSS and disk bytes
//! written are that scenario's alone), several times; the table shows medians, with the baselines
//! measured in the same run.
//!
//! ```text
//! cargo run --release -p backhaul-tests --bin bench -- all            # everything, a few minutes
//! cargo run --release -p backhaul-tests --bin bench -- all --quick    # smoke run, under a minute
//! cargo run --release -p backhaul-tests --bin bench -- queue [--runs N] [--dir DIR]
//! cargo run --release -p backhaul-tests --bin bench -- forward   # end to end; baseline needs `pip install paho-mqtt`
//! ```
//!
//! `--dir` is where the scenarios put their data (default: a temp dir under /var/tmp, which is on
//! the real disk; /tmp may be a tmpfs, where fsync is free and the figures would lie).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use backhaul_edge::queue::{Durability, NewBatch, Queue, QueueConfig};
use backhaul_shared::{Detection, Presence, Sensor, Timestamp, Zone};
use serde_json::{json, Value};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    match args.first().map(String::as_str) {
        Some("scenario") => {
            let result = run_scenario(&args[1..])?;
            println!("{result}");
            Ok(())
        }
        Some(group @ ("all" | "queue" | "cloud" | "forward" | "decode")) => {
            let quick = flag("--quick");
            let runs: usize = value("--runs").map(|r| r.parse()).transpose()?.unwrap_or(if quick { 1 } else { 3 });
            let base = match value("--dir") {
                Some(d) => PathBuf::from(d),
                None => PathBuf::from("/var/tmp"),
            };
            let dir = tempfile::Builder::new().prefix("backhaul-bench-").tempdir_in(&base)?;
            println!(
                "# backhaul benchmarks ({group}{}), {runs} run(s) each, medians",
                if quick { ", quick" } else { "" }
            );
            println!("# machine: {}", machine());
            println!("# data dir: {} ({})", dir.path().display(), filesystem(dir.path()));
            if group == "all" || group == "queue" {
                queue_benchmarks(dir.path(), runs, quick)?;
            }
            if group == "all" || group == "cloud" {
                cloud_benchmarks(dir.path(), runs, quick)?;
            }
            if group == "all" || group == "forward" {
                forward_benchmarks(dir.path(), runs, quick)?;
            }
            if group == "all" || group == "decode" {
                decode_benchmarks(dir.path(), runs, quick)?;
            }
            Ok(())
        }
        _ => {
            eprintln!("usage: bench all|queue|cloud|forward|decode [--quick] [--runs N] [--dir DIR]");
            std::process::exit(2);
        }
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cores} cores, {cpu}")
}

fn filesystem(path: &Path) -> String {
    Command::new("df")
        .args(["--output=fstype,source"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1).map(|l| l.split_whitespace().collect::<Vec<_>>().join(" on ")))
        .unwrap_or_default()
}

/// Runs `bench scenario ARGS` in a child `runs` times and returns the parsed results.
fn child(args: &[String], runs: usize) -> Result<Vec<Value>> {
    let exe = std::env::current_exe()?;
    (0..runs)
        .map(|_| {
            let out = Command::new(&exe).arg("scenario").args(args).output().context("running a scenario")?;
            if !out.status.success() {
                bail!("scenario {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let text = String::from_utf8(out.stdout)?;
            serde_json::from_str(text.trim()).with_context(|| format!("scenario output: {text}"))
        })
        .collect()
}

fn median(results: &[Value], key: &str) -> f64 {
    let mut v: Vec<f64> = results.iter().filter_map(|r| r[key].as_f64()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn s(v: &str) -> String {
    v.to_owned()
}

fn queue_benchmarks(dir: &Path, runs: usize, quick: bool) -> Result<()> {
    let secs = if quick { "1" } else { "3" };
    let d = dir.display().to_string();

    let fsync = child(&[s("fsync"), s(&d), s(secs)], runs)?;
    let fsync_rate = median(&fsync, "ops_per_s");
    println!();
    println!("| scenario | batches/s | detections/s | vs raw fsync | batches per sync | disk bytes written / payload byte | peak RSS MiB |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!("| baseline: raw 512 B append + fdatasync | {fsync_rate:.0} | | 1.0x | 1 | | |");
    let cases = [
        ("1", "1", "1"),
        ("1", "4", "1"),
        ("1", "4", "8"),
        ("50", "1", "1"),
        ("50", "4", "1"),
        ("500", "1", "1"),
        ("500", "4", "1"),
    ];
    for (detections, producers, many) in cases {
        let r = child(&[s("enqueue"), s(&d), s(detections), s(producers), s(secs), s(many)], runs)?;
        let bps = median(&r, "batches_per_s");
        let how = if many == "1" { String::new() } else { format!(", enqueue_many of {many}") };
        println!(
            "| enqueue durable, {detections} det/batch, {producers} producer(s){how} | {bps:.0} | {:.0} | {:.1}x | {:.1} | {:.2} | {:.1} |",
            median(&r, "detections_per_s"),
            bps / fsync_rate,
            median(&r, "batches_per_sync"),
            median(&r, "write_amplification"),
            median(&r, "peak_rss_mib"),
        );
    }

    let total = if quick { "100000" } else { "1000000" };
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
    }
    for (label, r) in [("acked kept 24 h (default)", &r), ("retain_acked = 0", &r0)] {
        println!("| drain (next + ack), {label}: batches/s | {:.0} |", median(r, "drain_batches_per_s"));
        println!("| drain (next + ack), {label}: detections/s | {:.0} |", median(r, "drain_detections_per_s"));
        println!("| peak RSS while opening and draining, {label}, MiB | {:.1} |", median(r, "drain_peak_rss_mib"));
    }
    Ok(())
}

fn run_scenario(args: &[String]) -> Result<Value> {
    let arg = |i: usize| args.get(i).cloned().context("missing scenario argument");
    match args.first().map(String::as_str) {
        Some("fsync") => raw_fsync(Path::new(&arg(1)?), arg(2)?.parse()?),
        Some("enqueue") => {
            let many = args.get(5).map(|m| m.parse()).transpose()?.unwrap_or(1);
            enqueue(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?, arg(4)?.parse()?, many)
        }
        Some("backlog") => backlog(
            Path::new(&arg(1)?),
            arg(2)?.parse()?,
            arg(3)?.parse()?,
            args.get(4).is_some_and(|a| a == "retain0"),
        ),
        Some("backlog-drain") => backlog_drain(Path::new(&arg(1)?), args.get(2).is_some_and(|a| a == "retain0")),
        Some("cloud-http") => cloud_http(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?),
        Some("cloud-mqtt") => cloud_mqtt(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?),
        Some("drain") => drain(Path::new(&arg(1)?), &arg(2)?, arg(3)?.parse()?, arg(4)?.parse()?),
        Some("paho") => paho(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?),
        Some("decode") => decode_replay(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?),
        Some("fill") => {
            let q = Queue::open(Path::new(&arg(1)?), QueueConfig { max_bytes: u64::MAX, ..QueueConfig::default() })?;
            let (total, per): (u64, usize) = (arg(2)?.parse()?, arg(3)?.parse()?);
            for i in 0..total / per as u64 {
                q.enqueue(sample_batch(per, i))?;
            }
            Ok(json!({ "rss_mib": current_rss_mib() }))
        }
        Some("open-only") => {
            let q = Queue::open(Path::new(&arg(1)?), QueueConfig { max_bytes: u64::MAX, ..QueueConfig::default() })?;
            Ok(json!({ "pending": q.stats()?.pending, "rss_mib": current_rss_mib() }))
        }
        other => bail!("unknown scenario {other:?}"),
    }
}

/// The disk's raw durable-write rate: append 512 bytes, fdatasync, repeat.
fn raw_fsync(dir: &Path, seconds: u64) -> Result<Value> {
    use std::io::Write;
    let path = dir.join(format!("fsync-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let block = [0xABu8; 512];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(json!({ "ops_per_s": n as f64 / elapsed }))
}

/// splitmix64: a cheap, well-mixed pseudo-random stream.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A batch like a busy site's: mostly presence (keyed hashes look random, so they are random
/// here: no help for the compressor), some Thingy:52 readings, detection times spread over the
/// batch's window with sub-second precision, RSSI varying.
fn sample_batch(detections: usize, salt: u64) -> NewBatch {
    let now = Timestamp::now();
    let base = now.unix_micros() - 5_000_000;
    NewBatch {
        device_id: "rpi-bench-01".into(),
        name: Some("Bench Pi".into()),
        location: Some("Lab".into()),
        timestamp: now,
        detections: (0..detections)
            .map(|i| {
                let r = mix(salt.wrapping_mul(1_000_003).wrapping_add(i as u64));
                let t = Timestamp::from_unix_micros(base + (r % 5_000_000) as i64).unwrap_or(now);
                if i % 10 == 9 {
                    Detection::Sensor(Sensor {
                        node: format!("c1:0e:5a:33:9f:{:02x}", r % 8),
                        rssi: -60 - (r % 30) as i16,
                        temp: Some(f64::from((r % 300) as u32) / 10.0),
                        humidity: Some((r % 100) as u8),
                        co2_ppm: Some(400 + (r % 1000) as u32),
                        window_open: Some(r.is_multiple_of(2)),
                        battery: Some((r % 100) as u8),
                        timestamp: t,
                    })
                } else {
                    Detection::Presence(Presence {
                        device_hash: format!("{:016x}", mix(r)),
                        rssi: -30 - (r % 70) as i16,
                        zone: [Zone::Near, Zone::Medium, Zone::Far][(r % 3) as usize],
                        timestamp: t,
                    })
                }
            })
            .collect(),
        source_position: None,
        batch_id: None,
    }
}

fn disk_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("write_bytes: ").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn current_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_size(&p)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

fn payload_len(batch: &NewBatch) -> u64 {
    // The wire JSON is what the queue stores; measure it the same way.
    let b = backhaul_shared::Batch {
        schema: 1,
        batch_id: backhaul_shared::BatchId::new(),
        device_id: batch.device_id.clone(),
        seq: 1_000_000,
        name: batch.name.clone(),
        location: batch.location.clone(),
        timestamp: batch.timestamp,
        detections: batch.detections.clone(),
    };
    b.to_json().len() as u64
}

/// Durable enqueues from `producers` threads for `seconds`, `many` batches per call.
fn enqueue(dir: &Path, detections: usize, producers: usize, seconds: u64, many: usize) -> Result<Value> {
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
    std::thread::sleep(Duration::from_secs(seconds));
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
fn backlog(dir: &Path, total: u64, per_batch: usize, retain0: bool) -> Result<Value> {
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

fn backlog_drain(data: &Path, retain0: bool) -> Result<Value> {
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

fn cloud_benchmarks(dir: &Path, runs: usize, quick: bool) -> Result<()> {
    let d = dir.display().to_string();
    let total = if quick { "50000" } else { "200000" };
    println!();
    println!("| cloud ingest into SQLite, {total} detections, 4 HTTP clients on loopback | detections/s | batches/s |");
    println!("| --- | ---: | ---: |");
    for per in ["50", "500"] {
        let r = child(&[s("cloud-http"), s(&d), s(total), s(per)], runs)?;
        println!(
            "| HTTP new, {per} det/batch | {:.0} | {:.0} |",
            median(&r, "new_detections_per_s"),
            median(&r, "new_batches_per_s")
        );
        println!(
            "| HTTP duplicates (the same batches again), {per} det/batch | {:.0} | {:.0} |",
            median(&r, "dup_detections_per_s"),
            median(&r, "dup_batches_per_s")
        );
    }
    let batches = if quick { "500" } else { "2000" };
    for per in ["50", "500"] {
        let r = child(&[s("cloud-mqtt"), s(&d), s(batches), s(per)], runs)?;
        println!(
            "| MQTT QoS 1, publish to end-to-end ack, {per} det/batch, {batches} batches | {:.0} | {:.0} |",
            median(&r, "detections_per_s"),
            median(&r, "batches_per_s")
        );
    }
    Ok(())
}

/// A running `backhaul-cloud serve` (release build, next to this binary) on a temp SQLite.
struct CloudProcess {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

const BENCH_KEY: &str = "bench-fleet-key-0123456789";

impl CloudProcess {
    fn start(dir: &Path, mqtt_url: Option<&str>) -> Result<Self> {
        use std::io::BufRead;
        let data = tempfile::tempdir_in(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut config = format!(
            "listen = \"127.0.0.1:{port}\"\ndatabase = \"sqlite:{}\"\nmax_body_bytes = \"4MiB\"\n",
            data.path().join("ingest.db").display()
        );
        if let Some(url) = mqtt_url {
            config.push_str(&format!("[mqtt]\nurl = \"{url}\"\nclient_id = \"bench-cloud-{port}\"\n"));
        }
        let config_path = data.path().join("cloud.toml");
        std::fs::write(&config_path, config)?;
        let exe = std::env::current_exe()?.with_file_name("backhaul-cloud");
        if !exe.is_file() {
            bail!("{} not found: cargo build --release -p backhaul-cloud", exe.display());
        }
        let mut child = Command::new(exe)
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("BACKHAUL_API_KEYS", format!("*={BENCH_KEY}"))
            .env("BACKHAUL_LOG", "warn,backhaul_cloud::mqtt=info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let stderr = std::io::BufReader::new(child.stderr.take().context("stderr")?);
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let tx2 = tx.clone();
        std::thread::spawn(move || stdout.lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
        std::thread::spawn(move || stderr.lines().map_while(Result::ok).for_each(|l| drop(tx2.send(l))));
        let want = if mqtt_url.is_some() { "subscribed to batches and status" } else { "listening on" };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let line =
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).context("cloud did not start")?;
            if line.contains(want) {
                break;
            }
        }
        std::thread::spawn(move || rx.into_iter().for_each(drop));
        Ok(Self { child, port, _dir: data })
    }
}

impl Drop for CloudProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wire_batches(n: usize, per: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let nb = sample_batch(per, i as u64);
            let b = backhaul_shared::Batch {
                schema: 1,
                batch_id: backhaul_shared::BatchId::new(),
                device_id: format!("rpi-bench-{:02}", i % 8),
                seq: (i / 8) as u64,
                name: nb.name,
                location: nb.location,
                timestamp: nb.timestamp,
                detections: nb.detections,
            };
            (b.batch_id.to_string(), b.to_json())
        })
        .collect()
}

/// POSTs every batch from 4 client threads; returns detections/s.
fn post_all(port: u16, batches: &Arc<Vec<(String, Vec<u8>)>>, per: usize, expect: u16) -> Result<(f64, f64)> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (batches, next) = (batches.clone(), next.clone());
            std::thread::spawn(move || -> Result<()> {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                let url = format!("http://127.0.0.1:{port}/api/v1/detections/bulk");
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some((id, body)) = batches.get(i) else { return Ok(()) };
                    loop {
                        let r = agent
                            .post(&url)
                            .header("X-API-Key", BENCH_KEY)
                            .header("Idempotency-Key", id)
                            .send(&body[..])?;
                        match r.status().as_u16() {
                            s if s == expect => break,
                            429 | 503 => std::thread::sleep(Duration::from_millis(5)),
                            s => bail!("unexpected status {s}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = batches.len() as f64;
    Ok((n * per as f64 / secs, n / secs))
}

fn cloud_http(dir: &Path, total: usize, per: usize) -> Result<Value> {
    let cloud = CloudProcess::start(dir, None)?;
    let batches = Arc::new(wire_batches(total / per, per));
    let (new_d, new_b) = post_all(cloud.port, &batches, per, 201)?;
    let (dup_d, dup_b) = post_all(cloud.port, &batches, per, 200)?;
    Ok(json!({
        "new_detections_per_s": new_d, "new_batches_per_s": new_b,
        "dup_detections_per_s": dup_d, "dup_batches_per_s": dup_b,
    }))
}

/// QoS 1 publishes of `n` batches, timed from the first publish to the last end-to-end ack.
fn cloud_mqtt(dir: &Path, n: usize, per: usize) -> Result<Value> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let broker = backhaul_tests::Mosquitto::start()?;
    let _cloud = CloudProcess::start(dir, Some(&broker.url()))?;
    let batches = wire_batches(n, per);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let mut options = MqttOptions::new("bench-edge", "127.0.0.1", broker.port());
        options.set_max_packet_size(16 << 20, 16 << 20).set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let acks: backhaul_shared::AckMessage =
                            serde_json::from_slice(&p.payload).unwrap_or(backhaul_shared::AckMessage { acks: vec![] });
                        let _ = ack_tx.send(acks.acks.len());
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = conn_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        client.subscribe("backhaul/+/acks", QoS::AtLeastOnce).await?;
        conn_rx.recv().await.context("subscribed")?;
        let start = Instant::now();
        let publisher = client.clone();
        tokio::spawn(async move {
            for (i, (_, body)) in batches.into_iter().enumerate() {
                let topic = format!("backhaul/rpi-bench-{:02}/batches", i % 8);
                if publisher.publish(topic, QoS::AtLeastOnce, false, body).await.is_err() {
                    return;
                }
            }
        });
        let mut acked = 0;
        while acked < n {
            acked += tokio::time::timeout(Duration::from_secs(60), ack_rx.recv()).await?.context("ack stream ended")?;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(json!({ "batches_per_s": n as f64 / secs, "detections_per_s": (n * per) as f64 / secs }))
    })
}

fn forward_benchmarks(dir: &Path, runs: usize, quick: bool) -> Result<()> {
    let d = dir.display().to_string();
    let total = if quick { "50000" } else { "200000" };
    println!();
    println!(
        "| end-to-end backlog drain of {total} detections, rate limit off | detections/s | batches/s | vs paho | edge peak RSS MiB | edge CPU s per 1M detections |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let have_paho = Command::new("python3").args(["-c", "import paho.mqtt"]).status().is_ok_and(|s| s.success());
    for per in ["50", "500"] {
        let baseline = if have_paho {
            let r = child(&[s("paho"), s(&d), s(total), s(per)], runs)?;
            let rate = median(&r, "detections_per_s");
            println!(
                "| baseline: seed transport (paho-mqtt QoS 1, no durability, no cloud), {per} det/batch | {rate:.0} | {:.0} | 1.0x | | |",
                median(&r, "batches_per_s")
            );
            Some(rate)
        } else {
            println!("| baseline: paho-mqtt not installed (`pip install paho-mqtt`), {per} det/batch | | | | | |");
            None
        };
        for mode in ["broker", "mqtt", "http"] {
            let r = child(&[s("drain"), s(&d), s(mode), s(total), s(per)], runs)?;
            let rate = median(&r, "detections_per_s");
            let path = match mode {
                "broker" => "MQTT, `ack = \"broker\"`: edge queue → Mosquitto → PUBACK (no cloud, like the baseline)",
                "mqtt" => "MQTT: edge queue → Mosquitto → cloud (SQLite) → end-to-end ack",
                _ => "HTTP: edge queue → cloud (SQLite) → 201",
            };
            println!(
                "| backhaul {path}, {per} det/batch | {rate:.0} | {:.0} | {} | {:.1} | {:.2} |",
                median(&r, "batches_per_s"),
                baseline.map_or_else(String::new, |b| format!("{:.2}x", rate / b)),
                median(&r, "edge_peak_rss_mib"),
                median(&r, "edge_cpu_s_per_million"),
            );
        }
    }
    Ok(())
}

/// Fills an edge queue in `data` with `total` detections in batches of `per` (the last batch
/// carries the simulated source's final position, so the edge's source has nothing more to make).
fn fill_edge_queue(data: &Path, total: u64, per: usize) -> Result<Vec<Vec<u8>>> {
    let q = Queue::open(
        data,
        QueueConfig { max_bytes: u64::MAX, durability: Durability::Flush, ..QueueConfig::default() },
    )?;
    let n = total / per as u64;
    let mut batch = Vec::new();
    for i in 0..n {
        let mut b = sample_batch(per, i);
        if i + 1 == n {
            b.source_position = Some((total - 1).to_le_bytes().to_vec());
        }
        batch.push(b);
        if batch.len() == 16 || i + 1 == n {
            q.enqueue_many(std::mem::take(&mut batch))?;
        }
    }
    // The exact payloads the edge will send, for the baseline.
    let mut payloads = Vec::new();
    while let Some(b) = q.next_batch()? {
        payloads.push(b.payload);
    }
    Ok(payloads)
}

fn proc_field(pid: u32, file: &str, key: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
}

/// utime + stime of a process, in seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// `backhaul-edge run` (release, next to this binary) draining a prefilled backlog through a real
/// Mosquitto (or HTTP) into a real cloud, timed from the edge's start to the last ack.
fn drain(dir: &Path, mode: &str, total: u64, per: usize) -> Result<Value> {
    let work = tempfile::tempdir_in(dir)?;
    let data = work.path().join("edge");
    fill_edge_queue(&data, total, per)?;
    let broker = backhaul_tests::Mosquitto::start()?;
    // `broker`: no cloud at all; the edge deletes on PUBACK.
    let cloud = match mode {
        "broker" => None,
        _ => Some(CloudProcess::start(dir, (mode == "mqtt").then(|| broker.url()).as_deref())?),
    };
    let (transport_mode, ack) =
        if mode == "http" { ("http", "cloud") } else { ("mqtt", if mode == "broker" { "broker" } else { "cloud" }) };
    let status_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = work.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"rpi-bench-01\"\ndata_dir = \"{}\"\nstatus_listen = \"127.0.0.1:{status_port}\"\n\
             [source]\nkind = \"simulated\"\ncount = {total}\nrate = 1.0\n\
             [batch]\nmax_detections = {per}\n\
             [queue]\nmax_bytes = \"100GiB\"\n\
             [transport]\nmode = \"{transport_mode}\"\nrate_per_sec = 1000000\nburst = 100000\n\
             [transport.mqtt]\nurl = \"{}\"\nack = \"{ack}\"\n[transport.http]\nurl = \"http://127.0.0.1:{}\"\n",
            data.display(),
            broker.url(),
            cloud.as_ref().map_or(1, |c| c.port)
        ),
    )?;
    let exe = std::env::current_exe()?.with_file_name("backhaul-edge");
    if !exe.is_file() {
        bail!("{} not found: cargo build --release --workspace", exe.display());
    }
    let batches = total / per as u64;
    let start = Instant::now();
    let mut edge = Command::new(exe)
        .args(["run", "--config"])
        .arg(&config)
        .env("BACKHAUL_API_KEY", BENCH_KEY)
        .env("BACKHAUL_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let pid = edge.id();
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut rss, mut cpu) = (0.0f64, 0.0f64);
    loop {
        if Instant::now() > deadline {
            let _ = edge.kill();
            bail!("the edge did not drain within 600 s");
        }
        rss = rss.max(proc_field(pid, "status", "VmHWM:").unwrap_or(0.0) / 1024.0);
        cpu = cpu.max(cpu_seconds(pid).unwrap_or(0.0));
        let status = agent
            .get(format!("http://127.0.0.1:{status_port}/status"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .and_then(|b| serde_json::from_str::<Value>(&b).ok());
        if status.as_ref().is_some_and(|s| s["sent"]["acked_batches"].as_u64() == Some(batches)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = start.elapsed().as_secs_f64();
    rss = rss.max(proc_field(pid, "status", "VmHWM:").unwrap_or(0.0) / 1024.0);
    cpu = cpu.max(cpu_seconds(pid).unwrap_or(0.0));
    let _ = edge.kill();
    let _ = edge.wait();
    drop(cloud);
    Ok(json!({
        "detections_per_s": total as f64 / secs,
        "batches_per_s": batches as f64 / secs,
        "edge_peak_rss_mib": rss,
        "edge_cpu_s_per_million": cpu / total as f64 * 1e6,
    }))
}

/// The seed agent's transport on the same payloads: paho-mqtt QoS 1 to a broker, no durability,
/// no cloud (`tests/bench/paho_publish.py`).
fn paho(dir: &Path, total: u64, per: usize) -> Result<Value> {
    let work = tempfile::tempdir_in(dir)?;
    let payloads = fill_edge_queue(&work.path().join("edge"), total, per)?;
    let file = work.path().join("payloads.jsonl");
    let mut text = Vec::new();
    for p in &payloads {
        text.extend_from_slice(p);
        text.push(b'\n');
    }
    std::fs::write(&file, text)?;
    let broker = backhaul_tests::Mosquitto::start()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/paho_publish.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["127.0.0.1", &broker.port().to_string()])
        .arg(&file)
        .args(["32", "backhaul/rpi-bench-01/batches"])
        .output()?;
    if !out.status.success() {
        bail!("paho baseline failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let r: Value = serde_json::from_slice(&out.stdout)?;
    let secs = r["seconds"].as_f64().context("seconds")?;
    Ok(json!({
        "detections_per_s": total as f64 / secs,
        "batches_per_s": payloads.len() as f64 / secs,
    }))
}

fn decode_benchmarks(dir: &Path, runs: usize, quick: bool) -> Result<()> {
    let d = dir.display().to_string();
    let total = if quick { "200000" } else { "1000000" };
    println!();
    println!("| decode + dedup + batch from a replayed capture of {total} advertisements, one thread | advertisements/s | CPU µs per advertisement | detections per advertisement |");
    println!("| --- | ---: | ---: | ---: |");
    for advertisers in ["200", "20000"] {
        let r = child(&[s("decode"), s(&d), s(total), s(advertisers)], runs)?;
        println!(
            "| {advertisers} advertisers, 1 in 10 a Thingy:52, 10 s dedup window | {:.0} | {:.2} | {:.3} |",
            median(&r, "advertisements_per_s"),
            median(&r, "cpu_us_per_advertisement"),
            median(&r, "detections_per_advertisement")
        );
    }
    Ok(())
}

/// A capture of `total` advertisements from `advertisers` advertisers, 2,000 a second of capture
/// time (a busy site), through the replay source (read, parse, decode, dedup) and the batcher.
fn decode_replay(dir: &Path, total: u64, advertisers: u64) -> Result<Value> {
    use backhaul_edge::batch::Batcher;
    use backhaul_edge::decode::presence::{AddressHasher, Zones};
    use backhaul_edge::decode::{Decoder, PresenceSettings, Thingy52Settings};
    use backhaul_edge::source::replay::Replay;
    use backhaul_edge::source::{Next, Source};
    use std::io::Write;

    let work = tempfile::tempdir_in(dir)?;
    let path = work.path().join("capture.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let start_ms = 1_763_720_000_000i64;
    for i in 0..total {
        let r = mix(i);
        let a = r % advertisers;
        let t = Timestamp::from_unix_millis(start_ms + (i / 2) as i64).context("time")?;
        let data = if a.is_multiple_of(10) {
            r#"{"65535":"010102280300fd04000002640557"}"#.to_owned()
        } else {
            format!(r#"{{"76":"1005031c{:08x}"}}"#, r as u32)
        };
        writeln!(
            f,
            r#"{{"t":"{t}","address":"{:02X}:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}","rssi":-{},"tx_power":null,"manufacturer_data":{data},"service_data":{{}},"services":[],"name":null}}"#,
            0xC0 | (a >> 40) & 0x3f,
            (a >> 32) & 0xff,
            (a >> 24) & 0xff,
            (a >> 16) & 0xff,
            (a >> 8) & 0xff,
            a & 0xff,
            30 + r % 70
        )?;
    }
    f.flush()?;
    drop(f);
    let decoder = Decoder::new(
        Some(PresenceSettings {
            hasher: AddressHasher::new(b"bench-secret", None).context("secret")?,
            zones: Zones::default(),
            smoothing: Duration::ZERO,
        }),
        Some(Thingy52Settings::default()),
        Duration::from_secs(10),
    );
    let cpu_before = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let started = Instant::now();
    let mut replay = Replay::resume(&path, decoder, None, false).map_err(anyhow::Error::msg)?;
    let mut batcher = Batcher::new(500, 5000);
    let (mut detections, mut batches) = (0u64, 0u64);
    loop {
        match replay.next(Instant::now()) {
            Next::Detection(d, p) => {
                detections += 1;
                if batcher.push(d, p, 0).is_some() {
                    batches += 1;
                }
            }
            Next::Wait(_) => {}
            Next::Done => break,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu_before;
    Ok(json!({
        "advertisements_per_s": total as f64 / secs,
        "cpu_us_per_advertisement": cpu / total as f64 * 1e6,
        "detections_per_advertisement": detections as f64 / total as f64,
        "batches": batches,
    }))
}
