//! The binary runs and explains itself. (Also makes `cargo test --workspace` build the binary
//! before the end-to-end tests in `backhaul-tests` run it.)

use std::process::Command;

#[test]
fn help_lists_the_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_backhaul-cloud")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "demo"] {
        assert!(text.contains(cmd), "--help should list `{cmd}`:\n{text}");
    }
}
