//! backhaul-edge: the store-and-forward service for a BLE-listening Raspberry Pi.
//!
//! Stages: [`source`] → `decode` → [`batch`] → [`queue`] → [`forward`], the producing half driven
//! by [`pipeline`]. Only the binary's `main` wires them together. [`status`] serves what
//! [`telemetry`] and the queue know on a loopback port.

pub mod batch;
pub mod clock;
pub mod config;
pub mod decode;
pub mod forward;
pub mod pipeline;
pub mod queue;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod watchdog;
