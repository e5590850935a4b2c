//! Clocks on a Pi without an RTC (issue #13, kind 8): the edge's clock floor, against real
//! processes. The wall clock of the edge is set to 1970 with libfaketime (`LD_PRELOAD`, the library
//! of Debian's `faketime` package, which `scripts/test` installs); monotonic time stays real
//! (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as on a Pi that booted without a clock.

use std::path::{Path, PathBuf};
use std::time::Duration;

use backhaul_shared::Timestamp;
use backhaul_tests::cloud::{get_json, http, Cloud, CloudOptions, DEVICE};
use backhaul_tests::edge::{num, Edge, EdgeOptions};
use backhaul_tests::{sigterm, Mosquitto};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// libfaketime's multi-threaded build, from Debian's `faketime` package.
fn libfaketime() -> PathBuf {
    ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib/arm-linux-gnueabihf", "/usr/lib"]
        .iter()
        .map(|d| Path::new(d).join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.is_file())
        .expect("libfaketime is not installed: `apt-get install faketime` (./scripts/test installs it)")
}

/// The environment that starts the edge's wall clock at 1970-01-01T00:00:00Z.
fn wall_clock_in_1970() -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), libfaketime().display().to_string()),
        ("FAKETIME".into(), "@1970-01-01 00:00:00".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("TZ".into(), "UTC".into()),
    ]
}

/// Runs the simulated edge on `data_dir` until the cloud holds `total` detections of it (its
/// `count` is over the device's life), then stops it with SIGTERM; returns its last `/status`.
fn run_edge(broker: &Mosquitto, cloud: &Cloud, data_dir: &Path, total: u64, env: Vec<(String, String)>) -> Value {
    let mut edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: total,
        rate: 2_000.0,
        data_dir: Some(data_dir.to_owned()),
        env,
        ..EdgeOptions::default()
    })
    .unwrap();
    let status = edge.wait_drained(total, T).unwrap_or_else(|e| panic!("{e}\n{}", edge.process.output().join("\n")));
    cloud.wait_detections(DEVICE, total, T).unwrap();
    sigterm(edge.process.child().unwrap()).unwrap();
    assert_eq!(edge.process.wait_exit(T).unwrap(), Some(0));
    let mut status = status;
    status["log"] = edge.process.output().join("\n").into();
    status
}

/// Every stored detection of the test device, as RFC 3339 times.
fn detection_times(cloud: &Cloud) -> Vec<Timestamp> {
    let (status, body) = get_json(&http(), cloud, &format!("/api/v1/detections?device_id={DEVICE}&limit=1000"));
    assert_eq!(status, 200, "{body}");
    body["detections"].as_array().unwrap().iter().map(|d| d["timestamp"].as_str().unwrap().parse().unwrap()).collect()
}

/// `all` without `earlier` (a multiset difference: times are not unique).
fn minus(all: &[Timestamp], earlier: &[Timestamp]) -> Vec<Timestamp> {
    let mut left: std::collections::BTreeMap<Timestamp, usize> = std::collections::BTreeMap::new();
    for t in earlier {
        *left.entry(*t).or_default() += 1;
    }
    all.iter()
        .filter(|t| match left.get_mut(t) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .copied()
        .collect()
}

fn floor(status: &Value) -> Timestamp {
    status["clock"]["floor"].as_str().unwrap_or_else(|| panic!("no clock.floor in {status}")).parse().unwrap()
}

/// The input: a run with a correct clock, a stop, a start with the wall clock at 1970.
/// Before: detections dated 1970 were stored without a word. Now: stamped from the floor (the
/// newest batch of the first run) plus monotonic time, the batches say `"clock": "unsynced"`, the
/// edge warns and shows it in `/status`, and the cloud counts them per device.
#[test]
fn a_restart_with_the_wall_clock_in_1970_stamps_from_the_floor_and_says_so() {
    let broker = Mosquitto::start().unwrap();
    let cloud = Cloud::start(CloudOptions { mqtt_url: Some(broker.url()), ..Default::default() }).unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let started = Timestamp::now();

    let first = run_edge(&broker, &cloud, &data_dir, 200, vec![]);
    assert_eq!(first["clock"]["synced"], true, "{}", first["clock"]);
    let first_times = detection_times(&cloud);
    let newest_first = *first_times.iter().max().unwrap();
    assert_eq!(cloud.device(DEVICE)["clock_unsynced_batches"], 0);

    let second = run_edge(&broker, &cloud, &data_dir, 400, wall_clock_in_1970());
    let log = second["log"].as_str().unwrap();
    assert_eq!(second["clock"]["synced"], false, "{}", second["clock"]);
    assert!(floor(&second) >= newest_first, "the floor {} is the first run's newest batch or later", floor(&second));
    assert!(log.contains("BELOW THE CLOCK FLOOR"), "a warning is logged:\n{log}");
    for line in log.lines().filter(|l| l.contains("clock floor") || l.contains("CLOCK FLOOR")) {
        eprintln!("second run: {line}");
    }

    let times = detection_times(&cloud);
    assert_eq!(times.len(), 400);
    let oldest = *times.iter().min().unwrap();
    assert!(oldest >= started, "no detection dated before the test began (1970): oldest {oldest}");
    let second_run = minus(&times, &first_times);
    assert_eq!(second_run.len(), 200);
    assert!(second_run.iter().all(|t| *t >= newest_first), "the second run's times continue after the first's");
    let device = cloud.device(DEVICE);
    let second_batches = device["batches"].as_i64().unwrap() - num(&first, "/produced/batches") as i64;
    assert!(second_batches > 0);
    assert_eq!(
        device["clock_unsynced_batches"].as_i64(),
        Some(second_batches),
        "every batch of the 1970 run: {device}"
    );
}

/// Further: the floor survives restarts while the clock stays in 1970 (a fresh queue starts from
/// the build time, the next start from its newest batch, so times never go back), and once the
/// wall clock is right again stamping returns to it and nothing more is counted as unsynced.
#[test]
fn the_floor_holds_across_unsynced_restarts_and_the_wall_clock_wins_once_it_is_set() {
    let broker = Mosquitto::start().unwrap();
    let cloud = Cloud::start(CloudOptions { mqtt_url: Some(broker.url()), ..Default::default() }).unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");

    // A Pi that never had the time: a fresh queue, the wall clock in 1970 from the first start.
    let first = run_edge(&broker, &cloud, &data_dir, 100, wall_clock_in_1970());
    assert_eq!(first["clock"]["synced"], false);
    let year = |t: &Timestamp| t.as_offset_date_time().year();
    let times = detection_times(&cloud);
    assert!(times.iter().all(|t| year(t) >= 2026), "from the build-time floor, not 1970: {:?}", times.iter().min());
    let newest_first = *times.iter().max().unwrap();
    let first_times = times;

    let second = run_edge(&broker, &cloud, &data_dir, 200, wall_clock_in_1970());
    assert!(floor(&second) >= newest_first, "the second start's floor is the first run's newest batch");
    let second_run = minus(&detection_times(&cloud), &first_times);
    assert_eq!(second_run.len(), 100);
    assert!(second_run.iter().all(|t| *t >= newest_first), "the second run's detections all come after the first's");
    let unsynced = cloud.device(DEVICE)["clock_unsynced_batches"].as_i64().unwrap();
    assert_eq!(Some(unsynced), cloud.device(DEVICE)["batches"].as_i64());

    // NTP has set the clock: times are the wall clock again, and the batches are synced.
    let before_third = Timestamp::now();
    let third = run_edge(&broker, &cloud, &data_dir, 300, vec![]);
    assert_eq!(third["clock"]["synced"], true);
    let times = detection_times(&cloud);
    assert_eq!(times.iter().filter(|t| **t >= before_third).count(), 100, "the third run stamps the wall clock");
    assert_eq!(cloud.device(DEVICE)["clock_unsynced_batches"].as_i64(), Some(unsynced), "no new unsynced batch");
}
