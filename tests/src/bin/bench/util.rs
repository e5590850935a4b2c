//! Helpers the scenarios share: sample data and readings from /proc.

use std::path::Path;

use backhaul_edge::queue::NewBatch;
use backhaul_shared::{Detection, Presence, Sensor, Timestamp, Zone};

/// splitmix64: a cheap, well-mixed pseudo-random stream.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A batch like a busy site's: mostly presence (keyed hashes look random, so they are random
/// here: no help for the compressor), some Thingy:52 readings, detection times spread over the
/// batch's window with sub-second precision, RSSI varying.
pub fn sample_batch(detections: usize, salt: u64) -> NewBatch {
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
                        rssi: Some(-60 - (r % 30) as i16),
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
        clock: Default::default(),
    }
}

pub fn disk_write_bytes() -> u64 {
    proc_field(std::process::id(), "io", "write_bytes:").unwrap_or(0.0) as u64
}

pub fn peak_rss_mib() -> f64 {
    proc_field(std::process::id(), "status", "VmHWM:").map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn current_rss_mib() -> f64 {
    proc_field(std::process::id(), "status", "VmRSS:").map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn dir_size(path: &Path) -> u64 {
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

pub fn payload_len(batch: &NewBatch) -> u64 {
    // The wire JSON is what the queue stores; measure it the same way.
    let b = backhaul_shared::Batch {
        clock: Default::default(),
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

pub fn proc_field(pid: u32, file: &str, key: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
}

/// utime + stime of a process, in seconds (USER_HZ is 100 on Linux).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
