//! The backhaul wire contract and what both binaries share.
//!
//! - [`batch`]: the schema-1 batch, its idempotency key ([`BatchId`]) and validation.
//! - [`wire`]: acks, device status and the MQTT topic layout.
//! - [`command`]: commands from the cloud to one device and their results (issue #18).
//! - [`record`]: the version + length + CRC32 framing of every record stored on disk.
//! - [`config`]: TOML + environment configuration with errors that name the key.
//! - [`logging`]: `tracing` for a terminal or for journald.
//! - [`fuzzing`]: the fuzz targets' entry points.
//! - [`panics`]: panic messages, and panics caught on purpose under a process-wide hook.
//! - [`tls`], [`link`], [`backoff`]: what both binaries' links share (TLS, the broker endpoint,
//!   reconnect pacing, systemd notify).

pub mod backoff;
pub mod batch;
pub mod command;
pub mod config;
pub mod fuzzing;
pub mod link;
pub mod logging;
pub mod panics;
pub mod record;
pub mod tls;
pub mod wire;

pub use batch::{
    Batch, BatchError, BatchId, Clock, Detection, Limits, Presence, Sensor, Telemetry, Timestamp, ValidationError, Zone,
};
pub use wire::{Ack, AckMessage, AckStatus, DeviceStatus, Topics};
