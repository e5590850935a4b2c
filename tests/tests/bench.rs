//! The benchmark command's measuring scenarios, run small, so the benchmarks cannot rot unnoticed
//! between the (manual) full runs: each starts the real edge, cloud, Mosquitto or baseline, and its
//! figures must be plausible, not just present. The figures themselves are not asserted (they are
//! measured by `bench all`, not by timed tests).

use std::process::Command;

use serde_json::Value;

/// `bench scenario ARGS` (this profile's build, next to the edge and cloud binaries) → its JSON.
fn scenario(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_bench")).arg("scenario").args(args).output().expect("bench runs");
    assert!(out.status.success(), "bench scenario {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn number(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

/// On the real disk: on a tmpfs (/tmp on some systems) nothing reaches the block layer, and the
/// disk-write figures would be 0.
fn dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("backhaul-bench-test-").tempdir_in("/var/tmp").unwrap()
}

/// The JSON of one sample detection is about 130 bytes; MQTT and HTTP framing add a little.
fn plausible_wire_bytes(v: &Value) {
    let (up, down) = (number(v, "wire_up_per_detection"), number(v, "wire_down_per_detection"));
    assert!((90.0..200.0).contains(&up), "wire bytes up per detection: {up} ({v})");
    assert!((0.0..20.0).contains(&down), "wire bytes down per detection: {down} ({v})");
}

#[test]
fn backlog_drain_after_sigkill_measures_every_figure() {
    let d = dir();
    let p = d.path().to_str().unwrap();
    for mode in ["mqtt", "http"] {
        let r = scenario(&["edge-run", p, mode, "2000", "100", "backlog"]);
        assert!(number(&r, "detections_per_s") > 0.0, "{r}");
        assert!(number(&r, "first_ack_ms") > 0.0, "{r}");
        // The drain moves every acked batch to the retained range: at least its compressed payload.
        assert!(number(&r, "disk_bytes_per_detection") > 10.0, "{r}");
        assert!(number(&r, "edge_peak_rss_mib") > 1.0, "{r}");
        plausible_wire_bytes(&r);
    }
}

#[test]
fn live_run_counts_the_whole_edge_life_cycle() {
    let d = dir();
    let r = scenario(&["edge-run", d.path().to_str().unwrap(), "mqtt", "2000", "500", "live"]);
    // Enqueue (fsync) and ack: every detection is written at least once.
    assert!(number(&r, "disk_bytes_per_detection") > 30.0, "{r}");
    plausible_wire_bytes(&r);
}

#[test]
fn baselines_publish_the_same_payloads() {
    let d = dir();
    let r = scenario(&["publish-baseline", d.path().to_str().unwrap(), "mosquitto_pub", "2000", "100"]);
    assert!(number(&r, "detections_per_s") > 0.0 && number(&r, "batches_per_s") > 0.0, "{r}");
    let r = scenario(&["seed-backend", d.path().to_str().unwrap(), "2000", "100"]);
    assert!(number(&r, "detections_per_s") > 0.0, "{r}");
}

/// Ignored since the MQTT 5 link (issue #13): under valgrind, which runs one thread at a time, the
/// link's event loop is woken by a publish only at its next keep-alive, so each batch waits up
/// to 15 s and the run exceeds the bench's 900 s deadline. Not seen without valgrind (the process
/// tests deliver in milliseconds, also pinned to one core); the cause is not found yet. Run it
/// with `cargo test -p backhaul-tests --test bench -- --ignored callgrind`.
#[test]
#[ignore = "under valgrind the MQTT 5 link only wakes at its keep-alive; see the doc comment"]
fn callgrind_counts_a_positive_marginal_cost() {
    if Command::new("valgrind").arg("--version").output().map_or(true, |o| !o.status.success()) {
        eprintln!("valgrind is not installed: skipped (scripts/test installs it)");
        return;
    }
    let d = dir();
    let r = scenario(&["instructions", d.path().to_str().unwrap(), "mqtt", "200", "100"]);
    let per = number(&r, "instructions_per_detection");
    // The edge needs thousands of instructions per detection (JSON, compression, sled, MQTT); a
    // count swamped by a spin loop, or a negative difference, is a broken measurement.
    // (This is the debug build: several times the release build's count.)
    assert!((500.0..5_000_000.0).contains(&per), "{r}");
}
