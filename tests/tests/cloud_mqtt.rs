//! `backhaul-cloud serve` ingesting over MQTT from a real Mosquitto: exactly once across both
//! adapters, a SIGKILL between commit and PUBACK, and a flood of malformed messages.

use std::time::Duration;

use backhaul_shared::{AckMessage, AckStatus, Topics};
use backhaul_tests::cloud::{get_json, http, post_batch, Cloud, DEVICE, DEVICE_KEY};
use backhaul_tests::mqtt::TestClient;
use backhaul_tests::{wait_until, wire_batch, Mosquitto};
use rumqttc::QoS;

const T: Duration = Duration::from_secs(30);

fn mqtt_cloud(broker: &Mosquitto, env: Vec<(String, String)>) -> Cloud {
    Cloud::start_mqtt(broker, env).unwrap()
}

async fn next_ack(client: &mut TestClient) -> AckMessage {
    client.next_ack(T).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_over_http_and_mqtt_twice_each_is_stored_once() {
    let broker = Mosquitto::start().unwrap();
    let cloud = mqtt_cloud(&broker, vec![]);
    let topics = Topics::default();
    let mut edge = TestClient::connect(broker.port(), "edge-sim", true);
    edge.connected(T).await.unwrap();
    edge.subscribe(&topics.acks(DEVICE)).await.unwrap();

    let batch = wire_batch(DEVICE, 0, 10);
    let bytes = batch.to_json();
    let id = batch.batch_id.to_string();
    let agent = http();

    edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, bytes.clone()).await.unwrap();
    let ack = next_ack(&mut edge).await;
    assert_eq!((ack.acks[0].batch_id, ack.acks[0].status), (batch.batch_id, AckStatus::Stored));

    let (status, body, _) =
        tokio::task::block_in_place(|| post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(&id), &bytes));
    assert_eq!(status, 200, "{body}");
    let (status, _, _) =
        tokio::task::block_in_place(|| post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(&id), &bytes));
    assert_eq!(status, 200);

    edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, bytes.clone()).await.unwrap();
    let ack = next_ack(&mut edge).await;
    assert_eq!(ack.acks[0].status, AckStatus::Duplicate);

    let stats = tokio::task::block_in_place(|| get_json(&agent, &cloud, "/api/v1/stats").1);
    assert_eq!(
        (stats["batches"].as_i64(), stats["detections"].as_i64(), stats["duplicates"].as_i64()),
        (Some(1), Some(10), Some(3)),
        "{stats}"
    );

    // A batch on another device's topic is rejected, with the reason.
    let stray = wire_batch("rpi-other", 0, 1);
    edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, stray.to_json()).await.unwrap();
    let ack = next_ack(&mut edge).await;
    assert_eq!(ack.acks[0].status, AckStatus::Rejected);
    assert!(ack.acks[0].reason.as_deref().unwrap_or("").contains("differs"), "{ack:?}");

    // An invalid batch whose batch_id can be read is rejected by name: the device stops resending.
    let mut invalid = serde_json::to_value(wire_batch(DEVICE, 5, 2)).unwrap();
    invalid["detections"][0]["rssi"] = 999.into();
    edge.client
        .publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, invalid.to_string().into_bytes())
        .await
        .unwrap();
    let ack = next_ack(&mut edge).await;
    assert_eq!(ack.acks[0].batch_id.to_string(), invalid["batch_id"].as_str().unwrap());
    assert_eq!(ack.acks[0].status, AckStatus::Rejected);
    assert!(ack.acks[0].reason.as_deref().unwrap_or("").contains("detections[0].rssi"), "{ack:?}");

    // Status messages reach the device table.
    edge.client
        .publish(topics.status(DEVICE), QoS::AtLeastOnce, true, br#"{"online":true,"queue_depth":7}"#.to_vec())
        .await
        .unwrap();
    let agent2 = agent.clone();
    tokio::task::block_in_place(|| {
        wait_until("the status to be stored", T, || {
            let devices = get_json(&agent2, &cloud, "/api/v1/devices").1;
            devices["devices"][0]["online"] == true && devices["devices"][0]["status"]["queue_depth"] == 7
        })
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_commit_and_puback_gives_a_duplicate_not_a_double() {
    let broker = Mosquitto::start().unwrap();
    let mut cloud = mqtt_cloud(&broker, vec![("BACKHAUL_FAILPOINT".into(), "before_puback".into())]);
    let topics = Topics::default();
    let mut edge = TestClient::connect(broker.port(), "edge-sim-kill", true);
    edge.connected(T).await.unwrap();
    edge.subscribe(&topics.acks(DEVICE)).await.unwrap();

    let batch = wire_batch(DEVICE, 0, 25);
    edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, batch.to_json()).await.unwrap();
    // Committed, parked before its PUBACK: kill it exactly there.
    tokio::task::block_in_place(|| cloud.process.wait_for_line(T, |l| l.contains("FAILPOINT before_puback"))).unwrap();
    let ack = next_ack(&mut edge).await;
    assert_eq!(ack.acks[0].status, AckStatus::Stored, "the ack is published after the commit");
    tokio::task::block_in_place(|| cloud.kill9_and_restart()).unwrap();

    // The broker redelivers to the same persistent session: a duplicate, acked again.
    let ack = next_ack(&mut edge).await;
    assert_eq!((ack.acks[0].batch_id, ack.acks[0].status), (batch.batch_id, AckStatus::Duplicate));
    let stats = tokio::task::block_in_place(|| get_json(&http(), &cloud, "/api/v1/stats").1);
    assert_eq!(
        (stats["batches"].as_i64(), stats["detections"].as_i64(), stats["duplicates"].as_i64()),
        (Some(1), Some(25), Some(1)),
        "{stats}"
    );
}

/// A malformed payload of kind `i % 7`.
fn malformed(i: usize, good: &[u8]) -> Vec<u8> {
    match i % 7 {
        0 => good[..good.len() / 2].to_vec(), // truncated JSON
        1 => br#"{"schema":1,"batch_id":42,"device_id":"rpi-test-01","seq":"x"}"#.to_vec(), // wrong types
        2 => format!(r#"{{"schema":1,"seq":1{}}}"#, "0".repeat(400)).into_bytes(), // a huge number
        3 => vec![0xff, 0xfe, b'{', 0xc3, 0x28], // invalid UTF-8
        4 => format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(), // deep nesting
        5 => b"".to_vec(),
        _ => {
            let mut v = serde_json::to_value(wire_batch(DEVICE, 7, 1)).unwrap();
            v["detections"][0]["rssi"] = 999.into(); // schema-invalid
            v.to_string().into_bytes()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_messages_interleaved_with_good_batches() {
    let broker = Mosquitto::start().unwrap();
    // Without the per-device rate limit: 2,000 posts of one device key in a second would be 429s
    // (tests/tests/rate_limits.rs), and this test is about what malformed input does.
    let cloud = mqtt_cloud(&broker, vec![("BACKHAUL_DEVICE_RATE_PER_SEC".into(), "0".into())]);
    let topics = Topics::default();
    let mut edge = TestClient::connect(broker.port(), "edge-sim-flood", true);
    edge.connected(T).await.unwrap();
    let agent = http();
    let (bad_mqtt, bad_http, every) = (1000usize, 1000usize, 50usize);
    let mut good = Vec::new();
    let template = wire_batch(DEVICE, 0, 2).to_json();
    // Two 10 MB strings, one each way. Over MQTT the broker drops it for the cloud (its MQTT 5
    // Maximum Packet Size is max_body_bytes + 64 KiB), so it is no dead letter.
    let ten_mb = format!(r#"{{"schema":1,"name":"{}"}}"#, "x".repeat(10 << 20)).into_bytes();
    edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, ten_mb.clone()).await.unwrap();
    let (status, _, _) =
        tokio::task::block_in_place(|| post_batch(&agent, &cloud, Some(DEVICE_KEY), Some("x"), &ten_mb));
    assert!(status == 413 || status == 0, "a 10 MB body is refused: {status}");
    let mut http_dead_letters = 0;
    for i in 0..bad_mqtt.max(bad_http) {
        if i < bad_mqtt {
            edge.client
                .publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, malformed(i, &template))
                .await
                .unwrap();
        }
        if i < bad_http {
            let body = malformed(i, &template);
            let (status, _, _) =
                tokio::task::block_in_place(|| post_batch(&agent, &cloud, Some(DEVICE_KEY), Some("x"), &body));
            assert_eq!(status, 400, "malformed body {i}");
            http_dead_letters += 1;
        }
        if i % every == 0 {
            let b = wire_batch(DEVICE, good.len() as u64, 3);
            if good.len() % 2 == 0 {
                edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, b.to_json()).await.unwrap();
            } else {
                let (status, body, _) = tokio::task::block_in_place(|| {
                    post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(&b.batch_id.to_string()), &b.to_json())
                });
                assert_eq!(status, 201, "{body}");
            }
            good.push(b);
        }
    }
    let expected_dead = (bad_mqtt + http_dead_letters) as i64;
    let agent2 = agent.clone();
    tokio::task::block_in_place(|| {
        wait_until("every message to be handled", Duration::from_secs(120), || {
            let s = get_json(&agent2, &cloud, "/api/v1/stats").1;
            s["batches"].as_i64() == Some(good.len() as i64) && s["dead_letters"].as_i64() == Some(expected_dead)
        })
    })
    .unwrap_or_else(|e| panic!("{e}: {}", get_json(&agent, &cloud, "/api/v1/stats").1));
    let stats = tokio::task::block_in_place(|| get_json(&agent, &cloud, "/api/v1/stats").1);
    assert_eq!(stats["detections"].as_i64(), Some(good.len() as i64 * 3), "{stats}");
    assert_eq!(tokio::task::block_in_place(|| get_json(&agent, &cloud, "/health").0), 200, "still up");
}
