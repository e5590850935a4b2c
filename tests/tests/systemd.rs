//! The systemd contract of `backhaul-edge run`, with a real notify socket: READY=1 once running,
//! regular WATCHDOG=1 while every stage makes progress, no more pings once the forwarder is
//! wedged (a test-only fault hook), STOPPING=1 on SIGTERM. And the unit files pass
//! `systemd-analyze verify`.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use backhaul_tests::cloud::{get_json, http, Cloud, CloudOptions, FLEET_KEY};
use backhaul_tests::edge::{Edge, EdgeOptions};
use backhaul_tests::{wait_for, wire_batch, Mosquitto};

/// A notify socket like systemd's, in a temp dir.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: String,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify").to_str().unwrap().to_owned();
        let socket = UnixDatagram::bind(&path).unwrap();
        Self { _dir: dir, path, socket }
    }

    /// The next datagram within `timeout`, if any.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Reads datagrams until one satisfies `pred`; panics after `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} within {timeout:?}");
            if let Some(m) = self.next(left) {
                if pred(&m) {
                    return m;
                }
            }
        }
    }
}

#[test]
fn the_watchdog_is_pinged_while_stages_progress_and_not_once_the_forwarder_is_wedged() {
    let broker = Mosquitto::start().unwrap();
    let notify = NotifySocket::new();
    let edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 0, // forever, slowly
        rate: 100.0,
        env: vec![
            ("NOTIFY_SOCKET".into(), notify.path.clone()),
            ("WATCHDOG_USEC".into(), "1000000".into()),
            ("BACKHAUL_FAILPOINT".into(), "freeze_forwarder_after:4000".into()),
        ],
        ..Default::default()
    })
    .unwrap();
    notify.wait_for("READY=1", Duration::from_secs(30), |m| m.contains("READY=1"));
    // Pings at half the interval, with the queue and link in STATUS=.
    for _ in 0..3 {
        let m = notify.wait_for("WATCHDOG=1", Duration::from_secs(5), |m| m.contains("WATCHDOG=1"));
        assert!(m.contains("STATUS=queue:") && m.contains("link mqtt"), "{m}");
    }
    // The forwarder freezes 4 s after start; 3 s later (the limit for a 1 s watchdog) the pings stop.
    let stalled = notify.wait_for("a stalled STATUS", Duration::from_secs(20), |m| m.contains("stalled"));
    assert!(stalled.contains("forwarder"), "{stalled}");
    let quiet_until = Instant::now() + Duration::from_secs(2);
    while let Some(m) = notify.next(quiet_until.saturating_duration_since(Instant::now())) {
        assert!(!m.contains("WATCHDOG=1"), "a ping after the forwarder wedged: {m}");
        if Instant::now() >= quiet_until {
            break;
        }
    }
    drop(edge);
}

/// Issue #14, kind 4: an MQTT ingest that has messages waiting and finishes none for
/// `ingest_stall_after` is unhealthy: `/health` answers 503 naming it, `/metrics` says so, and the
/// watchdog pings stop (systemd then restarts the service). A test-only failpoint makes the worker
/// hang on the first batch; the broker, the connection and the database are all fine.
#[test]
fn a_stalled_mqtt_ingest_is_unhealthy_and_stops_the_cloud_watchdog() {
    let broker = Mosquitto::start().unwrap();
    let notify = NotifySocket::new();
    let mut cloud = Cloud::start(CloudOptions {
        mqtt_url: Some(broker.url()),
        extra: "ingest_stall_after = \"5s\"".into(),
        env: vec![
            ("NOTIFY_SOCKET".into(), notify.path.clone()),
            ("WATCHDOG_USEC".into(), "1000000".into()),
            ("BACKHAUL_FAILPOINT".into(), "stall_mqtt".into()),
        ],
        ..Default::default()
    })
    .unwrap();
    notify.wait_for("READY=1", Duration::from_secs(30), |m| m.contains("READY=1"));
    cloud.process.wait_for_any_line(Duration::from_secs(30), |l| l.contains("subscribed to batches")).unwrap();
    // Idle: healthy, pinging.
    for _ in 0..3 {
        notify.wait_for("WATCHDOG=1", Duration::from_secs(5), |m| m.contains("WATCHDOG=1"));
    }
    let agent = http();
    assert_eq!(get_json(&agent, &cloud, "/health").0, 200);
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string(), "-q", "1", "-t", "backhaul/dev-stall/batches"])
        .arg("-m")
        .arg(String::from_utf8(wire_batch("dev-stall", 0, 2).to_json()).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let stalled_at = Instant::now();
    let body = wait_for("/health to answer 503", Duration::from_secs(30), || {
        let (code, body) = get_json(&agent, &cloud, "/health");
        (code == 503).then_some(body)
    })
    .unwrap();
    assert!(stalled_at.elapsed() >= Duration::from_secs(4), "not before ingest_stall_after: {body}");
    assert_eq!(body["stalled"], serde_json::json!(["mqtt"]), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("mqtt ingest is stalled: 1 waiting") && error.contains("systemd restarts"), "{body}");
    let metrics = agent
        .get(cloud.url("/metrics"))
        .header("Authorization", &format!("Bearer {FLEET_KEY}"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(metrics.contains("backhaul_cloud_ingress_stalled{ingress=\"mqtt\"} 1"), "{metrics}");
    assert!(metrics.contains("backhaul_cloud_ingress_waiting{ingress=\"mqtt\"} 1"), "{metrics}");
    assert!(metrics.contains("backhaul_cloud_ingress_stalled{ingress=\"http\"} 0"), "{metrics}");
    // No ping once stalled: after one watchdog period (500 ms) for a tick already under way, drain
    // what was sent before, then listen for 2 s.
    std::thread::sleep(Duration::from_millis(600));
    while notify.next(Duration::from_millis(1)).is_some() {}
    let quiet_until = Instant::now() + Duration::from_secs(2);
    while let Some(m) = notify.next(quiet_until.saturating_duration_since(Instant::now())) {
        assert!(!m.contains("WATCHDOG=1"), "a ping while MQTT ingest is stalled: {m}");
    }
}

/// Kind 4 for HTTP: bulk posts that are never stored make the service unhealthy too, also when
/// their clients give up sooner than `ingest_stall_after` (as the edge's 30 s HTTP timeout would
/// against the default 60 s): a client going away is no progress.
#[test]
fn a_stalled_http_ingest_is_unhealthy() {
    let cloud = Cloud::start(CloudOptions {
        extra: "ingest_stall_after = \"5s\"".into(),
        env: vec![("BACKHAUL_FAILPOINT".into(), "stall_http".into())],
        ..Default::default()
    })
    .unwrap();
    let agent = http();
    wait_for("the cloud to answer /health", Duration::from_secs(30), || {
        (get_json(&agent, &cloud, "/health").0 == 200).then_some(())
    })
    .unwrap();
    let url = cloud.url("/api/v1/detections/bulk");
    let batch = wire_batch(backhaul_tests::cloud::DEVICE, 0, 2);
    let poster = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        let _ = agent
            .post(&url)
            .header("X-API-Key", backhaul_tests::cloud::DEVICE_KEY)
            .header("Idempotency-Key", &batch.batch_id.to_string())
            .send(&batch.to_json()[..]);
    });
    let body = wait_for("/health to answer 503", Duration::from_secs(30), || {
        let (code, body) = get_json(&agent, &cloud, "/health");
        (code == 503).then_some(body)
    })
    .unwrap();
    assert_eq!(body["stalled"], serde_json::json!(["http"]), "{body}");
    assert!(body["error"].as_str().unwrap().contains("http ingest is stalled: 1 waiting"), "{body}");
    drop(cloud);
    let _ = poster.join();
}

#[test]
fn sigterm_says_stopping_and_exits_cleanly() {
    let broker = Mosquitto::start().unwrap();
    let notify = NotifySocket::new();
    let mut edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 0,
        rate: 100.0,
        env: vec![("NOTIFY_SOCKET".into(), notify.path.clone())],
        ..Default::default()
    })
    .unwrap();
    notify.wait_for("READY=1", Duration::from_secs(30), |m| m.contains("READY=1"));
    backhaul_tests::sigterm(edge.process.child().unwrap()).unwrap();
    notify.wait_for("STOPPING=1", Duration::from_secs(10), |m| m.contains("STOPPING=1"));
    assert_eq!(edge.process.wait_exit(Duration::from_secs(30)).unwrap(), Some(0));
}

#[test]
fn the_unit_files_pass_systemd_analyze_verify() {
    let Some(analyze) = backhaul_tests::find_program("systemd-analyze") else {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for (unit, binary) in [("backhaul-edge.service", "backhaul-edge"), ("backhaul-cloud.service", "backhaul-cloud")] {
        // ExecStart must name an existing binary for verify: point it at the one just built.
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        let built = backhaul_tests::binary(binary).unwrap();
        std::fs::write(dir.path().join(unit), text.replace(&format!("/usr/bin/{binary}"), built.to_str().unwrap()))
            .unwrap();
    }
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("backhaul-edge.service"))
        .arg(dir.path().join("backhaul-cloud.service"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // It exits 0 even with warnings (PITFALLS): any line naming our units is a finding.
    let findings: Vec<&str> = text.lines().filter(|l| l.contains("backhaul")).collect();
    assert!(out.status.success() && findings.is_empty(), "systemd-analyze verify:\n{text}");
}
