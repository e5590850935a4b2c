//! Ledgers for the chaos suite: what an edge produced, batch by batch (from its queue on disk,
//! `backhaul-edge queue export`), and what the cloud stored (from `/api/v1/detections`), and their
//! comparison: every produced batch stored exactly once with all its detections, nothing else
//! stored, every drop accounted for.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::cloud::{get_json, http, Cloud};

/// batch_id → detections.
pub type Ledger = BTreeMap<String, u64>;

/// Every batch the edge's queue holds (pending, acked and retained, dead-lettered). The edge must
/// be stopped. Also returns the batches dropped by the byte budget (counted, not kept).
pub fn edge_ledger(data_dir: &Path) -> Result<(Ledger, u64)> {
    let dir = data_dir.to_str().context("utf-8 path")?;
    let (code, out, err) = crate::run("backhaul-edge", &["queue", "export", "--data-dir", dir], &[])?;
    ensure!(code == 0, "queue export failed: {err}");
    let mut ledger = Ledger::new();
    for line in out.lines() {
        let r: Value = serde_json::from_str(line)?;
        if r["state"] == "quarantined" {
            continue;
        }
        let id = r["batch_id"].as_str().context("a batch_id")?.to_owned();
        ensure!(
            ledger.insert(id.clone(), r["detections"].as_u64().unwrap_or(0)).is_none(),
            "batch {id} twice in the queue"
        );
    }
    let (code, out, err) = crate::run("backhaul-edge", &["queue", "stats", "--data-dir", dir], &[])?;
    ensure!(code == 0, "queue stats failed: {err}");
    let stats: Value = serde_json::from_str(&out)?;
    Ok((ledger, stats["dropped_batches"].as_u64().unwrap_or(0)))
}

/// Waits until `GET /api/v1/devices` says `device_id`'s conservation ledger balances (issue #18:
/// `produced = stored + queued + dropped + quarantined + lost + dead_lettered`, from the edge's
/// last status and the cloud's count); returns the ledger. Errors with the last ledger seen.
pub fn ledger_balances(cloud: &Cloud, device_id: &str, timeout: std::time::Duration) -> Result<Value> {
    let mut last = Value::Null;
    let r = crate::wait_for(&format!("{device_id}'s ledger to balance"), timeout, || {
        last = cloud.device(device_id)["ledger"].clone();
        (last["balanced"] == true).then(|| last.clone())
    });
    r.with_context(|| format!("the last ledger: {last}"))
}

/// Every batch the cloud stored for `device_id`, with its detection count.
pub fn cloud_ledger(cloud: &Cloud, device_id: &str) -> Ledger {
    let agent = http();
    let mut ledger = Ledger::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/detections?device_id={device_id}&limit=1000");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, body) = get_json(&agent, cloud, &path);
        assert_eq!(status, 200, "{body}");
        for d in body["detections"].as_array().into_iter().flatten() {
            *ledger.entry(d["batch_id"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return ledger,
        }
    }
}

/// The outcome of one scenario, as a row of the README's reliability table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub produced: u64,
    pub stored: u64,
    /// Produced, not stored (and not dropped by policy).
    pub lost: u64,
    /// Stored without having been produced, or with other detections than produced.
    pub wrong: u64,
    /// Resends the cloud absorbed (its duplicate counter).
    pub duplicates_absorbed: u64,
}

/// Compares the ledgers; `Err` names every batch lost or stored wrongly.
pub fn compare(edge: &Ledger, cloud: &Ledger) -> (Tally, Vec<String>) {
    let mut problems = Vec::new();
    let mut t = Tally { produced: edge.len() as u64, stored: cloud.len() as u64, ..Tally::default() };
    for (id, n) in edge {
        match cloud.get(id) {
            None => {
                t.lost += 1;
                problems.push(format!("lost: batch {id} ({n} detections) never stored"));
            }
            Some(m) if m != n => {
                t.wrong += 1;
                problems.push(format!("batch {id}: produced {n} detections, stored {m}"));
            }
            Some(_) => {}
        }
    }
    for id in cloud.keys().filter(|id| !edge.contains_key(*id)) {
        t.wrong += 1;
        problems.push(format!("stored but never produced: batch {id}"));
    }
    (t, problems)
}
