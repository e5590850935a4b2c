//! Seed compatibility (issue #20; SPEC.md "Wave 2 additions", "Seed compatibility"): the senders
//! already deployed, unchanged, mapped to schema-1 batches that then take the one ingest path
//! ([`crate::ingest::Ingest::accept`]), so they are validated and stored exactly once like any
//! batch.
//!
//! | sender | arrives as | becomes |
//! | --- | --- | --- |
//! | BLE presence agent, HTTP | `POST /api/v1/detections/bulk` `{device_id, detections: [{device_hash, rssi, zone, timestamp}]}`, no `schema`, `batch_id`, `seq`, `Idempotency-Key` | a batch of presence detections ([`agent_batch`]) |
//! | the same agent, MQTT | the same plus `name`, `location`, `timestamp` on `[compat] tfg_topic` | the same |
//! | Thingy:52 gateway | `{timestamp, temp?, humidity?, co2_ppm?, window_open?, battery?}` on `{gateway_id}/{node_mac}/update` | a batch of the gateway with one sensor detection of the node ([`thingy_batch`]) |
//! | fleet client, heartbeat | anything on `rpi/{client_id}/heartbeat` | the device's last seen time and liveness, no row ([`crate::store::Store::heartbeat`]) |
//! | fleet client, state | `{entity_id, pose: {x, y, angle}, velocity: {vx, vy}}` on `rpi/{client_id}/state` | a batch of one telemetry detection ([`state_batch`]) |
//!
//! A payload without a batch id gets a **derived idempotency key**: a UUID (version 8, RFC 9562
//! §5.8) made of the SHA-256 of the batch it becomes ([`derived_key`]), so a resend of the same
//! payload (the agent buffers 100 messages and sends them again after a reconnect; a QoS 1
//! redelivery) is the same batch id and is stored once. Times are normalised to UTC first, so
//! `+01:00` and `Z` spellings of one instant are one batch. The one case a derived key cannot tell
//! apart: the same detections (same device, hashes, RSSI, zones and timestamps) sent twice on
//! purpose are stored once. State reports carry no time: they are stamped when received, so each
//! report is its own batch and a broker's redelivery of one is stored again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use backhaul_shared::batch::SCHEMA_VERSION;
use backhaul_shared::{
    Batch, BatchError, BatchId, Clock, Detection, Limits, Presence, Sensor, Telemetry, Timestamp, Zone,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::CompatConfig;

/// The highest CO2 reading stored, ppm (the edge's Thingy:52 decoder's bound).
pub const MAX_CO2_PPM: u32 = 100_000;

/// The seed agent's body (HTTP and MQTT): SPEC.md "Seed compatibility". `timestamp` (when the
/// agent sent it) is read and not kept: a resend may carry a new one.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentBody {
    device_id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    #[schema(value_type = Option<String>, format = DateTime)]
    timestamp: Option<Timestamp>,
    detections: Vec<AgentDetection>,
}

/// One detection of the seed agent's body.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentDetection {
    device_hash: String,
    rssi: i16,
    zone: Zone,
    /// RFC 3339 with any UTC offset (the agent writes `+01:00`); stored in UTC.
    #[schema(value_type = String, format = DateTime)]
    timestamp: Timestamp,
}

/// Whether `raw` is a JSON object with none of a batch's `schema`, `batch_id` and `seq`: the seed
/// agent's body. A body with any of them is a batch (a third-party batch that forgot `schema` is
/// told so, rather than stored under a derived key).
pub fn is_seed_body(raw: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default, deserialize_with = "present")]
        schema: bool,
        #[serde(default, deserialize_with = "present")]
        batch_id: bool,
        #[serde(default, deserialize_with = "present")]
        seq: bool,
    }
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| true)
    }
    matches!(serde_json::from_slice::<Probe>(raw), Ok(Probe { schema: false, batch_id: false, seq: false }))
}

fn malformed(e: serde_path_to_error::Error<serde_json::Error>) -> BatchError {
    let field = e.path().to_string();
    BatchError::Malformed { field, message: e.into_inner().to_string() }
}

fn parse<'a, T: Deserialize<'a>>(raw: &'a [u8]) -> Result<T, BatchError> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let value = serde_path_to_error::deserialize(&mut de).map_err(malformed)?;
    de.end().map_err(|e| BatchError::Malformed { field: ".".into(), message: e.to_string() })?;
    Ok(value)
}

/// The derived idempotency key of `batch` (its `batch_id` is ignored): SHA-256 of the batch's
/// canonical schema-1 JSON with a nil id, the first 16 bytes with the version (8) and variant bits
/// of a UUID set (RFC 9562 §5.8).
pub fn derived_key(batch: &Batch) -> BatchId {
    let mut canonical = batch.clone();
    canonical.batch_id = BatchId::from_uuid_bytes([0; 16]);
    let digest = Sha256::new().chain_update(b"backhaul-derived-key-v1\n").chain_update(canonical.to_json()).finalize();
    let mut bytes: [u8; 16] = digest[..16].try_into().expect("32 bytes");
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    BatchId::from_uuid_bytes(bytes)
}

/// A batch stamped at its newest detection, with `batch_id` (or its derived key), validated.
fn finish(mut batch: Batch, batch_id: Option<BatchId>, limits: &Limits) -> Result<Batch, BatchError> {
    batch.validate(limits)?;
    batch.batch_id = batch_id.unwrap_or_else(|| derived_key(&batch));
    Ok(batch)
}

fn newest(detections: &[Detection]) -> Option<Timestamp> {
    detections.iter().map(Detection::timestamp).max()
}

/// The seed agent's body as a schema-1 batch: presence detections in UTC, `seq` 0 (the agent
/// numbers nothing: no gaps are tracked for it), stamped at its newest detection, with
/// `batch_id` if the sender gave one (an `Idempotency-Key`) or else its [`derived_key`]. Errors
/// name the field (`detections[2].zone`); an empty `detections` is refused (nothing to store).
pub fn agent_batch(raw: &[u8], batch_id: Option<BatchId>, limits: &Limits) -> Result<Batch, BatchError> {
    let body: AgentBody = parse(raw)?;
    let detections: Vec<Detection> = body
        .detections
        .into_iter()
        .map(|d| {
            Detection::Presence(Presence {
                // The edge writes lower-case hex: one hash, one spelling.
                device_hash: d.device_hash.to_ascii_lowercase(),
                rssi: d.rssi,
                zone: d.zone,
                timestamp: d.timestamp,
            })
        })
        .collect();
    let timestamp = newest(&detections).ok_or_else(|| BatchError::Malformed {
        field: "detections".into(),
        message: "is empty: a body needs at least one detection".into(),
    })?;
    let batch = Batch {
        schema: SCHEMA_VERSION,
        batch_id: BatchId::from_uuid_bytes([0; 16]),
        device_id: body.device_id,
        seq: 0,
        name: body.name,
        location: body.location,
        timestamp,
        detections,
        clock: Clock::Synced,
    };
    finish(batch, batch_id, limits)
}

/// A Thingy:52 gateway's update (`{gateway_id}/{node_mac}/update`); other fields are ignored.
#[derive(Debug, Deserialize)]
struct ThingyUpdate {
    timestamp: SeedTime,
    #[serde(default)]
    temp: Option<f64>,
    #[serde(default)]
    humidity: Option<u8>,
    #[serde(default)]
    co2_ppm: Option<u32>,
    #[serde(default)]
    window_open: Option<bool>,
    #[serde(default)]
    battery: Option<u8>,
}

/// A gateway's time: RFC 3339 (any offset), or Unix seconds (a number below 10^11) or
/// milliseconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SeedTime {
    Text(Timestamp),
    Unix(f64),
}

impl SeedTime {
    fn timestamp(&self) -> Result<Timestamp, BatchError> {
        let bad = |m: String| BatchError::Malformed { field: "timestamp".into(), message: m };
        match self {
            SeedTime::Text(t) => Ok(*t),
            SeedTime::Unix(n) if n.is_finite() && *n >= 0.0 => {
                let ms = if *n < 1e11 { n * 1000.0 } else { *n };
                Timestamp::from_unix_millis(ms as i64).ok_or_else(|| bad(format!("{n} is out of range")))
            }
            SeedTime::Unix(n) => Err(bad(format!("{n} is not a Unix time"))),
        }
    }
}

/// CO2 the Thingy:52 reports while its sensor warms up ("not ready", SPEC.md "Decoders"): absent.
const CO2_NOT_READY: u32 = 0xFFFF_FFFF;

/// A Thingy:52 update as a batch of `gateway`'s with one sensor detection of `node` (no RSSI:
/// the gateway reports none; absent values stay absent, as does CO2 "not ready"; the node's
/// address in lower case, as the edge writes it), keyed by [`derived_key`]. An update with no
/// reading, or CO2 over `MAX_CO2_PPM` ppm (the edge's decoder's bound), is refused.
pub fn thingy_batch(gateway: &str, node: &str, raw: &[u8], limits: &Limits) -> Result<Batch, BatchError> {
    let mut u: ThingyUpdate = parse(raw)?;
    let timestamp = u.timestamp.timestamp()?;
    let bad = |field: &str, message: String| BatchError::Malformed { field: field.into(), message };
    if u.co2_ppm == Some(CO2_NOT_READY) {
        u.co2_ppm = None;
    }
    if let Some(ppm) = u.co2_ppm.filter(|&p| p > MAX_CO2_PPM) {
        return Err(bad("co2_ppm", format!("{ppm} ppm is over {MAX_CO2_PPM}")));
    }
    if u.temp.is_none() && u.humidity.is_none() && u.co2_ppm.is_none() && u.window_open.is_none() && u.battery.is_none()
    {
        return Err(bad(".", "no reading (temp, humidity, co2_ppm, window_open or battery): nothing to store".into()));
    }
    let detection = Detection::Sensor(Sensor {
        node: node.to_ascii_lowercase(),
        rssi: None,
        temp: u.temp,
        humidity: u.humidity,
        co2_ppm: u.co2_ppm,
        window_open: u.window_open,
        battery: u.battery,
        timestamp,
    });
    let batch = Batch {
        schema: SCHEMA_VERSION,
        batch_id: BatchId::from_uuid_bytes([0; 16]),
        device_id: gateway.to_owned(),
        seq: 0,
        name: None,
        location: None,
        timestamp,
        detections: vec![detection],
        clock: Clock::Synced,
    };
    finish(batch, None, limits)
}

/// A fleet client's state report (32-bit integers); other fields are ignored.
#[derive(Debug, Deserialize)]
struct StateReport {
    entity_id: u32,
    pose: Pose,
    velocity: Velocity,
}

#[derive(Debug, Deserialize)]
struct Pose {
    x: i32,
    y: i32,
    angle: i32,
}

#[derive(Debug, Deserialize)]
struct Velocity {
    vx: i32,
    vy: i32,
}

/// A state report of `client` as a batch of one telemetry detection: `entity_id`, and fields
/// `pose.x`, `pose.y`, `pose.angle`, `velocity.vx`, `velocity.vy`, stamped `received` (the
/// report has no time of its own).
pub fn state_batch(client: &str, raw: &[u8], received: Timestamp, limits: &Limits) -> Result<Batch, BatchError> {
    let s: StateReport = parse(raw)?;
    let fields = BTreeMap::from([
        ("pose.x".to_owned(), f64::from(s.pose.x)),
        ("pose.y".to_owned(), f64::from(s.pose.y)),
        ("pose.angle".to_owned(), f64::from(s.pose.angle)),
        ("velocity.vx".to_owned(), f64::from(s.velocity.vx)),
        ("velocity.vy".to_owned(), f64::from(s.velocity.vy)),
    ]);
    let batch = Batch {
        schema: SCHEMA_VERSION,
        batch_id: BatchId::from_uuid_bytes([0; 16]),
        device_id: client.to_owned(),
        seq: 0,
        name: None,
        location: None,
        timestamp: received,
        detections: vec![Detection::Telemetry(Telemetry { entity_id: s.entity_id, fields, timestamp: received })],
        clock: Clock::Synced,
    };
    finish(batch, None, limits)
}

/// Which seed sender a topic belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedTopic<'a> {
    /// `[compat] tfg_topic`: the agent's body; the device is in the payload.
    Agent,
    Thingy {
        gateway: &'a str,
        node: &'a str,
    },
    Heartbeat {
        client: &'a str,
    },
    State {
        client: &'a str,
    },
}

/// The seed MQTT topics this cloud takes (`[compat]`), and the heartbeats it has written lately.
#[derive(Debug, Default)]
pub struct Compat {
    pub config: CompatConfig,
    heartbeats: Mutex<HashMap<String, Instant>>,
    /// Devices created by heartbeats in the current minute: (its start, how many).
    new_devices: Mutex<Option<(Instant, u32)>>,
}

/// Devices heartbeats may create per minute (a fleet's clients appear over a few minutes; a flood
/// of made-up ids is dead-lettered beyond this).
pub const NEW_DEVICES_PER_MINUTE: u32 = 60;

/// Clients whose last heartbeat write is remembered, at most (a flood of made-up client ids
/// clears the memory rather than growing it).
const MAX_REMEMBERED: usize = 100_000;

impl Compat {
    pub fn new(config: CompatConfig) -> Self {
        Self { config, heartbeats: Mutex::default(), new_devices: Mutex::default() }
    }

    /// The subscriptions, each shared by `group`'s replicas like the batches (empty with
    /// `[compat]` off).
    pub fn filters(&self, group: &str) -> Vec<String> {
        let mut f = Vec::new();
        if let Some(t) = &self.config.tfg_topic {
            f.push(format!("$share/{group}/{t}"));
        }
        if self.config.thingy_topics {
            f.push(format!("$share/{group}/+/+/update"));
        }
        if self.config.fleet_topics {
            f.push(format!("$share/{group}/rpi/+/heartbeat"));
            f.push(format!("$share/{group}/rpi/+/state"));
        }
        f
    }

    /// The seed sender of `topic`, if `[compat]` takes it.
    pub fn classify<'a>(&self, topic: &'a str) -> Option<SeedTopic<'a>> {
        if self.config.tfg_topic.as_deref() == Some(topic) {
            return Some(SeedTopic::Agent);
        }
        let levels: Vec<&str> = topic.split('/').collect();
        match levels.as_slice() {
            ["rpi", client, "heartbeat"] if self.config.fleet_topics => Some(SeedTopic::Heartbeat { client }),
            ["rpi", client, "state"] if self.config.fleet_topics => Some(SeedTopic::State { client }),
            [gateway, node, "update"] if self.config.thingy_topics => Some(SeedTopic::Thingy { gateway, node }),
            _ => None,
        }
    }

    /// Whether a heartbeat of `client` now should be written: the first, then one per
    /// [`crate::store::HEARTBEAT_WRITE_EVERY`].
    pub fn heartbeat_due(&self, client: &str) -> bool {
        let now = Instant::now();
        let mut seen = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get(client) {
            Some(at) if now.duration_since(*at) < crate::store::HEARTBEAT_WRITE_EVERY => false,
            _ => {
                if seen.len() >= MAX_REMEMBERED {
                    seen.clear();
                }
                seen.insert(client.to_owned(), now);
                true
            }
        }
    }

    /// Whether a heartbeat may create one more device this minute (counts it if so).
    pub fn new_device_allowed(&self) -> bool {
        let now = Instant::now();
        let mut window = self.new_devices.lock().unwrap_or_else(|p| p.into_inner());
        let (start, n) = window.get_or_insert((now, 0));
        if now.duration_since(*start) >= std::time::Duration::from_secs(60) {
            (*start, *n) = (now, 0);
        }
        if *n >= NEW_DEVICES_PER_MINUTE {
            return false;
        }
        *n += 1;
        true
    }

    /// Forgets a heartbeat write that failed, so the next heartbeat tries again.
    pub fn heartbeat_failed(&self, client: &str) {
        self.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).remove(client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn an_agent_body_with_offsets_becomes_a_utc_batch_whose_key_does_not_depend_on_the_spelling() {
        let plus_one = br#"{"device_id": "rpi-entrance-01", "detections": [
            {"device_hash": "a1b2c3d4e5f60718", "rssi": -61, "zone": "near", "timestamp": "2026-11-30T11:00:00.250+01:00"},
            {"device_hash": "0011223344556677", "rssi": -80, "zone": "far", "timestamp": "2026-11-30T11:00:01+01:00"}]}"#;
        let utc = br#"{"device_id": "rpi-entrance-01", "timestamp": "2026-11-30T10:05:00Z", "detections": [
            {"device_hash": "a1b2c3d4e5f60718", "rssi": -61, "zone": "near", "timestamp": "2026-11-30T10:00:00.25Z"},
            {"device_hash": "0011223344556677", "rssi": -80, "zone": "far", "timestamp": "2026-11-30T10:00:01Z"}]}"#;
        assert!(is_seed_body(plus_one));
        let a = agent_batch(plus_one, None, &limits()).unwrap();
        let b = agent_batch(utc, None, &limits()).unwrap();
        assert_eq!(a.batch_id, b.batch_id, "the agent's send time and the offsets' spelling do not change the key");
        assert_eq!(a.to_json(), b.to_json());
        assert!(a.batch_id.is_uuid());
        let id = a.batch_id.to_string();
        assert_eq!(&id[14..15], "8", "a version 8 UUID: {id}");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "RFC 9562 variant: {id}");
        assert_eq!(a.timestamp.to_string(), "2026-11-30T10:00:01Z");
        assert_eq!(a.detections[0].timestamp().to_string(), "2026-11-30T10:00:00.25Z");
        assert_eq!(a.seq, 0);
        // Parsing it back as a batch gives the same batch (what the store reads).
        assert_eq!(Batch::from_json(&a.to_json(), &limits()).unwrap(), a);
        // Other detections, another key.
        let other = agent_batch(&plus_one.replace(b"-61", b"-62"), None, &limits()).unwrap();
        assert_ne!(other.batch_id, a.batch_id);
    }

    #[test]
    fn the_derived_key_of_a_known_payload_never_changes() {
        // Canonical form v1: a change here stores every resend that straddles the upgrade twice.
        let body = br#"{"device_id": "rpi-entrance-01", "detections": [
            {"device_hash": "a1b2c3d4e5f60718", "rssi": -61, "zone": "near", "timestamp": "2026-11-30T11:00:00+01:00"}]}"#;
        let b = agent_batch(body, None, &limits()).unwrap();
        assert_eq!(b.batch_id.to_string(), "ee0d2417-e11e-8a05-bc6e-73204fbe2d37");
    }

    trait Replace {
        fn replace(&self, from: &[u8], to: &[u8]) -> Vec<u8>;
    }

    impl Replace for [u8] {
        fn replace(&self, from: &[u8], to: &[u8]) -> Vec<u8> {
            String::from_utf8_lossy(self)
                .replace(&*String::from_utf8_lossy(from), &String::from_utf8_lossy(to))
                .into_bytes()
        }
    }

    #[test]
    fn a_bad_agent_body_names_its_field() {
        for (body, field) in [
            (&br#"{"device_id": "pi", "detections": [{"device_hash": "ab", "rssi": -61, "zone": "close", "timestamp": "2026-11-30T10:00:00Z"}]}"#[..], "detections[0].zone"),
            (br#"{"device_id": "pi", "detections": [{"device_hash": "ab", "rssi": -300, "zone": "near", "timestamp": "2026-11-30T10:00:00Z"}]}"#, "detections[0].rssi"),
            (br#"{"device_id": "pi", "detections": []}"#, "detections"),
            (br#"{"device_id": "a/b", "detections": [{"device_hash": "ab", "rssi": -61, "zone": "near", "timestamp": "2026-11-30T10:00:00Z"}]}"#, "device_id"),
            (br#"{"detections": []}"#, "."),
        ] {
            let e = agent_batch(body, None, &limits()).unwrap_err();
            assert!(e.field().starts_with(field), "{e} (field {})", e.field());
        }
        assert!(!is_seed_body(br#"{"schema": 1}"#));
        assert!(!is_seed_body(br#"{"schema": null, "device_id": "pi", "detections": []}"#));
        assert!(!is_seed_body(br#"{"batch_id": "x", "device_id": "pi", "detections": []}"#));
        assert!(!is_seed_body(br#"{"seq": 3, "device_id": "pi", "detections": []}"#));
        assert!(!is_seed_body(b"[1]"));
    }

    #[test]
    fn a_thingy_update_without_co2_keeps_it_absent_and_reads_unix_times() {
        let b = thingy_batch(
            "gw-lab",
            "C0:98:E5:00:00:01",
            br#"{"timestamp": "2026-11-30T11:00:00+01:00", "temp": 21.5, "humidity": 40, "window_open": false, "battery": 88}"#,
            &limits(),
        )
        .unwrap();
        assert_eq!(b.device_id, "gw-lab");
        let Detection::Sensor(s) = &b.detections[0] else { panic!() };
        assert_eq!(
            (s.node.as_str(), s.temp, s.humidity, s.co2_ppm, s.window_open, s.battery, s.rssi),
            ("c0:98:e5:00:00:01", Some(21.5), Some(40), None, Some(false), Some(88), None)
        );
        let not_ready =
            thingy_batch("gw", "n1", br#"{"timestamp": 1796036400, "temp": 20, "co2_ppm": 4294967295}"#, &limits())
                .unwrap();
        let Detection::Sensor(s) = &not_ready.detections[0] else { panic!() };
        assert_eq!(s.co2_ppm, None, "0xFFFFFFFF is the sensor's not-ready value");
        let e = thingy_batch("gw", "n1", br#"{"timestamp": 1796036400, "co2_ppm": 200000}"#, &limits()).unwrap_err();
        assert_eq!(e.field(), "co2_ppm");
        let e = thingy_batch("gw", "n1", br#"{"timestamp": 1796036400}"#, &limits()).unwrap_err();
        assert!(e.to_string().contains("no reading"), "{e}");
        let json = String::from_utf8(b.to_json()).unwrap();
        assert!(!json.contains("co2_ppm") && !json.contains("rssi"), "{json}");
        let secs = thingy_batch("gw", "n1", br#"{"timestamp": 1796036400, "temp": 20}"#, &limits()).unwrap();
        let millis = thingy_batch("gw", "n1", br#"{"timestamp": 1796036400000, "temp": 20}"#, &limits()).unwrap();
        assert_eq!(secs.timestamp, millis.timestamp);
        assert_eq!(secs.batch_id, millis.batch_id);
        let e = thingy_batch("gw", "n1", br#"{"timestamp": "x", "temp": 20}"#, &limits()).unwrap_err();
        assert_eq!(e.field(), "timestamp");
        let e = thingy_batch("gw", "n1", br#"{"timestamp": 1796036400, "temp": 200}"#, &limits()).unwrap_err();
        assert_eq!(e.field(), "detections[0].temp");
    }

    #[test]
    fn a_state_report_becomes_telemetry_with_32_bit_fields() {
        let at: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
        let raw = br#"{"entity_id": 7, "pose": {"x": -2147483648, "y": 2147483647, "angle": 90}, "velocity": {"vx": -3, "vy": 0}}"#;
        let b = state_batch("robot-1", raw, at, &limits()).unwrap();
        let Detection::Telemetry(t) = &b.detections[0] else { panic!() };
        assert_eq!(t.entity_id, 7);
        assert_eq!(t.fields["pose.x"], -2147483648.0);
        assert_eq!(t.fields["pose.y"], 2147483647.0);
        assert_eq!(t.fields["velocity.vx"], -3.0);
        assert_eq!(t.fields.len(), 5);
        let over =
            br#"{"entity_id": 7, "pose": {"x": 2147483648, "y": 0, "angle": 0}, "velocity": {"vx": 0, "vy": 0}}"#;
        assert_eq!(state_batch("robot-1", over, at, &limits()).unwrap_err().field(), "pose.x");
        let later = state_batch("robot-1", raw, "2026-11-30T10:00:01Z".parse().unwrap(), &limits()).unwrap();
        assert_ne!(later.batch_id, b.batch_id, "each report is its own batch");
    }

    #[test]
    fn topics_are_classified_only_when_their_sender_is_on() {
        let off = Compat::default();
        assert_eq!(off.classify("tfg/detections/raw"), None);
        assert_eq!(off.classify("gw/n1/update"), None);
        assert!(off.filters("g").is_empty());
        let on = Compat::new(CompatConfig {
            tfg_topic: Some("tfg/detections/raw".into()),
            thingy_topics: true,
            fleet_topics: true,
        });
        assert_eq!(on.classify("tfg/detections/raw"), Some(SeedTopic::Agent));
        assert_eq!(on.classify("gw/n1/update"), Some(SeedTopic::Thingy { gateway: "gw", node: "n1" }));
        assert_eq!(on.classify("rpi/c1/heartbeat"), Some(SeedTopic::Heartbeat { client: "c1" }));
        assert_eq!(on.classify("rpi/c1/state"), Some(SeedTopic::State { client: "c1" }));
        assert_eq!(on.classify("rpi/c1/other"), None);
        assert_eq!(on.classify("a/b/c/update"), None);
        assert_eq!(on.filters("g").len(), 4);
        for _ in 0..NEW_DEVICES_PER_MINUTE {
            assert!(on.new_device_allowed());
        }
        assert!(!on.new_device_allowed(), "a flood of new ids is capped");
        assert!(on.heartbeat_due("c1"));
        assert!(!on.heartbeat_due("c1"));
        on.heartbeat_failed("c1");
        assert!(on.heartbeat_due("c1"));
    }
}
