//! The offline queue tools as an operator runs them: `backhaul-edge queue stats|verify|export` and
//! `backhaul-edge replay` on a data_dir the service left behind.

use std::time::Duration;

use backhaul_edge::queue::{NewBatch, Queue, QueueConfig};
use backhaul_tests::{presence_batch, run};

fn batch(n: usize) -> NewBatch {
    presence_batch("rpi-cli", n)
}

#[test]
fn stats_verify_export_and_replay_work_on_a_real_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let acked_id = {
        let q = Queue::open(dir.path(), QueueConfig::default()).unwrap();
        for _ in 0..3 {
            q.enqueue(batch(4)).unwrap();
        }
        let b = q.next_batch().unwrap().unwrap();
        q.ack(b.batch_id).unwrap();
        b.batch_id
    };

    let (code, out, err) = run("backhaul-edge", &["queue", "stats", "--data-dir", data_dir], &[]).unwrap();
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["pending"], 2);
    assert_eq!(stats["acked_retained"], 1);
    assert_eq!(stats["produced_detections"], 12);
    assert_eq!(stats["dropped_batches"], 0);
    // What data_dir occupies on disk (allocated size): sled's files, more than the records' bytes.
    let disk = stats["disk_bytes"].as_u64().unwrap_or(0);
    assert!(disk > stats["bytes"].as_u64().unwrap(), "{stats}");

    let (code, out, _) = run("backhaul-edge", &["queue", "verify", "--data-dir", data_dir], &[]).unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("3 records intact") && out.contains("0 damaged"), "{out}");

    let (code, out, _) = run("backhaul-edge", &["queue", "export", "--data-dir", data_dir], &[]).unwrap();
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    let acked: Vec<_> = lines.iter().filter(|l| l["state"] == "acked").collect();
    assert_eq!(acked.len(), 1);
    assert_eq!(acked[0]["batch_id"], acked_id.to_string());
    assert_eq!(acked[0]["batch"]["detections"].as_array().unwrap().len(), 4);

    // Replay everything acked since a minute ago: the acked batch is pending again, same id.
    let since = time::OffsetDateTime::now_utc() - Duration::from_secs(60);
    let since = since.format(&time::format_description::well_known::Rfc3339).unwrap();
    let (code, out, err) = run("backhaul-edge", &["replay", "--since", &since, "--data-dir", data_dir], &[]).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("requeued 1 acked batches"), "{out}");
    // The offline tool has no budget of its own to report.
    assert!(stats.get("budget_bytes").is_none(), "{stats}");
    // An empty window is an error; a window with nothing retained in it says why that may be.
    let (code, _, err) =
        run("backhaul-edge", &["replay", "--since", &since, "--until", &since, "--data-dir", data_dir], &[]).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("--until is not after --since"), "{err}");
    let (code, out, err) = run(
        "backhaul-edge",
        &["replay", "--since", "2020-01-01T00:00:00Z", "--until", "2020-01-02T00:00:00Z", "--data-dir", data_dir],
        &[],
    )
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("requeued 0") && err.contains("retain_acked"), "{out} {err}");
    let q = Queue::open(dir.path(), QueueConfig::default()).unwrap();
    assert_eq!(q.next_batch().unwrap().unwrap().batch_id, acked_id);
    drop(q);

    // A second process on the same data_dir gets a clear message naming it.
    let _held = Queue::open(dir.path(), QueueConfig::default()).unwrap();
    let (code, _, err) = run("backhaul-edge", &["queue", "stats", "--data-dir", data_dir], &[]).unwrap();
    assert_eq!(code, 1);
    assert!(err.contains(data_dir) && err.contains("another backhaul-edge"), "{err}");
}

#[test]
fn verify_exits_nonzero_and_names_a_damaged_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = Queue::open(dir.path(), QueueConfig::default()).unwrap();
        q.enqueue(batch(2)).unwrap();
        let mut raw = q.debug_pending_raw(0).unwrap().unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0x40;
        q.debug_overwrite_pending(0, &raw).unwrap();
    }
    let (code, out, _) =
        run("backhaul-edge", &["queue", "verify", "--data-dir", dir.path().to_str().unwrap()], &[]).unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 damaged") && out.contains("damaged: 70") && out.contains("checksum"), "{out}");
}
