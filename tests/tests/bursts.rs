//! Bursts (issue #14, kind 3): a burst of QoS 1 messages drains at the steady rate, live and onto a
//! cloud restarted with the burst queued for its session. The test broker, like the field report's,
//! sets no in-flight limit, so Mosquitto sends the whole burst at once.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use backhaul_tests::cloud::{get_json, http, Cloud};
use backhaul_tests::{find_program, wait_for, wire_batch, Mosquitto};

const T: Duration = Duration::from_secs(180);

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

#[test]
fn a_burst_of_mixed_messages_drains_and_every_valid_batch_is_stored() {
    let broker = Mosquitto::start().unwrap();
    let cloud = Cloud::start_mqtt(&broker, Vec::new()).unwrap();
    publish_lines(&broker, "backhaul/burst-a/batches", &mixed("burst-a", 10_000));
    wait_for("all 10,000 valid batches stored", T, || (stored_batches(&cloud, "burst-a") == 10_000).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {} stored", stored_batches(&cloud, "burst-a")));
    wait_for("all 10,000 junk messages dead-lettered", T, || (dead_letters(&cloud) >= 10_000).then_some(())).unwrap();
}

#[test]
fn a_cloud_restarted_onto_a_backlog_for_its_session_drains_it() {
    let broker = Mosquitto::start().unwrap();
    let mut cloud = Cloud::start_mqtt(&broker, Vec::new()).unwrap();
    // The cloud goes away; its persistent session collects the burst.
    cloud.process.kill9().unwrap();
    publish_lines(&broker, "backhaul/burst-b/batches", &mixed("burst-b", 10_000));
    cloud.kill9_and_restart().unwrap();
    wait_for("all 10,000 valid batches stored", T, || (stored_batches(&cloud, "burst-b") == 10_000).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {} stored", stored_batches(&cloud, "burst-b")));
}
