//! backhaul-edge: the store-and-forward service for a BLE-listening Raspberry Pi.
//!
//! Stages: `source` → `decode` → `batch` → [`queue`] → `forward`. Only the binary's `main` wires
//! them together. Built so far: the durable [`queue`] and the [`config`].

pub mod config;
pub mod queue;
