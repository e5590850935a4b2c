//! The broker configuration shipped in `deploy/mosquitto/acl` (issue #16, item 4), enforced by a
//! real Mosquitto with per-device logins, with the real `backhaul-cloud` and `backhaul-edge`:
//! - the edge and the cloud work under it (batches, status, acks);
//! - device A cannot publish batches or status as B, cannot read B's acks or batches, and cannot
//!   forge acks for B;
//! - Mosquitto 2.0's acl_file checks reads when it delivers, not when a client subscribes: a
//!   device that joins the cloud's shared subscription takes a share of the batches, which the
//!   broker then does not deliver to it; the edges' resends after `ack_timeout` bring every batch
//!   to the cloud, later. Nothing is lost.

use std::path::{Path, PathBuf};
use std::time::Duration;

use backhaul_shared::{AckMessage, Topics};
use backhaul_tests::cloud::{get_json, http, Cloud, CloudOptions, FLEET_KEY};
use backhaul_tests::edge::{Edge, EdgeOptions};
use backhaul_tests::mqtt::{ClientEvent, TestClient};
use backhaul_tests::{wait_for, wire_batch, Mosquitto, MosquittoOptions};
use rumqttc::QoS;

const T: Duration = Duration::from_secs(60);

fn acl_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto/acl")
}

/// A broker with the shipped ACL and a password file holding the cloud's and three devices' logins.
fn acl_broker(dir: &Path) -> Mosquitto {
    let passwd = dir.join("passwd");
    for (i, (user, password)) in
        [("backhaul-cloud", "pw-cloud"), ("dev-a", "pw-a"), ("dev-b", "pw-b"), ("dev-edge", "pw-edge")]
            .into_iter()
            .enumerate()
    {
        let mut args = vec!["-b"];
        if i == 0 {
            args.push("-c");
        }
        let passwd = passwd.to_str().unwrap();
        args.extend([passwd, user, password]);
        let out = std::process::Command::new("mosquitto_passwd").args(&args).output().unwrap();
        assert!(out.status.success(), "mosquitto_passwd: {out:?}");
    }
    Mosquitto::start_with(MosquittoOptions {
        require_login: true,
        max_queued_messages: 1000,
        extra: format!("password_file {}\nacl_file {}\n", passwd.display(), acl_file().display()),
        ..Default::default()
    })
    .unwrap()
}

fn cloud(broker: &Mosquitto) -> Cloud {
    let mut cloud = Cloud::start(CloudOptions {
        mqtt_url: Some(broker.url()),
        mqtt_extra: "username = \"backhaul-cloud\"".into(),
        env: vec![("BACKHAUL_MQTT_PASSWORD".into(), "pw-cloud".into())],
        ..Default::default()
    })
    .unwrap();
    cloud.process.wait_for_any_line(T, |l| l.contains("subscribed to batches and status")).unwrap();
    cloud
}

#[test]
fn the_real_edge_and_cloud_work_under_the_shipped_acl() {
    let dir = tempfile::tempdir().unwrap();
    let broker = acl_broker(dir.path());
    let cloud = cloud(&broker);
    let edge = Edge::start(EdgeOptions {
        device_id: "dev-edge".into(),
        mqtt_url: broker.url(),
        count: 300,
        mqtt: "username = \"dev-edge\"".into(),
        env: vec![("BACKHAUL_MQTT_PASSWORD".into(), "pw-edge".into())],
        ..Default::default()
    })
    .unwrap();
    edge.wait_drained(300, T).unwrap();
    cloud.wait_detections("dev-edge", 300, T).unwrap();
    // The retained status got through as well.
    wait_for("the edge's status at the cloud", T, || {
        let (_, devices) = get_json(&http(), &cloud, "/api/v1/devices");
        devices["devices"].as_array()?.iter().find(|d| d["device_id"] == "dev-edge" && d["online"] == true).cloned()
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_a_cannot_publish_as_b_read_bs_acks_or_forge_acks_for_b() {
    let dir = tempfile::tempdir().unwrap();
    let broker = acl_broker(dir.path());
    let cloud = tokio::task::block_in_place(|| cloud(&broker));
    let topics = Topics::default();

    let mut b = TestClient::connect_as(broker.port(), "dev-b", true, Some(("dev-b", "pw-b")));
    b.connected(T).await.unwrap();
    b.subscribe(&topics.acks("dev-b")).await.unwrap();

    let mut a = TestClient::connect_as(broker.port(), "dev-a", true, Some(("dev-a", "pw-a")));
    a.connected(T).await.unwrap();
    // Everything A may not read; and its own acks.
    for filter in [topics.acks("dev-b"), topics.batches("dev-b"), "backhaul/+/acks".into(), "backhaul/#".into()] {
        a.subscribe(&filter).await.unwrap();
    }
    a.subscribe(&topics.acks("dev-a")).await.unwrap();

    // A tries: a batch as B, B's status, and a forged ack for B.
    let as_b = wire_batch("dev-b", 0, 5);
    a.client.publish(topics.batches("dev-b"), QoS::AtLeastOnce, false, as_b.to_json()).await.unwrap();
    for device in ["dev-b", "dev-c"] {
        let status = br#"{"online":true,"queue_depth":0}"#.to_vec();
        a.client.publish(topics.status(device), QoS::AtLeastOnce, true, status).await.unwrap();
    }
    let forged = format!(r#"{{"acks":[{{"batch_id":"{}","status":"stored"}}]}}"#, backhaul_shared::BatchId::new());
    a.client.publish(topics.acks("dev-b"), QoS::AtLeastOnce, false, forged.into_bytes()).await.unwrap();

    // B sends its own batch: the only message on its acks topic is the cloud's signed ack.
    let own_b = wire_batch("dev-b", 1, 7);
    b.client.publish(topics.batches("dev-b"), QoS::AtLeastOnce, false, own_b.to_json()).await.unwrap();
    let ack = b
        .next_matching(T, "B's ack", |e| match e {
            ClientEvent::Message { payload, .. } => Some(serde_json::from_slice::<AckMessage>(&payload).unwrap()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(ack.acks.len(), 1);
    assert_eq!(ack.acks[0].batch_id, own_b.batch_id, "the forged ack never reached B");
    assert!(ack.acks[0].verify("dev-b", FLEET_KEY.as_bytes()));

    // A sends its own batch and gets its own ack; nothing of B's reached A before it.
    let own_a = wire_batch("dev-a", 0, 3);
    a.client.publish(topics.batches("dev-a"), QoS::AtLeastOnce, false, own_a.to_json()).await.unwrap();
    let mut seen_by_a = Vec::new();
    a.next_matching(T, "A's own ack", |e| match e {
        ClientEvent::Message { topic, payload, .. } => {
            let own = topic == topics.acks("dev-a");
            seen_by_a.push(topic);
            own.then_some(payload)
        }
        _ => None,
    })
    .await
    .unwrap();
    assert!(seen_by_a.iter().all(|t| !t.contains("dev-b")), "A read B's messages: {seen_by_a:?}");
    assert!(seen_by_a.iter().all(|t| !t.ends_with("/batches")), "{seen_by_a:?}");

    let (_, stats) = tokio::task::block_in_place(|| get_json(&http(), &cloud, "/api/v1/stats"));
    assert_eq!(stats["batches"].as_i64(), Some(2), "B's own and A's own; not A's batch as B: {stats}");
    assert_eq!(stats["detections"].as_i64(), Some(10), "{stats}");
    // (The cloud handles messages concurrently, so a status A published before its batch could in
    // principle still be on its way; the broker dropped it, so it never comes.)
    let (_, devices) = tokio::task::block_in_place(|| get_json(&http(), &cloud, "/api/v1/devices"));
    assert!(
        devices["devices"].as_array().unwrap().iter().all(|d| d["device_id"] != "dev-c"),
        "A's status for a device that does not exist made a phantom device: {devices}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_in_the_clouds_shared_group_delays_batches_but_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let broker = acl_broker(dir.path());
    let cloud = tokio::task::block_in_place(|| cloud(&broker));
    let mut a = TestClient::connect_as(broker.port(), "dev-a", true, Some(("dev-a", "pw-a")));
    a.connected(T).await.unwrap();
    a.subscribe("$share/ingest/backhaul/+/batches").await.unwrap();
    let edge = tokio::task::block_in_place(|| {
        Edge::start(EdgeOptions {
            device_id: "dev-edge".into(),
            mqtt_url: broker.url(),
            count: 400,
            max_detections: 50,
            mqtt: "username = \"dev-edge\"".into(),
            env: vec![("BACKHAUL_MQTT_PASSWORD".into(), "pw-edge".into())],
            ..Default::default()
        })
    })
    .unwrap();
    let status = tokio::task::block_in_place(|| edge.wait_drained(400, Duration::from_secs(120))).unwrap();
    tokio::task::block_in_place(|| cloud.wait_detections("dev-edge", 400, T)).unwrap();
    let (_, stats) = tokio::task::block_in_place(|| get_json(&http(), &cloud, "/api/v1/stats"));
    assert_eq!((stats["batches"].as_i64(), stats["detections"].as_i64()), (Some(8), Some(400)), "{stats}");
    assert!(a.events.try_recv().map_or(true, |e| !matches!(e, ClientEvent::Message { .. })), "A read a batch");
    eprintln!("resent while a device was in the shared group: {}", status["sent"]["resent"]);
}
