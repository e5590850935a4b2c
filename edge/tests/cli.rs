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
