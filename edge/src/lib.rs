//! backhaul-edge: the store-and-forward service for a BLE-listening Raspberry Pi.
//!
//! Stages: [`source`] → `decode` → [`batch`] → [`queue`] → [`forward`], the producing half driven
//! by [`pipeline`]; [`commands`] runs what operators send through the cloud. Only the binary's
//! `main` wires them together. [`status`] serves what
//! [`telemetry`] and the queue know on a loopback port.

pub mod batch;
pub mod clock;
pub mod commands;
pub mod config;
pub mod decode;
pub mod forward;
pub mod fuzzing;
pub mod init;
pub mod pipeline;
pub mod queue;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod watchdog;

/// Test-only fault injection: with `BACKHAUL_FAILPOINT={name}MS` (e.g.
/// `panic_forwarder_after:1500`), how long after its start a stage should fail on purpose.
/// Failpoints: `freeze_forwarder_after:` (the forwarder wedges: the watchdog test),
/// `panic_forwarder_after:` and `panic_source_after:` (the thread panics: the test that any
/// panic stops the process for systemd to restart it). Unset in production: `None`.
pub fn failpoint_after(name: &str) -> Option<std::time::Duration> {
    std::env::var("BACKHAUL_FAILPOINT").ok()?.strip_prefix(name)?.parse().ok().map(std::time::Duration::from_millis)
}
