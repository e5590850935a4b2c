//! The whole system end to end: `backhaul-edge run` (simulated source, durable queue, forwarder)
//! against a real Mosquitto and a real `backhaul-cloud serve` on SQLite, with brokers, clouds and
//! edges killed with SIGKILL. Each test ends by checking that every detection produced is stored
//! exactly once: the simulated source makes detection `i` once over the device's life, so the
//! cloud holding exactly `count` detections, in as many batches as the edge produced, means nothing
//! was lost and nothing stored twice.

use std::time::{Duration, Instant};

use backhaul_edge::queue::{Queue, QueueConfig};
use backhaul_tests::cloud::{get_json, http, post_batch, Cloud, CloudOptions, DEVICE, DEVICE_KEY};
use backhaul_tests::edge::{num, Edge, EdgeOptions};
use backhaul_tests::{presence_batch, wait_until, Mosquitto};

const T: Duration = Duration::from_secs(90);

fn mqtt_cloud(broker: &Mosquitto) -> Cloud {
    Cloud::start_mqtt(broker, Vec::new()).unwrap()
}

/// Waits until the edge has sent everything (nothing pending or in flight) and the cloud holds
/// exactly the edge's produced batches and detections; returns the cloud's device row.
fn assert_all_stored_once(edge: &Edge, cloud: &Cloud, detections: u64) -> serde_json::Value {
    let status = edge.wait_drained(detections, T).unwrap();
    let device = cloud.wait_detections(DEVICE, detections, T).unwrap();
    assert_eq!(
        num(&device, "/batches"),
        num(&status, "/produced/batches"),
        "every batch stored once\nedge: {status}\ncloud: {device}"
    );
    assert_eq!(num(&device, "/gaps"), 0, "no seq missing: {device}");
    assert_eq!(num(&status, "/queue/dropped"), 0);
    device
}

#[test]
fn over_mqtt_every_detection_produced_is_stored_exactly_once() {
    let broker = Mosquitto::start().unwrap();
    let cloud = mqtt_cloud(&broker);
    let edge = Edge::start(EdgeOptions { mqtt_url: broker.url(), count: 5000, ..Default::default() }).unwrap();
    assert_all_stored_once(&edge, &cloud, 5000);
    let status = edge.status().unwrap();
    assert_eq!(status["link"]["connected"], true);
    assert!(status["link"]["last_ack"].is_string(), "{status}");
    // The retained status reached the cloud.
    wait_until("the device's status in the cloud", T, || cloud.device(DEVICE)["status"]["queue_depth"].is_u64())
        .unwrap();
}

#[test]
fn over_http_every_detection_produced_is_stored_exactly_once() {
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let edge =
        Edge::start(EdgeOptions { mode: "http", http_url: cloud.url(""), count: 3000, ..Default::default() }).unwrap();
    assert_all_stored_once(&edge, &cloud, 3000);
}

#[test]
fn a_backlog_built_while_the_broker_is_down_from_the_start_all_arrives() {
    let mut broker = Mosquitto::start().unwrap();
    let cloud = mqtt_cloud(&broker);
    broker.kill9().unwrap();
    let edge = Edge::start(EdgeOptions { mqtt_url: broker.url(), count: 2000, ..Default::default() }).unwrap();
    let backlog = edge.wait_status("the whole backlog on disk", T, |s| num(s, "/produced/detections") == 2000).unwrap();
    assert_eq!(backlog["link"]["connected"], false, "{backlog}");
    assert_eq!(num(&backlog, "/queue/pending"), num(&backlog, "/produced/batches"), "nothing left the Pi: {backlog}");
    assert!(backlog["link"]["last_error"].as_str().unwrap_or_default().contains("broker"), "{backlog}");
    broker.restart().unwrap();
    assert_all_stored_once(&edge, &cloud, 2000);
}

#[test]
fn the_broker_killed_and_restarted_without_persistence_mid_flight_loses_nothing() {
    let mut broker = Mosquitto::start().unwrap();
    let mut cloud = mqtt_cloud(&broker);
    // 20 s of production; the drain is paced so batches are in flight when the broker dies.
    let edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 20_000,
        rate: 1000.0,
        rate_per_sec: 100,
        burst: 10,
        ..Default::default()
    })
    .unwrap();
    for round in 0..2 {
        let before = num(&cloud.device(DEVICE), "/detections");
        wait_until("more batches stored", T, || num(&cloud.device(DEVICE), "/detections") > before + 1000).unwrap();
        // The cloud goes away: the broker takes (PUBACKs) batches and queues them for it...
        cloud.process.kill9().unwrap();
        let sent = num(&edge.status().unwrap(), "/sent/batches");
        edge.wait_status("batches taken by the broker", T, |s| num(s, "/sent/batches") >= sent + 10).unwrap();
        // ...and dies without persistence: those batches exist only on the edge now.
        broker.kill9().unwrap();
        edge.wait_status("the edge to see the link down", T, |s| s["link"]["connected"] == false).unwrap();
        broker.restart().unwrap();
        cloud.kill9_and_restart().unwrap();
        edge.wait_status("the edge to reconnect", T, |s| num(s, "/link/link_ups") >= round + 2).unwrap();
    }
    assert_all_stored_once(&edge, &cloud, 20_000);
}

#[test]
fn the_edge_killed_mid_drain_several_times_loses_nothing_and_duplicates_are_absorbed() {
    let broker = Mosquitto::start().unwrap();
    let cloud = mqtt_cloud(&broker);
    // A backlog at once, drained at 40 batches (2,000 detections) per second.
    let mut edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 12_000,
        rate: 1_000_000.0,
        rate_per_sec: 40,
        burst: 5,
        ..Default::default()
    })
    .unwrap();
    for _ in 0..4 {
        let before = num(&cloud.device(DEVICE), "/detections");
        wait_until("the drain to go on", T, || num(&cloud.device(DEVICE), "/detections") >= before + 1000).unwrap();
        edge.kill9_and_restart().unwrap();
    }
    assert_all_stored_once(&edge, &cloud, 12_000);
    let (_, stats) = get_json(&http(), &cloud, "/api/v1/stats");
    assert_eq!(num(&stats, "/detections"), 12_000, "{stats}");
}

#[test]
fn over_http_a_500_is_retried_and_a_422_is_dead_lettered_while_the_rest_flows() {
    let mut cloud = Cloud::start(CloudOptions::default()).unwrap();
    let agent = http();
    let cloud_url = cloud.url("");
    // Three batches already in the queue; the cloud already holds the first one's batch_id with
    // another payload, so the edge's send of it gets a 422.
    let mut conflicting = None;
    let edge_options = EdgeOptions { mode: "http", http_url: cloud_url, count: 500, ..Default::default() };
    let prepare = |data_dir: &std::path::Path| {
        let queue = Queue::open(data_dir, QueueConfig::default())?;
        for _ in 0..3 {
            queue.enqueue(presence_batch(DEVICE, 7))?;
        }
        let first = queue.next_batch()?.expect("a batch");
        let mut other: backhaul_shared::Batch = serde_json::from_slice(&first.payload)?;
        other.detections.truncate(2);
        let (code, body, _) =
            post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(&first.batch_id.to_string()), &other.to_json());
        anyhow::ensure!(code == 201, "pre-storing the conflicting batch: {code} {body}");
        conflicting = Some(first.batch_id);
        // From now on the cloud answers 500 to the first three posts.
        cloud.restart_with(&[("BACKHAUL_FAILPOINT", "bulk_500:3")])
    };
    let edge = Edge::start_with(edge_options, prepare).unwrap();
    let status = edge
        .wait_status("the queue drained", T, |s| {
            num(s, "/produced/detections") == 521 && num(s, "/queue/pending") == 0 && num(s, "/queue/in_flight") == 0
        })
        .unwrap();
    assert_eq!(num(&status, "/queue/dead_letters"), 1, "{status}");
    assert_eq!(num(&status, "/sent/rejected"), 1, "{status}");
    assert!(num(&status, "/link/link_ups") >= 2, "the 500s took the link down and /health brought it back: {status}");
    // 2 + 10 batches from the edge, and the pre-stored one.
    let device = cloud.wait_detections(DEVICE, 2 + 7 * 2 + 500, T).unwrap();
    assert_eq!(num(&device, "/batches"), 13, "{device}");
    let (_, stats) = get_json(&agent, &cloud, "/api/v1/stats");
    assert!(num(&stats, "/rejected") >= 1, "{stats}");
    // The refused batch is kept on the Pi for inspection, with the cloud's reason. (A graceful
    // stop writes the acks and moves still in memory.)
    let mut edge = edge;
    backhaul_tests::sigterm(edge.process.child().unwrap()).unwrap();
    assert_eq!(edge.process.wait_exit(T).unwrap(), Some(0), "a graceful stop exits 0");
    let data_dir = edge.data_dir();
    let (code, out, err) =
        backhaul_tests::run("backhaul-edge", &["queue", "export", "--data-dir", data_dir.to_str().unwrap()], &[])
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let dead: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["state"] == "dead_letter")
        .collect();
    assert_eq!(dead.len(), 1, "{out}");
    assert_eq!(dead[0]["batch_id"], conflicting.unwrap().to_string());
    assert!(dead[0]["reason"].as_str().unwrap().contains("422"), "{}", dead[0]);
}

#[test]
fn the_rate_limit_paces_a_backlog_drain() {
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    // 300 batches at once, drained at 50 batches/s with a burst of 5: at least (300 - 5) / 50 = 5.9 s.
    let started = Instant::now();
    let edge = Edge::start(EdgeOptions {
        mode: "http",
        http_url: cloud.url(""),
        count: 15_000,
        rate: 1_000_000.0,
        rate_per_sec: 50,
        burst: 5,
        ..Default::default()
    })
    .unwrap();
    assert_all_stored_once(&edge, &cloud, 15_000);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs_f64(5.9 * 0.95),
        "300 batches at 50/s drained in {took:?}: faster than the limit"
    );
}

#[test]
fn with_ack_broker_a_puback_is_enough_to_delete_a_batch() {
    // No cloud at all: only the broker's PUBACKs can empty the queue. (A persistent subscription
    // stands for the cloud's session: with nobody subscribed, MQTT 5's PUBACK says 0x10, which
    // with ack = "broker" is not a delivery.)
    let broker = Mosquitto::start().unwrap();
    broker.persistent_subscriber("cloud-away", "backhaul/+/batches").unwrap();
    let edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 1000,
        mqtt: "ack = \"broker\"".into(),
        ..Default::default()
    })
    .unwrap();
    let status = edge
        .wait_status("every batch acked by the broker", T, |s| {
            num(s, "/produced/detections") == 1000 && num(s, "/queue/pending") == 0 && num(s, "/queue/in_flight") == 0
        })
        .unwrap();
    assert_eq!(num(&status, "/sent/acked_batches"), num(&status, "/produced/batches"), "{status}");
}
