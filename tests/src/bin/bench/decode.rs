//! Decoding: a replayed capture through decode, dedup and the batcher.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use backhaul_shared::Timestamp;
use serde_json::{json, Value};

use crate::util::*;
use crate::{child, median, s};

pub fn decode_benchmarks(dir: &Path, runs: usize, quick: bool) -> Result<()> {
    let d = dir.display().to_string();
    let total = if quick { "100000" } else { "1000000" };
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
pub fn decode_replay(dir: &Path, total: u64, advertisers: u64) -> Result<Value> {
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
