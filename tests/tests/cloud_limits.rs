//! Oversized MQTT messages (issue #14, kind 2) against a real `backhaul-cloud` and Mosquitto: a
//! message bigger than the cloud reads must never cut its ingest off (it used to reconnect every
//! 100 ms and be sent the message again, for good), and `deploy/`'s broker limits stop a hostile
//! publisher at the broker while edges learn the limit and cut their batches to fit.

use std::process::{Command, Stdio};
use std::time::Duration;

use backhaul_tests::cloud::{get_json, http, Cloud, DEVICE};
use backhaul_tests::edge::{num, Edge, EdgeOptions};
use backhaul_tests::{find_program, wait_for, wire_batch, Mosquitto, MosquittoOptions};

const T: Duration = Duration::from_secs(60);

fn mosquitto_pub(broker: &Mosquitto, client_id: &str, topic: &str, args: &[&str], stdin: Option<String>) {
    let mut child = Command::new(find_program("mosquitto_pub").expect("mosquitto-clients"))
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string(), "-q", "1", "-i", client_id, "-t", topic])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    // Its exit code is not the point (a publisher the broker disconnects may report either way).
    let _ = child.wait();
}

/// Publishes a message of `bytes` bytes of `x` on `topic`.
fn publish_size(broker: &Mosquitto, client_id: &str, topic: &str, bytes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("message");
    std::fs::write(&file, vec![b'x'; bytes]).unwrap();
    mosquitto_pub(broker, client_id, topic, &["-f", file.to_str().unwrap()], None);
}

/// Publishes batches `seqs` of `device`, one message each, from one client.
fn publish_batches(broker: &Mosquitto, device: &str, seqs: std::ops::Range<u64>) {
    let lines: String =
        seqs.map(|seq| String::from_utf8(wire_batch(device, seq, 2).to_json()).unwrap() + "\n").collect();
    mosquitto_pub(broker, "good-publisher", &format!("backhaul/{device}/batches"), &["-l"], Some(lines));
}

fn dead_letters(cloud: &Cloud) -> u64 {
    get_json(&http(), cloud, "/api/v1/stats").1["dead_letters"].as_u64().unwrap()
}

fn stored_batches(cloud: &Cloud, device: &str) -> u64 {
    cloud.device(device)["batches"].as_u64().unwrap_or(0)
}

fn wait_batches(cloud: &Cloud, device: &str, n: u64) {
    wait_for(&format!("{n} batches of {device} stored"), T, || (stored_batches(cloud, device) == n).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {} stored", stored_batches(cloud, device)));
}

/// How often the cloud's ingest connection connected.
fn connects(cloud: &mut Cloud) -> usize {
    cloud.process.output().iter().filter(|l| l.contains("connected to the MQTT broker")).count()
}

#[test]
fn a_message_bigger_than_the_cloud_reads_never_cuts_its_mqtt_ingest_off() {
    // The field report's broker: no size limit at all (Mosquitto's default).
    let broker = Mosquitto::start().unwrap();
    let mut cloud = Cloud::start_mqtt(&broker, Vec::new()).unwrap();
    // 17 MiB on a batches topic, then 20 good batches of another device. The cloud announces its
    // Maximum Packet Size (max_body_bytes + 64 KiB) in its MQTT 5 CONNECT, so the broker drops the
    // big one for it instead of sending it: no dead letter, no reconnect.
    publish_size(&broker, "hostile", "backhaul/dev-big/batches", 17 << 20);
    publish_batches(&broker, "dev-good", 0..20);
    wait_batches(&cloud, "dev-good", 20);
    assert_eq!(connects(&mut cloud), 1, "never cut off:\n{}", cloud.process.output().join("\n"));
    assert_eq!(dead_letters(&cloud), 0, "the cloud never saw it");

    // Over max_body_bytes (1 MiB) but within the announced packet: it reaches the cloud, which
    // dead-letters it, naming the limit, like an HTTP body of that size.
    publish_size(&broker, "hostile", "backhaul/dev-big/batches", (1 << 20) + 1000);
    publish_batches(&broker, "dev-good", 20..30);
    wait_batches(&cloud, "dev-good", 30);
    wait_for("the oversized message dead-lettered", T, || (dead_letters(&cloud) == 1).then_some(())).unwrap();
    let logged = cloud.process.output().join("\n");
    assert!(logged.contains("over max_body_bytes"), "{logged}");

    // After a restart nothing is waiting that stops it: the session holds no oversized message.
    cloud.kill9_and_restart().unwrap();
    cloud.process.wait_for_any_line(T, |l| l.contains("subscribed to batches and status")).unwrap();
    publish_size(&broker, "hostile", "backhaul/dev-big/batches", 17 << 20);
    publish_batches(&broker, "dev-good", 30..50);
    wait_batches(&cloud, "dev-good", 50);
    assert_eq!(connects(&mut cloud), 1, "never cut off after the restart either");
    assert_eq!(dead_letters(&cloud), 1);
}

#[test]
fn the_deploy_broker_limits_stop_a_hostile_publisher_and_edges_cut_batches_to_fit() {
    let limits = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto/backhaul.conf"),
    )
    .unwrap();
    let max_packet: u64 = limits
        .lines()
        .find_map(|l| l.strip_prefix("max_packet_size "))
        .expect("deploy/ sets max_packet_size")
        .trim()
        .parse()
        .unwrap();
    let broker = Mosquitto::start_with(MosquittoOptions { extra: limits, ..Default::default() }).unwrap();
    let cloud = Cloud::start_mqtt(&broker, Vec::new()).unwrap();
    // The hostile publisher is disconnected by the broker: nothing reaches any subscriber.
    publish_size(&broker, "hostile", "backhaul/dev-big/batches", 17 << 20);
    wait_for("the broker to log the disconnect", T, || {
        broker.log().contains("Client hostile disconnected due to oversize packet").then_some(())
    })
    .unwrap();
    // An edge whose batches would not fit (10,000 detections, about 1.5 MB) learns the broker's
    // limit from its MQTT 5 CONNACK and cuts them to fit.
    let edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 20_000,
        max_detections: 10_000,
        max_age_ms: 60_000,
        ..Default::default()
    })
    .unwrap();
    let status = edge.wait_drained(20_000, T).unwrap();
    cloud.wait_detections(DEVICE, 20_000, T).unwrap();
    let learned = num(&status, "/link/max_payload_bytes");
    assert!(learned > 0 && learned <= max_packet, "learned {learned} from the broker's {max_packet}: {status}");
    assert_eq!(num(&status, "/link/link_ups"), 1, "never cut off: {status}");
    assert_eq!(dead_letters(&cloud), 0, "every piece the edge cut fits the cloud's max_body_bytes too");
}

/// An operator sees a lost broker (a new user found it invisible: `/health` stays 200 by design,
/// since HTTP ingest still works): `/metrics` has `backhaul_cloud_mqtt_connected`, 1 while the
/// ingest connection is up and 0 once the broker is gone, and 1 again after it is back.
#[test]
fn metrics_say_whether_the_mqtt_ingest_connection_is_up() {
    let mut broker = Mosquitto::start().unwrap();
    let cloud = Cloud::start_mqtt(&broker, Vec::new()).unwrap();
    let gauge = || -> Option<String> {
        let mut r = http()
            .get(cloud.url("/metrics"))
            .header("Authorization", &format!("Bearer {}", backhaul_tests::cloud::FLEET_KEY))
            .call()
            .ok()?;
        let text = r.body_mut().read_to_string().ok()?;
        text.lines().find(|l| l.starts_with("backhaul_cloud_mqtt_connected ")).map(str::to_owned)
    };
    let is = |v: &str| wait_for(&format!("mqtt_connected {v}"), T, || gauge().filter(|l| l.ends_with(v)).map(|_| ()));
    is(" 1").unwrap();
    broker.kill9().unwrap();
    is(" 0").unwrap();
    broker.restart().unwrap();
    is(" 1").unwrap();
}
