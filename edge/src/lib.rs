//! backhaul-edge: the store-and-forward service for a BLE-listening Raspberry Pi.
//!
//! Stages: `source` → `decode` → `batch` → [`queue`] → `forward`. Only the binary's `main` wires
//! them together. Built so far: the durable [`queue`], the [`config`], the [`batch`] cutter and the simulated
//! [`source`].

pub mod batch;
pub mod config;
pub mod queue;
pub mod source;
