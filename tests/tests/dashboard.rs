//! The dashboard in a real browser (issue #19): Debian's chromium, driven by playwright-core
//! (`tests/browser/dashboard.mjs`), against the real `backhaul-cloud` fed by two real
//! `backhaul-edge` processes over a real Mosquitto. The script signs in, waits for both devices
//! with the right counts, watches the live feed move, sends a replay from the device's page and
//! sees its result, and signs in with a device key that sees one device only. It saves a
//! screenshot to `target/dashboard.png`.
//!
//! Needs `node` and `tests/browser/node_modules` (`npm ci` in `tests/browser`, which
//! `scripts/test` runs) and `/usr/bin/chromium`; without them the test says so and is skipped
//! (fails under `BACKHAUL_TEST_NO_SKIP=1`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use backhaul_tests::cloud::{Cloud, DEVICE, DEVICE_KEY, FLEET_KEY};
use backhaul_tests::edge::{Edge, EdgeOptions};
use backhaul_tests::{find_program, skip, Mosquitto, Process};

const T: Duration = Duration::from_secs(240);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_owned()
}

#[test]
fn the_dashboard_shows_two_edges_live_sends_a_replay_and_keeps_a_device_key_to_its_device() {
    let browser_dir = workspace().join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let Some(node) = find_program("node") else {
        return skip("dashboard", "node is not installed (scripts/test installs it)");
    };
    if !browser_dir.join("node_modules/playwright-core").exists() || !Path::new(&chromium).exists() {
        return skip("dashboard", "run `npm ci` in tests/browser and install chromium (scripts/test does both)");
    }
    let broker = Mosquitto::start().unwrap();
    let cloud = Cloud::start_mqtt(&broker, Vec::new()).unwrap();
    let since = backhaul_shared::Timestamp::now();
    let screenshot = workspace().join("target/dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let (a, b) = (DEVICE, "rpi-test-02");
    let (a_count, b_count) = (600u64, 400u64);
    let expect = format!("{a}={a_count},{b}={b_count}");
    let env = [
        ("BACKHAUL_URL", cloud.url("")),
        ("FLEET_KEY", FLEET_KEY.to_owned()),
        ("DEVICE_KEY", DEVICE_KEY.to_owned()),
        ("DEVICE", DEVICE.to_owned()),
        ("EXPECT", expect),
        ("REPLAY_DEVICE", a.to_owned()),
        ("REPLAY_SINCE", since.to_string()),
        ("SCREENSHOT", screenshot.display().to_string()),
        ("CHROMIUM", chromium),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let script = browser_dir.join("dashboard.mjs");
    let mut driver = Process::spawn_program("dashboard.mjs", &node, &[script.to_str().unwrap()], &env).unwrap();
    // The edges start once the page is signed in and listening, so it sees them arrive.
    driver.wait_for_any_line(Duration::from_secs(60), |l| l == "ready").unwrap();
    let edge = |device: &str, count: u64| {
        Edge::start(EdgeOptions {
            device_id: device.into(),
            mqtt_url: broker.url(),
            count,
            rate: 150.0,
            max_detections: 20,
            ..Default::default()
        })
        .unwrap()
    };
    let _edges = [edge(a, a_count), edge(b, b_count)];
    let code = driver.wait_exit(T).unwrap();
    let output = driver.output().join("\n");
    assert_eq!(code, Some(0), "the browser test failed:\n{output}");
    assert!(output.lines().any(|l| l == "ok"), "{output}");
    assert!(screenshot.exists(), "no screenshot at {}", screenshot.display());
    // The page's view agrees with the API's.
    assert_eq!(cloud.device(a)["detections"], a_count);
    assert_eq!(cloud.device(b)["detections"], b_count);
}
