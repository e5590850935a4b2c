//! `backhaul-edge run` end to end: backlog drains over MQTT and HTTP against the seed agent's
//! transport and `mosquitto_pub`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use backhaul_edge::queue::{Durability, Queue, QueueConfig};
use serde_json::{json, Value};

use crate::cloud::{CloudProcess, BENCH_KEY};
use crate::util::*;
use crate::{child, median, s};

pub fn forward_benchmarks(dir: &Path, runs: usize, quick: bool) -> Result<()> {
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
pub fn fill_edge_queue(data: &Path, total: u64, per: usize) -> Result<Vec<Vec<u8>>> {
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

/// `backhaul-edge run` (release, next to this binary) draining a prefilled backlog through a real
/// Mosquitto (or HTTP) into a real cloud, timed from the edge's start to the last ack.
pub fn drain(dir: &Path, mode: &str, total: u64, per: usize) -> Result<Value> {
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
pub fn paho(dir: &Path, total: u64, per: usize) -> Result<Value> {
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
