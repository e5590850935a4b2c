//! Field faults of the MQTT link (issue #13, kinds 1, 4 and 5), against a real Mosquitto and the
//! real `backhaul-edge` (and `backhaul-cloud` where something must be stored):
//! - a PUBACK is a delivery only when the broker did not refuse the publish (MQTT 5 reason codes);
//!   MQTT 3.1.1 with `ack = "broker"` cannot tell, so it is refused at start;
//! - a batch larger than the broker's maximum packet size never blocks the queue behind it;
//! - "connected but nothing is acked" is visible (`link.acks_overdue`), with resends backing off.

use std::path::Path;
use std::time::{Duration, Instant};

use backhaul_edge::queue::{Queue, QueueConfig};
use backhaul_tests::cloud::{Cloud, DEVICE};
use backhaul_tests::edge::{num, Edge, EdgeOptions};
use backhaul_tests::{presence_batch, run, Mosquitto, MosquittoOptions};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// A broker whose ACL (in `acl`) lets anonymous clients read everything under `backhaul/` and
/// publish nothing: the edge connects and subscribes to its acks, but its batches are denied.
///
/// `max_queued_messages` is Mosquitto's default: with 0 ("unlimited"), Mosquitto 2.0.11 drops an
/// MQTT 5 client's connection right after a PUBACK refusing a denied publish ("Bad socket
/// read/write"), which is a broker quirk, not what this test is about.
fn read_only_broker(acl: &Path) -> Mosquitto {
    std::fs::write(acl, "topic read backhaul/#\n").unwrap();
    Mosquitto::start_with(MosquittoOptions {
        max_queued_messages: 1000,
        extra: format!("acl_file {}\n", acl.display()),
        ..Default::default()
    })
    .unwrap()
}

fn last_error(status: &Value) -> String {
    status["link"]["last_error"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_publish_the_broker_acl_denies_is_a_refusal_not_a_delivery_in_both_ack_modes() {
    for ack in ["broker", "cloud"] {
        let dir = tempfile::tempdir().unwrap();
        let acl = dir.path().join("acl");
        let broker = read_only_broker(&acl);
        let edge = Edge::start(EdgeOptions {
            mqtt_url: broker.url(),
            count: 200,
            max_detections: 50,
            mqtt: format!("ack = \"{ack}\""),
            ..Default::default()
        })
        .unwrap();
        let status = edge
            .wait_status("the broker's refusal to show", T, |s| {
                num(s, "/sent/refused") >= 1 && last_error(s).contains("0x87")
            })
            .unwrap();
        assert!(last_error(&status).contains("ACL"), "the error says what to check: {status}");
        let status = edge.wait_status("all 4 batches produced", T, |s| num(s, "/produced/batches") == 4).unwrap();
        assert_eq!(num(&status, "/sent/acked_batches"), 0, "ack = {ack}: a refusal is no delivery: {status}");
        assert_eq!(num(&status, "/queue/dead_letters"), 0, "an ACL is not the batches' fault: {status}");
        assert_eq!(
            num(&status, "/queue/pending") + num(&status, "/queue/in_flight"),
            4,
            "ack = {ack}: every batch is still queued: {status}"
        );
        if ack == "broker" {
            // Fixed on the broker: sending resumes by itself (after its pause) and all is delivered
            // (to a persistent session standing for the cloud's).
            std::fs::write(&acl, "topic readwrite backhaul/#\n").unwrap();
            broker.reload().unwrap();
            broker.persistent_subscriber("cloud-away", "backhaul/+/batches").unwrap();
            edge.wait_drained(200, T).unwrap();
        }
    }
}

#[test]
fn with_ack_broker_and_nobody_subscribed_a_puback_saying_no_subscribers_deletes_nothing() {
    // MQTT 5 PUBACK reason 0x10: the broker took the publish and gave it to nobody. With
    // ack = "broker" deleting the batch would lose it (found by review).
    let broker = Mosquitto::start().unwrap();
    let edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 100,
        max_detections: 50,
        mqtt: "ack = \"broker\"".into(),
        ..Default::default()
    })
    .unwrap();
    let status = edge
        .wait_status("the refusal to show", T, |s| num(s, "/sent/refused") >= 1 && last_error(s).contains("0x10"))
        .unwrap();
    assert!(last_error(&status).contains("backhaul-cloud"), "{status}");
    assert_eq!(num(&status, "/sent/acked_batches"), 0, "{status}");
    // Once a session subscribes (the cloud's, away or not), everything is delivered.
    broker.persistent_subscriber("cloud-away", "backhaul/+/batches").unwrap();
    edge.wait_drained(100, T).unwrap();
}

#[test]
fn protocol_3_1_1_with_ack_broker_is_refused_at_start_and_says_why() {
    let edge = Edge::start(EdgeOptions { count: 10, ..Default::default() }).unwrap();
    let config = std::fs::read_to_string(edge.config_path()).unwrap();
    drop(edge);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        config.replace("[transport.mqtt]\n", "[transport.mqtt]\nprotocol = \"3.1.1\"\nack = \"broker\"\n"),
    )
    .unwrap();
    for command in ["check-config", "run"] {
        let (code, _, stderr) = run("backhaul-edge", &[command, "--config", path.to_str().unwrap()], &[]).unwrap();
        assert_ne!(code, 0, "{command} must refuse it: {stderr}");
        assert!(
            stderr.contains("transport.mqtt.ack") && stderr.contains("3.1.1") && stderr.contains("PUBACK"),
            "{command}: the error names the key and explains: {stderr}"
        );
    }
    // The same with MQTT 5, or with 3.1.1 and the cloud's acks, is fine.
    for (protocol, ack) in [("5", "broker"), ("3.1.1", "cloud")] {
        std::fs::write(
            &path,
            config.replace(
                "[transport.mqtt]\n",
                &format!("[transport.mqtt]\nprotocol = \"{protocol}\"\nack = \"{ack}\"\n"),
            ),
        )
        .unwrap();
        let key = [("BACKHAUL_API_KEY", backhaul_tests::cloud::DEVICE_KEY)];
        let (code, _, stderr) =
            run("backhaul-edge", &["check-config", "--config", path.to_str().unwrap()], &key).unwrap();
        assert_eq!(code, 0, "protocol {protocol}, ack {ack}: {stderr}");
    }
}

#[test]
fn connected_but_never_acked_shows_acks_overdue_and_resends_back_off() {
    // MQTT 3.1.1: the broker drops the denied publishes and PUBACKs them anyway, so only the
    // missing end-to-end acks can tell.
    let dir = tempfile::tempdir().unwrap();
    let broker = read_only_broker(&dir.path().join("acl"));
    let edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 200,
        max_detections: 50,
        mqtt: "protocol = \"3.1.1\"".into(),
        env: vec![("BACKHAUL_TRANSPORT__ACK_TIMEOUT".into(), "1s".into())],
        ..Default::default()
    })
    .unwrap();
    let status =
        edge.wait_status("acks overdue for all 4 batches", T, |s| num(s, "/link/acks_overdue/count") == 4).unwrap();
    assert_eq!(status["link"]["connected"], true, "{status}");
    let error = last_error(&status);
    assert!(error.contains("no ack") && error.contains("ACL") && error.contains("topic_prefix"), "{error}");
    assert!(status["link"]["acks_overdue"]["since"].is_string(), "{status}");
    let metrics = edge.metrics().unwrap();
    assert!(metrics.contains("backhaul_edge_link_acks_overdue_batches{device_id=\"rpi-test-01\"} 4"), "{metrics}");
    // Each batch is resent after 1 s, then 2 s, then 4 s: in the first 8 s after its first
    // send, 3 resends each, where a fixed timeout would have made 7.
    let started = Instant::now();
    let status = edge.wait_status("8 s of resends", T, |_| started.elapsed() >= Duration::from_secs(7)).unwrap();
    let resent = num(&status, "/sent/resent");
    assert!((4..=4 * 4).contains(&resent), "resends back off: {resent} resends of 4 batches in 8 s: {status}");
    assert_eq!(num(&status, "/queue/pending") + num(&status, "/queue/in_flight"), 4, "nothing deleted: {status}");
}

/// A broker that accepts packets of at most 10,000 bytes (and says so in its MQTT 5 CONNACK).
fn small_packet_broker() -> Mosquitto {
    Mosquitto::start_with(MosquittoOptions { extra: "max_packet_size 10000\n".into(), ..Default::default() }).unwrap()
}

fn mqtt_cloud(broker: &Mosquitto) -> Cloud {
    Cloud::start_mqtt(broker, Vec::new()).unwrap()
}

#[test]
fn a_queued_batch_over_the_brokers_max_packet_size_is_cut_to_fit_and_never_blocks_the_batches_behind_it() {
    let broker = small_packet_broker();
    let cloud = mqtt_cloud(&broker);
    // One 13 KB batch queued (as by an edge before the broker's limit was known), then ten
    // small batches from the source.
    let edge = Edge::start_with(
        EdgeOptions { mqtt_url: broker.url(), count: 50, max_detections: 5, ..Default::default() },
        |data_dir| {
            let queue = Queue::open(data_dir, QueueConfig::default())?;
            let big = presence_batch(DEVICE, 110);
            let size = backhaul_edge::pipeline::wire_size_bound(&big);
            anyhow::ensure!(size > 12_000, "the big batch is about {size} bytes");
            queue.enqueue(big)?;
            Ok(())
        },
    )
    .unwrap();
    // Everything arrives: the ten small batches and the big one's 110 detections, cut in two.
    let device = cloud.wait_detections(DEVICE, 50 + 110, Duration::from_secs(40)).unwrap();
    assert_eq!(num(&device, "/batches"), 10 + 2, "{device}");
    let status = edge
        .wait_status("the queue drained", T, |s| num(s, "/queue/pending") + num(s, "/queue/in_flight") == 0)
        .unwrap();
    assert_eq!(num(&status, "/queue/dead_letters"), 1, "the original is kept for inspection: {status}");
    assert_eq!(num(&status, "/sent/cut"), 1, "{status}");
    let error = last_error(&status);
    assert!(error.contains("maximum packet size") && error.contains("enqueued again as 2 batches"), "{error}");
    assert_eq!(num(&status, "/link/link_ups"), 1, "the connection was never dropped: {status}");
    assert!(num(&status, "/link/max_payload_bytes") < 10_000, "{status}");
    // The dead letter's reason names the limit (`queue export` shows it).
    let mut edge = edge;
    backhaul_tests::sigterm(edge.process.child().unwrap()).unwrap();
    assert_eq!(edge.process.wait_exit(T).unwrap(), Some(0));
    let data_dir = edge.data_dir();
    let (code, out, err) =
        run("backhaul-edge", &["queue", "export", "--data-dir", data_dir.to_str().unwrap()], &[]).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("maximum packet size"), "{out}");
}

#[test]
fn batches_are_cut_to_fit_the_brokers_max_packet_size_and_all_arrive() {
    let broker = small_packet_broker();
    let cloud = mqtt_cloud(&broker);
    let edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 2000,
        max_detections: 500,
        max_age_ms: 2000,
        ..Default::default()
    })
    .unwrap();
    let status = edge.wait_drained(2000, T).unwrap();
    let device = cloud.wait_detections(DEVICE, 2000, T).unwrap();
    assert_eq!(num(&device, "/batches"), num(&status, "/produced/batches"), "{device}\n{status}");
    assert!(num(&status, "/produced/batches") >= 2000 / 80, "cut smaller than 500 a batch: {status}");
    assert_eq!(num(&status, "/queue/dead_letters"), 0, "{status}");
    assert_eq!(num(&status, "/link/link_ups"), 1, "the connection was never dropped: {status}");
}

#[test]
fn with_mqtt_3_1_1_max_message_bytes_bounds_the_batches() {
    // MQTT 3.1.1 has no CONNACK limit: the configured one is what the edge goes by.
    let broker = small_packet_broker();
    let cloud = mqtt_cloud(&broker);
    let edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 1000,
        max_detections: 500,
        max_age_ms: 2000,
        mqtt: "protocol = \"3.1.1\"\nmax_message_bytes = \"8KiB\"".into(),
        ..Default::default()
    })
    .unwrap();
    edge.wait_drained(1000, T).unwrap();
    cloud.wait_detections(DEVICE, 1000, T).unwrap();
    let status = edge.status().unwrap();
    assert!(num(&status, "/link/max_payload_bytes") < 8192, "{status}");
    assert_eq!(num(&status, "/link/link_ups"), 1, "{status}");
}

#[test]
fn a_message_on_the_acks_topic_bigger_than_the_edge_reads_never_cuts_the_edge_off() {
    // Issue #14: a 2 MiB message on an edge's acks topic cut it off for good (it reads at most
    // 1 MiB, and the broker sent it again after every reconnect). With MQTT 5 the edge announces
    // its maximum packet size in its CONNECT, and the broker drops bigger messages for it. (With
    // protocol = "3.1.1" this test fails: the protocol cannot announce it.)
    let broker = Mosquitto::start().unwrap();
    let cloud = mqtt_cloud(&broker);
    let edge =
        Edge::start(EdgeOptions { mqtt_url: broker.url(), count: 2000, rate: 400.0, ..Default::default() }).unwrap();
    edge.wait_status("the edge connected", T, |s| s["link"]["connected"] == true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 2 << 20]).unwrap();
    let topic = format!("backhaul/{DEVICE}/acks");
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string(), "-q", "1", "-t", &topic, "-f"])
        .arg(&big)
        .status()
        .unwrap();
    assert!(status.success());
    let status = edge.wait_drained(2000, T).unwrap();
    cloud.wait_detections(DEVICE, 2000, T).unwrap();
    assert_eq!(num(&status, "/link/link_ups"), 1, "never cut off: {status}");
}

#[test]
fn with_a_broker_that_never_says_its_limit_a_batch_that_keeps_dropping_the_connection_is_cut() {
    // MQTT 3.1.1 and no max_message_bytes: the edge cannot know the broker's 10,000 bytes; the
    // connection drops after every send of the 13 KB batch. After 3 such drops in a row the
    // limit is learned, the batch is cut, and everything arrives.
    let broker = small_packet_broker();
    let cloud = mqtt_cloud(&broker);
    let edge = Edge::start_with(
        EdgeOptions {
            mqtt_url: broker.url(),
            count: 50,
            max_detections: 5,
            mqtt: "protocol = \"3.1.1\"".into(),
            ..Default::default()
        },
        |data_dir| {
            let queue = Queue::open(data_dir, QueueConfig::default())?;
            queue.enqueue(presence_batch(DEVICE, 110))?;
            Ok(())
        },
    )
    .unwrap();
    cloud.wait_detections(DEVICE, 50 + 110, T).unwrap();
    let status = edge
        .wait_status("the queue drained", T, |s| num(s, "/queue/pending") + num(s, "/queue/in_flight") == 0)
        .unwrap();
    assert_eq!(num(&status, "/sent/cut"), 1, "{status}");
    assert_eq!(num(&status, "/queue/dead_letters"), 1, "{status}");
    assert!(last_error(&status).contains("learned"), "{status}");
    let learned = num(&status, "/link/max_payload_bytes");
    assert!((10_000..13_700).contains(&learned), "learned below the batch that failed: {status}");
}
