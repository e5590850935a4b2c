//! `deploy/grafana/backhaul.json` (issue #19): every metric the dashboard's queries name exists in
//! the real binaries' `/metrics` (the cloud's, with a fleet key, and an edge's `status_listen`),
//! and the per-device families the fleet panels sum have a series for a device that sent.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use backhaul_tests::cloud::{Cloud, DEVICE, FLEET_KEY};
use backhaul_tests::edge::{Edge, EdgeOptions};
use backhaul_tests::{wait_for, Mosquitto};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);

/// The `backhaul_*` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("backhaul_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The families a `/metrics` text declares (`# TYPE name kind`).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_the_grafana_dashboard_names_is_served_by_the_edge_or_the_cloud() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/backhaul.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut named = BTreeSet::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}: no query", panel["title"]);
        let ids: BTreeSet<&str> = targets.iter().map(|t| t["refId"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), targets.len(), "{}: refIds repeat", panel["title"]);
        for t in targets {
            let names = metric_names(t["expr"].as_str().unwrap());
            assert!(!names.is_empty(), "{}: a query without a backhaul metric", panel["title"]);
            named.extend(names);
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries}");
    for wanted in [
        "backhaul_cloud_device_backlog_batches",
        "backhaul_cloud_device_oldest_pending_age_seconds",
        "backhaul_cloud_device_drain_rate_batches_per_second",
        "backhaul_edge_dropped_invalid_detections_total",
        "backhaul_cloud_detections_total",
        "backhaul_cloud_duplicates_total",
        "backhaul_cloud_dead_letters_total",
    ] {
        assert!(named.contains(wanted), "the dashboard does not show {wanted}");
    }

    let broker = Mosquitto::start().unwrap();
    let cloud = Cloud::start_mqtt(&broker, Vec::new()).unwrap();
    let edge = Edge::start(EdgeOptions { mqtt_url: broker.url(), count: 200, ..Default::default() }).unwrap();
    cloud.wait_detections(DEVICE, 200, T).unwrap();
    let cloud_metrics = || {
        let mut r =
            backhaul_tests::cloud::http().get(cloud.url("/metrics")).header("X-API-Key", FLEET_KEY).call().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.body_mut().read_to_string().unwrap()
    };
    // The device's status (with its backlog) arrives every status_interval; its ledger balances
    // once a status reports the batches stored (one sent mid-drain may count some as queued).
    let cloud_text = wait_for("the device's backlog and a balanced ledger in the cloud's metrics", T, || {
        let text = cloud_metrics();
        (text.contains(&format!("backhaul_cloud_device_backlog_batches{{device_id=\"{DEVICE}\"}}"))
            && text.contains(&format!("backhaul_cloud_device_ledger_balanced{{device_id=\"{DEVICE}\"}} 1")))
        .then_some(text)
    })
    .unwrap();
    let edge_text = edge.metrics().unwrap();
    let served: BTreeSet<String> = families(&cloud_text).union(&families(&edge_text)).cloned().collect();
    let missing: Vec<&String> = named.iter().filter(|n| !served.contains(*n)).collect();
    assert!(missing.is_empty(), "the dashboard names metrics no binary serves: {missing:?}\nserved: {served:?}");
    for family in ["backhaul_cloud_device_online", "backhaul_cloud_device_ledger_balanced"] {
        assert!(
            cloud_text.contains(&format!("{family}{{device_id=\"{DEVICE}\"}} 1")),
            "{family} for {DEVICE}:\n{cloud_text}"
        );
    }
}
