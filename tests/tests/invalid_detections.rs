//! Issue #13, kind 2: the edge checks each detection against the wire contract before batching,
//! with the cloud's own rules (`backhaul_shared::batch::validate_detection`). A detection the cloud
//! would refuse is dropped and counted by reason; the rest of its batch is stored. Before, one bad
//! RSSI got its whole batch refused (400 / `rejected`) and dead-lettered with the good detections
//! in it. Real edge (replay source) and cloud binaries, over HTTP and over MQTT with a real
//! Mosquitto.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use backhaul_tests::cloud::{get_json, http, Cloud, CloudOptions, DEVICE};
use backhaul_tests::edge::{num, Edge, EdgeOptions};
use backhaul_tests::Mosquitto;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const SECRET: &str = "invalid-detections-secret-0123456789";
/// A Thingy:52 node's payload: window open, 40 %, 25.3 °C, 612 ppm, 87 %.
const THINGY: &str = r#"{"65535":"010102280300fd04000002640557"}"#;

/// One capture line: advertiser `i` (a distinct address each, so no dedup) heard at second `i`.
fn line(i: u32, address: &str, rssi: i16, manufacturer_data: &str) -> String {
    format!(
        r#"{{"t":"2026-11-21T10:{:02}:{:02}Z","address":"{address}","rssi":{rssi},"tx_power":null,"manufacturer_data":{manufacturer_data},"service_data":{{}},"services":[],"name":null}}"#,
        i / 60,
        i % 60
    )
}

fn address(i: u32) -> String {
    format!("11:22:33:44:{:02X}:{:02X}", i / 256, i % 256)
}

fn write_capture(dir: &Path, lines: &[String]) -> String {
    let path = dir.join("capture.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    path.display().to_string()
}

fn replay_edge(path: &str, options: EdgeOptions) -> Edge {
    Edge::start(EdgeOptions {
        source: Some(format!("kind = \"replay\"\npath = \"{path}\"")),
        max_detections: 10,
        env: vec![("BACKHAUL_HASH_SECRET".into(), SECRET.into())],
        ..options
    })
    .unwrap()
}

/// Every stored detection of the test device, as the cloud returns them.
fn stored(cloud: &Cloud) -> Vec<Value> {
    let (_, body) = get_json(&http(), cloud, &format!("/api/v1/detections?device_id={DEVICE}&limit=1000"));
    body["detections"].as_array().cloned().unwrap_or_default()
}

fn metrics(edge: &Edge) -> String {
    edge.metrics().unwrap()
}

/// The value of the dropped-invalid counter for `reason` in `/metrics`.
fn dropped_metric(text: &str, reason: &str) -> Option<f64> {
    let series =
        format!("backhaul_edge_dropped_invalid_detections_total{{device_id=\"{DEVICE}\",reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.parse().ok())
}

/// The field fault as reported: 40 advertisers, one heard at +79 dBm and one at +127 (HCI's "RSSI
/// not available"), batches of 10. Before: the two batches holding them were refused whole and
/// dead-lettered, 20 of the 38 good detections stored.
#[test]
fn an_impossible_rssi_drops_only_its_detection_and_the_rest_of_the_batch_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [(13, 79), (27, 127)];
    let rssi = |i: u32| bad.iter().find(|b| b.0 == i).map_or(-50 - (i as i16), |b| b.1);
    let lines: Vec<String> = (0..40).map(|i| line(i, &address(i), rssi(i), "{}")).collect();
    let path = write_capture(dir.path(), &lines);

    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let edge = replay_edge(&path, EdgeOptions { mode: "http", http_url: cloud.url(""), ..Default::default() });
    let device = cloud.wait_detections(DEVICE, 38, T).unwrap();
    let status = edge.wait_drained(38, T).unwrap();
    let status = edge.wait_status("the source to finish", T, |s| s["source"]["done"] == true).unwrap_or(status);

    assert_eq!(num(&device, "/gaps"), 0, "{device}");
    assert_eq!(status["dropped_invalid"], json!({"rssi_out_of_range": 2}), "{status}");
    assert_eq!(num(&status, "/source/detections"), 40, "every advertisement made a detection: {status}");
    assert_eq!(num(&status, "/queue/dead_letters"), 0, "nothing refused: {status}");
    assert_eq!(num(&status, "/sent/rejected"), 0, "{status}");
    let mut got: Vec<i64> = stored(&cloud).iter().map(|d| d["rssi"].as_i64().unwrap()).collect();
    got.sort_unstable();
    let mut want: Vec<i64> = (0..40).filter(|i| !bad.iter().any(|b| b.0 == *i)).map(|i| i64::from(rssi(i))).collect();
    want.sort_unstable();
    assert_eq!(got, want, "the 38 good detections, each stored once");

    let text = metrics(&edge);
    assert_eq!(dropped_metric(&text, "rssi_out_of_range"), Some(2.0), "{text}");
    assert_eq!(dropped_metric(&text, "node_empty"), Some(0.0), "every known reason has a series: {text}");
}

/// Another rule and the other transport: over MQTT, a presence advertiser heard at -128 dBm (what
/// some stacks report for "unknown"; the cloud's floor is -127) and a Thingy:52 recorded without
/// an address (its reading would carry an empty `node`). Only those two detections go; the
/// Thingy's presence detection, which is valid, is stored.
#[test]
fn over_mqtt_another_rssi_and_an_empty_sensor_node_are_dropped_and_counted_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> = (0..20).map(|i| line(i, &address(i), -60 - (i as i16), "{}")).collect();
    lines.insert(7, line(30, &address(30), -128, "{}"));
    lines.insert(15, line(31, "", -70, THINGY));
    lines.push(line(32, "C1:0E:5A:33:9F:02", -65, THINGY)); // a well-formed Thingy: 2 detections
    let path = write_capture(dir.path(), &lines);

    let broker = Mosquitto::start().unwrap();
    let mut cloud = Cloud::start(CloudOptions { mqtt_url: Some(broker.url()), ..Default::default() }).unwrap();
    cloud.process.wait_for_any_line(T, |l| l.contains("subscribed to batches and status")).unwrap();
    let edge = replay_edge(&path, EdgeOptions { mqtt_url: broker.url(), ..Default::default() });
    // 20 presence + the empty-address Thingy's presence + the good Thingy's presence and reading.
    cloud.wait_detections(DEVICE, 23, T).unwrap();
    let status = edge.wait_drained(23, T).unwrap();
    assert_eq!(status["dropped_invalid"], json!({"node_empty": 1, "rssi_out_of_range": 1}), "{status}");
    assert_eq!(num(&status, "/source/detections"), 25, "{status}");
    assert_eq!(num(&status, "/queue/dead_letters"), 0, "{status}");

    let rows = stored(&cloud);
    let sensors: Vec<&Value> = rows.iter().filter(|d| d["kind"] == "sensor").collect();
    assert_eq!(sensors.len(), 1, "only the well-formed Thingy's reading: {sensors:?}");
    assert_eq!(sensors[0]["node"], "c1:0e:5a:33:9f:02");
    assert!(rows.iter().all(|d| d["rssi"].as_i64().unwrap() >= -127), "no -128 stored");

    let text = metrics(&edge);
    assert_eq!(dropped_metric(&text, "rssi_out_of_range"), Some(1.0), "{text}");
    assert_eq!(dropped_metric(&text, "node_empty"), Some(1.0), "{text}");
}
