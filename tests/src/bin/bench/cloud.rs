//! `backhaul-cloud serve` on its own: HTTP ingest (new and duplicate) and the MQTT path.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use backhaul_shared::Detection;
use serde_json::{json, Value};

use crate::util::*;
use crate::{child, median, s, Targets};

pub fn cloud_benchmarks(dir: &Path, runs: usize, quick: bool, targets: &mut Targets) -> Result<()> {
    let d = dir.display().to_string();
    let total = if quick { "20000" } else { "2000000" };
    println!();
    println!(
        "| cloud ingest, growing from empty to {total} stored detections, {CLIENTS} HTTP clients on loopback | detections/s | batches/s | cloud CPU s per M det | cloud peak RSS MiB | vs seed backend's shape |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let mut reads = Vec::new();
    for per in ["50", "500"] {
        let seed = child(&[s("seed-backend"), s(&d), s(total), s(per)], runs)?;
        let seed_rate = median(&seed, "detections_per_s");
        println!(
            "| baseline: seed backend's shape (one INSERT per detection, a transaction per batch, one writer, no HTTP), {per} det/batch | {seed_rate:.0} | {:.0} | | | 1.0x |",
            median(&seed, "batches_per_s")
        );
        for (backend, replicas, label) in [
            ("sqlite", "1", "SQLite"),
            ("postgres", "1", "PostgreSQL, 1 replica"),
            ("postgres", "2", "PostgreSQL, 2 replicas"),
        ] {
            let r = child(&[s("cloud-http"), s(&d), s(total), s(per), s(backend), s(replicas)], runs)?;
            let (new, dup) = (median(&r, "new_detections_per_s"), median(&r, "dup_detections_per_s"));
            println!(
                "| {label}: HTTP new (acked = readable), {per} det/batch | {new:.0} | {:.0} | {:.1} | {:.0} | {:.2}x |",
                median(&r, "new_batches_per_s"),
                median(&r, "cpu_s_per_million"),
                median(&r, "peak_rss_mib"),
                new / seed_rate
            );
            println!(
                "| {label}: HTTP duplicates (the same batches again), {per} det/batch | {dup:.0} | {:.0} | | | {:.2}x |",
                median(&r, "dup_batches_per_s"),
                dup / seed_rate
            );
            reads.push((label, per, r.clone()));
            let key = |what: &str| format!("{label}, {per} det/batch: {what}");
            match (backend, replicas, per) {
                ("sqlite", _, "500") => {
                    targets.add("#15", &key("new ≥ 300,000 det/s"), format!("{new:.0}/s"), Some(new >= 300_000.0));
                    targets.add("#15", &key("duplicates ≥ 1,000,000 det/s"), format!("{dup:.0}/s"), Some(dup >= 1e6));
                }
                ("sqlite", _, "50") => {
                    targets.add("#15", &key("new ≥ 100,000 det/s"), format!("{new:.0}/s"), Some(new >= 100_000.0));
                }
                ("postgres", "1", "500") => {
                    targets.add("#15", &key("new ≥ 150,000 det/s"), format!("{new:.0}/s"), Some(new >= 150_000.0));
                }
                _ => {}
            }
        }
    }
    println!();
    println!("| reading `GET /api/v1/detections?limit=100` at {total} stored (medians of 20 reads) | newest page, ms | a page at the middle of the stored time, ms | one device's newest page, ms | one device, middle, ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (label, per, r) in &reads {
        println!(
            "| {label}, {per} det/batch | {:.1} | {:.1} | {:.1} | {:.1} |",
            median(r, "read_newest_ms"),
            median(r, "read_middle_ms"),
            median(r, "read_device_newest_ms"),
            median(r, "read_device_middle_ms")
        );
    }
    println!();
    let stored = if quick { "100000" } else { "10000000" };
    let r = child(&[s("cloud-restart"), s(&d), s(stored), s("500")], runs)?;
    let health = median(&r, "health_ms");
    println!("| restart of `serve` on SQLite with {stored} stored detections (500 per batch) | |");
    println!("| --- | ---: |");
    println!("| spawn to the first `/health` 200 | {health:.0} ms |");
    println!("| newest page of detections after it | {:.1} ms |", median(&r, "read_newest_ms"));
    println!("| database bytes per stored detection | {:.1} |", median(&r, "db_bytes_per_detection"));
    println!("| filling it through the store (group commits of 64, one client) | {:.0} s |", median(&r, "fill_s"));
    targets.add(
        "#15",
        &format!("restart with {stored} stored detections: /health 200 in under 1 s"),
        format!("{health:.0} ms"),
        Some(health < 1000.0),
    );
    println!();
    let batches = if quick { "200" } else { "2000" };
    println!("| MQTT QoS 1, publish to end-to-end ack, {batches} batches | detections/s | batches/s |");
    println!("| --- | ---: | ---: |");
    for (backend, label) in [("sqlite", "SQLite"), ("postgres", "PostgreSQL")] {
        for per in ["50", "500"] {
            let r = child(&[s("cloud-mqtt"), s(&d), s(batches), s(per), s(backend)], runs)?;
            println!(
                "| {label}, {per} det/batch | {:.0} | {:.0} |",
                median(&r, "detections_per_s"),
                median(&r, "batches_per_s")
            );
        }
    }
    Ok(())
}

/// Ingest with dashboards reading the live feed (issue #19), against no dashboards, in one run.
pub fn live_benchmarks(dir: &Path, runs: usize, quick: bool, targets: &mut Targets) -> Result<()> {
    let d = dir.display().to_string();
    println!();
    let live_total = if quick { "20000" } else { "400000" };
    println!(
        "| cloud ingest (SQLite, HTTP, 50 det/batch, {live_total} detections) with dashboards reading the live feed | detections/s | batches/s | cloud CPU s per M det | events each client got | dropped per client | vs no clients |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut none = 0.0;
    for (clients, keys, label) in [
        ("0", "fleet", "no live clients (the baseline)"),
        ("500", "fleet", "500 live clients, fleet key (every event is theirs)"),
        ("500", "device", "500 live clients, each a silent device's key (every event wakes them, none is theirs)"),
    ] {
        let r = child(&[s("cloud-live"), s(&d), s(live_total), s("50"), s(clients), s(keys)], runs)?;
        let rate = median(&r, "new_detections_per_s");
        if clients == "0" {
            none = rate;
        }
        println!(
            "| {label} | {rate:.0} | {:.0} | {:.1} | {:.0} of {:.0} | {:.0} | {:.2}x |",
            median(&r, "new_batches_per_s"),
            median(&r, "cpu_s_per_million"),
            median(&r, "events_per_client"),
            median(&r, "batches"),
            median(&r, "dropped_per_client"),
            rate / none
        );
        if clients == "500" {
            targets.add(
                "#19",
                &format!("500 live clients ({keys} keys): ingest within 10% of none"),
                format!("{:.2}x", rate / none),
                Some(rate >= 0.9 * none),
            );
        }
    }
    println!();
    Ok(())
}

/// Concurrent HTTP clients of the ingest benchmark (issue #15 asks for 8).
const CLIENTS: usize = 8;

/// Where a benchmarked cloud keeps its data.
pub enum Database<'a> {
    /// A new SQLite file in the process's temp dir.
    Sqlite,
    /// This URL (PostgreSQL).
    Url(&'a str),
}

impl CloudProcess {
    pub fn start(dir: &Path, mqtt_url: Option<&str>, database: &Database<'_>) -> Result<Self> {
        Self::start_with(dir, mqtt_url, database, "")
    }

    /// [`Self::start`] with `extra` lines at the top of the config.
    pub fn start_with(dir: &Path, mqtt_url: Option<&str>, database: &Database<'_>, extra: &str) -> Result<Self> {
        use std::io::BufRead;
        let data = tempfile::tempdir_in(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let url = match database {
            Database::Sqlite => format!("sqlite:{}", data.path().join("ingest.db").display()),
            Database::Url(u) => (*u).to_owned(),
        };
        let mut config = format!(
            // No per-device rate limit: the benchmark measures how fast batches are stored.
            "listen = \"127.0.0.1:{port}\"\ndatabase = \"{url}\"\nmax_body_bytes = \"4MiB\"\ndevice_rate_per_sec = 0\n\
             max_concurrent_ingest = 64\n{extra}\n"
        );
        if let Some(url) = mqtt_url {
            config.push_str(&format!(
                "[mqtt]\nurl = \"{url}\"\nclient_id = \"bench-cloud-{port}\"\nsession_expiry = \"10s\"\n"
            ));
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
        let mut said = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(want) => break,
                Ok(line) => said.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("backhaul-cloud did not start; it said:\n{}", said.join("\n"));
                }
            }
        }
        std::thread::spawn(move || rx.into_iter().for_each(drop));
        Ok(Self { child, port, _dir: data })
    }
}

/// A running `backhaul-cloud serve` (release build, next to this binary) on a temp SQLite.
pub struct CloudProcess {
    pub child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

pub const BENCH_KEY: &str = "bench-fleet-key-0123456789";

impl Drop for CloudProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` batches of `per` detections from 8 devices, as a fleet sends them: device `i % 8`'s batch
/// `i / 8` holds detections from its own 5-second window (in no order within it), the windows of
/// one device follow each other and end now, and the 8 devices' windows overlap.
pub fn wire_batches(n: usize, per: usize) -> Vec<(String, Vec<u8>)> {
    wire_batches_ending(n, per, 0, 0)
}

/// `parse PER DETECTIONS`: the cloud's parse and check of wire batches ([`backhaul_shared::Batch::from_json`])
/// on one core, the step every ingest path runs before the store: `DETECTIONS` detections in
/// realistic batches of `PER` ([`wire_batches`]), parsed five times over after one warm-up pass.
/// Reports ns per detection (best of the five passes) and MB/s of wire JSON.
pub fn parse_batches(per: usize, detections: usize) -> Result<Value> {
    if per == 0 || detections == 0 {
        bail!("parse PER DETECTIONS: both at least 1");
    }
    let batches = wire_batches(detections.div_ceil(per), per);
    let limits = backhaul_shared::Limits::default();
    let bytes: usize = batches.iter().map(|(_, raw)| raw.len()).sum();
    let pass = || -> Result<f64> {
        let start = Instant::now();
        for (_, raw) in &batches {
            std::hint::black_box(backhaul_shared::Batch::from_json(raw, &limits)?);
        }
        Ok(start.elapsed().as_secs_f64())
    };
    pass()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        best = best.min(pass()?);
    }
    let total = (batches.len() * per) as f64;
    Ok(json!({
        "ns_per_detection": best / total * 1e9,
        "detections_per_s": total / best,
        "wire_mb_per_s": bytes as f64 / best / 1e6,
    }))
}

/// [`wire_batches`] whose windows end `earlier_us` before now, with seqs from `first_seq`.
pub fn wire_batches_ending(n: usize, per: usize, earlier_us: i64, first_seq: u64) -> Vec<(String, Vec<u8>)> {
    let rounds = n.div_ceil(8) as i64;
    let end = backhaul_shared::Timestamp::now().unix_micros() - earlier_us;
    (0..n)
        .map(|i| {
            let mut nb = sample_batch(per, i as u64);
            // sample_batch's times lie in the 5 s before its `now`: moved into this batch's window.
            let shift = (rounds - (i / 8) as i64) * 5_000_000 + (i % 8) as i64 * 611_000;
            for d in &mut nb.detections {
                let t = backhaul_shared::Timestamp::from_unix_micros(
                    d.timestamp().unix_micros().min(end + earlier_us) - earlier_us - shift,
                )
                .context("a bench time")?;
                match d {
                    Detection::Presence(p) => p.timestamp = t,
                    Detection::Sensor(s) => s.timestamp = t,
                    Detection::Telemetry(m) => m.timestamp = t,
                }
            }
            let b = backhaul_shared::Batch {
                clock: Default::default(),
                schema: 1,
                batch_id: backhaul_shared::BatchId::new(),
                device_id: format!("rpi-bench-{:02}", i % 8),
                seq: first_seq + (i / 8) as u64,
                name: nb.name,
                location: nb.location,
                timestamp: nb.timestamp,
                detections: nb.detections,
            };
            Ok((b.batch_id.to_string(), b.to_json()))
        })
        .collect::<Result<_>>()
        .expect("bench batches")
}

/// POSTs every batch from [`CLIENTS`] client threads, spread over `ports` (replicas); returns
/// (detections/s, batches/s).
pub fn post_all(ports: &[u16], batches: &Arc<Vec<(String, Vec<u8>)>>, per: usize, expect: u16) -> Result<(f64, f64)> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (batches, next, port) = (batches.clone(), next.clone(), ports[c % ports.len()]);
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

/// A private PostgreSQL for a scenario (the tests' harness: initdb into a temp dir, a free port).
fn postgres_for(backend: &str) -> Result<Option<backhaul_tests::postgres::Postgres>> {
    match backend {
        "sqlite" => Ok(None),
        "postgres" => Ok(Some(backhaul_tests::postgres::Postgres::start()?)),
        other => bail!("unknown backend {other:?} (sqlite or postgres)"),
    }
}

/// Median wall time of 20 GETs of `path`, in ms.
fn read_ms(agent: &ureq::Agent, port: u16, path: &str) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let r = agent.get(format!("http://127.0.0.1:{port}{path}")).header("X-API-Key", BENCH_KEY).call()?;
        if r.status().as_u16() != 200 {
            bail!("GET {path} answered {}", r.status());
        }
        let body: Value = serde_json::from_reader(r.into_body().into_reader())?;
        if body["detections"].as_array().map_or(0, Vec::len) != 100 {
            bail!("GET {path} did not answer a full page");
        }
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// New batches until `total` detections are stored, then the same again (duplicates), over HTTP
/// from [`CLIENTS`] clients spread over `replicas` cloud processes; then reads.
pub fn cloud_http(dir: &Path, total: usize, per: usize, backend: &str, replicas: usize) -> Result<Value> {
    let pg = postgres_for(backend)?;
    let url = pg.as_ref().map(|p| p.url());
    let database = url.as_deref().map_or(Database::Sqlite, Database::Url);
    let clouds: Vec<CloudProcess> =
        (0..replicas.max(1)).map(|_| CloudProcess::start(dir, None, &database)).collect::<Result<_>>()?;
    let ports: Vec<u16> = clouds.iter().map(|c| c.port).collect();
    let batches = Arc::new(wire_batches(total / per, per));
    let cpu_before: f64 = clouds.iter().filter_map(|c| cpu_seconds(c.child.id())).sum();
    let (new_d, new_b) = post_all(&ports, &batches, per, 201)?;
    let cpu: f64 = clouds.iter().filter_map(|c| cpu_seconds(c.child.id())).sum::<f64>() - cpu_before;
    let rss: f64 = clouds.iter().filter_map(|c| proc_field(c.child.id(), "status", "VmHWM:")).sum::<f64>() / 1024.0;
    let (dup_d, dup_b) = post_all(&ports, &batches, per, 200)?;
    // Reads: the newest page, and a page at the middle of the stored time (as deep as a cursor
    // half way through would be), fleet-wide and for one device.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let times: Vec<i64> = {
        let first: backhaul_shared::Batch = serde_json::from_slice(&batches[0].1)?;
        let last: backhaul_shared::Batch = serde_json::from_slice(&batches[batches.len() - 1].1)?;
        [first, last].iter().flat_map(|b| b.detections.iter().map(|d| d.timestamp().unix_micros())).collect()
    };
    let mid = (times.iter().min().copied().unwrap_or(0) + times.iter().max().copied().unwrap_or(0)) / 2;
    let mid = backhaul_shared::Timestamp::from_unix_micros(mid).context("mid time")?.to_string();
    let port = ports[0];
    let read_newest = read_ms(&agent, port, "/api/v1/detections?limit=100")?;
    let read_middle = read_ms(&agent, port, &format!("/api/v1/detections?limit=100&until={mid}"))?;
    let read_device_newest = read_ms(&agent, port, "/api/v1/detections?limit=100&device_id=rpi-bench-03")?;
    let read_device_middle =
        read_ms(&agent, port, &format!("/api/v1/detections?limit=100&device_id=rpi-bench-03&until={mid}"))?;
    drop(clouds);
    drop(pg);
    Ok(json!({
        "new_detections_per_s": new_d, "new_batches_per_s": new_b,
        "dup_detections_per_s": dup_d, "dup_batches_per_s": dup_b,
        "cpu_s_per_million": cpu / (batches.len() * per) as f64 * 1e6,
        "peak_rss_mib": rss,
        "read_newest_ms": read_newest, "read_middle_ms": read_middle,
        "read_device_newest_ms": read_device_newest, "read_device_middle_ms": read_device_middle,
    }))
}

/// New batches over HTTP (as [`cloud_http`], SQLite) while `clients` dashboards read the live
/// feed (`GET /api/v1/live`, issue #19), each reading as fast as it can; returns the ingest rate,
/// the events the clients got and the events they dropped (the cloud's
/// `backhaul_cloud_live_dropped_total`).
///
/// `device_keys`: each client signs in with a key of its own device, one that sends nothing (the
/// worst case for a device's stream: every batch of the fleet wakes it, none is its own).
pub fn cloud_live(dir: &Path, total: usize, per: usize, clients: usize, device_keys: bool) -> Result<Value> {
    use std::io::{Read, Write};
    let keys_file = dir.join(format!("live-keys-{}.toml", std::process::id()));
    let key_of = |i: usize| format!("watch-key-{i:05}-0123456789");
    let keys: String = (0..clients).map(|i| format!("\"watch-{i:05}\" = \"{}\"\n", key_of(i))).collect();
    std::fs::write(&keys_file, keys)?;
    let cloud = CloudProcess::start_with(
        dir,
        None,
        &Database::Sqlite,
        &format!(
            "max_connections = {}\nmax_live_clients = {}\n[auth]\nkeys_file = \"{}\"",
            clients + 256,
            clients + 1,
            keys_file.display()
        ),
    )?;
    let port = cloud.port;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One thread per client, blocked in read (woken only when its stream has something: a
    // browser's cost, not a polling loop's), with a small stack.
    let mut readers = Vec::new();
    for i in 0..clients {
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
        let key = if device_keys { key_of(i) } else { BENCH_KEY.to_owned() };
        write!(sock, "GET /api/v1/live HTTP/1.1\r\nHost: bench\r\nX-API-Key: {key}\r\n\r\n")?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let (received, stop) = (received.clone(), stop.clone());
        readers.push(std::thread::Builder::new().stack_size(64 << 10).spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            // The tail of the last read, so a marker split between two reads is counted once.
            let mut tail: Vec<u8> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match sock.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        tail.extend_from_slice(&buf[..n]);
                        let events = tail.windows(12).filter(|w| w == b"event: batch").count();
                        received.fetch_add(events as u64, Ordering::Relaxed);
                        let keep = tail.len().min(11);
                        tail.drain(..tail.len() - keep);
                    }
                    Err(_) => {}
                }
            }
        })?);
    }
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let metric = |name: &str| -> Result<f64> {
        let text = agent
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .header("X-API-Key", BENCH_KEY)
            .call()?
            .body_mut()
            .read_to_string()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .with_context(|| format!("{name} not in /metrics"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric("backhaul_cloud_live_clients")? < clients as f64 {
        if Instant::now() > deadline {
            bail!("only {} of {clients} live clients connected", metric("backhaul_cloud_live_clients")?);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let batches = Arc::new(wire_batches(total / per, per));
    let cpu_before = cpu_seconds(cloud.child.id()).unwrap_or(0.0);
    let (new_d, new_b) = post_all(&[port], &batches, per, 201)?;
    let cpu = cpu_seconds(cloud.child.id()).unwrap_or(0.0) - cpu_before;
    // What was sent is read within a flush or two.
    std::thread::sleep(Duration::from_millis(500));
    let dropped = metric("backhaul_cloud_live_dropped_total")?;
    let connected = metric("backhaul_cloud_live_clients")?;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    Ok(json!({
        "new_detections_per_s": new_d, "new_batches_per_s": new_b,
        "cpu_s_per_million": cpu / (batches.len() * per) as f64 * 1e6,
        "events_per_client": received.load(Ordering::Relaxed) as f64 / clients.max(1) as f64,
        "dropped_per_client": dropped / clients.max(1) as f64,
        "still_connected": connected,
        "batches": batches.len(),
    }))
}

/// Restart with `total` stored detections (issue #15: `/health` 200 in under 1 s at 10,000,000):
/// the database is filled through the store itself, as the ack path writes it (64 batches at a
/// time, so in group commits), not over HTTP; then `serve` starts on it. Returns the time from
/// spawning `serve` to its first `/health` 200, and the newest page's read time there.
pub fn cloud_restart(dir: &Path, total: usize, per: usize) -> Result<Value> {
    use backhaul_cloud::store::Store;
    let data = tempfile::tempdir_in(dir)?;
    let url = format!("sqlite:{}", data.path().join("ingest.db").display());
    let n = total / per;
    let chunk = 4096usize;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let fill_start = Instant::now();
    rt.block_on(async {
        let store = Arc::new(Store::connect(&url).await?);
        for c in 0..n.div_ceil(chunk) {
            let count = chunk.min(n - c * chunk);
            // Older chunks further back: chunk c's windows end (chunks - c) windows ago.
            let earlier = (n.div_ceil(chunk) - c) as i64 * (chunk as i64 / 8) * 5_000_000;
            let batches = wire_batches_ending(count, per, earlier, (c * chunk / 8) as u64);
            let limits = backhaul_shared::Limits::default();
            for group in batches.chunks(64) {
                let mut tasks = Vec::new();
                for (_, raw) in group {
                    let (store, raw) = (store.clone(), raw.clone());
                    let batch = backhaul_shared::Batch::from_json(&raw, &limits)?;
                    tasks.push(tokio::spawn(async move {
                        let hash = backhaul_cloud::ingest::payload_hash(&raw);
                        store.store_batch(&batch, &raw, &hash, "bench", backhaul_cloud::store::Lookup::First).await
                    }));
                }
                for t in tasks {
                    t.await??;
                }
            }
        }
        anyhow::Ok(())
    })?;
    let fill_s = fill_start.elapsed().as_secs_f64();
    let start = Instant::now();
    let cloud = CloudProcess::start(dir, None, &Database::Url(&url))?;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    loop {
        let r = agent.get(format!("http://127.0.0.1:{}/health", cloud.port)).call();
        if r.is_ok_and(|r| r.status().as_u16() == 200) {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("/health did not answer 200 within 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let health_ms = start.elapsed().as_secs_f64() * 1000.0;
    let read_newest = read_ms(&agent, cloud.port, "/api/v1/detections?limit=100")?;
    let db_bytes: u64 =
        std::fs::read_dir(data.path())?.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    Ok(json!({
        "health_ms": health_ms, "fill_s": fill_s, "read_newest_ms": read_newest,
        "db_bytes_per_detection": db_bytes as f64 / total as f64,
    }))
}

/// QoS 1 publishes of `n` batches, timed from the first publish to the last end-to-end ack.
pub fn cloud_mqtt(dir: &Path, n: usize, per: usize, backend: &str) -> Result<Value> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let broker = backhaul_tests::Mosquitto::start()?;
    let pg = postgres_for(backend)?;
    let url = pg.as_ref().map(|p| p.url());
    let database = url.as_deref().map_or(Database::Sqlite, Database::Url);
    let _cloud = CloudProcess::start(dir, Some(&broker.url()), &database)?;
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

/// The seed backend's storage shape, as an ORM writes it: each batch parsed, then one INSERT per
/// detection in a transaction per batch, into the same table and indexes as the cloud's, on
/// SQLite with the cloud's settings (WAL, `synchronous=FULL`). One writer, no HTTP, no dedup: an
/// upper bound for that shape.
pub fn seed_backend(dir: &Path, total: usize, per: usize) -> Result<Value> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use sqlx::{Connection, Executor};
    let work = tempfile::tempdir_in(dir)?;
    let batches = wire_batches(total / per, per);
    let limits = backhaul_shared::Limits { max_detections: per };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let options = SqliteConnectOptions::new()
            .filename(work.path().join("seed.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
        conn.execute(
            "CREATE TABLE detections (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, ts BIGINT NOT NULL,
                kind TEXT NOT NULL, rssi INTEGER NOT NULL, device_hash TEXT, zone TEXT, node TEXT,
                temp DOUBLE PRECISION, humidity INTEGER, co2_ppm BIGINT, window_open INTEGER, battery INTEGER);
             CREATE INDEX detections_device_ts ON detections (device_id, ts);
             CREATE INDEX detections_ts ON detections (ts);",
        )
        .await?;
        let start = Instant::now();
        for (_, body) in &batches {
            let batch = backhaul_shared::Batch::from_json(body, &limits)?;
            let mut tx = conn.begin().await?;
            for d in &batch.detections {
                let q = sqlx::query(
                    "INSERT INTO detections (device_id, ts, kind, rssi, device_hash, zone, node, temp, humidity,
                        co2_ppm, window_open, battery) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                )
                .bind(&batch.device_id)
                .bind(d.timestamp().unix_micros());
                let q = match d {
                    Detection::Presence(p) => q
                        .bind("presence")
                        .bind(i64::from(p.rssi))
                        .bind(Some(&p.device_hash))
                        .bind(Some(format!("{:?}", p.zone).to_lowercase()))
                        .bind(None::<String>)
                        .bind(None::<f64>)
                        .bind(None::<i64>)
                        .bind(None::<i64>)
                        .bind(None::<i64>)
                        .bind(None::<i64>),
                    Detection::Sensor(s) => q
                        .bind("sensor")
                        .bind(s.rssi.map_or(0, i64::from))
                        .bind(None::<&String>)
                        .bind(None::<String>)
                        .bind(Some(s.node.clone()))
                        .bind(s.temp)
                        .bind(s.humidity.map(i64::from))
                        .bind(s.co2_ppm.map(i64::from))
                        .bind(s.window_open.map(i64::from))
                        .bind(s.battery.map(i64::from)),
                    Detection::Telemetry(_) => anyhow::bail!("the seed backend has no telemetry"),
                };
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(json!({ "detections_per_s": total as f64 / secs, "batches_per_s": batches.len() as f64 / secs }))
    })
}
