//! The binary's command line, run as a user would. (Also makes `cargo test --workspace` build the
//! binary before the end-to-end tests in `backhaul-tests` run it.)

use std::process::Command;

fn edge(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_backhaul-edge")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_commands() {
    let (code, out, _) = edge(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["run", "status", "queue", "replay", "scan", "check-config"] {
        assert!(out.contains(cmd), "--help should list `{cmd}`:\n{out}");
    }
}

#[test]
fn queue_commands_on_a_missing_data_dir_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let (code, _, err) = edge(&["queue", "stats", "--data-dir", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("no queue in") && err.contains("--data-dir"), "{err}");
}

#[test]
fn replay_rejects_a_bad_time_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = edge(&["replay", "--since", "yesterday", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("--since") && err.contains("RFC 3339"), "{err}");
}

fn edge_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_backhaul-edge"));
    cmd.args(args);
    for k in ["BACKHAUL_HASH_SECRET", "BACKHAUL_MQTT_PASSWORD", "BACKHAUL_API_KEY"] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CONFIG: &str = r#"
device_id = "rpi-entrance-01"
name = "Entrance Pi"
data_dir = "/var/lib/backhaul"

[source]
kind = "ble"

[transport]
mode = "mqtt"
rate_per_sec = 50

[transport.mqtt]
url = "mqtt://127.0.0.1:1883"
username = "rpi-entrance-01"
"#;

#[test]
fn check_config_prints_effective_settings_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.toml");
    std::fs::write(&file, CONFIG).unwrap();
    let (code, out, err) = edge_env(
        &["check-config", "--config", file.to_str().unwrap()],
        &[
            ("BACKHAUL_HASH_SECRET", "s3cret-hash-key-do-not-print"),
            ("BACKHAUL_MQTT_PASSWORD", "mqtt-pass-do-not-print"),
            ("BACKHAUL_API_KEY", "api-key-0123456789-do-not-print"),
            ("BACKHAUL_TRANSPORT__RATE_PER_SEC", "20"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("do-not-print") && !err.contains("do-not-print"), "a secret was printed:\n{out}\n{err}");
    assert!(out.contains("hash secret: *** (from environment variable BACKHAUL_HASH_SECRET)"), "{out}");
    assert!(out.contains("rate_per_sec = 20"), "{out}");
    assert!(
        out.contains("transport.rate_per_sec set by environment variable BACKHAUL_TRANSPORT__RATE_PER_SEC"),
        "{out}"
    );
    assert!(out.contains("max_detections = 500"), "defaults are shown: {out}");
}

#[test]
fn check_config_refuses_presence_without_a_hash_secret_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.toml");
    std::fs::write(&file, CONFIG).unwrap();
    let (code, _, err) = edge_env(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("decode.hash_secret_file") && err.contains("BACKHAUL_HASH_SECRET"), "{err}");

    std::fs::write(&file, CONFIG.replace("rate_per_sec = 50", "rate_per_second = 50")).unwrap();
    let (code, _, err) =
        edge_env(&["check-config", "--config", file.to_str().unwrap()], &[("BACKHAUL_HASH_SECRET", "x")]);
    assert_eq!(code, 1);
    assert!(err.contains("transport.rate_per_second") && err.contains("unknown field"), "{err}");

    std::fs::write(&file, CONFIG.replace("rpi-entrance-01\"\nname", "rpi/entrance\"\nname")).unwrap();
    let (code, _, err) =
        edge_env(&["check-config", "--config", file.to_str().unwrap()], &[("BACKHAUL_HASH_SECRET", "x")]);
    assert_eq!(code, 1);
    assert!(err.contains("device_id") && err.contains("edge.toml"), "{err}");
}
