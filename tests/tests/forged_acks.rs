//! No ack the edge did not ask for, and none it cannot verify (issue #16, item 5), against a real
//! Mosquitto as shipped before #16 (anonymous, no ACL), the real `backhaul-edge` and
//! `backhaul-cloud`:
//! - an attacker reads batch ids off `backhaul/{device}/batches` and publishes `stored` and
//!   `rejected` acks for them on the device's acks topic (unsigned, or signed with another key):
//!   before #16 the edge deleted 10 of 10 batches the cloud never stored, and dead-lettered 5 of
//!   10 on forged `rejected` acks. Now every batch stays queued and reaches the cloud once.
//! - a genuine ack replayed later is for a batch no longer in flight: ignored.
//! - the cloud signs each ack with the device's own key, or the fleet key for a device without one.
//! - status on a topic whose device_id no device may have creates no device.

use std::collections::BTreeSet;
use std::time::Duration;

use backhaul_shared::{Ack, AckMessage, AckStatus, BatchId, Topics};
use backhaul_tests::cloud::{get_json, http, Cloud, DEVICE, DEVICE_KEY, FLEET_KEY};
use backhaul_tests::edge::{num, Edge, EdgeOptions};
use backhaul_tests::mqtt::{ClientEvent, TestClient};
use backhaul_tests::{wire_batch, Mosquitto};
use rumqttc::QoS;

const T: Duration = Duration::from_secs(60);

fn forged(device: &str, batch_id: BatchId, status: AckStatus, key: Option<&[u8]>) -> Vec<u8> {
    let ack = match key {
        Some(key) => Ack::signed(device, batch_id, status, Some("forged".into()), key),
        None => Ack { batch_id, status, reason: Some("forged".into()), mac: None },
    };
    serde_json::to_vec(&AckMessage { acks: vec![ack] }).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_acks_on_an_open_broker_never_delete_or_dead_letter_a_batch() {
    let broker = Mosquitto::start().unwrap();
    let topics = Topics::default();
    let mut attacker = TestClient::connect(broker.port(), "attacker", true);
    attacker.connected(T).await.unwrap();
    attacker.subscribe(&topics.batches(DEVICE)).await.unwrap();

    // 10 batches of 50, and no cloud yet: nothing can be stored.
    let edge = tokio::task::block_in_place(|| {
        Edge::start(EdgeOptions { mqtt_url: broker.url(), count: 500, max_detections: 50, ..Default::default() })
    })
    .unwrap();
    let mut ids = BTreeSet::new();
    while ids.len() < 10 {
        let id = attacker
            .next_matching(T, "a batch on the device's topic", |e| match e {
                ClientEvent::Message { payload, .. } => {
                    serde_json::from_slice::<serde_json::Value>(&payload).ok()?["batch_id"].as_str()?.parse().ok()
                }
                _ => None,
            })
            .await
            .unwrap();
        ids.insert(id);
    }
    // Every kind of forgery for every batch: unsigned, signed with another device's or the fleet
    // key (the edge holds its own), signed with the right key for another device's topic.
    let acks_topic = topics.acks(DEVICE);
    let mut forgeries = 0;
    for &id in &ids {
        for status in [AckStatus::Stored, AckStatus::Duplicate, AckStatus::Rejected] {
            for payload in [
                forged(DEVICE, id, status, None),
                forged(DEVICE, id, status, Some(FLEET_KEY.as_bytes())),
                forged(DEVICE, id, status, Some(b"device-key-of-another-device-0123")),
                forged("rpi-other", id, status, Some(DEVICE_KEY.as_bytes())),
            ] {
                attacker.client.publish(&acks_topic, QoS::AtLeastOnce, false, payload).await.unwrap();
                forgeries += 1;
            }
        }
    }
    let status = tokio::task::block_in_place(|| {
        edge.wait_status("every forged ack ignored", T, |s| num(s, "/link/acks_ignored/unverified") >= forgeries)
    })
    .unwrap();
    assert_eq!(num(&status, "/sent/acked_batches"), 0, "no forged ack deleted a batch: {status}");
    assert_eq!(num(&status, "/sent/rejected"), 0, "no forged ack dead-lettered a batch: {status}");
    assert_eq!(num(&status, "/queue/dead_letters"), 0, "{status}");
    assert_eq!(num(&status, "/queue/pending") + num(&status, "/queue/in_flight"), 10, "{status}");
    let metrics = tokio::task::block_in_place(|| edge.metrics()).unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("backhaul_edge_acks_unverified_total")
            && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(forgeries as f64)),
        "{metrics}"
    );

    // The cloud comes: every batch reaches it once, acked with its MAC.
    attacker.subscribe(&acks_topic).await.unwrap();
    let cloud = tokio::task::block_in_place(|| Cloud::start_mqtt(&broker, vec![])).unwrap();
    tokio::task::block_in_place(|| edge.wait_drained(500, T)).unwrap();
    let stats = tokio::task::block_in_place(|| get_json(&http(), &cloud, "/api/v1/stats").1);
    assert_eq!((stats["batches"].as_i64(), stats["detections"].as_i64()), (Some(10), Some(500)), "{stats}");

    // A genuine ack, replayed: its batch is no longer in flight, so nothing happens.
    let genuine = attacker
        .next_matching(T, "a genuine ack", |e| match e {
            ClientEvent::Message { topic, payload, .. } if topic == acks_topic => {
                let m: AckMessage = serde_json::from_slice(&payload).ok()?;
                m.acks.iter().all(|a| a.verify(DEVICE, DEVICE_KEY.as_bytes()) && a.reason.is_none()).then_some(payload)
            }
            _ => None,
        })
        .await
        .unwrap();
    let before = tokio::task::block_in_place(|| edge.status()).unwrap();
    attacker.client.publish(&acks_topic, QoS::AtLeastOnce, false, genuine).await.unwrap();
    let after = tokio::task::block_in_place(|| {
        edge.wait_status("the replayed ack ignored", T, |s| {
            num(s, "/link/acks_ignored/not_in_flight") > num(&before, "/link/acks_ignored/not_in_flight")
        })
    })
    .unwrap();
    assert_eq!(num(&after, "/sent/acked_batches"), num(&before, "/sent/acked_batches"), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_signs_each_ack_with_the_devices_key_or_the_fleet_key() {
    let broker = Mosquitto::start().unwrap();
    let cloud = tokio::task::block_in_place(|| Cloud::start_mqtt(&broker, vec![])).unwrap();
    let topics = Topics::default();
    let mut device = TestClient::connect(broker.port(), "device-sim", true);
    device.connected(T).await.unwrap();
    for (device_id, key) in [(DEVICE, DEVICE_KEY), ("rpi-without-own-key", FLEET_KEY)] {
        device.subscribe(&topics.acks(device_id)).await.unwrap();
        let batch = wire_batch(device_id, 0, 3);
        device.client.publish(topics.batches(device_id), QoS::AtLeastOnce, false, batch.to_json()).await.unwrap();
        let ack = device.next_ack(T).await.unwrap();
        let ack = &ack.acks[0];
        assert_eq!((ack.batch_id, ack.status), (batch.batch_id, AckStatus::Stored));
        assert!(ack.verify(device_id, key.as_bytes()), "{device_id}: {ack:?}");
        assert!(!ack.verify(device_id, b"not-the-key-0123456789"), "{device_id}");
    }
    drop(cloud);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_on_a_topic_no_device_may_have_creates_no_device() {
    let broker = Mosquitto::start().unwrap();
    let cloud = tokio::task::block_in_place(|| Cloud::start_mqtt(&broker, vec![])).unwrap();
    let mut client = TestClient::connect(broker.port(), "prankster", true);
    client.connected(T).await.unwrap();
    let long = "x".repeat(65);
    let status = br#"{"online":true,"queue_depth":0,"uptime_s":99999}"#.to_vec();
    client.client.publish(format!("backhaul/{long}/status"), QoS::AtLeastOnce, true, status.clone()).await.unwrap();
    client.client.publish("backhaul/rpi-real/status", QoS::AtLeastOnce, true, status).await.unwrap();
    let agent = http();
    backhaul_tests::wait_until("the odd status dead-lettered", T, || {
        let (_, stats) = tokio::task::block_in_place(|| get_json(&agent, &cloud, "/api/v1/stats"));
        stats["dead_letters"].as_i64() >= Some(1)
    })
    .unwrap();
    let devices = backhaul_tests::wait_for("the good status stored", T, || {
        let (_, devices) = tokio::task::block_in_place(|| get_json(&agent, &cloud, "/api/v1/devices"));
        let list = devices["devices"].as_array()?.clone();
        list.iter().any(|d| d["device_id"] == "rpi-real").then_some(list)
    })
    .unwrap();
    assert!(devices.iter().all(|d| d["device_id"] != long.as_str()), "no phantom device: {devices:?}");
}
