//! Field faults of the cloud (issue #13, kinds 3 and 6): a graceful stop with MQTT on, and a task
//! that dies takes the process down with a non-zero exit instead of leaving ingest dead in a live
//! process. Real `backhaul-cloud` processes against a real Mosquitto.

use std::time::{Duration, Instant};

use backhaul_shared::{AckMessage, AckStatus, Topics};
use backhaul_tests::cloud::{get_json, http, Cloud, CloudOptions, DEVICE};
use backhaul_tests::mqtt::{ClientEvent, TestClient};
use backhaul_tests::{sigterm, wait_until, wire_batch, Mosquitto};
use rumqttc::QoS;

const T: Duration = Duration::from_secs(30);

fn mqtt_cloud(broker: &Mosquitto, env: Vec<(String, String)>) -> Cloud {
    Cloud::start_mqtt(broker, env).unwrap()
}

async fn next_ack(client: &mut TestClient) -> AckMessage {
    client.next_ack(T).await.unwrap()
}

fn stats(cloud: &Cloud) -> serde_json::Value {
    tokio::task::block_in_place(|| get_json(&http(), cloud, "/api/v1/stats").1)
}

/// Mosquitto's log lines about `client_id` (connection_messages is on in the test broker).
fn broker_lines(broker: &Mosquitto, client_id: &str) -> Vec<String> {
    let needle = format!("Client {client_id} ");
    broker.log().lines().filter(|l| l.contains(&needle)).map(str::to_owned).collect()
}

/// Issue #13, kind 6, the listed input: `serve` with `[mqtt]`, then SIGTERM. It used to panic in
/// the MQTT task ("all branches are disabled"), exit 1 and never send DISCONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_mqtt_on_exits_0_after_a_clean_disconnect() {
    let broker = Mosquitto::start().unwrap();
    let mut cloud = mqtt_cloud(&broker, vec![]);
    let topics = Topics::default();
    let mut edge = TestClient::connect(broker.port(), "edge-sim-term", true);
    edge.connected(T).await.unwrap();
    edge.subscribe(&topics.acks(DEVICE)).await.unwrap();
    let batch = wire_batch(DEVICE, 0, 5);
    edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, batch.to_json()).await.unwrap();
    assert_eq!(next_ack(&mut edge).await.acks[0].status, AckStatus::Stored);

    let started = Instant::now();
    sigterm(cloud.process.child().unwrap()).unwrap();
    let code = tokio::task::block_in_place(|| cloud.process.wait_exit(T)).unwrap();
    let output = cloud.process.output().join("\n");
    assert_eq!(code, Some(0), "exit code; output:\n{output}");
    assert!(started.elapsed() < Duration::from_secs(10), "stopped in {:?}", started.elapsed());
    assert!(!output.contains("panicked"), "{output}");
    // Both connections (ingest and acks) said DISCONNECT: the broker logs "disconnected", not
    // "closed its connection" (which is what a dropped socket gives, and would fire a last will).
    let client_id = format!("cloud-{}", cloud.port);
    for id in [client_id.clone(), format!("{client_id}-acks")] {
        tokio::task::block_in_place(|| {
            wait_until(&format!("mosquitto to log {id}'s disconnect"), T, || {
                broker_lines(&broker, &id).iter().any(|l| l.contains(&format!("Client {id} disconnected.")))
            })
        })
        .unwrap_or_else(|e| panic!("{e}; broker log:\n{}", broker.log()));
        let closed: Vec<_> =
            broker_lines(&broker, &id).into_iter().filter(|l| l.contains("closed its connection")).collect();
        assert!(closed.is_empty(), "{id} dropped its socket without DISCONNECT: {closed:?}");
    }
}

/// Kind 6, further: SIGTERM while a backlog is queued at the broker and messages are in hand.
/// What was in hand is committed and PUBACKed, the rest stays at the broker; after a restart
/// everything published is stored exactly once, and both stops exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_backlog_at_the_broker_loses_nothing_and_stores_each_batch_once() {
    let broker = Mosquitto::start().unwrap();
    // Without the per-device rate limit: 3,000 batches of one device at once are over its burst,
    // and this simulated edge never resends what a limit turned away (a real one does:
    // tests/tests/rate_limits.rs). What is tested here is the stop.
    let mut cloud = mqtt_cloud(&broker, vec![("BACKHAUL_DEVICE_RATE_PER_SEC".into(), "0".into())]);
    let topics = Topics::default();
    let mut edge = TestClient::connect(broker.port(), "edge-sim-backlog", true);
    edge.connected(T).await.unwrap();
    edge.subscribe(&topics.acks(DEVICE)).await.unwrap();
    // Enough that the stop finds a backlog however fast the cloud stores (300 were all stored
    // before the stop took effect once batches were acked with one row each, issue #15).
    let n = 3_000u64;
    for seq in 0..n {
        let b = wire_batch(DEVICE, seq, 20);
        edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, b.to_json()).await.unwrap();
    }
    // Stop in the middle of the stream: after the first ack, while the rest is in hand or queued.
    next_ack(&mut edge).await;
    sigterm(cloud.process.child().unwrap()).unwrap();
    let code = tokio::task::block_in_place(|| cloud.process.wait_exit(T)).unwrap();
    assert_eq!(code, Some(0), "exit code; output:\n{}", cloud.process.output().join("\n"));
    let stored_at_stop = {
        tokio::task::block_in_place(|| cloud.restart_with(&[])).unwrap();
        tokio::task::block_in_place(|| {
            cloud.process.wait_for_any_line(T, |l| l.contains("subscribed to batches and status"))
        })
        .unwrap();
        stats(&cloud)["batches"].as_i64().unwrap_or(-1)
    };
    let agent = http();
    tokio::task::block_in_place(|| {
        wait_until("every batch to be stored after the restart", Duration::from_secs(60), || {
            get_json(&agent, &cloud, "/api/v1/stats").1["batches"].as_u64() == Some(n)
        })
    })
    .unwrap_or_else(|e| panic!("{e}: {}", stats(&cloud)));
    let s = stats(&cloud);
    assert_eq!((s["batches"].as_u64(), s["detections"].as_u64()), (Some(n), Some(n * 20)), "{s}");
    eprintln!("stored before the stop: {stored_at_stop} of {n}; duplicates absorbed: {}", s["duplicates"]);
    assert!(stored_at_stop < n as i64, "the stop came while a backlog was left (else the test proves little)");

    sigterm(cloud.process.child().unwrap()).unwrap();
    assert_eq!(tokio::task::block_in_place(|| cloud.process.wait_exit(T)).unwrap(), Some(0));
}

/// Issue #13, kind 3: a panic in the MQTT event loop task used to leave the process up with ingest
/// dead. Now the process exits non-zero at once, saying what died; after a restart the message the
/// dead task held is redelivered and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_mqtt_event_loop_task_ends_the_process_non_zero_and_promptly() {
    let broker = Mosquitto::start().unwrap();
    let mut cloud = mqtt_cloud(&broker, vec![("BACKHAUL_FAILPOINT".into(), "panic:mqtt-poller".into())]);
    let topics = Topics::default();
    let mut edge = TestClient::connect(broker.port(), "edge-sim-panic", true);
    edge.connected(T).await.unwrap();
    edge.subscribe(&topics.acks(DEVICE)).await.unwrap();
    let batch = wire_batch(DEVICE, 0, 7);
    edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, batch.to_json()).await.unwrap();
    let started = Instant::now();
    let code = tokio::task::block_in_place(|| cloud.process.wait_exit(Duration::from_secs(10))).unwrap();
    let took = started.elapsed();
    let output = cloud.process.output().join("\n");
    assert!(matches!(code, Some(c) if c != 0), "exit code {code:?}; output:\n{output}");
    assert!(took < Duration::from_secs(8), "exited after {took:?}");
    assert!(output.contains("event loop panicked: FAILPOINT panic:mqtt-poller"), "says what died:\n{output}");
    eprintln!("exit code {code:?} {took:?} after the message that triggered the panic");

    tokio::task::block_in_place(|| cloud.kill9_and_restart()).unwrap();
    let ack = next_ack(&mut edge).await;
    assert_eq!((ack.acks[0].batch_id, ack.acks[0].status), (batch.batch_id, AckStatus::Stored));
    let s = stats(&cloud);
    assert_eq!((s["batches"].as_i64(), s["detections"].as_i64()), (Some(1), Some(7)), "{s}");
}

/// Kind 3, further: the other long-lived tasks. A panic in the MQTT ack connection's loop, in the
/// MQTT worker, or in the watchdog task (HTTP only, no MQTT at all) ends the process non-zero too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_any_long_lived_task_ends_the_process_non_zero() {
    let topics = Topics::default();
    for task in ["mqtt-acks", "mqtt-worker", "watchdog"] {
        // A broker each: the shared subscription would hand messages to the dead cloud's session.
        let broker = Mosquitto::start().unwrap();
        let mut env = vec![("BACKHAUL_FAILPOINT".to_owned(), format!("panic:{task}"))];
        // Kept until the end: dropping the client stops its event loop, maybe before the publish.
        let mut edge = None;
        let mut cloud = if task == "watchdog" {
            // The watchdog task runs under systemd's watchdog only (its pings are no-ops here).
            env.push(("WATCHDOG_USEC".into(), "200000".into()));
            Cloud::start(CloudOptions { env, ..Default::default() }).unwrap()
        } else {
            let cloud = mqtt_cloud(&broker, env);
            let client = edge.insert(TestClient::connect(broker.port(), &format!("edge-sim-{task}"), true));
            client.connected(T).await.unwrap();
            let b = wire_batch(DEVICE, 0, 1);
            client.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, b.to_json()).await.unwrap();
            cloud
        };
        let started = Instant::now();
        let code = tokio::task::block_in_place(|| cloud.process.wait_exit(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{task}: {e}; output:\n{}", cloud.process.output().join("\n")));
        let output = cloud.process.output().join("\n");
        assert!(matches!(code, Some(c) if c != 0), "{task}: exit code {code:?}; output:\n{output}");
        assert!(started.elapsed() < Duration::from_secs(8), "{task}: exited after {:?}", started.elapsed());
        assert!(output.contains(&format!("panicked: FAILPOINT panic:{task}")), "{task}: says what died:\n{output}");
        drop(edge);
    }
}

/// Once the restarted cloud is subscribed, publishes one more batch of the test device and waits
/// for its ack: whatever the broker had to redeliver came before it.
async fn after_a_marker(cloud: &mut Cloud, edge: &mut TestClient, topics: &Topics) {
    tokio::task::block_in_place(|| cloud.process.wait_for_any_line(T, |l| l.contains("subscribed to batches")))
        .unwrap();
    edge.subscribe(&topics.acks(DEVICE)).await.unwrap();
    let marker = wire_batch(DEVICE, 1000, 1);
    edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, marker.to_json()).await.unwrap();
    edge.next_matching(T, "the marker's ack", |e| match e {
        ClientEvent::Message { topic, payload, .. } if topic.ends_with("/acks") => {
            let ack: AckMessage = serde_json::from_slice(&payload).ok()?;
            (ack.acks[0].batch_id == marker.batch_id).then_some(())
        }
        _ => None,
    })
    .await
    .unwrap();
}

/// A valid RFC 3339 time that is past year 9999 once in UTC (issue #14).
const PAST_9999: &str = "9999-12-31T23:59:59-01:00";

/// Issue #14, kind 1: that time used to panic the parser, kill the MQTT task, and after every
/// restart the broker redelivered it and ingest died again. Now: the poison on
/// `backhaul/dev-a/batches` is dead-lettered naming its field, the 40 good batches of another
/// device behind it are all stored, and the same body over HTTP gets a 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_past_year_9999_is_dead_lettered_and_the_batches_behind_it_are_stored() {
    let broker = Mosquitto::start().unwrap();
    let mut cloud = mqtt_cloud(&broker, vec![]);
    let topics = Topics::default();
    let mut edge = TestClient::connect(broker.port(), "edge-sim-poison", true);
    edge.connected(T).await.unwrap();
    edge.subscribe(&topics.acks("dev-a")).await.unwrap();
    let mut poison = serde_json::to_value(wire_batch("dev-a", 0, 2)).unwrap();
    poison["timestamp"] = PAST_9999.into();
    let poison = poison.to_string().into_bytes();
    edge.client.publish(topics.batches("dev-a"), QoS::AtLeastOnce, false, poison.clone()).await.unwrap();
    for seq in 0..40 {
        let b = wire_batch(DEVICE, seq, 3);
        edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, b.to_json()).await.unwrap();
    }
    let ack = next_ack(&mut edge).await;
    assert_eq!(ack.acks[0].status, AckStatus::Rejected, "dev-a is told: {ack:?}");
    assert!(ack.acks[0].reason.as_deref().unwrap_or("").contains("`timestamp`"), "{ack:?}");
    let agent = http();
    tokio::task::block_in_place(|| {
        wait_until("the 40 good batches and the dead letter", T, || {
            let s = get_json(&agent, &cloud, "/api/v1/stats").1;
            s["batches"].as_i64() == Some(40) && s["dead_letters"].as_i64() == Some(1)
        })
    })
    .unwrap_or_else(|e| panic!("{e}: {}", stats(&cloud)));
    assert_eq!(tokio::task::block_in_place(|| get_json(&agent, &cloud, "/health").0), 200, "still up");
    assert!(cloud.process.output().iter().all(|l| !l.contains("panicked")));

    // The same body over HTTP, and the same time in a detection: 400 naming the field.
    let id = serde_json::from_slice::<serde_json::Value>(&poison).unwrap()["batch_id"].as_str().unwrap().to_owned();
    let (status, body, _) = tokio::task::block_in_place(|| {
        backhaul_tests::cloud::post_batch(&agent, &cloud, Some(backhaul_tests::cloud::FLEET_KEY), Some(&id), &poison)
    });
    assert_eq!(status, 400, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["field"], "timestamp", "{body}");
    let mut in_detection = serde_json::to_value(wire_batch("dev-a", 1, 2)).unwrap();
    in_detection["detections"][1]["timestamp"] = PAST_9999.into();
    let id = in_detection["batch_id"].as_str().unwrap().to_owned();
    let (status, body, _) = tokio::task::block_in_place(|| {
        backhaul_tests::cloud::post_batch(
            &agent,
            &cloud,
            Some(backhaul_tests::cloud::FLEET_KEY),
            Some(&id),
            in_detection.to_string().as_bytes(),
        )
    });
    assert_eq!(status, 400, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["field"], "detections[1].timestamp");

    // Nothing is redelivered after a restart: the poison was PUBACKed (41: the marker batch).
    tokio::task::block_in_place(|| cloud.kill9_and_restart()).unwrap();
    after_a_marker(&mut cloud, &mut edge, &topics).await;
    let s = stats(&cloud);
    assert_eq!(
        (s["batches"].as_i64(), s["dead_letters"].as_i64(), s["panics"].as_i64()),
        (Some(41), Some(3), Some(0)),
        "{s}"
    );
}

/// Issue #14, kind 2: a panic while handling one MQTT message costs that message only. It is
/// dead-lettered with the reason, refused to its device, counted in `panics`, PUBACKed; the
/// messages behind it are stored and the process stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_handling_one_message_dead_letters_it_and_ingest_goes_on() {
    let broker = Mosquitto::start().unwrap();
    let mut cloud = mqtt_cloud(&broker, vec![("BACKHAUL_FAILPOINT".into(), "panic:mqtt-message".into())]);
    let topics = Topics::default();
    let mut edge = TestClient::connect(broker.port(), "edge-sim-msg-panic", true);
    edge.connected(T).await.unwrap();
    edge.subscribe(&topics.acks(DEVICE)).await.unwrap();
    let first = wire_batch(DEVICE, 0, 4);
    edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, first.to_json()).await.unwrap();
    let ack = next_ack(&mut edge).await;
    assert_eq!((ack.acks[0].batch_id, ack.acks[0].status), (first.batch_id, AckStatus::Rejected));
    assert!(ack.acks[0].reason.as_deref().unwrap_or("").contains("panicked"), "{ack:?}");
    for seq in 1..=20 {
        let b = wire_batch(DEVICE, seq, 4);
        edge.client.publish(topics.batches(DEVICE), QoS::AtLeastOnce, false, b.to_json()).await.unwrap();
    }
    let agent = http();
    tokio::task::block_in_place(|| {
        wait_until("the 20 batches behind the panic", T, || {
            get_json(&agent, &cloud, "/api/v1/stats").1["batches"].as_i64() == Some(20)
        })
    })
    .unwrap_or_else(|e| panic!("{e}: {}", stats(&cloud)));
    let s = stats(&cloud);
    assert_eq!((s["dead_letters"].as_i64(), s["panics"].as_i64()), (Some(1), Some(1)), "{s}");
    assert_eq!(tokio::task::block_in_place(|| get_json(&agent, &cloud, "/health").0), 200, "still up");
    // PUBACKed: a restart does not bring it back.
    tokio::task::block_in_place(|| cloud.kill9_and_restart()).unwrap();
    after_a_marker(&mut cloud, &mut edge, &topics).await;
    let s = stats(&cloud);
    assert_eq!((s["batches"].as_i64(), s["panics"].as_i64()), (Some(21), Some(1)), "{s}");
}
