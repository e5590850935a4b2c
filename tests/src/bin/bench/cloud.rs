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
    let total = if quick { "20000" } else { "200000" };
    println!();
    println!(
        "| cloud ingest into SQLite, {total} detections, 4 HTTP clients on loopback | detections/s | batches/s | vs seed backend's shape |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for per in ["50", "500"] {
        let seed = child(&[s("seed-backend"), s(&d), s(total), s(per)], runs)?;
        let seed_rate = median(&seed, "detections_per_s");
        println!(
            "| baseline: seed backend's shape (one INSERT per detection, a transaction per batch, one writer, no HTTP), {per} det/batch | {seed_rate:.0} | {:.0} | 1.0x |",
            median(&seed, "batches_per_s")
        );
        let r = child(&[s("cloud-http"), s(&d), s(total), s(per)], runs)?;
        let (new, dup) = (median(&r, "new_detections_per_s"), median(&r, "dup_detections_per_s"));
        println!(
            "| HTTP new, {per} det/batch | {new:.0} | {:.0} | {:.2}x |",
            median(&r, "new_batches_per_s"),
            new / seed_rate
        );
        let queryable = median(&r, "queryable_detections_per_s");
        println!(
            "| HTTP new, until every detection is queryable (the projection caught up), {per} det/batch | {queryable:.0} | | {:.2}x |",
            queryable / seed_rate
        );
        println!(
            "| HTTP duplicates (the same batches again), {per} det/batch | {dup:.0} | {:.0} | {:.2}x |",
            median(&r, "dup_batches_per_s"),
            dup / seed_rate
        );
        if per == "500" {
            targets.add(
                "#4",
                "HTTP ingest of new batches ≥ 200,000 detections/s",
                format!("{new:.0}/s"),
                Some(new >= 200_000.0),
            );
            targets.add(
                "#4",
                "HTTP duplicate replay ≥ 1,000,000 detections/s",
                format!("{dup:.0}/s"),
                Some(dup >= 1_000_000.0),
            );
        }
    }
    let batches = if quick { "200" } else { "2000" };
    for per in ["50", "500"] {
        let r = child(&[s("cloud-mqtt"), s(&d), s(batches), s(per)], runs)?;
        println!(
            "| MQTT QoS 1, publish to end-to-end ack, {per} det/batch, {batches} batches | {:.0} | {:.0} | |",
            median(&r, "detections_per_s"),
            median(&r, "batches_per_s")
        );
    }
    Ok(())
}

impl CloudProcess {
    pub fn start(dir: &Path, mqtt_url: Option<&str>) -> Result<Self> {
        use std::io::BufRead;
        let data = tempfile::tempdir_in(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut config = format!(
            // No per-device rate limit: the benchmark measures how fast batches are stored.
            "listen = \"127.0.0.1:{port}\"\ndatabase = \"sqlite:{}\"\nmax_body_bytes = \"4MiB\"\ndevice_rate_per_sec = 0\n",
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
    child: std::process::Child,
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

pub fn wire_batches(n: usize, per: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let nb = sample_batch(per, i as u64);
            let b = backhaul_shared::Batch {
                clock: Default::default(),
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
pub fn post_all(port: u16, batches: &Arc<Vec<(String, Vec<u8>)>>, per: usize, expect: u16) -> Result<(f64, f64)> {
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

pub fn cloud_http(dir: &Path, total: usize, per: usize) -> Result<Value> {
    let cloud = CloudProcess::start(dir, None)?;
    let batches = Arc::new(wire_batches(total / per, per));
    let start = Instant::now();
    let (new_d, new_b) = post_all(cloud.port, &batches, per, 201)?;
    // Acked is not yet the detections projection (issue #15): a read of detections catches it up,
    // so this is when every detection is queryable.
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let r = agent
        .get(format!("http://127.0.0.1:{}/api/v1/detections?limit=1", cloud.port))
        .header("X-API-Key", BENCH_KEY)
        .call()?;
    if r.status().as_u16() != 200 {
        bail!("reading detections answered {}", r.status());
    }
    let queryable = (batches.len() * per) as f64 / start.elapsed().as_secs_f64();
    let (dup_d, dup_b) = post_all(cloud.port, &batches, per, 200)?;
    Ok(json!({
        "new_detections_per_s": new_d, "new_batches_per_s": new_b,
        "queryable_detections_per_s": queryable,
        "dup_detections_per_s": dup_d, "dup_batches_per_s": dup_b,
    }))
}

/// QoS 1 publishes of `n` batches, timed from the first publish to the last end-to-end ack.
pub fn cloud_mqtt(dir: &Path, n: usize, per: usize) -> Result<Value> {
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
                        .bind(i64::from(s.rssi))
                        .bind(None::<&String>)
                        .bind(None::<String>)
                        .bind(Some(s.node.clone()))
                        .bind(s.temp)
                        .bind(s.humidity.map(i64::from))
                        .bind(s.co2_ppm.map(i64::from))
                        .bind(s.window_open.map(i64::from))
                        .bind(s.battery.map(i64::from)),
                };
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(json!({ "detections_per_s": total as f64 / secs, "batches_per_s": batches.len() as f64 / secs }))
    })
}
