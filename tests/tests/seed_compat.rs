//! Seed compatibility (issue #20), end to end: the deployed senders' own payload shapes, from the
//! issue's text, into the real `backhaul-cloud` (SQLite) over HTTP and over a real Mosquitto with
//! `[compat]` on; each stored value is read back through the API, and resends are stored once.

use std::time::Duration;

use backhaul_tests::cloud::{get_json, http, post_batch, Cloud, CloudOptions, DEVICE, DEVICE_KEY, FLEET_KEY};
use backhaul_tests::mqtt::TestClient;
use backhaul_tests::{wait_for, Mosquitto};
use rumqttc::QoS;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// The BLE presence agent's HTTP body: no schema, batch_id, seq; times with a UTC offset.
fn agent_body(device: &str, first: u32, n: u32) -> Value {
    json!({
        "device_id": device,
        "detections": (first..first + n).map(|i| json!({
            "device_hash": format!("{i:016x}"),
            "rssi": -40 - (i % 50) as i32,
            "zone": (["near", "medium", "far"][i as usize % 3]),
            "timestamp": format!("2026-11-30T11:{:02}:{:02}.5+01:00", (i / 60) % 60, i % 60),
        })).collect::<Vec<_>>(),
    })
}

fn detections(cloud: &Cloud, device: &str) -> Vec<Value> {
    let (code, body) = get_json(&http(), cloud, &format!("/api/v1/detections?device_id={device}&limit=1000"));
    assert_eq!(code, 200, "{body}");
    body["detections"].as_array().unwrap().clone()
}

fn compat_cloud(broker: &Mosquitto) -> Cloud {
    let mut cloud = Cloud::start(CloudOptions {
        mqtt_url: Some(broker.url()),
        extra: "[compat]\ntfg_topic = \"tfg/detections/raw\"\nthingy_topics = true\nfleet_topics = true\n".into(),
        ..Default::default()
    })
    .unwrap();
    cloud.process.wait_for_any_line(T, |l| l.contains("subscribed to batches and status")).unwrap();
    cloud
}

#[test]
fn the_agents_keyless_http_post_is_stored_once_in_utc_with_and_without_an_idempotency_key() {
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let agent = http();
    // The agent checks /health first and expects 200.
    assert_eq!(agent.get(cloud.url("/health")).call().unwrap().status().as_u16(), 200);
    let body = agent_body(DEVICE, 0, 3).to_string();
    // Without an API key: refused, nothing stored.
    let (code, answer, _) = post_batch(&agent, &cloud, None, None, body.as_bytes());
    assert_eq!(code, 401, "{answer}");
    // With the device's key, no Idempotency-Key: stored (201), then the resend is a duplicate (200).
    let (code, answer, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), None, body.as_bytes());
    assert_eq!(code, 201, "{answer}");
    let first: Value = serde_json::from_str(&answer).unwrap();
    let derived = first["batch_id"].as_str().unwrap().to_owned();
    assert_eq!(derived.len(), 36, "a UUID: {derived}");
    assert_eq!(&derived[14..15], "8", "version 8 (derived): {derived}");
    let (code, answer, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), None, body.as_bytes());
    assert_eq!((code, serde_json::from_str::<Value>(&answer).unwrap()["status"].clone()), (200, json!("duplicate")));
    // The same detections spelled in UTC are the same batch.
    let mut utc: Value = serde_json::from_str(&body).unwrap();
    for d in utc["detections"].as_array_mut().unwrap() {
        let t: backhaul_shared::Timestamp = d["timestamp"].as_str().unwrap().parse().unwrap();
        d["timestamp"] = json!(t.to_string());
    }
    let utc = utc.to_string();
    assert!(utc.contains("T10:00:00.5Z"), "{utc}");
    let (code, answer, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), None, utc.as_bytes());
    assert_eq!(code, 200, "{answer} for {utc}");
    // Each stored value, in UTC.
    let rows = detections(&cloud, DEVICE);
    assert_eq!(rows.len(), 3);
    let oldest = rows.iter().find(|r| r["device_hash"] == "0000000000000000").unwrap();
    assert_eq!(oldest["timestamp"], "2026-11-30T10:00:00.5Z");
    assert_eq!(
        (oldest["rssi"].clone(), oldest["zone"].clone(), oldest["kind"].clone()),
        (json!(-40), json!("near"), json!("presence"))
    );
    assert_eq!(oldest["batch_id"], derived.as_str());
    let r2 = rows.iter().find(|r| r["device_hash"] == "0000000000000002").unwrap();
    assert_eq!(
        (r2["rssi"].clone(), r2["zone"].clone(), r2["timestamp"].clone()),
        (json!(-42), json!("far"), json!("2026-11-30T10:00:02.5Z"))
    );
    // With an Idempotency-Key (a UUID, in capitals): stored under it, lowercased; sent again, a duplicate.
    let other = agent_body(DEVICE, 10, 2).to_string();
    let key = "6F9619FF-8B86-D011-B42D-00C04FC964FF";
    let (code, answer, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(key), other.as_bytes());
    assert_eq!(code, 201, "{answer}");
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["batch_id"], key.to_lowercase());
    let (code, _, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(&key.to_lowercase()), other.as_bytes());
    assert_eq!(code, 200);
    // A malformed key or body is a 400 naming the field; another device's body is a 403.
    let (code, answer, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), Some("not-an-id"), other.as_bytes());
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("ULID or a UUID"), "{answer}");
    let bad = other.replace("\"medium\"", "\"close\"");
    let (code, answer, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), None, bad.as_bytes());
    assert_eq!(code, 400, "{answer}");
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["field"], "detections[0].zone");
    let (code, _, _) =
        post_batch(&agent, &cloud, Some(DEVICE_KEY), None, agent_body("rpi-other", 0, 1).to_string().as_bytes());
    assert_eq!(code, 403);
    // A fleet key posts for any device.
    let (code, _, _) =
        post_batch(&agent, &cloud, Some(FLEET_KEY), None, agent_body("rpi-other", 0, 1).to_string().as_bytes());
    assert_eq!(code, 201);
    // A schema-1 batch whose batch_id is a UUID (a third-party sender).
    let mut b = serde_json::to_value(backhaul_tests::wire_batch(DEVICE, 5, 2)).unwrap();
    let uuid = "3d813cbb-47fb-32ba-91df-831e1593ac29";
    b["batch_id"] = json!(uuid);
    let (code, answer, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(uuid), b.to_string().as_bytes());
    assert_eq!(code, 201, "{answer}");
    let (code, _, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(uuid), b.to_string().as_bytes());
    assert_eq!(code, 200);
    assert_eq!(detections(&cloud, DEVICE).len(), 3 + 2 + 2);
    // Once a device runs backhaul-edge (it sent a status), a seed body in its name is refused.
    let r = agent
        .post(cloud.url("/api/v1/devices/rpi-other/status"))
        .header("X-API-Key", FLEET_KEY)
        .header("Content-Type", "application/json")
        .send(r#"{"online": true, "queue_depth": 0}"#.as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (code, answer, _) =
        post_batch(&agent, &cloud, Some(FLEET_KEY), None, agent_body("rpi-other", 5, 1).to_string().as_bytes());
    assert_eq!(code, 409, "{answer}");
    assert!(answer.contains("runs backhaul-edge"), "{answer}");
    // A batch that only forgot `schema` is told so, not stored under a derived key.
    let mut forgot = serde_json::to_value(backhaul_tests::wire_batch(DEVICE, 9, 1)).unwrap();
    forgot.as_object_mut().unwrap().remove("schema");
    let id = forgot["batch_id"].as_str().unwrap().to_owned();
    let (code, answer, _) = post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(&id), forgot.to_string().as_bytes());
    assert_eq!(code, 400, "{answer}");
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["field"], "schema", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_mqtt_senders_are_stored_once_each_value_as_sent() {
    let broker = tokio::task::block_in_place(|| Mosquitto::start().unwrap());
    let cloud = tokio::task::block_in_place(|| compat_cloud(&broker));
    let mut sender = TestClient::connect(broker.port(), "tfg-agent", true);
    sender.connected(T).await.unwrap();
    // A Pi that already runs backhaul-edge (it has sent a status): the shared seed topic cannot
    // write in its name.
    tokio::task::block_in_place(|| {
        let r = http()
            .post(cloud.url("/api/v1/devices/rpi-migrated/status"))
            .header("X-API-Key", FLEET_KEY)
            .header("Content-Type", "application/json")
            .send(r#"{"online": true, "queue_depth": 0}"#.as_bytes())
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    });
    sender
        .client
        .publish("tfg/detections/raw", QoS::AtLeastOnce, false, agent_body("rpi-migrated", 0, 2).to_string())
        .await
        .unwrap();
    // A heartbeat that is not JSON: a dead letter, and no device.
    sender.client.publish("rpi/junk-1/heartbeat", QoS::AtLeastOnce, false, "garbage").await.unwrap();

    // The agent over MQTT: 100 messages on the one topic, then the same 100 again (its RAM buffer
    // after a reconnect). Each message: 2 detections, with name, location and its send time.
    let message = |i: u32, sent: &str| {
        let mut m = agent_body("rpi-hall-02", i * 2, 2);
        m["name"] = json!("Hall");
        m["location"] = json!("Building B");
        m["timestamp"] = json!(sent);
        m.to_string()
    };
    for round in ["2026-11-30T12:00:00+01:00", "2026-11-30T12:05:00+01:00"] {
        for i in 0..100 {
            sender.client.publish("tfg/detections/raw", QoS::AtLeastOnce, false, message(i, round)).await.unwrap();
        }
    }
    // Thingy:52 updates: one without CO2, one with everything.
    sender
        .client
        .publish(
            "gw-lab/C0:98:E5:00:00:01/update",
            QoS::AtLeastOnce,
            false,
            r#"{"timestamp": "2026-11-30T11:30:00+01:00", "temp": 21.5, "humidity": 40, "window_open": false, "battery": 88}"#,
        )
        .await
        .unwrap();
    sender
        .client
        .publish(
            "gw-lab/C0:98:E5:00:00:02/update",
            QoS::AtLeastOnce,
            false,
            r#"{"timestamp": "2026-11-30T10:31:00Z", "temp": -5.25, "humidity": 90, "co2_ppm": 1200, "window_open": true, "battery": 3}"#,
        )
        .await
        .unwrap();
    // A fleet client: heartbeats every 500 ms (here, 20 at once) and a state report.
    for _ in 0..20 {
        sender
            .client
            .publish("rpi/robot-7/heartbeat", QoS::AtLeastOnce, false, r#"{"timestamp": "2026-11-30T10:00:00Z"}"#)
            .await
            .unwrap();
    }
    let state = r#"{"entity_id": 4000000000, "pose": {"x": -2147483648, "y": 2147483647, "angle": 270}, "velocity": {"vx": -12, "vy": 7}}"#;
    sender.client.publish("rpi/robot-7/state", QoS::AtLeastOnce, false, state).await.unwrap();
    // A broken message on a seed topic is a dead letter, not a stop.
    sender.client.publish("tfg/detections/raw", QoS::AtLeastOnce, false, "{\"device_id\": 1}").await.unwrap();

    tokio::task::block_in_place(|| {
        // The second round is counted as 100 duplicates (the counts are written every 5 s), and
        // nothing more is stored.
        wait_for("the resent round counted as duplicates", T, || {
            let (_, s) = get_json(&http(), &cloud, "/api/v1/stats");
            (s["duplicates"].as_u64() >= Some(100)).then_some(())
        })
        .unwrap();
        let hall = cloud.wait_detections("rpi-hall-02", 200, T).unwrap();
        assert_eq!(hall["batches"], 100, "100 messages sent twice: stored once each");
        assert_eq!(get_json(&http(), &cloud, "/api/v1/stats").1["duplicates"], 100);
        assert_eq!((hall["name"].clone(), hall["location"].clone()), (json!("Hall"), json!("Building B")));
        let rows = detections(&cloud, "rpi-hall-02");
        assert_eq!(rows.len(), 200);
        let r = rows.iter().find(|r| r["device_hash"] == format!("{:016x}", 61)).unwrap();
        assert_eq!(
            (r["rssi"].clone(), r["zone"].clone(), r["timestamp"].clone()),
            (json!(-51), json!("medium"), json!("2026-11-30T10:01:01.5Z"))
        );

        let gw = cloud.wait_detections("gw-lab", 2, T).unwrap();
        assert_eq!(gw["batches"], 2);
        let rows = detections(&cloud, "gw-lab");
        // The node address in lower case, as backhaul-edge writes it (one node, one history).
        let n1 = rows.iter().find(|r| r["node"] == "c0:98:e5:00:00:01").unwrap();
        assert_eq!(n1["kind"], "sensor");
        assert_eq!(n1["timestamp"], "2026-11-30T10:30:00Z");
        assert_eq!(
            (n1["temp"].clone(), n1["humidity"].clone(), n1["window_open"].clone(), n1["battery"].clone()),
            (json!(21.5), json!(40), json!(false), json!(88))
        );
        assert!(n1.get("co2_ppm").is_none() && n1.get("rssi").is_none(), "absent stays absent: {n1}");
        let n2 = rows.iter().find(|r| r["node"] == "c0:98:e5:00:00:02").unwrap();
        assert_eq!(
            (n2["temp"].clone(), n2["co2_ppm"].clone(), n2["window_open"].clone(), n2["battery"].clone()),
            (json!(-5.25), json!(1200), json!(true), json!(3))
        );

        let robot = cloud.wait_detections("robot-7", 1, T).unwrap();
        assert_eq!(robot["online"], true, "{robot}");
        assert_eq!(robot["batches"], 1, "heartbeats store no batch: {robot}");
        let rows = detections(&cloud, "robot-7");
        assert_eq!(rows[0]["kind"], "telemetry");
        assert_eq!(rows[0]["entity_id"], 4_000_000_000u64);
        assert_eq!(
            rows[0]["fields"],
            json!({"pose.angle": 270.0, "pose.x": -2147483648.0, "pose.y": 2147483647.0, "velocity.vx": -12.0, "velocity.vy": 7.0})
        );

        let dead = wait_for("the broken message dead-lettered", T, || {
            let (_, v) = get_json(&http(), &cloud, "/api/v1/dead-letters");
            v["dead_letters"].as_array().and_then(|d| d.iter().find(|d| d["topic"] == "tfg/detections/raw").cloned())
        })
        .unwrap();
        assert!(dead["error"].as_str().unwrap().contains("device_id"), "{dead}");
        let (_, v) = get_json(&http(), &cloud, "/api/v1/dead-letters");
        let errors: Vec<String> =
            v["dead_letters"].as_array().unwrap().iter().map(|d| d["error"].as_str().unwrap().to_owned()).collect();
        assert!(errors.iter().any(|e| e.contains("`rpi-migrated` runs backhaul-edge")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("a heartbeat must be a JSON object")), "{errors:?}");
        assert_eq!(cloud.device("rpi-migrated")["detections"], 0);
        assert_eq!(cloud.device("junk-1"), Value::Null);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_alone_make_a_device_seen_and_online_and_the_seed_topics_are_off_by_default() {
    let broker = tokio::task::block_in_place(|| Mosquitto::start().unwrap());
    // [compat] off: a cloud takes none of the seed topics (its dead letters stay empty).
    let plain = tokio::task::block_in_place(|| Cloud::start_mqtt(&broker, Vec::new()).unwrap());
    let mut sender = TestClient::connect(broker.port(), "fleet-client", true);
    sender.connected(T).await.unwrap();
    sender.client.publish("rpi/robot-9/heartbeat", QoS::AtLeastOnce, false, "{}").await.unwrap();
    sender
        .client
        .publish("tfg/detections/raw", QoS::AtLeastOnce, false, agent_body("x", 0, 1).to_string())
        .await
        .unwrap();
    let compat = tokio::task::block_in_place(|| compat_cloud(&broker));
    for _ in 0..5 {
        sender.client.publish("rpi/robot-9/heartbeat", QoS::AtLeastOnce, false, "{}").await.unwrap();
    }
    // A flood of made-up client ids: at most NEW_DEVICES_PER_MINUTE become devices.
    for i in 0..80 {
        sender.client.publish(format!("rpi/flood-{i:02}/heartbeat"), QoS::AtLeastOnce, false, "{}").await.unwrap();
    }
    tokio::task::block_in_place(|| {
        let cap = backhaul_cloud::compat::NEW_DEVICES_PER_MINUTE as usize;
        let flood = wait_for("the flood's heartbeats handled", T, || {
            let (_, v) = get_json(&http(), &compat, "/api/v1/devices");
            let devices = v["devices"].as_array().unwrap().clone();
            let (_, dead) = get_json(&http(), &compat, "/api/v1/dead-letters?limit=1000");
            let refused = dead["dead_letters"].as_array().unwrap().len();
            (devices.len() + refused >= 81).then_some((devices, refused))
        })
        .unwrap();
        assert_eq!(flood.0.len(), cap, "robot-9 and {} flood ids: {:?}", cap - 1, flood.0.len());
        assert_eq!(flood.1, 81 - cap);
        let seen = wait_for("robot-9 seen by its heartbeats", T, || {
            let d = compat.device("robot-9");
            (d["online"] == true).then_some(d)
        })
        .unwrap();
        assert_eq!((seen["batches"].clone(), seen["detections"].clone()), (json!(0), json!(0)));
        assert_eq!(plain.device("robot-9"), Value::Null, "the plain cloud shares the database? it must not");
        let (_, v) = get_json(&http(), &plain, "/api/v1/dead-letters");
        assert_eq!(v["dead_letters"], json!([]), "a cloud without [compat] does not subscribe to the seed topics");
    });
}
