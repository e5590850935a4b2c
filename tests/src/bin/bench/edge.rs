//! `backhaul-edge run` end to end: backlog drains over MQTT and HTTP against the seed agent's
//! transport and `mosquitto_pub`.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
        "| backlog drain | detections | detections/s | vs mosquitto_pub | vs paho | restart to first ack, ms | wire bytes / detection, up + down | edge disk bytes written / detection | edge peak RSS MiB | CPU s per 1M detections: edge (or publisher) + broker + cloud = all |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    // 100 per batch, 200,000 detections: the end-to-end scenario of issue #15.
    for per in [50usize, 100, 500] {
        let total = match (quick, per) {
            (true, 500) => 20_000,
            (true, _) => 10_000,
            (false, 500) => 1_000_000,
            (false, _) => 200_000,
        };
        let (t, p) = (total.to_string(), per.to_string());
        let r = child(&[s("publish-baseline"), s(&d), s("mosquitto_pub"), t.clone(), p.clone()], runs)?;
        let pub_rate = median(&r, "detections_per_s");
        let pub_cpu = format!("? + {:.2}", median(&r, "broker_cpu_s_per_million"));
        let paho = match &python {
            Ok(py) => {
                let r = child(&[s("publish-baseline"), s(&d), py.clone(), t.clone(), p.clone()], runs)?;
                Some((median(&r, "detections_per_s"), cpu_sum(&r, &["publisher", "broker"])))
            }
            Err(_) => None,
        };
        let paho_rate = paho.as_ref().map(|(rate, _)| *rate);
        let vs_paho = |rate: f64| paho_rate.map_or(String::new(), |b| format!("{:.2}x", rate / b));
        println!(
            "| baseline: `mosquitto_pub -l -q 1 -M 32`, {per} det/batch | {total} | {pub_rate:.0} | 1.0x | {} | | | | | {pub_cpu} |",
            vs_paho(pub_rate)
        );
        if let Some((rate, cpu)) = &paho {
            println!(
                "| baseline: seed agent's transport (paho-mqtt, Python), {per} det/batch | {total} | {rate:.0} | {:.2}x | 1.0x | | | | | {cpu} |",
                rate / pub_rate
            );
        } else {
            let why = python.as_ref().err().map_or("", String::as_str);
            println!("| baseline: seed agent's transport: not run ({why}), {per} det/batch | | | | | | | | | |");
        }
        // The last case: how much of the gap to the baselines is the retention of acked batches.
        let mut cases = vec![("broker", None), ("mqtt", None), ("http", None)];
        if per == 500 {
            cases.push(("broker", Some("retain0")));
        }
        for (mode, flag) in cases {
            let mut args = vec![s("edge-run"), s(&d), s(mode), t.clone(), p.clone(), s("backlog")];
            args.extend(flag.map(s));
            let r = child(&args, runs)?;
            let rate = median(&r, "detections_per_s");
            println!(
                "| backhaul {}{}, {per} det/batch | {total} | {rate:.0} | {:.2}x | {} | {:.0} | {} | {:.1} | {:.1} | {} |",
                path_label(mode),
                if flag.is_some() { ", `retain_acked = \"0s\"`" } else { "" },
                rate / pub_rate,
                vs_paho(rate),
                median(&r, "first_ack_ms"),
                wire(&r),
                median(&r, "disk_bytes_per_detection"),
                median(&r, "edge_peak_rss_mib"),
                // `broker` mode has no cloud.
                cpu_sum(&r, if mode == "broker" { &["edge", "broker"] } else { &["edge", "broker", "cloud"] }),
            );
            if flag.is_some() {
                continue;
            }
            let versus = match mode {
                "mqtt" => Some("end-to-end MQTT drain at least as fast as the seed transport"),
                "broker" => Some("like for like, both ending at the broker's PUBACK"),
                _ => None,
            };
            if let (Some(what), Some(b)) = (versus, paho_rate) {
                targets.add(
                    if per == 100 && mode == "mqtt" { "#5, #15" } else { "#5" },
                    &format!("{what} ({per} det/batch)"),
                    format!("{:.2}x ({rate:.0} vs {b:.0} detections/s)", rate / b),
                    Some(rate >= b),
                );
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

    let (fast, paced) = if quick { (10_000, 5_000) } else { (200_000, 100_000) };
    println!();
    println!(
        "Live: the simulated source (10,000 devices) → batcher (500) → durable queue (fsync) → link → cloud \
         (SQLite) → ack; the edge's whole life cycle. \"As fast as it goes\" builds a backlog (the cloud is \
         slower than the source); \"paced\" stays below the cloud's rate, so the queue stays near empty, \
         as in the field."
    );
    println!();
    println!(
        "| live | detections | detections/s | wire bytes / detection, up + down | edge disk bytes written / detection | edge peak RSS MiB | edge CPU s per 1M detections |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    // (mode, detections, extra flags, label)
    let pace = "rate=10000";
    let pi = ", Pi-class: edge pinned to one core (`taskset -c 0`), the rest on the other";
    let mut cases = vec![
        ("mqtt", fast, vec![], "as fast as it goes"),
        ("http", fast, vec![], "as fast as it goes"),
        ("mqtt", paced, vec![pace], "paced at 10,000/s"),
        ("mqtt", paced, vec![pace, "retain0"], "paced at 10,000/s, `retain_acked = \"0s\"`"),
    ];
    if !quick {
        cases.push(("http", paced, vec![pace], "paced at 10,000/s"));
        cases.push(("mqtt", paced, vec![pace, "pin"], "paced at 10,000/s"));
        cases.push(("http", paced, vec![pace, "pin"], "paced at 10,000/s"));
    }
    for (mode, total, flags, label) in cases {
        let mut args = vec![s("edge-run"), s(&d), s(mode), total.to_string(), s("500"), s("live")];
        args.extend(flags.iter().map(|f| s(f)));
        let pin = flags.contains(&"pin");
        let r = if pin { child_pinned("1", &args, runs)? } else { child(&args, runs)? };
        let disk = median(&r, "disk_bytes_per_detection");
        println!(
            "| {}, {label}{} | {total} | {:.0} | {} | {disk:.1} | {:.1} | {:.2} |",
            path_label(mode),
            if pin { pi } else { "" },
            median(&r, "detections_per_s"),
            wire(&r),
            median(&r, "edge_peak_rss_mib"),
            median(&r, "edge_cpu_s_per_million"),
        );
        if !pin && flags.contains(&pace) {
            targets.add(
                "#8",
                &format!("edge disk bytes written per detection (SD card wear), live over {mode}, {label}"),
                format!("{disk:.0} bytes"),
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
    let connections = median(r, "connections");
    if up.is_nan() {
        "n/a (reconnected)".into()
    } else if connections > 1.0 {
        format!("{up:.1} + {down:.1} ({connections:.0} connections)")
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
    // Wait to be killed; if the parent dies instead, stdin closes and this exits.
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    Ok(json!({}))
}

/// Fills the edge queue at `data` in a child process and kills it with SIGKILL once it is full, so
/// the edge then opens the backlog as it would after a crash or a power cut of the process.
fn fill_and_kill(data: &Path, total: u64, per: usize) -> Result<()> {
    use std::io::BufRead;
    let mut filler = Command::new(std::env::current_exe()?)
        .args(["scenario", "fill-edge"])
        .arg(data)
        .args([total.to_string(), per.to_string()])
        .stdin(std::process::Stdio::piped())
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

/// `a + b + c = sum` of the runs' median `{part}_cpu_s_per_million` (CPU seconds per million
/// detections, user + system), for the processes of the run; a part that was not measured is
/// `?`, and so is the sum.
fn cpu_sum(runs: &[Value], parts: &[&str]) -> String {
    let values: Vec<f64> = parts.iter().map(|part| median(runs, &format!("{part}_cpu_s_per_million"))).collect();
    let show = |v: f64| if v.is_finite() { format!("{v:.2}") } else { "?".to_owned() };
    let shown: Vec<String> = values.iter().map(|&v| show(v)).collect();
    format!("{} = {}", shown.join(" + "), show(values.iter().sum()))
}

/// `backhaul-edge run` (release, next to this binary) through a real Mosquitto (or HTTP) into a
/// real cloud, timed from the edge's start to the last ack.
///
/// `backlog`: the queue is filled first by a process killed with SIGKILL, and the source has
/// nothing more to make (the last batch carries its final position). Otherwise (live) the
/// simulated source makes `total` detections as fast as the queue takes them.
/// One `edge-run` scenario: `MODE TOTAL PER backlog|live [pin] [rate=N] [retain0]`.
#[derive(Debug, Clone)]
pub struct Run {
    /// `broker` (MQTT, deleted on PUBACK, no cloud), `mqtt` or `http`.
    pub mode: String,
    pub total: u64,
    pub per: usize,
    pub backlog: bool,
    pub launch: Launch,
    /// Live: the source's pace in detections/s (default: as fast as the queue takes them).
    pub rate: Option<f64>,
    /// `retain_acked = "0s"`: acked batches are deleted, not kept for replay.
    pub retain0: bool,
    /// `transport.max_inflight` (default: the edge's, 32).
    pub inflight: Option<u32>,
}

impl Run {
    pub fn parse(args: &[String]) -> Result<Self> {
        let arg = |i: usize| {
            args.get(i).cloned().context("edge-run MODE TOTAL PER backlog|live [pin] [rate=N] [retain0] [inflight=N]")
        };
        let mut run = Run {
            mode: arg(0)?,
            total: arg(1)?.parse()?,
            per: arg(2)?.parse()?,
            backlog: arg(3)? == "backlog",
            launch: Launch::Plain,
            rate: None,
            retain0: false,
            inflight: None,
        };
        for flag in &args[4..] {
            match flag.as_str() {
                "pin" => run.launch = Launch::Pinned,
                "retain0" => run.retain0 = true,
                other => match (other.strip_prefix("rate="), other.strip_prefix("inflight=")) {
                    (Some(r), _) => run.rate = Some(r.parse()?),
                    (_, Some(n)) => run.inflight = Some(n.parse()?),
                    _ => bail!("unknown edge-run flag {other:?}"),
                },
            }
        }
        Ok(run)
    }
}

pub fn edge_run(dir: &Path, run: &Run) -> Result<Value> {
    let Run { ref mode, total, per, backlog, launch, rate, retain0, inflight } = *run;
    let mode = mode.as_str();
    let work = tempfile::tempdir_in(dir)?;
    let data = work.path().join("edge");
    if backlog {
        fill_and_kill(&data, total, per)?;
    }
    let broker = backhaul_tests::Mosquitto::start()?;
    // `broker`: no cloud at all; the edge deletes on PUBACK. A persistent session that subscribed
    // and went away stands for the cloud's: the broker queues the batches for it, and PUBACKs
    // with MQTT 5 reason 0x00 (with nobody subscribed, 0x10 is no delivery for the edge).
    if mode == "broker" {
        broker.persistent_subscriber("bench-cloud-away", "backhaul/+/batches")?;
    }
    let cloud = match mode {
        "broker" => None,
        _ => Some(CloudProcess::start(
            dir,
            (mode == "mqtt").then(|| broker.url()).as_deref(),
            &crate::cloud::Database::Sqlite,
        )?),
    };
    let (transport_mode, ack) =
        if mode == "http" { ("http", "cloud") } else { ("mqtt", if mode == "broker" { "broker" } else { "cloud" }) };
    let status_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let rate = if backlog { 1.0 } else { rate.unwrap_or(1e9) };
    let retain = if retain0 { "retain_acked = \"0s\"\n" } else { "" };
    let inflight = inflight.map(|n| format!("max_inflight = {n}\n")).unwrap_or_default();
    // HTTP goes through a counting relay: ureq's connections may close and reopen, and closed
    // connections are gone from `ss`. (MQTT has one connection; `ss` reads it without a hop.)
    let relay = match &cloud {
        Some(c) if mode == "http" => Some(CountingRelay::start(c.port)?),
        _ => None,
    };
    let config = work.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"rpi-bench-01\"\ndata_dir = \"{}\"\nstatus_listen = \"127.0.0.1:{status_port}\"\n\
             [source]\nkind = \"simulated\"\ncount = {total}\nrate = {rate}\ndevices = 10000\n\
             [batch]\nmax_detections = {per}\n\
             [queue]\nmax_bytes = \"100GiB\"\n{retain}\
             [transport]\nmode = \"{transport_mode}\"\nrate_per_sec = 1000000\nburst = 100000\n{inflight}\
             [transport.mqtt]\nurl = \"{}\"\nack = \"{ack}\"\n[transport.http]\nurl = \"http://127.0.0.1:{}\"\n",
            data.display(),
            broker.url(),
            relay.as_ref().map_or(1, |r| r.port)
        ),
    )?;
    let exe = std::env::current_exe()?.with_file_name("backhaul-edge");
    if !exe.is_file() {
        bail!("{} not found: cargo build --release --workspace", exe.display());
    }
    // CPU seconds of the broker and the cloud over the run, so the end-to-end path's cost can be
    // set beside a baseline's (publisher and broker only).
    let others_cpu = || {
        let of = |pid: Option<u32>| pid.and_then(cpu_seconds).unwrap_or(f64::NAN);
        (of(broker.pid()), of(cloud.as_ref().map(|c| c.child.id())))
    };
    let (broker_before, cloud_before) = others_cpu();
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
        // (Under callgrind every poll the edge answers would count: rarely there.)
        let pause = match (launch, first_ack_ms) {
            (Launch::Callgrind, _) => 500,
            (_, None) => 2,
            _ => 20,
        };
        std::thread::sleep(Duration::from_millis(pause));
    };
    let secs = start.elapsed().as_secs_f64();
    rss = rss.max(proc_field(pid, "status", "VmHWM:").unwrap_or(0.0) / 1024.0);
    cpu = cpu.max(cpu_seconds(pid).unwrap_or(0.0));
    let (broker_cpu, cloud_cpu) = others_cpu();
    let (broker_cpu, cloud_cpu) = (broker_cpu - broker_before, cloud_cpu - cloud_before);
    // Bytes over the edge's own TCP connections; only counts connections still open, so a run
    // that reconnected has no figure.
    let (up, down, connections) = match (&relay, tcp_bytes(pid, broker.port())) {
        (Some(r), _) => {
            (r.up.load(Ordering::Relaxed), r.down.load(Ordering::Relaxed), r.connections.load(Ordering::Relaxed))
        }
        (None, Some((up, down))) if link_ups <= 1 => (up, down, 1),
        _ => (0, 0, 0),
    };
    let per_detection = |bytes: u64| if connections == 0 { f64::NAN } else { bytes as f64 / total as f64 };
    let (up, down) = (per_detection(up), per_detection(down));
    // A clean stop (SIGTERM), so everything the edge has written is counted: its buffered acks
    // included. A zombie's /proc/PID/io still answers until it is reaped.
    if !Command::new("kill").args(["-TERM", &pid.to_string()]).status().is_ok_and(|s| s.success()) {
        let _ = edge.kill();
        bail!("could not send SIGTERM to the edge");
    }
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
        "broker_cpu_s_per_million": broker_cpu / total as f64 * 1e6,
        "cloud_cpu_s_per_million": cloud_cpu / total as f64 * 1e6,
        "disk_bytes_per_detection": written / total as f64,
        "wire_up_per_detection": up,
        "wire_down_per_detection": down,
        "connections": connections,
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
    if spin == 0.0 {
        bail!(
            "sled's Lazy::deref is not in the profile {} (inlined or renamed?): the spin it does under \
             valgrind can no longer be left out, so the count would be wrong; see callgrind_annotate",
            profile.display()
        );
    }
    Ok(total - spin)
}

/// A TCP relay on loopback to `127.0.0.1:target` that counts the bytes each way and the
/// connections made through it.
struct CountingRelay {
    port: u16,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
}

impl CountingRelay {
    fn start(target: u16) -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let relay = Self { port, up: Arc::default(), down: Arc::default(), connections: Arc::default() };
        let (up, down, connections) = (relay.up.clone(), relay.down.clone(), relay.connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else { continue };
                connections.fetch_add(1, Ordering::Relaxed);
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    pump(client, server, up.clone());
                    pump(s2, c2, down.clone());
                }
            }
        });
        Ok(relay)
    }
}

/// Copies `from` to `to` on a thread, counting, until either side closes.
fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream, count: Arc<AtomicU64>) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// Bytes sent and received over the TCP connections that `pid` has open to `127.0.0.1:peer_port`
/// (`ss -tinp`).
fn tcp_bytes(pid: u32, peer_port: u16) -> Option<(u64, u64)> {
    let out = Command::new("ss").args(["-tinpH", "state", "established"]).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let owner = format!("pid={pid},");
    let peer = format!("127.0.0.1:{peer_port}");
    let mut lines = text.lines();
    let (mut up, mut down, mut found) = (0, 0, false);
    while let Some(line) = lines.next() {
        // Columns: Recv-Q Send-Q Local Peer Process; the next line holds the socket's counters.
        let to_peer = line.split_whitespace().nth(3) == Some(peer.as_str());
        if !line.contains(&owner) {
            continue;
        }
        let info = lines.next()?;
        if !to_peer {
            continue; // e.g. the bench's own /status polls
        }
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
    let run = |total| Run {
        mode: mode.to_owned(),
        total,
        per,
        backlog: false,
        launch: Launch::Callgrind,
        rate: None,
        retain0: false,
        inflight: None,
    };
    let one = edge_run(dir, &run(n))?;
    let two = edge_run(dir, &run(2 * n))?;
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
    let broker_cpu = || broker.pid().and_then(cpu_seconds).unwrap_or(f64::NAN);
    let broker_before = broker_cpu();
    let mut publisher_cpu = f64::NAN;
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
        publisher_cpu = r["cpu_seconds"].as_f64().unwrap_or(f64::NAN);
        r["seconds"].as_f64().context("seconds")?
    };
    let per_million = |cpu: f64| cpu / total as f64 * 1e6;
    Ok(json!({
        "detections_per_s": total as f64 / secs,
        "batches_per_s": batches as f64 / secs,
        "publisher_cpu_s_per_million": per_million(publisher_cpu),
        "broker_cpu_s_per_million": per_million(broker_cpu() - broker_before),
    }))
}
