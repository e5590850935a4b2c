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
use crate::{child, child_pinned, median, s, Targets};

pub fn forward_benchmarks(dir: &Path, runs: usize, quick: bool, targets: &mut Targets) -> Result<()> {
    let d = dir.display().to_string();
    let python = python_with_paho();
    println!();
    println!(
        "Backlog drain: the edge killed (SIGKILL) with a full queue, restarted, and timed from its start \
         to the last ack; rate limit off. Baselines publish the same payloads, QoS 1, 32 in flight, no \
         durability, no cloud."
    );
    println!();
    println!(
        "| backlog drain | detections | detections/s | vs mosquitto_pub | vs paho | restart to first ack, ms | wire bytes / detection, up + down | edge disk bytes written / detection | edge peak RSS MiB | edge CPU s per 1M detections |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for per in [50usize, 500] {
        let total = match (quick, per) {
            (true, 50) => 10_000,
            (true, _) => 20_000,
            (false, 50) => 200_000,
            (false, _) => 1_000_000,
        };
        let (t, p) = (total.to_string(), per.to_string());
        let r = child(&[s("publish-baseline"), s(&d), s("mosquitto_pub"), t.clone(), p.clone()], runs)?;
        let pub_rate = median(&r, "detections_per_s");
        let paho_rate = match &python {
            Ok(py) => {
                let r = child(&[s("publish-baseline"), s(&d), py.clone(), t.clone(), p.clone()], runs)?;
                Some(median(&r, "detections_per_s"))
            }
            Err(_) => None,
        };
        let vs_paho = |rate: f64| paho_rate.map_or(String::new(), |b| format!("{:.2}x", rate / b));
        println!(
            "| baseline: `mosquitto_pub -l -q 1 -M 32`, {per} det/batch | {total} | {pub_rate:.0} | 1.0x | {} | | | | | |",
            vs_paho(pub_rate)
        );
        if let Some(rate) = paho_rate {
            println!(
                "| baseline: seed agent's transport (paho-mqtt, Python), {per} det/batch | {total} | {rate:.0} | {:.2}x | 1.0x | | | | | |",
                rate / pub_rate
            );
        } else {
            let why = python.as_ref().err().map_or("", String::as_str);
            println!("| baseline: seed agent's transport: not run ({why}), {per} det/batch | | | | | | | | | |");
        }
        for mode in ["broker", "mqtt", "http"] {
            let r = child(&[s("edge-run"), s(&d), s(mode), t.clone(), p.clone(), s("backlog")], runs)?;
            let rate = median(&r, "detections_per_s");
            println!(
                "| backhaul {}, {per} det/batch | {total} | {rate:.0} | {:.2}x | {} | {:.0} | {} | {:.1} | {:.1} | {:.2} |",
                path_label(mode),
                rate / pub_rate,
                vs_paho(rate),
                median(&r, "first_ack_ms"),
                wire(&r),
                median(&r, "disk_bytes_per_detection"),
                median(&r, "edge_peak_rss_mib"),
                median(&r, "edge_cpu_s_per_million"),
            );
            if mode == "mqtt" {
                if let Some(b) = paho_rate {
                    targets.add(
                        "#5",
                        &format!("end-to-end MQTT drain at least as fast as the seed transport ({per} det/batch)"),
                        format!("{:.2}x ({rate:.0} vs {b:.0} detections/s)", rate / b),
                        Some(rate >= b),
                    );
                }
            }
            if mode == "broker" {
                if let Some(b) = paho_rate {
                    targets.add(
                        "#5",
                        &format!("like for like, both ending at the broker's PUBACK ({per} det/batch)"),
                        format!("{:.2}x ({rate:.0} vs {b:.0} detections/s)", rate / b),
                        Some(rate >= b),
                    );
                }
            }
            if per == 500 {
                targets.add(
                    "#8",
                    &format!("restart to first ack with a {total}-detection backlog, {mode}"),
                    format!("{:.0} ms", median(&r, "first_ack_ms")),
                    None,
                );
            }
        }
    }

    let live = if quick { 10_000 } else { 200_000 };
    println!();
    println!(
        "Live: the simulated source as fast as it goes → batcher (500) → durable queue (fsync) → link → \
         cloud (SQLite) → ack → delete; the edge's whole life cycle, {live} detections."
    );
    println!();
    println!(
        "| live | detections/s | wire bytes / detection, up + down | edge disk bytes written / detection | edge peak RSS MiB | edge CPU s per 1M detections |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let cases: &[(&str, bool)] = if quick {
        &[("mqtt", false), ("http", false)]
    } else {
        &[("mqtt", false), ("http", false), ("mqtt", true), ("http", true)]
    };
    for &(mode, pin) in cases {
        let mut args = vec![s("edge-run"), s(&d), s(mode), live.to_string(), s("500"), s("live")];
        if pin {
            args.push(s("pin"));
        }
        let r = if pin { child_pinned("1", &args, runs)? } else { child(&args, runs)? };
        let pinned =
            if pin { ", Pi-class: edge pinned to one core (`taskset -c 0`), the rest on the other" } else { "" };
        println!(
            "| {}{pinned} | {:.0} | {} | {:.1} | {:.1} | {:.2} |",
            path_label(mode),
            median(&r, "detections_per_s"),
            wire(&r),
            median(&r, "disk_bytes_per_detection"),
            median(&r, "edge_peak_rss_mib"),
            median(&r, "edge_cpu_s_per_million"),
        );
        if !pin {
            targets.add(
                "#8",
                &format!("edge disk bytes written per detection, live over {mode} (SD card wear)"),
                format!("{:.1} bytes", median(&r, "disk_bytes_per_detection")),
                None,
            );
        }
    }

    // Instructions: the marginal cost of N more detections through the whole edge (start-up and
    // shutdown cancel out), counted by callgrind, which counts the same on any x86-64 machine.
    let n = if quick { 2_000u64 } else { 20_000 };
    println!();
    if Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success()) {
        println!(
            "| Pi-class: x86-64 instructions per detection, live, whole edge (callgrind; the difference between {n} and {} detections) | instructions / detection | detections/s per core at 1.5 G instructions/s |",
            2 * n
        );
        println!("| --- | ---: | ---: |");
        for mode in if quick { &["mqtt"][..] } else { &["mqtt", "http"] } {
            let r = child(&[s("instructions"), s(&d), s(mode), n.to_string(), s("500")], 1)?;
            let per_detection = median(&r, "instructions_per_detection");
            println!("| {} | {per_detection:.0} | {:.0} |", path_label(mode), 1.5e9 / per_detection);
            targets.add(
                "#8",
                &format!("x86-64 instructions per detection through the whole edge, live over {mode}"),
                format!("{per_detection:.0}"),
                None,
            );
        }
    } else {
        println!("(instructions per detection: valgrind is not installed: `apt-get install valgrind`)");
    }
    Ok(())
}

fn path_label(mode: &str) -> &'static str {
    match mode {
        "broker" => "MQTT, `ack = \"broker\"`: edge queue → Mosquitto → PUBACK (no cloud, like the baselines)",
        "mqtt" => "MQTT: edge queue → Mosquitto → cloud (SQLite) → end-to-end ack",
        _ => "HTTP: edge queue → cloud (SQLite) → 201",
    }
}

fn wire(r: &[Value]) -> String {
    let (up, down) = (median(r, "wire_up_per_detection"), median(r, "wire_down_per_detection"));
    if up.is_nan() {
        "n/a (reconnected)".into()
    } else {
        format!("{up:.1} + {down:.1}")
    }
}

/// A Python with paho-mqtt: the system's, or one in a venv under `target/` made on first use.
fn python_with_paho() -> std::result::Result<String, String> {
    let has_paho =
        |py: &str| Command::new(py).args(["-c", "import paho.mqtt"]).output().is_ok_and(|o| o.status.success());
    if has_paho("python3") {
        return Ok("python3".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let venv = exe.parent().and_then(Path::parent).ok_or("no target dir")?.join("bench-venv");
    let py = venv.join("bin/python").display().to_string();
    if has_paho(&py) {
        return Ok(py);
    }
    eprintln!("bench: installing paho-mqtt into {} for the seed transport's baseline", venv.display());
    let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).output().is_ok_and(|o| o.status.success())
        && Command::new(&py)
            .args(["-m", "pip", "install", "-q", "paho-mqtt"])
            .output()
            .is_ok_and(|o| o.status.success());
    if made && has_paho(&py) {
        Ok(py)
    } else {
        Err("paho-mqtt is not installed and could not be: `pip install paho-mqtt`".into())
    }
}

/// Fills an edge queue in `data` with `total` detections in batches of `per` (the last batch
/// carries the simulated source's final position, so the edge's source has nothing more to make).
pub fn fill_edge_queue(data: &Path, total: u64, per: usize) -> Result<Queue> {
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
    q.flush()?;
    Ok(q)
}

/// `bench scenario fill-edge DATA TOTAL PER`: fills an edge queue, says so, and waits to be killed.
pub fn fill_then_wait(data: &Path, total: u64, per: usize) -> Result<Value> {
    let _queue = fill_edge_queue(data, total, per)?;
    println!("filled");
    std::io::Write::flush(&mut std::io::stdout())?;
    loop {
        std::thread::park();
    }
}

/// Fills the edge queue at `data` in a child process and kills it with SIGKILL once it is full, so
/// the edge then opens the backlog as it would after a crash or a power cut of the process.
fn fill_and_kill(data: &Path, total: u64, per: usize) -> Result<()> {
    use std::io::BufRead;
    let mut filler = Command::new(std::env::current_exe()?)
        .args(["scenario", "fill-edge"])
        .arg(data)
        .args([total.to_string(), per.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(filler.stdout.take().context("stdout")?).read_line(&mut line)?;
    filler.kill()?;
    filler.wait()?;
    if line.trim() != "filled" {
        bail!("filling the edge queue failed");
    }
    Ok(())
}

/// How `edge_run` starts the edge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Launch {
    Plain,
    /// `taskset -c 0` (the caller runs on core 1).
    Pinned,
    /// Under `valgrind --tool=callgrind`; stopped with SIGTERM so callgrind writes its counts.
    Callgrind,
}

/// `backhaul-edge run` (release, next to this binary) through a real Mosquitto (or HTTP) into a
/// real cloud, timed from the edge's start to the last ack.
///
/// `backlog`: the queue is filled first by a process killed with SIGKILL, and the source has
/// nothing more to make (the last batch carries its final position). Otherwise (live) the
/// simulated source makes `total` detections as fast as the queue takes them.
pub fn edge_run(dir: &Path, mode: &str, total: u64, per: usize, backlog: bool, launch: Launch) -> Result<Value> {
    let work = tempfile::tempdir_in(dir)?;
    let data = work.path().join("edge");
    if backlog {
        fill_and_kill(&data, total, per)?;
    }
    let broker = backhaul_tests::Mosquitto::start()?;
    // `broker`: no cloud at all; the edge deletes on PUBACK.
    let cloud = match mode {
        "broker" => None,
        _ => Some(CloudProcess::start(dir, (mode == "mqtt").then(|| broker.url()).as_deref())?),
    };
    let (transport_mode, ack) =
        if mode == "http" { ("http", "cloud") } else { ("mqtt", if mode == "broker" { "broker" } else { "cloud" }) };
    let status_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let rate = if backlog { 1.0 } else { 1e9 };
    let config = work.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"rpi-bench-01\"\ndata_dir = \"{}\"\nstatus_listen = \"127.0.0.1:{status_port}\"\n\
             [source]\nkind = \"simulated\"\ncount = {total}\nrate = {rate}\ndevices = 10000\n\
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
    let callgrind_out = work.path().join("callgrind.out");
    let mut command = match launch {
        Launch::Plain => Command::new(&exe),
        Launch::Pinned => {
            let mut c = Command::new("taskset");
            c.args(["-c", "0"]).arg(&exe);
            c
        }
        Launch::Callgrind => {
            let mut c = Command::new("valgrind");
            c.args(["--tool=callgrind", "--quiet"]).arg(format!("--callgrind-out-file={}", callgrind_out.display()));
            c.arg(&exe);
            c
        }
    };
    let start = Instant::now();
    let mut edge = command
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
    let deadline = Instant::now() + Duration::from_secs(900);
    let (mut rss, mut cpu, mut first_ack_ms) = (0.0f64, 0.0f64, None);
    let link_ups = loop {
        if Instant::now() > deadline {
            let _ = edge.kill();
            bail!("the edge did not deliver {total} detections within 900 s");
        }
        if let Ok(Some(status)) = edge.try_wait() {
            bail!("the edge exited with {status}");
        }
        rss = rss.max(proc_field(pid, "status", "VmHWM:").unwrap_or(0.0) / 1024.0);
        cpu = cpu.max(cpu_seconds(pid).unwrap_or(0.0));
        let status = agent
            .get(format!("http://127.0.0.1:{status_port}/status"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .and_then(|b| serde_json::from_str::<Value>(&b).ok());
        if let Some(status) = status {
            if first_ack_ms.is_none() && status["sent"]["acked_batches"].as_u64().unwrap_or(0) > 0 {
                first_ack_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
            }
            if status["sent"]["acked_detections"].as_u64() >= Some(total) {
                break status["link"]["link_ups"].as_u64().unwrap_or(0);
            }
        }
        // Fine-grained until the first ack (that time is reported), then easier on the CPU.
        std::thread::sleep(Duration::from_millis(if first_ack_ms.is_none() { 2 } else { 20 }));
    };
    let secs = start.elapsed().as_secs_f64();
    rss = rss.max(proc_field(pid, "status", "VmHWM:").unwrap_or(0.0) / 1024.0);
    cpu = cpu.max(cpu_seconds(pid).unwrap_or(0.0));
    // Bytes over the edge's own TCP connections; only counts connections still open, so a run
    // that reconnected has no figure.
    let (up, down) = match tcp_bytes(pid) {
        Some((up, down)) if link_ups <= 1 => (up as f64 / total as f64, down as f64 / total as f64),
        _ => (f64::NAN, f64::NAN),
    };
    // A clean stop (SIGTERM), so everything the edge has written is counted: its buffered acks
    // included. A zombie's /proc/PID/io still answers until it is reaped.
    Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    let stop_deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().and_then(|rest| rest.split_whitespace().next().map(str::to_owned)))
        .is_some_and(|state| state != "Z")
    {
        if Instant::now() > stop_deadline {
            let _ = edge.kill();
            bail!("the edge did not stop within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let written = proc_field(pid, "io", "write_bytes:").unwrap_or(f64::NAN);
    let exited = edge.wait()?;
    if !exited.success() {
        bail!("the edge did not stop cleanly on SIGTERM: {exited}");
    }
    let instructions = if launch == Launch::Callgrind { callgrind_instructions(&callgrind_out)? } else { f64::NAN };
    drop(cloud);
    Ok(json!({
        "detections_per_s": total as f64 / secs,
        "batches_per_s": (total / per as u64) as f64 / secs,
        "first_ack_ms": first_ack_ms,
        "edge_peak_rss_mib": rss,
        "edge_cpu_s_per_million": cpu / total as f64 * 1e6,
        "disk_bytes_per_detection": written / total as f64,
        "wire_up_per_detection": up,
        "wire_down_per_detection": down,
        "instructions": instructions,
    }))
}

/// The instructions in a callgrind profile, less the self cost of sled's `Lazy::deref`: it spins
/// while another thread initialises it, and valgrind runs one thread at a time, so there that spin
/// lasts a whole time slice and would swamp the count (98% of it, and varying run to run).
fn callgrind_instructions(profile: &Path) -> Result<f64> {
    let out = Command::new("callgrind_annotate")
        .args(["--threshold=100", "--auto=no"])
        .arg(profile)
        .output()
        .context("callgrind_annotate (apt-get install valgrind)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |line: &str| line.split_whitespace().next().and_then(|n| n.replace(',', "").parse::<f64>().ok());
    let total = text
        .lines()
        .find(|l| l.contains("PROGRAM TOTALS"))
        .and_then(count)
        .with_context(|| format!("no total in callgrind's profile {}", profile.display()))?;
    let spin: f64 = text
        .lines()
        .filter(|l| l.contains("sled::lazy::Lazy<T,F> as core::ops::deref::Deref>::deref"))
        .filter_map(count)
        .sum();
    Ok(total - spin)
}

/// Bytes sent and received over the TCP connections that `pid` has open (`ss -tinp`).
fn tcp_bytes(pid: u32) -> Option<(u64, u64)> {
    let out = Command::new("ss").args(["-tinpH", "state", "established"]).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let owner = format!("pid={pid},");
    let mut lines = text.lines();
    let (mut up, mut down, mut found) = (0, 0, false);
    while let Some(line) = lines.next() {
        if !line.contains(&owner) {
            continue;
        }
        let info = lines.next()?;
        let field = |key: &str| {
            info.split_whitespace().find_map(|f| f.strip_prefix(key)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        };
        up += field("bytes_sent:");
        down += field("bytes_received:");
        found = true;
    }
    found.then_some((up, down))
}

/// Callgrind's instruction count for the edge's whole life with `n` and with `2n` detections (live),
/// and their difference per detection: the marginal cost, start-up and shutdown cancelled out.
pub fn instructions(dir: &Path, mode: &str, n: u64, per: usize) -> Result<Value> {
    let one = edge_run(dir, mode, n, per, false, Launch::Callgrind)?;
    let two = edge_run(dir, mode, 2 * n, per, false, Launch::Callgrind)?;
    let (a, b) = (one["instructions"].as_f64().context("count")?, two["instructions"].as_f64().context("count")?);
    Ok(json!({ "instructions_per_detection": (b - a) / n as f64, "instructions_n": a, "instructions_2n": b }))
}

/// A baseline publisher on the same payloads: `mosquitto_pub -l -q 1 -M 32`, or the seed agent's
/// transport (paho-mqtt under the Python interpreter `tool`, `tests/bench/paho_publish.py`): QoS 1,
/// no durability, no cloud, timed from start to the last PUBACK.
pub fn publish_baseline(dir: &Path, tool: &str, total: u64, per: usize) -> Result<Value> {
    let work = tempfile::tempdir_in(dir)?;
    let queue = fill_edge_queue(&work.path().join("edge"), total, per)?;
    let file = work.path().join("payloads.jsonl");
    let mut text = Vec::new();
    let mut batches = 0;
    while let Some(b) = queue.next_batch()? {
        text.extend_from_slice(&b.payload);
        text.push(b'\n');
        batches += 1;
    }
    drop(queue);
    std::fs::write(&file, text)?;
    let broker = backhaul_tests::Mosquitto::start()?;
    let topic = "backhaul/rpi-bench-01/batches";
    let secs = if tool == "mosquitto_pub" {
        let start = Instant::now();
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &broker.port().to_string(), "-t", topic, "-q", "1", "-M", "32", "-l"])
            .stdin(std::fs::File::open(&file)?)
            .output()
            .context("mosquitto_pub (apt-get install mosquitto-clients)")?;
        if !out.status.success() {
            bail!("mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        start.elapsed().as_secs_f64()
    } else {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/paho_publish.py");
        let out = Command::new(tool)
            .arg(script)
            .args(["127.0.0.1", &broker.port().to_string()])
            .arg(&file)
            .args(["32", topic])
            .output()?;
        if !out.status.success() {
            bail!("paho baseline failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let r: Value = serde_json::from_slice(&out.stdout)?;
        r["seconds"].as_f64().context("seconds")?
    };
    Ok(json!({ "detections_per_s": total as f64 / secs, "batches_per_s": batches as f64 / secs }))
}
