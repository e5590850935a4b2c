//! The benchmark command. Every scenario runs in its own child process (so peak RSS and disk bytes
//! written are that scenario's alone), several times; the table shows medians, with the baselines
//! measured in the same run.
//!
//! ```text
//! cargo run --release -p backhaul-tests --bin bench -- all            # everything, about 25 minutes
//! cargo run --release -p backhaul-tests --bin bench -- all --quick    # smoke run, under a minute
//! cargo run --release -p backhaul-tests --bin bench -- queue|cloud|live|forward|decode [--runs N] [--dir DIR]
//! ```
//!
//! Needs Mosquitto and its clients (`mosquitto_pub`), valgrind for instruction counts, and Python 3
//! for the seed agent's transport (paho-mqtt is installed into a venv under `target/` if missing).
//!
//! `--dir` is where the scenarios put their data (default: a temp dir under /var/tmp, which is on
//! the real disk; /tmp may be a tmpfs, where fsync is free and the figures would lie).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use backhaul_edge::queue::{Queue, QueueConfig};
use serde_json::{json, Value};

mod cloud;
mod decode;
mod edge;
mod queue;
mod util;

use cloud::*;
use decode::*;
use edge::*;
use queue::*;
use util::*;

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
        Some(group @ ("all" | "queue" | "cloud" | "live" | "forward" | "decode")) => {
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
            ensure_binaries()?;
            let started = std::time::Instant::now();
            let mut targets = Targets::default();
            let d = dir.path();
            let mut timed = |name: &str, run: &mut dyn FnMut(&mut Targets) -> Result<()>| -> Result<()> {
                if group == "all" || group == name {
                    let t = std::time::Instant::now();
                    run(&mut targets)?;
                    eprintln!("bench: {name} took {:.0} s", t.elapsed().as_secs_f64());
                }
                Ok(())
            };
            timed("queue", &mut |t| queue_benchmarks(d, runs, quick, t))?;
            timed("cloud", &mut |t| cloud_benchmarks(d, runs, quick, t))?;
            timed("live", &mut |t| live_benchmarks(d, runs, quick, t))?;
            timed("forward", &mut |t| forward_benchmarks(d, runs, quick, t))?;
            timed("decode", &mut |_| decode_benchmarks(d, runs, quick))?;
            targets.print();
            println!();
            println!("# took {:.0} s", started.elapsed().as_secs_f64());
            Ok(())
        }
        _ => {
            eprintln!("usage: bench all|queue|cloud|forward|decode [--quick] [--runs N] [--dir DIR]");
            std::process::exit(2);
        }
    }
}

/// The scenarios run `backhaul-edge` and `backhaul-cloud` from next to this binary. Under
/// `cargo run` (which builds only this binary) they are built first, in the same profile.
fn ensure_binaries() -> Result<()> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the bench binary's directory")?;
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = dir.file_name().is_some_and(|n| n == "release");
        eprintln!("bench: building backhaul-edge and backhaul-cloud ({})", if release { "release" } else { "debug" });
        let mut build = Command::new(cargo);
        build.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "--bins",
            "-p",
            "backhaul-edge",
            "-p",
            "backhaul-cloud",
        ]);
        if release {
            build.arg("--release");
        }
        if !build.status().context("running cargo build")?.success() {
            bail!("building backhaul-edge and backhaul-cloud failed (see cargo's output above)");
        }
    }
    for name in ["backhaul-edge", "backhaul-cloud"] {
        if !dir.join(name).is_file() {
            bail!(
                "{} not found: run the benchmarks with `cargo run --release -p backhaul-tests --bin bench -- all`, \
                 or build everything first with `cargo build --release --workspace`",
                dir.join(name).display()
            );
        }
    }
    Ok(())
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

/// The targets the issues set, next to what this run measured (printed last).
#[derive(Debug, Default)]
pub struct Targets(Vec<[String; 4]>);

impl Targets {
    /// `met`: `None` for a figure the issues asked to see but set no target for.
    pub fn add(&mut self, issue: &str, what: &str, measured: String, met: Option<bool>) {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "",
        };
        self.0.push([issue.to_owned(), what.to_owned(), measured, verdict.to_owned()]);
    }

    fn print(&self) {
        if self.0.is_empty() {
            return;
        }
        println!();
        println!("| issue | target or figure asked for | this run | |");
        println!("| --- | --- | ---: | --- |");
        for [issue, what, measured, verdict] in &self.0 {
            println!("| {issue} | {what} | {measured} | {verdict} |");
        }
    }
}

/// [`child`], on one core: `taskset -c CPU bench scenario ARGS`.
pub fn child_pinned(cpu: &str, args: &[String], runs: usize) -> Result<Vec<Value>> {
    let exe = std::env::current_exe()?.display().to_string();
    let mut pinned = vec![s("-c"), s(cpu), exe, s("scenario")];
    pinned.extend(args.iter().cloned());
    run_children(Command::new("taskset").args(&pinned), args, runs)
}

/// Runs `bench scenario ARGS` in a child `runs` times and returns the parsed results.
pub fn child(args: &[String], runs: usize) -> Result<Vec<Value>> {
    let exe = std::env::current_exe()?;
    run_children(Command::new(exe).arg("scenario").args(args), args, runs)
}

fn run_children(command: &mut Command, args: &[String], runs: usize) -> Result<Vec<Value>> {
    (0..runs)
        .map(|_| {
            let out = command.output().context("running a scenario")?;
            if !out.status.success() {
                bail!("scenario {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let text = String::from_utf8(out.stdout)?;
            serde_json::from_str(text.trim()).with_context(|| format!("scenario output: {text}"))
        })
        .collect()
}

/// The median of `key` over the runs; NaN (shown as "NaN" or "n/a") unless every run has it, so a
/// median never silently stands for fewer runs than the table says.
pub fn median(results: &[Value], key: &str) -> f64 {
    let mut v: Vec<f64> = results.iter().filter_map(|r| r[key].as_f64()).collect();
    if v.len() < results.len() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn s(v: &str) -> String {
    v.to_owned()
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
        Some("cloud-http") => {
            cloud_http(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?, &arg(4)?, arg(5)?.parse()?)
        }
        Some("cloud-live") => cloud_live(
            Path::new(&arg(1)?),
            arg(2)?.parse()?,
            arg(3)?.parse()?,
            arg(4)?.parse()?,
            args.get(5).is_some_and(|k| k == "device"),
        ),
        Some("cloud-restart") => cloud_restart(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?),
        Some("cloud-mqtt") => cloud_mqtt(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?, &arg(4)?),
        Some("edge-run") => edge_run(Path::new(&arg(1)?), &Run::parse(&args[2..])?),
        Some("seed-backend") => seed_backend(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?),
        Some("fill-edge") => fill_then_wait(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?),
        Some("publish-baseline") => publish_baseline(Path::new(&arg(1)?), &arg(2)?, arg(3)?.parse()?, arg(4)?.parse()?),
        Some("instructions") => instructions(Path::new(&arg(1)?), &arg(2)?, arg(3)?.parse()?, arg(4)?.parse()?),
        Some("decode") => decode_replay(Path::new(&arg(1)?), arg(2)?.parse()?, arg(3)?.parse()?),
        Some("parse") => cloud::parse_batches(arg(1)?.parse()?, arg(2)?.parse()?),
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
