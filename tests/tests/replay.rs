//! A field capture played through `backhaul-edge run` (replay source → decoders → batches →
//! durable queue → HTTP) into the cloud, checking every decoded value the cloud stored.

use std::io::Write;
use std::time::Duration;

use backhaul_edge::decode::presence::AddressHasher;
use backhaul_tests::cloud::{get_json, http, Cloud, CloudOptions, DEVICE};
use backhaul_tests::edge::{Edge, EdgeOptions};

const T: Duration = Duration::from_secs(60);
const SECRET: &str = "replay-test-secret-0123456789";

fn line(t: &str, address: &str, rssi: i16, manufacturer_data: &str) -> String {
    format!(
        r#"{{"t":"{t}","address":"{address}","rssi":{rssi},"tx_power":null,"manufacturer_data":{manufacturer_data},"service_data":{{}},"services":[],"name":null}}"#
    )
}

#[test]
fn a_capture_of_mixed_advertisers_is_decoded_and_stored_exactly() {
    let thingy = r#"{"65535":"010102280300fd04000002640557"}"#; // window open, 40 %, 25.3 °C, 612 ppm, 87 %
    let later = r#"{"65535":"010002290300e304ffffffff0556"}"#; // closed, 41 %, 22.7 °C, CO2 not ready, 86 %
    let capture = [
        line("2026-11-21T10:00:00Z", "C1:0E:5A:33:9F:02", -58, thingy),
        line("2026-11-21T10:00:00.100Z", "C1:0E:5A:33:9F:02", -59, thingy), // same frame, channel 38
        line("2026-11-21T10:00:00.200Z", "C1:0E:5A:33:9F:02", -61, thingy), // channel 39
        line(
            "2026-11-21T10:00:01Z",
            "11:22:33:44:55:01",
            -70,
            r#"{"76":"0215e2c56db5dffb48d2b060d0f5a71096e000010002c5"}"#,
        ),
        line(
            "2026-11-21T10:00:02Z",
            "E8:6E:84:A1:22:05",
            -80,
            r#"{"1177":"0512fc5394c37c0004fffc040cac364200cdcbb8334c884f"}"#,
        ),
        "this line is damaged".to_owned(),
        line("2026-11-21T10:00:12Z", "C1:0E:5A:33:9F:02", -77, later),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("capture.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for l in &capture {
        writeln!(f, "{l}").unwrap();
    }
    drop(f);

    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let edge = Edge::start(EdgeOptions {
        mode: "http",
        http_url: cloud.url(""),
        source: Some(format!("kind = \"replay\"\npath = \"{}\"", path.display())),
        max_detections: 4,
        env: vec![("BACKHAUL_HASH_SECRET".into(), SECRET.into())],
        ..Default::default()
    })
    .unwrap();
    // 2 Thingy readings, and presence for the Thingy twice (two dedup windows), the iBeacon and the Ruuvi.
    cloud.wait_detections(DEVICE, 6, T).unwrap();
    edge.wait_drained(6, T).unwrap();

    let (_, body) = get_json(&http(), &cloud, &format!("/api/v1/detections?device_id={DEVICE}&limit=100"));
    let mut rows: Vec<serde_json::Value> = body["detections"].as_array().unwrap().clone();
    rows.sort_by_key(|r| (r["timestamp"].as_str().unwrap().to_owned(), r["kind"].as_str().unwrap().to_owned()));
    let hash = |a: &str| AddressHasher::new(SECRET.as_bytes(), None).unwrap().hash(a, 0);
    let got: Vec<String> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            let o = r.as_object_mut().unwrap();
            for k in ["device_id", "batch_id", "cursor"] {
                o.remove(k);
            }
            serde_json::to_string(&r).unwrap()
        })
        .collect();
    let want = [
        format!(r#"{{"kind":"presence","timestamp":"2026-11-21T10:00:00Z","rssi":-58,"device_hash":"{}","zone":"near"}}"#, hash("C1:0E:5A:33:9F:02")),
        r#"{"kind":"sensor","timestamp":"2026-11-21T10:00:00Z","rssi":-58,"node":"c1:0e:5a:33:9f:02","temp":25.3,"humidity":40,"co2_ppm":612,"window_open":true,"battery":87}"#.to_owned(),
        format!(r#"{{"kind":"presence","timestamp":"2026-11-21T10:00:01Z","rssi":-70,"device_hash":"{}","zone":"medium"}}"#, hash("11:22:33:44:55:01")),
        format!(r#"{{"kind":"presence","timestamp":"2026-11-21T10:00:02Z","rssi":-80,"device_hash":"{}","zone":"far"}}"#, hash("E8:6E:84:A1:22:05")),
        format!(r#"{{"kind":"presence","timestamp":"2026-11-21T10:00:12Z","rssi":-77,"device_hash":"{}","zone":"far"}}"#, hash("C1:0E:5A:33:9F:02")),
        r#"{"kind":"sensor","timestamp":"2026-11-21T10:00:12Z","rssi":-77,"node":"c1:0e:5a:33:9f:02","temp":22.7,"humidity":41,"window_open":false,"battery":86}"#.to_owned(),
    ];
    let want: Vec<String> = want
        .iter()
        .map(|w| serde_json::to_string(&serde_json::from_str::<serde_json::Value>(w).unwrap()).unwrap())
        .collect();
    assert_eq!(got, want);
    for r in &rows {
        let text = r.to_string();
        assert!(
            !text.contains("11:22:33:44:55:01") && !text.contains("E8:6E:84"),
            "no raw address of a passer-by: {text}"
        );
    }
}

/// These machines have no radio and no bluetoothd: the BLE source must keep the service up, keep
/// retrying, and say why nothing comes (on a machine with a radio, it hears something instead).
#[test]
fn without_bluez_the_ble_source_keeps_the_service_up_and_says_why() {
    let edge = Edge::start(EdgeOptions {
        source: Some("kind = \"ble\"\nstall_after_s = 5".into()),
        env: vec![("BACKHAUL_HASH_SECRET".into(), SECRET.into())],
        ..Default::default()
    })
    .unwrap();
    let status = edge
        .wait_status("the BLE source to report", T, |s| {
            s["source"]["last_error"].is_string() || s["source"]["detections"].as_u64().unwrap_or(0) > 0
        })
        .unwrap();
    if let Some(e) = status["source"]["last_error"].as_str() {
        assert!(e.contains("BlueZ") || e.contains("adapter"), "{e}");
    }
    assert!(edge.status().is_ok(), "still running");
}

#[test]
fn scan_without_bluez_says_why_nothing_was_heard() {
    let (code, out, err) = backhaul_tests::run("backhaul-edge", &["scan", "--seconds", "1"], &[]).unwrap();
    if code == 0 {
        assert!(!out.is_empty(), "heard something: a radio is present");
    } else {
        assert!(err.contains("nothing heard") && (err.contains("BlueZ") || err.contains("adapter")), "{err}");
    }
}
