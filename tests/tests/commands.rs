//! Commands from the cloud to a running Pi (issue #18), end to end with a real Mosquitto, the real
//! `backhaul-cloud` (its HTTP API and its operator CLI) and the real `backhaul-edge`:
//! - a replay after a simulated cloud restore resends exactly the batches acked since T, with the
//!   service running; sent to a cloud that still has them, they count as duplicates;
//! - a command sent while the Pi is down runs once when it returns; a duplicated command runs once;
//!   a forged one never runs; `set_rate` survives a restart and `/status` and `check-config` say
//!   where the rate comes from;
//! - over HTTP the edge fetches its commands and answers them; keys are scoped: only a fleet key
//!   commands, a device key reads and answers only its own device's commands.

use std::path::Path;
use std::time::Duration;

use backhaul_shared::command::{CommandId, CommandMessage, Purpose, Signed};
use backhaul_shared::Topics;
use backhaul_tests::chaos::ledger_balances;
use backhaul_tests::cloud::{get_json, http, Cloud, CloudOptions, DEVICE, DEVICE_KEY, FLEET_KEY};
use backhaul_tests::edge::{num, Edge, EdgeOptions};
use backhaul_tests::mqtt::TestClient;
use backhaul_tests::{binary, wait_for, Mosquitto};
use rumqttc::QoS;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);

fn post_command(cloud: &Cloud, key: &str, device: &str, body: &Value) -> (u16, Value) {
    let mut r = http()
        .post(cloud.url(&format!("/api/v1/devices/{device}/commands")))
        .header("X-API-Key", key)
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .unwrap();
    let code = r.status().as_u16();
    (code, serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap_or(Value::Null))
}

fn get_with(cloud: &Cloud, key: &str, path: &str) -> (u16, Value) {
    let mut r = http().get(cloud.url(path)).header("X-API-Key", key).call().unwrap();
    let code = r.status().as_u16();
    (code, serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap_or(Value::Null))
}

/// Queues a command with the fleet key; returns its id.
fn command(cloud: &Cloud, body: Value) -> String {
    let (code, v) = post_command(cloud, FLEET_KEY, DEVICE, &body);
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["status"], "queued");
    v["command_id"].as_str().unwrap().to_owned()
}

/// Waits until the command is `done` or `failed`; returns it.
fn finished(cloud: &Cloud, id: &str) -> Value {
    finished_within(cloud, id, T)
}

fn finished_within(cloud: &Cloud, id: &str, timeout: Duration) -> Value {
    wait_for(&format!("command {id} answered"), timeout, || {
        let (_, v) = get_json(&http(), cloud, &format!("/api/v1/devices/{DEVICE}/commands/{id}"));
        matches!(v["status"].as_str(), Some("done" | "failed")).then_some(v)
    })
    .unwrap()
}

fn duplicates(cloud: &Cloud) -> u64 {
    get_json(&http(), cloud, "/api/v1/stats").1["duplicates"].as_u64().unwrap()
}

fn sqlite_files(dir: &Path) -> Vec<std::path::PathBuf> {
    ["ingest.db", "ingest.db-wal", "ingest.db-shm"].iter().map(|f| dir.join(f)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_a_replay_after_a_cloud_restore_resends_exactly_what_was_acked_since_t_with_the_service_running() {
    tokio::task::block_in_place(|| {
        let broker = Mosquitto::start().unwrap();
        let mut cloud = Cloud::start_mqtt(&broker, Vec::new()).unwrap();
        let mut edge =
            Edge::start(EdgeOptions { mqtt_url: broker.url(), count: 500, max_detections: 50, ..Default::default() })
                .unwrap();
        cloud.wait_detections(DEVICE, 500, T).unwrap();
        edge.wait_drained(500, T).unwrap();

        // The nightly backup: the database as it is now.
        let backup = tempfile::tempdir().unwrap();
        cloud
            .kill9_then(|dir| {
                for f in sqlite_files(dir).into_iter().filter(|f| f.exists()) {
                    std::fs::copy(&f, backup.path().join(f.file_name().unwrap()))?;
                }
                Ok(())
            })
            .unwrap();
        let batches_at_backup = cloud.device(DEVICE)["batches"].as_u64().unwrap();
        let since = backhaul_shared::Timestamp::now();
        wait_for("the clock to pass T", T, || (backhaul_shared::Timestamp::now() > since).then_some(())).unwrap();

        // More detections after the backup: 300 more, acked after T.
        let config = std::fs::read_to_string(edge.config_path()).unwrap();
        std::fs::write(edge.config_path(), config.replace("count = 500", "count = 800")).unwrap();
        // A clean stop (the acks are written: phase one is not sent again after T).
        edge.stop().unwrap();
        edge.restart().unwrap();
        cloud.wait_detections(DEVICE, 800, T).unwrap();
        edge.wait_drained(800, T).unwrap();
        let batches = cloud.device(DEVICE)["batches"].as_u64().unwrap();
        let after_t = batches - batches_at_backup;
        assert!(after_t >= 6, "{after_t}");

        // A replay to a cloud that has them all: exactly those batches again, as duplicates.
        let dups = duplicates(&cloud);
        let id = command(&cloud, json!({ "kind": "replay", "since": since.to_string() }));
        let c = finished(&cloud, &id);
        assert_eq!(c["status"], "done", "{c}");
        assert_eq!(c["result"]["requeued_batches"], after_t, "{c}");
        wait_for("the replayed batches counted as duplicates", T, || {
            (duplicates(&cloud) == dups + after_t).then_some(())
        })
        .unwrap();
        edge.wait_drained(800, T).unwrap();
        assert_eq!(cloud.device(DEVICE)["detections"], 800);

        // The cloud is restored from the backup: what came after it is gone from the cloud. A
        // replay since T brings it back, once, with the Pi's service running throughout.
        cloud
            .kill9_then(|dir| {
                for f in sqlite_files(dir) {
                    let _ = std::fs::remove_file(&f);
                    let saved = backup.path().join(f.file_name().unwrap());
                    if saved.exists() {
                        std::fs::copy(saved, &f)?;
                    }
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(cloud.device(DEVICE)["detections"], 500, "restored to the backup");
        let id = command(&cloud, json!({ "kind": "replay", "since": since.to_string() }));
        let c = finished(&cloud, &id);
        assert_eq!(c["result"]["requeued_batches"], after_t, "{c}");
        let d = cloud.wait_detections(DEVICE, 800, T).unwrap();
        assert_eq!(d["batches"], batches);
        assert_eq!(d["gaps"], 0, "{d}");
        let status = edge.status().unwrap();
        assert_eq!(num(&status, "/commands/run"), 2, "{status}");
    });
}

fn cli(cloud: &Cloud, args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary("backhaul-cloud").unwrap())
        .args(args)
        .args(["--url", &cloud.url("")])
        .env("BACKHAUL_API_KEY", FLEET_KEY)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_a_command_for_a_pi_that_is_down_runs_once_when_it_returns_and_never_twice() {
    let broker = Mosquitto::start().unwrap();
    let (cloud, mut edge) = tokio::task::block_in_place(|| {
        let cloud = Cloud::start_mqtt(&broker, Vec::new()).unwrap();
        let edge = Edge::start(EdgeOptions { mqtt_url: broker.url(), count: 100, ..Default::default() }).unwrap();
        cloud.wait_detections(DEVICE, 100, T).unwrap();
        edge.wait_drained(100, T).unwrap();
        (cloud, edge)
    });
    let id = tokio::task::block_in_place(|| {
        edge.kill9().unwrap();
        // The operator CLI, while the Pi is down.
        let out = cli(&cloud, &["command", DEVICE, "set-rate", "7", "--burst", "9"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let id = stdout.split_whitespace().nth(1).unwrap().to_owned();
        // Published to the broker, which keeps it in the Pi's persistent session.
        wait_for("the command published", T, || {
            let (_, v) = get_json(&http(), &cloud, &format!("/api/v1/devices/{DEVICE}/commands/{id}"));
            (v["status"] == "delivered").then_some(())
        })
        .unwrap();
        edge.restart().unwrap();
        // From the broker's persistent session, not a republish (that waits at least a minute).
        let c = finished_within(&cloud, &id, Duration::from_secs(30));
        assert_eq!(c["status"], "done", "{c}");
        assert_eq!(c["result"]["rate_per_sec"], 7);
        let s = edge.status().unwrap();
        assert_eq!((num(&s, "/rate/rate_per_sec"), num(&s, "/rate/burst")), (7, 9), "{s}");
        assert!(s["rate"]["source"].as_str().unwrap().contains(&id), "{s}");
        assert_eq!(num(&s, "/commands/run"), 1);
        id
    });

    // The same command delivered again (as the broker does after a lost PUBACK), and forgeries.
    let mut client = TestClient::connect(broker.port(), "operator-tool", true);
    client.connected(T).await.unwrap();
    let topic = Topics::default().commands(DEVICE);
    let message = CommandMessage {
        command_id: id.parse().unwrap(),
        command: json!({ "kind": "set_rate", "rate_per_sec": 7, "burst": 9 }),
    };
    let again = Signed::seal(&message, Purpose::Command, DEVICE, DEVICE_KEY.as_bytes());
    let forged_ping = Signed::seal(
        &CommandMessage { command_id: CommandId::new(), command: json!({ "kind": "ping" }) },
        Purpose::Command,
        DEVICE,
        b"not-the-device-key-0123456789",
    );
    let as_result = Signed::seal(&message, Purpose::Result, DEVICE, DEVICE_KEY.as_bytes());
    for payload in [&again, &again, &forged_ping, &as_result] {
        client.client.publish(&topic, QoS::AtLeastOnce, false, serde_json::to_vec(payload).unwrap()).await.unwrap();
    }
    client.client.publish(&topic, QoS::AtLeastOnce, false, b"not json".to_vec()).await.unwrap();
    tokio::task::block_in_place(|| {
        let s = edge
            .wait_status("the redeliveries and forgeries handled", T, |s| {
                num(s, "/commands/redelivered") >= 2 && num(s, "/commands/unverified") >= 3
            })
            .unwrap();
        assert_eq!(num(&s, "/commands/run"), 1, "a duplicated command runs once, a forged one never: {s}");

        // set_rate survives a restart; check-config says where the rate comes from.
        edge.kill9_and_restart().unwrap();
        let s = edge.status().unwrap();
        assert_eq!((num(&s, "/rate/rate_per_sec"), num(&s, "/rate/burst")), (7, 9), "{s}");
        assert!(s["rate"]["source"].as_str().unwrap().contains(&id), "{s}");
        let check = std::process::Command::new(binary("backhaul-edge").unwrap())
            .args(["check-config", "--config", edge.config_path().to_str().unwrap()])
            .env("BACKHAUL_API_KEY", DEVICE_KEY)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&check.stdout);
        assert!(text.contains("rate_per_sec = 7, burst = 9") && text.contains(&id), "{text}");

        // The operator CLI shows the command and its result.
        let out = cli(&cloud, &["commands", DEVICE, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["commands"][0]["command_id"], id.as_str());
        assert_eq!(v["commands"][0]["status"], "done");
        let out = cli(&cloud, &["commands", DEVICE]);
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(table.starts_with("COMMAND") && table.contains("set_rate") && table.contains("done"), "{table}");
    });
}

#[test]
fn over_http_commands_are_fetched_run_once_and_answered_and_only_a_fleet_key_commands() {
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let edge = Edge::start(EdgeOptions {
        mode: "http",
        http_url: cloud.url(""),
        count: 300,
        http: "command_poll = \"1s\"".into(),
        ..Default::default()
    })
    .unwrap();
    cloud.wait_detections(DEVICE, 300, T).unwrap();
    edge.wait_drained(300, T).unwrap();

    // Who may do what.
    let ping = json!({ "kind": "ping" });
    let (code, v) = post_command(&cloud, DEVICE_KEY, DEVICE, &ping);
    assert_eq!(code, 403, "a device key cannot command, not even its own device: {v}");
    let (code, v) = post_command(&cloud, DEVICE_KEY, "rpi-other", &ping);
    assert_eq!(code, 403, "{v}");
    let (code, v) = post_command(&cloud, "wrong-key", DEVICE, &ping);
    assert_eq!(code, 401, "{v}");
    let (code, v) = get_with(&cloud, DEVICE_KEY, "/api/v1/devices/rpi-other/commands");
    assert_eq!(code, 403, "{v}");
    let (code, v) = post_command(&cloud, FLEET_KEY, "rpi-nobody", &ping);
    assert_eq!((code, v["field"].as_str()), (404, Some("device_id")), "{v}");
    for path in ["/api/v1/devices/rpi-nobody/commands", "/api/v1/devices/rpi-nobody/gaps"] {
        let (code, v) = get_with(&cloud, FLEET_KEY, path);
        assert_eq!(code, 404, "a typo must not look like a healthy device: {path}: {v}");
    }
    for (body, field) in [
        (json!({ "kind": "reboot" }), "kind"),
        (json!({ "kind": "set_rate", "rate_per_sec": 0, "burst": 1 }), "rate_per_sec"),
        (json!({ "kind": "replay", "since": "2026-11-30T10:00:00Z", "until": "2026-11-30T09:00:00Z" }), "until"),
        (json!({ "kind": "set_rate", "rate_per_sec": 5, "brust": 10 }), "brust"),
        (json!({ "kind": "ping", "extra": 1 }), "extra"),
    ] {
        let (code, v) = post_command(&cloud, FLEET_KEY, DEVICE, &body);
        assert_eq!((code, v["field"].as_str()), (422, Some(field)), "{body}: {v}");
    }
    let (code, v) = post_command(&cloud, FLEET_KEY, DEVICE, &json!({ "kind": "replay", "sinse": "x" }));
    assert_eq!(code, 422, "a misspelt field is refused: {v}");

    // ping, flush, rescan (not a BLE source), then a replay of everything acked.
    let id = command(&cloud, ping);
    let c = finished(&cloud, &id);
    assert_eq!(c["status"], "done", "{c}");
    assert_eq!(c["result"]["device_id"], DEVICE, "{c}");
    assert_eq!(c["result"]["produced"]["detections"], 300, "{c}");
    let c = finished(&cloud, &command(&cloud, json!({ "kind": "flush" })));
    assert_eq!(c["status"], "done", "{c}");
    assert!(c["result"]["cut_detections"].is_u64(), "{c}");
    let c = finished(&cloud, &command(&cloud, json!({ "kind": "rescan" })));
    assert_eq!(c["status"], "failed", "{c}");
    assert!(c["result"]["error"].as_str().unwrap().contains("only the BLE scanner"), "{c}");

    let batches = cloud.device(DEVICE)["batches"].as_u64().unwrap();
    let dups = duplicates(&cloud);
    let id = command(&cloud, json!({ "kind": "replay", "since": "2026-01-01T00:00:00Z" }));
    let c = finished(&cloud, &id);
    assert_eq!(c["result"]["requeued_batches"], batches, "{c}");
    wait_for("every batch again, as a duplicate", T, || (duplicates(&cloud) == dups + batches).then_some(())).unwrap();
    assert_eq!(cloud.device(DEVICE)["detections"], 300);

    // A result sent again changes nothing; a device key answers only its own device's commands.
    let result = json!({ "command_id": id, "status": "failed", "result": {"error": "x"}, "finished_at": "2026-11-30T00:00:00Z" });
    let post_result = |device: &str| {
        let mut r = http()
            .post(cloud.url(&format!("/api/v1/devices/{device}/commands/{id}/result")))
            .header("X-API-Key", DEVICE_KEY)
            .send(result.to_string().as_bytes())
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    assert_eq!(post_result(DEVICE), (200, r#"{"status":"already_final"}"#.to_owned()));
    assert_eq!(post_result("rpi-other").0, 403);
    assert_eq!(finished(&cloud, &id)["status"], "done");
    let (code, v) = get_with(&cloud, DEVICE_KEY, &format!("/api/v1/devices/{DEVICE}/commands?status=queued"));
    assert_eq!((code, v["commands"].as_array().map(Vec::len)), (200, Some(0)), "nothing left open: {v}");
    let s = edge.status().unwrap();
    assert_eq!(num(&s, "/commands/run"), 4, "{s}");
    assert_eq!(s["drain"]["eta_s"], 0, "nothing left to drain: {s}");

    // An HTTP edge posts its status too: the ledger balances and the backlog is empty.
    let ledger = ledger_balances(&cloud, DEVICE, T).unwrap();
    assert_eq!(num(&ledger, "/produced"), num(&s, "/produced/batches"), "{ledger}");
    assert_eq!(num(&ledger, "/stored"), batches, "{ledger}");
    let device = cloud.device(DEVICE);
    assert_eq!(device["backlog"]["batches"], 0, "{device}");
    assert_eq!(device["backlog"]["eta_s"], 0, "{device}");
}

#[test]
fn an_http_edge_that_holds_the_fleet_key_gets_its_commands_from_a_cloud_that_also_speaks_mqtt() {
    // The cloud publishes every queued command over MQTT too (it cannot know the device's
    // mode), which marks it delivered; the edge's fetch says it is the device fetching its work.
    let broker = Mosquitto::start().unwrap();
    let cloud = Cloud::start_mqtt(&broker, Vec::new()).unwrap();
    let device = "rpi-fleet-keyed"; // the harness gives it the fleet key
    let edge = Edge::start(EdgeOptions {
        device_id: device.into(),
        mode: "http",
        http_url: cloud.url(""),
        count: 100,
        http: "command_poll = \"1s\"".into(),
        ..Default::default()
    })
    .unwrap();
    cloud.wait_detections(device, 100, T).unwrap();
    edge.wait_drained(100, T).unwrap();
    let (code, v) = post_command(&cloud, FLEET_KEY, device, &json!({ "kind": "ping" }));
    assert_eq!(code, 202, "{v}");
    let id = v["command_id"].as_str().unwrap().to_owned();
    let c = wait_for("the ping answered", T, || {
        let (_, v) = get_json(&http(), &cloud, &format!("/api/v1/devices/{device}/commands/{id}"));
        (v["status"] == "done").then_some(v)
    })
    .unwrap();
    assert_eq!(c["result"]["device_id"], device, "{c}");
}

#[test]
fn a_pi_that_dies_between_recording_a_command_and_running_it_answers_interrupted_and_never_runs_it() {
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let mut edge = Edge::start(EdgeOptions {
        mode: "http",
        http_url: cloud.url(""),
        count: 100,
        http: "command_poll = \"1s\"".into(),
        env: vec![("BACKHAUL_FAILPOINT".into(), "abort_after_journal".into())],
        ..Default::default()
    })
    .unwrap();
    cloud.wait_detections(DEVICE, 100, T).unwrap();
    edge.wait_drained(100, T).unwrap();
    let id = command(&cloud, json!({ "kind": "set_rate", "rate_per_sec": 3, "burst": 3 }));
    // It dies with the command in its journal, not run (abort: no cleanup, like a crash).
    let code = edge.process.wait_exit(T).unwrap();
    assert_ne!(code, Some(0));
    edge.env_mut().retain(|(k, _)| k != "BACKHAUL_FAILPOINT");
    edge.restart().unwrap();
    let c = finished(&cloud, &id);
    assert_eq!(c["status"], "failed", "{c}");
    assert!(c["result"]["error"].as_str().unwrap().contains("interrupted"), "{c}");
    let s = edge.status().unwrap();
    assert_eq!(num(&s, "/commands/run"), 0, "never run: {s}");
    assert_eq!(s["rate"]["source"], "config", "the rate was not changed: {s}");
}
