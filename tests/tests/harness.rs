//! The harness itself against a real Mosquitto: QoS 1 round trip of a schema-1 batch, and a client
//! that reconnects after the broker is killed with SIGKILL and restarted on the same port.

use std::time::Duration;

use backhaul_shared::{Batch, Limits, Topics};
use backhaul_tests::mqtt::{ClientEvent, TestClient};
use backhaul_tests::Mosquitto;
use rumqttc::QoS;

const T: Duration = Duration::from_secs(15);

fn sample_batch(seq: u64, detections: usize) -> Batch {
    backhaul_tests::wire_batch("rpi-test-01", seq, detections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_batch_round_trips_byte_identical_through_real_mosquitto() {
    let broker = Mosquitto::start().unwrap();
    let topics = Topics::default();

    let mut sub = TestClient::connect(broker.port(), "test-sub", true);
    sub.connected(T).await.unwrap();
    sub.subscribe(&topics.shared_batches_filter("ingest")).await.unwrap();

    let mut publisher = TestClient::connect(broker.port(), "test-pub", true);
    publisher.connected(T).await.unwrap();
    let batch = sample_batch(1, 50);
    let bytes = batch.to_json();
    publisher.client.publish(topics.batches("rpi-test-01"), QoS::AtLeastOnce, false, bytes.clone()).await.unwrap();
    publisher.next_matching(T, "PUBACK", |e| matches!(e, ClientEvent::PubAck(_)).then_some(())).await.unwrap();

    let (topic, payload) = sub
        .next_matching(T, "the batch", |e| match e {
            ClientEvent::Message { topic, payload, .. } => Some((topic, payload)),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(topic, "backhaul/rpi-test-01/batches");
    assert_eq!(payload, bytes, "payload must arrive byte-identical");
    assert_eq!(Batch::from_json(&payload, &Limits::default()).unwrap(), batch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_broker_is_killed_and_restarted() {
    let mut broker = Mosquitto::start().unwrap();
    let mut client = TestClient::connect(broker.port(), "test-reconnect", true);
    client.connected(T).await.unwrap();

    broker.kill9().unwrap();
    assert!(!broker.is_running());
    client
        .next_matching(T, "the client to notice the broker is gone", |e| {
            matches!(e, ClientEvent::Disconnected(_)).then_some(())
        })
        .await
        .unwrap();

    broker.restart().unwrap();
    client.connected(T).await.expect("the client reconnects to the restarted broker");

    // And the new connection works: a QoS 1 publish to itself comes back.
    client.subscribe("backhaul/selftest/batches").await.unwrap();
    client.client.publish("backhaul/selftest/batches", QoS::AtLeastOnce, false, b"ping".to_vec()).await.unwrap();
    let payload = client
        .next_matching(T, "the message after reconnect", |e| match e {
            ClientEvent::Message { payload, .. } => Some(payload),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(payload, b"ping");
}
