//! Bursts (issue #14, kind 3): a burst of QoS 1 messages drains at the steady rate with bounded
//! memory, live (50,000 messages) and onto a cloud restarted with a 20,000-message backlog queued
//! for its session. The broker runs with `deploy/mosquitto/backhaul.conf` appended (its
//! `max_queued_messages` is bounded: with 0, Mosquitto 2.0.11 ignores the cloud's MQTT 5 Receive
//! Maximum and sends the whole burst at once, PITFALLS.md), and no in-flight limit of its own.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use backhaul_tests::cloud::{get_json, http, Cloud, CloudOptions};
use backhaul_tests::{find_program, wait_for, wire_batch, Mosquitto, MosquittoOptions};

/// A broker with `deploy/`'s limits.
fn deploy_broker() -> Mosquitto {
    let limits = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto/backhaul.conf"),
    )
    .unwrap();
    Mosquitto::start_with(MosquittoOptions { extra: limits, ..Default::default() }).unwrap()
}

const T: Duration = Duration::from_secs(300);

/// Publishes `lines` on `topic` with QoS 1 from one client (`mosquitto_pub -l`, one message a line).
fn publish_lines(broker: &Mosquitto, topic: &str, lines: &[String]) {
    let mut child = Command::new(find_program("mosquitto_pub").expect("mosquitto-clients"))
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string(), "-q", "1", "-l", "-t", topic])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for line in lines {
        writeln!(stdin, "{line}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

/// `valid` batches of `device` interleaved with as many junk messages.
fn mixed(device: &str, valid: u64) -> Vec<String> {
    (0..valid)
        .flat_map(|seq| {
            let batch = String::from_utf8(wire_batch(device, seq, 2).to_json()).unwrap();
            [batch, format!("junk {seq}: not a batch")]
        })
        .collect()
}

fn stored_batches(cloud: &Cloud, device: &str) -> u64 {
    cloud.device(device)["batches"].as_u64().unwrap_or(0)
}

fn dead_letters(cloud: &Cloud) -> u64 {
    get_json(&http(), cloud, "/api/v1/stats").1["dead_letters"].as_u64().unwrap_or(0)
}

/// The cloud's peak resident memory so far (VmHWM), MiB.
fn peak_rss_mib(cloud: &Cloud) -> u64 {
    let pid = cloud.process.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

/// Bounded memory: the cloud's peak stays well below what the whole burst would take held at once
/// with its parse buffers. (The bound comes from the Receive Maximum and from reading the broker
/// only as fast as messages are handled.)
const PEAK_RSS_MIB: u64 = 96;

/// A cloud on `broker` without per-device rate limits: the burst comes from one publisher that
/// never resends, as no edge would (a real edge resends what a rate limit turned away; that is
/// `tests/tests/rate_limits.rs`), and what is measured here is memory under a burst.
fn unlimited_cloud(broker: &Mosquitto) -> Cloud {
    let mut cloud = Cloud::start(CloudOptions {
        mqtt_url: Some(broker.url()),
        extra: "device_rate_per_sec = 0\n".into(),
        ..Default::default()
    })
    .unwrap();
    cloud.process.wait_for_any_line(T, |l| l.contains("subscribed to batches and status")).unwrap();
    cloud
}

#[test]
fn a_burst_of_mixed_messages_drains_and_every_valid_batch_is_stored() {
    let broker = deploy_broker();
    let cloud = unlimited_cloud(&broker);
    publish_lines(&broker, "backhaul/burst-a/batches", &mixed("burst-a", 25_000));
    wait_for("all 25,000 valid batches stored", T, || (stored_batches(&cloud, "burst-a") == 25_000).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {} stored", stored_batches(&cloud, "burst-a")));
    wait_for("all 25,000 junk messages dead-lettered", T, || (dead_letters(&cloud) >= 25_000).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {}", dead_letters(&cloud)));
    let peak = peak_rss_mib(&cloud);
    assert!(peak < PEAK_RSS_MIB, "the cloud's memory peaked at {peak} MiB");
}

#[test]
fn a_cloud_restarted_onto_a_backlog_for_its_session_drains_it() {
    let broker = deploy_broker();
    let mut cloud = unlimited_cloud(&broker);
    // The cloud goes away; its persistent session collects the burst.
    cloud.process.kill9().unwrap();
    publish_lines(&broker, "backhaul/burst-b/batches", &mixed("burst-b", 10_000));
    cloud.kill9_and_restart().unwrap();
    wait_for("all 10,000 valid batches stored", T, || (stored_batches(&cloud, "burst-b") == 10_000).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {} stored", stored_batches(&cloud, "burst-b")));
    wait_for("all 10,000 junk messages dead-lettered", T, || (dead_letters(&cloud) >= 10_000).then_some(())).unwrap();
    let peak = peak_rss_mib(&cloud);
    assert!(peak < PEAK_RSS_MIB, "the cloud's memory peaked at {peak} MiB");
}
