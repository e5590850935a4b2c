//! Issue #13 (and #14's queue budget): a config the cloud or a library would refuse later is refused
//! at start by `check-config` and by `run`, with the key, the value and the rule, before the queue
//! is opened (nothing is queued that could never be delivered).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the binary with `args` and `env` (secrets from the test's environment removed); kills it
/// if it is still running after 20 s, which fails the caller: these commands must refuse at once.
fn edge(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_backhaul-edge"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for k in ["BACKHAUL_HASH_SECRET", "BACKHAUL_MQTT_PASSWORD", "BACKHAUL_API_KEY", "BACKHAUL_FAILPOINT"] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("`backhaul-edge {}` kept running:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A simulated device over MQTT with `top` lines and `sections` appended; returns the config file.
fn config(dir: &Path, top: &str, sections: &str) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let file = dir.join("edge.toml");
    std::fs::write(
        &file,
        format!(
            "device_id = \"rpi-entrance-01\"\n{top}\ndata_dir = \"{}\"\nstatus_listen = \"127.0.0.1:{port}\"\n\n\
             [source]\nkind = \"simulated\"\ncount = 100\n\n{sections}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    file.to_str().unwrap().to_owned()
}

/// `check-config` and `run` both refuse, naming `needles`; `run` opened no queue.
fn both_refuse(dir: &Path, file: &str, env: &[(&str, &str)], needles: &[&str]) {
    for command in ["check-config", "run"] {
        let (code, err) = edge(&[command, "--config", file], env);
        assert_eq!(code, 1, "{command}: {err}");
        for n in needles {
            assert!(err.contains(n), "{command}: `{n}` missing from: {err}");
        }
    }
    assert!(!dir.join("data").exists(), "run refused after creating the data_dir: something may be queued");
}

#[test]
fn a_tab_in_name_is_refused_by_check_config_and_run_before_anything_is_queued() {
    // The listed input: `check-config` accepted it, then the cloud refused every batch.
    let dir = tempfile::tempdir().unwrap();
    let file = config(dir.path(), "name = \"Entrance\\tPi\"", "");
    both_refuse(dir.path(), &file, &[], &["key `name`", "control characters", "'\\t'", "edge.toml"]);
}

#[test]
fn wire_fields_set_from_the_environment_are_checked_and_the_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = config(dir.path(), "name = \"Entrance Pi\"", "");
    both_refuse(
        dir.path(),
        &file,
        &[("BACKHAUL_LOCATION", "Main\u{7}entrance")],
        &["key `location`", "environment variable BACKHAUL_LOCATION", "control characters"],
    );
    both_refuse(dir.path(), &file, &[("BACKHAUL_DEVICE_ID", "rpi\tentrance")], &["key `device_id`", "'\\t'"]);
    both_refuse(
        dir.path(),
        &file,
        &[("BACKHAUL_TRANSPORT__MQTT__TOPIC_PREFIX", "fleet/#")],
        &["key `transport.mqtt.topic_prefix`", "'#'"],
    );
    let (code, err) = edge(&["check-config", "--config", &file], &[("BACKHAUL_API_KEY", "device-key-0123456789")]);
    assert_eq!(code, 0, "the same config without the bad values is fine: {err}");
}

#[test]
fn a_sub_second_keep_alive_is_refused_naming_the_key_the_value_and_the_range() {
    // The listed input: rumqttc panicked on it inside the link thread, the process stayed up and
    // never connected, with no error anywhere.
    let dir = tempfile::tempdir().unwrap();
    let file = config(dir.path(), "", "[transport.mqtt]\nkeep_alive = \"500ms\"");
    both_refuse(dir.path(), &file, &[], &["key `transport.mqtt.keep_alive`", "500ms", "outside the valid range 1s..="]);
}

#[test]
fn a_queue_budget_too_small_for_one_batch_is_refused_at_start() {
    // Issue #14: "0B" and "1KiB" hold no batch at all.
    let dir = tempfile::tempdir().unwrap();
    for small in ["0B", "1KiB"] {
        let file = config(dir.path(), "", &format!("[queue]\nmax_bytes = \"{small}\""));
        both_refuse(dir.path(), &file, &[], &["key `queue.max_bytes`", small, "batch.max_detections"]);
    }
    let file = config(dir.path(), "", "[transport]\nmax_inflight = 0");
    both_refuse(dir.path(), &file, &[], &["key `transport.max_inflight`", "0 is outside the valid range 1..=1000"]);
}
