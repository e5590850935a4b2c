//! The batch, schema 1: what an edge device sends and the cloud stores (SPEC.md, "The batch").
//!
//! Parsing and validation are separate steps with one entry point, [`Batch::from_json`], that does
//! both, so every consumer (the cloud's HTTP and MQTT adapters, the edge's own checks) rejects the same
//! inputs with the same messages. Every error names the offending field by its JSON path, e.g.
//! `detections[3].rssi`, so an operator reading a log or a 400 body knows what to fix.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;
/// Longest `device_id` accepted, in bytes. It is an MQTT topic level, so it is kept short.
pub const MAX_DEVICE_ID_BYTES: usize = 64;
/// RSSI values outside this range (dBm) are not physical and are rejected.
pub const RSSI_RANGE: std::ops::RangeInclusive<i32> = -127..=20;
/// Longest free-text field (`name`, `location`, `node`), in bytes.
pub const MAX_TEXT_BYTES: usize = 256;

/// The idempotency key of a batch: a ULID made at enqueue time, or a UUID from a third-party
/// sender (SPEC.md, "Wave 2 additions": the cloud accepts a UUID of any version).
///
/// A ULID is unique forever (48 bits of milliseconds + 80 random bits), also when a device's data
/// directory is wiped and its `seq` starts again, and sortable by creation time. On the wire it is
/// the 26-character Crockford base32 form; a UUID is written in its hyphenated lowercase form (RFC
/// 9562 §4), whatever form and case it was read in, so one id has one text. Both are 128 bits; the
/// form is part of the id (a UUID and a ULID with the same bits are different ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchId {
    bits: ulid::Ulid,
    uuid: bool,
}

impl BatchId {
    /// A new ULID, made now.
    pub fn new() -> Self {
        Self { bits: ulid::Ulid::new(), uuid: false }
    }

    /// Milliseconds since the Unix epoch at which a ULID was made (meaningless for a UUID).
    pub fn timestamp_ms(self) -> u64 {
        self.bits.timestamp_ms()
    }

    /// The id's 16 bytes, big-endian: for a ULID, byte order is time order.
    pub fn to_bytes(self) -> [u8; 16] {
        self.bits.to_bytes()
    }

    /// A ULID from its 16 bytes (the edge's queue stores its own ids so).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self { bits: ulid::Ulid::from_bytes(bytes), uuid: false }
    }

    /// A UUID from its 16 bytes (RFC 9562), written in the UUID form.
    pub fn from_uuid_bytes(bytes: [u8; 16]) -> Self {
        Self { bits: ulid::Ulid::from_bytes(bytes), uuid: true }
    }

    /// Whether this id is a UUID (a third-party sender's, or a derived key).
    pub fn is_uuid(self) -> bool {
        self.uuid
    }
}

impl Default for BatchId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.uuid {
            uuid::Uuid::from_bytes(self.bits.to_bytes()).hyphenated().fmt(f)
        } else {
            self.bits.fmt(f)
        }
    }
}

impl FromStr for BatchId {
    type Err = String;

    /// A 26-character ULID, or a UUID of any version (hyphenated, simple, braced or URN form, any
    /// case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == ulid::ULID_LEN {
            return ulid::Ulid::from_string(s)
                .map(|bits| Self { bits, uuid: false })
                .map_err(|e| format!("`{s}` is not a batch id (a 26-character ULID or a UUID): {e}"));
        }
        uuid::Uuid::try_parse(s)
            .map(|u| Self::from_uuid_bytes(u.into_bytes()))
            .map_err(|e| format!("`{s}` is not a batch id (a 26-character ULID or a UUID): {e}"))
    }
}

impl Serialize for BatchId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BatchId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The shared surface of an id that is a ULID newtype (`$name(ulid::Ulid)`): `new` (made now),
/// `timestamp_ms` (milliseconds since the Unix epoch it was made at), `Default` (a new one), and
/// the 26-character Crockford base32 form for `Display`, `FromStr` (the error names `$what`) and
/// serde.
macro_rules! ulid_id {
    ($name:ident, $what:literal) => {
        impl $name {
            /// A new id, made now.
            pub fn new() -> Self {
                Self(ulid::Ulid::new())
            }

            /// A new id, made now, above every id of this type this process made with it: ULIDs
            /// made in one millisecond are otherwise in random order (`ulid::Generator`, which
            /// increments the random part within a millisecond). For ids whose order is their
            /// order of creation (commands are published by id).
            pub fn new_monotonic() -> Self {
                static GENERATOR: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
                let mut generator = GENERATOR.lock().unwrap_or_else(|p| p.into_inner());
                // Overflow of the random part within one millisecond (2^80 ids): a plain new one.
                Self(generator.generate().unwrap_or_else(|_| ulid::Ulid::new()))
            }

            /// Milliseconds since the Unix epoch at which the id was made.
            pub fn timestamp_ms(self) -> u64 {
                self.0.timestamp_ms()
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                ulid::Ulid::from_string(s)
                    .map(Self)
                    .map_err(|e| format!("`{s}` is not a {} (a 26-character ULID): {e}", $what))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use ulid_id;

/// A point in time, on the wire as RFC 3339 (UTC, `Z`), internally UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    pub fn now() -> Self {
        Self(OffsetDateTime::now_utc())
    }

    /// Microseconds since the Unix epoch (how the cloud stores time).
    pub fn unix_micros(self) -> i64 {
        (self.0.unix_timestamp_nanos() / 1_000) as i64
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(self) -> i64 {
        (self.0.unix_timestamp_nanos() / 1_000_000) as i64
    }

    /// `None` when out of the representable range.
    pub fn from_unix_micros(micros: i64) -> Option<Self> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).ok().map(Self)
    }

    pub fn from_unix_millis(millis: i64) -> Option<Self> {
        Self::from_unix_micros(millis.checked_mul(1_000)?)
    }

    pub fn as_offset_date_time(self) -> OffsetDateTime {
        self.0
    }
}

/// The times a [`Timestamp`] parsed from the wire may hold, in UTC: from the Unix epoch to the end
/// of year 9999 (the last a UTC RFC 3339 string can write). Any other time is refused where it is
/// parsed, naming its field, rather than failing later: e.g. `9999-12-31T23:59:59-01:00` is valid
/// RFC 3339 but lies in year 10000 in UTC, where converting it used to panic (issue #14).
pub const TIME_WINDOW: (&str, &str) = ("1970-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z");

impl TryFrom<OffsetDateTime> for Timestamp {
    type Error = String;

    /// In UTC, if the time is within [`TIME_WINDOW`].
    fn try_from(t: OffsetDateTime) -> Result<Self, Self::Error> {
        let utc = t.checked_to_offset(time::UtcOffset::UTC).ok_or_else(|| {
            format!("{t} is past year 9999 in UTC (the supported window is {} to {})", TIME_WINDOW.0, TIME_WINDOW.1)
        })?;
        if utc.unix_timestamp() < 0 {
            return Err(format!(
                "{t} is before {} (the supported window is {} to {})",
                TIME_WINDOW.0, TIME_WINDOW.0, TIME_WINDOW.1
            ));
        }
        Ok(Self(utc))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.format(&Rfc3339) {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "{}", self.0),
        }
    }
}

impl FromStr for Timestamp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|e| format!("`{s}` is not an RFC 3339 timestamp (like 2026-11-21T10:30:00Z): {e}"))?;
        Self::try_from(t).map_err(|e| format!("`{s}` is out of range: {e}"))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One batch of detections from one device.
///
/// Never reorder or rename these fields: they are the wire format, and the cloud hashes the bytes.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Always [`SCHEMA_VERSION`].
    pub schema: u32,
    /// The idempotency key: a ULID, or a UUID.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "01JDX3Q4W8Z5N7K2M9P6R1T0VB"))]
    pub batch_id: BatchId,
    /// The device's id, also a topic level: 1..=64 bytes, no `/`, `+`, `#`.
    pub device_id: String,
    /// Per-device sequence assigned at enqueue; a gap means batches were dropped by policy.
    pub seq: u64,
    /// A human name for the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where the device is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// When the batch was cut.
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub timestamp: Timestamp,
    /// The detections, oldest first.
    pub detections: Vec<Detection>,
    /// Whether the device trusted its wall clock when it stamped this batch. Absent on the wire
    /// means [`Clock::Synced`], and a synced batch is written without it, so its bytes are those of
    /// a batch from before the field existed (added in wave 2, issue #13).
    #[serde(default, skip_serializing_if = "Clock::is_synced")]
    pub clock: Clock,
}

/// How the times of a batch were taken (SPEC.md, wave 2: the batch's additive `clock` field).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clock {
    /// From the wall clock, which was at or above the device's clock floor.
    #[default]
    Synced,
    /// The wall clock was below the device's clock floor (a Pi without an RTC before NTP synced):
    /// the times are the floor plus monotonic time since, an estimate that never goes backwards.
    Unsynced,
}

impl Clock {
    pub fn is_synced(&self) -> bool {
        *self == Clock::Synced
    }
}

/// One observation of one advertiser: a JSON object whose `kind` names its variant (SPEC.md, "The
/// batch"), e.g. `{"kind": "presence", "device_hash": "...", ...}`. Deserialized by hand (below),
/// serialized by serde with `kind` first.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Detection {
    Presence(Presence),
    Sensor(Sensor),
    /// Added in wave 2 (issue #20): a fleet client's state report.
    Telemetry(Telemetry),
}

impl Detection {
    pub fn timestamp(&self) -> Timestamp {
        match self {
            Detection::Presence(p) => p.timestamp,
            Detection::Sensor(s) => s.timestamp,
            Detection::Telemetry(t) => t.timestamp,
        }
    }

    /// dBm, if the detection was heard over the air (a gateway's sensor update and telemetry
    /// carry none).
    pub fn rssi(&self) -> Option<i16> {
        match self {
            Detection::Presence(p) => Some(p.rssi),
            Detection::Sensor(s) => s.rssi,
            Detection::Telemetry(_) => None,
        }
    }
}

/// Reads a detection without serde's buffering of an internally tagged enum when `kind` is its
/// first key, as [`Detection`]'s own `Serialize` writes it: the rest of the object goes straight to
/// the variant's struct. Anything else (another key order, e.g. a re-serialized `serde_json::Value`
/// with sorted keys, or the array form) goes to serde's derive ([`Tagged`]) as before, so the same
/// inputs are accepted and refused either way (pinned against the derive by
/// `a_detection_reads_as_the_derive_reads_it`): stored batches stay readable.
///
/// Why: in the cloud's profile of an MQTT drain (`perf record`, 100 detections per batch), serde's
/// buffering and the allocations it makes were about 15% of the cloud's CPU; `bench scenario parse`
/// measured 600 → 405 ns per detection (issue #15).
impl<'de> Deserialize<'de> for Detection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DetectionVisitor)
    }
}

/// serde's derive of the wire form: what [`Detection`] was read with before the fast path, and
/// still is for any object whose first key is not `kind`.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Tagged {
    Presence(Presence),
    Sensor(Sensor),
    Telemetry(Telemetry),
}

impl From<Tagged> for Detection {
    fn from(t: Tagged) -> Self {
        match t {
            Tagged::Presence(p) => Detection::Presence(p),
            Tagged::Sensor(s) => Detection::Sensor(s),
            Tagged::Telemetry(t) => Detection::Telemetry(t),
        }
    }
}

/// A detection's variant, as its `kind` names it: read as serde's derive reads [`Tagged`]'s tag
/// (a string only, with the derive's messages), so an error reads the same whatever the key order.
#[derive(Deserialize)]
#[serde(variant_identifier, rename_all = "snake_case")]
enum Kind {
    Presence,
    Sensor,
    Telemetry,
}

/// A detection object's first key: `kind`, or another key (handed back to the derive).
enum FirstKey {
    Kind,
    Other(String),
}

impl<'de> Deserialize<'de> for FirstKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = FirstKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FirstKey, E> {
                Ok(if v == "kind" { FirstKey::Kind } else { FirstKey::Other(v.to_owned()) })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

struct DetectionVisitor;

impl<'de> serde::de::Visitor<'de> for DetectionVisitor {
    type Value = Detection;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a detection: an object with a \"kind\"")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Detection, A::Error> {
        use serde::de::value::MapAccessDeserializer;
        let first = match map.next_key::<FirstKey>()? {
            Some(FirstKey::Kind) => {
                let kind = map.next_value::<Kind>()?;
                // A second `kind` would be an unknown field to the variant's struct: refuse it,
                // as the derive does.
                let rest = MapAccessDeserializer::new(NoSecondKind(map));
                return Ok(match kind {
                    Kind::Presence => Detection::Presence(Presence::deserialize(rest)?),
                    Kind::Sensor => Detection::Sensor(Sensor::deserialize(rest)?),
                    Kind::Telemetry => Detection::Telemetry(Telemetry::deserialize(rest)?),
                });
            }
            Some(FirstKey::Other(key)) => Some(key),
            None => None,
        };
        // The derive reads the whole object again: the key read above first, then the rest.
        Tagged::deserialize(MapAccessDeserializer::new(Replay { first, map })).map(Detection::from)
    }

    /// The array form (`["presence", hash, rssi, zone, timestamp]`), which the derive reads.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Detection, A::Error> {
        Tagged::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(Detection::from)
    }
}

/// A map whose first key was read already: hands that key out again, then the map's entries (its
/// value was not read, so it comes from the map).
struct Replay<A> {
    first: Option<String>,
    map: A,
}

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for Replay<A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        match self.first.take() {
            Some(key) => seed.deserialize(serde::de::value::StringDeserializer::new(key)).map(Some),
            None => self.map.next_key_seed(seed),
        }
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint().map(|n| n + usize::from(self.first.is_some()))
    }
}

/// The rest of a detection object after its `kind`: a second `kind` is refused (serde's derive
/// refuses it too), every other entry is passed on.
struct NoSecondKind<A>(A);

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for NoSecondKind<A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(KindGuard(seed))
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.0.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

/// Deserializes a key with `K`, refusing the key `kind`.
struct KindGuard<K>(K);

impl<'de, K: serde::de::DeserializeSeed<'de>> serde::de::DeserializeSeed<'de> for KindGuard<K> {
    type Value = K::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<K::Value, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de, K: serde::de::DeserializeSeed<'de>> serde::de::Visitor<'de> for KindGuard<K> {
    type Value = K::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    // A key without escapes is borrowed from the input: no allocation per key.
    fn visit_borrowed_str<E: serde::de::Error>(self, key: &'de str) -> Result<K::Value, E> {
        Self::refuse_kind(key)?;
        self.0.deserialize(serde::de::value::BorrowedStrDeserializer::new(key))
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<K::Value, E> {
        Self::refuse_kind(key)?;
        self.0.deserialize(serde::de::value::StrDeserializer::new(key))
    }
}

impl<K> KindGuard<K> {
    fn refuse_kind<E: serde::de::Error>(key: &str) -> Result<(), E> {
        if key == "kind" {
            return Err(E::custom("duplicate field `kind`"));
        }
        Ok(())
    }
}

/// A passer-by, known only by a keyed hash of its address.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    /// HMAC of the advertiser's address, hex (16 digits as the edge writes it).
    pub device_hash: String,
    /// dBm.
    pub rssi: i16,
    pub zone: Zone,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub timestamp: Timestamp,
}

/// Distance class derived from RSSI thresholds.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Zone {
    Near,
    Medium,
    Far,
}

/// A Thingy:52 sensor reading. Absent values are omitted, never zero-filled.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensor {
    /// The sensor node's address (the fleet's own hardware, not a passer-by).
    pub node: String,
    /// dBm; absent when relayed by a gateway that does not report it (issue #20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rssi: Option<i16>,
    /// °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp: Option<f64>,
    /// % relative humidity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub humidity: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub co2_ppm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_open: Option<bool>,
    /// Battery %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery: Option<u8>,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub timestamp: Timestamp,
}

/// Numbers reported by an entity of a fleet client (a robot's pose and velocity, issue #20), e.g.
/// `{"kind": "telemetry", "entity_id": 7, "fields": {"pose.x": 120, "velocity.vx": -3},
/// "timestamp": "..."}`. Field names are 1..=64 bytes of text; at most [`MAX_TELEMETRY_FIELDS`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub entity_id: u32,
    pub fields: std::collections::BTreeMap<String, f64>,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub timestamp: Timestamp,
}

/// Most fields one telemetry detection may carry.
pub const MAX_TELEMETRY_FIELDS: usize = 64;

/// Limits a consumer enforces beyond the schema itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most detections one batch may carry.
    pub max_detections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_detections: 10_000 }
    }
}

/// A batch that parsed but breaks a rule. `field` is the JSON path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("field `{field}`: {problem}")]
pub struct ValidationError {
    pub field: String,
    pub problem: String,
}

impl ValidationError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { field: field.into(), problem: problem.into() }
    }
}

/// Why bytes are not an acceptable batch.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BatchError {
    /// Not JSON, or JSON of the wrong shape. `field` is the path where it went wrong (`.` = the root).
    #[error("malformed batch at `{field}`: {message}")]
    Malformed { field: String, message: String },
    /// Well-formed but breaks a rule.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

impl BatchError {
    /// The JSON path of the offending field.
    pub fn field(&self) -> &str {
        match self {
            BatchError::Malformed { field, .. } => field,
            BatchError::Invalid(v) => &v.field,
        }
    }
}

impl Batch {
    /// Parses and validates a batch from its wire bytes (SPEC.md, "The batch").
    ///
    /// Errors: [`BatchError::Invalid`] naming `schema` for a schema missing or other than
    /// [`SCHEMA_VERSION`] (checked first); [`BatchError::Malformed`] naming the field (its JSON
    /// path) for other bytes that are not a batch; [`BatchError::Invalid`] for a batch that
    /// breaks a rule of [`Self::validate`].
    pub fn from_json(bytes: &[u8], limits: &Limits) -> Result<Self, BatchError> {
        // The common case, a well-formed batch, costs one plain parse: the parse that tracks the
        // path for the error (about a third slower, measured in the cloud's profile) and the
        // schema check run only for bytes that fail it, to say why.
        let batch = match serde_json::from_slice::<Batch>(bytes) {
            Ok(batch) => batch,
            Err(plain) => return Err(Self::why_not(bytes, plain)),
        };
        if batch.schema != SCHEMA_VERSION {
            if let Some(e) = Self::schema_error(bytes) {
                return Err(e);
            }
            // A batch written as a JSON array: `validate` names the schema.
        }
        batch.validate(limits)?;
        Ok(batch)
    }

    /// The error for a batch object whose `schema` is missing or not [`SCHEMA_VERSION`], if it is
    /// one: a batch of a future schema gets that message rather than one about whatever field it
    /// renamed.
    fn schema_error(bytes: &[u8]) -> Option<BatchError> {
        #[derive(Deserialize)]
        struct SchemaOnly {
            schema: Option<serde_json::Value>,
        }
        match serde_json::from_slice::<SchemaOnly>(bytes) {
            Ok(SchemaOnly { schema: None }) => Some(
                ValidationError::new("schema", format!("is missing (this build reads schema {SCHEMA_VERSION})")).into(),
            ),
            Ok(SchemaOnly { schema: Some(v) }) if v.as_u64() != Some(u64::from(SCHEMA_VERSION)) => Some(
                ValidationError::new(
                    "schema",
                    format!("unsupported schema {v} (this build reads schema {SCHEMA_VERSION})"),
                )
                .into(),
            ),
            _ => None,
        }
    }

    /// Why `bytes`, which the plain parse refused with `plain`, are not a batch: the schema
    /// first ([`Self::schema_error`]), then the path of the field that failed.
    fn why_not(bytes: &[u8], plain: serde_json::Error) -> BatchError {
        if let Some(e) = Self::schema_error(bytes) {
            return e;
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        match serde_path_to_error::deserialize::<_, Batch>(&mut de) {
            Err(e) => {
                let path = e.path().to_string();
                let message = e.into_inner().to_string();
                refine_detection_error(bytes, &path, &message).unwrap_or(BatchError::Malformed { field: path, message })
            }
            Ok(_) => BatchError::Malformed {
                field: ".".into(),
                // `end` fails where the plain parse did (trailing bytes); the plain error otherwise.
                message: de.end().err().unwrap_or(plain).to_string(),
            },
        }
    }

    /// The wire bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Batch always serializes")
    }

    /// Checks every rule that the types alone do not.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        if self.schema != SCHEMA_VERSION {
            return Err(ValidationError::new(
                "schema",
                format!("unsupported schema {} (this build reads schema {SCHEMA_VERSION})", self.schema),
            ));
        }
        validate_device_id(&self.device_id).map_err(|p| ValidationError::new("device_id", p))?;
        if i64::try_from(self.seq).is_err() {
            return Err(ValidationError::new("seq", format!("{} is over {}", self.seq, i64::MAX)));
        }
        for (field, value) in [("name", &self.name), ("location", &self.location)] {
            if let Some(v) = value {
                check_text(v).map_err(|p| ValidationError::new(field, p))?;
            }
        }
        if self.detections.len() > limits.max_detections {
            return Err(ValidationError::new(
                "detections",
                format!("{} detections, more than the limit of {}", self.detections.len(), limits.max_detections),
            ));
        }
        for (i, d) in self.detections.iter().enumerate() {
            validate_detection(d)
                .map_err(|e| ValidationError::new(format!("detections[{i}].{}", e.field), e.problem))?;
        }
        Ok(())
    }
}

/// Why one detection breaks the wire contract (see [`validate_detection`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("field `{field}`: {problem}")]
pub struct DetectionError {
    /// The offending field inside the detection, e.g. `rssi` (a batch names it
    /// `detections[3].rssi`).
    pub field: &'static str,
    /// A short stable key, field and rule, for counting and metric labels: one of
    /// [`DETECTION_REASONS`].
    pub reason: &'static str,
    /// What is wrong, for a person.
    pub problem: String,
}

impl DetectionError {
    fn new(field: &'static str, reason: &'static str, problem: impl Into<String>) -> Self {
        Self { field, reason, problem: problem.into() }
    }
}

/// Every [`DetectionError::reason`] there is. They are metric label values and `/status` keys:
/// add to them, never rename.
pub const DETECTION_REASONS: &[&str] = &[
    "rssi_out_of_range",
    "device_hash_invalid",
    "node_empty",
    "node_invalid",
    "temp_out_of_range",
    "humidity_out_of_range",
    "battery_out_of_range",
    "telemetry_fields_invalid",
];

/// Checks one detection against every rule of the wire contract that its type alone does not
/// enforce. The one definition of those rules: [`Batch::validate`] applies it to each detection
/// (the cloud refuses the whole batch), and the edge applies it to each detection before batching
/// (it drops and counts the one detection), so the two cannot drift apart.
pub fn validate_detection(d: &Detection) -> Result<(), DetectionError> {
    if let Some(rssi) = d.rssi().map(i32::from) {
        if !RSSI_RANGE.contains(&rssi) {
            return Err(DetectionError::new(
                "rssi",
                "rssi_out_of_range",
                format!("{rssi} dBm is outside {}..={}", RSSI_RANGE.start(), RSSI_RANGE.end()),
            ));
        }
    }
    match d {
        Detection::Telemetry(t) => {
            let bad = |p: String| DetectionError::new("fields", "telemetry_fields_invalid", p);
            if t.fields.is_empty() || t.fields.len() > MAX_TELEMETRY_FIELDS {
                return Err(bad(format!("{} fields; 1..={MAX_TELEMETRY_FIELDS} are allowed", t.fields.len())));
            }
            for name in t.fields.keys() {
                if name.is_empty() || name.len() > 64 {
                    return Err(bad(format!("the field name `{name}` is not 1..=64 bytes")));
                }
                check_text(name).map_err(|p| bad(format!("the field name `{name}` {p}")))?;
            }
        }
        Detection::Presence(p) => {
            let h = &p.device_hash;
            if h.is_empty() || h.len() > 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(DetectionError::new("device_hash", "device_hash_invalid", "must be 1 to 64 hex digits"));
            }
        }
        Detection::Sensor(s) => {
            if s.node.is_empty() {
                return Err(DetectionError::new("node", "node_empty", "must not be empty"));
            }
            check_text(&s.node).map_err(|p| DetectionError::new("node", "node_invalid", p))?;
            if let Some(t) = s.temp {
                // (NaN is outside too: JSON cannot carry it.)
                if !(-40.0..=85.0).contains(&t) {
                    return Err(DetectionError::new(
                        "temp",
                        "temp_out_of_range",
                        format!("{t} °C is outside -40..=85"),
                    ));
                }
            }
            if let Some(h) = s.humidity {
                if h > 100 {
                    return Err(DetectionError::new("humidity", "humidity_out_of_range", format!("{h} % is over 100")));
                }
            }
            if let Some(b) = s.battery {
                if b > 100 {
                    return Err(DetectionError::new("battery", "battery_out_of_range", format!("{b} % is over 100")));
                }
            }
        }
    }
    Ok(())
}

/// A detection whose `kind` is not its first key is read by serde's derive through a buffer, which
/// hides the path inside it (`detections[3]` instead of `detections[3].rssi`); a missing field is
/// named at the detection either way. On that error path only, read the
/// offending detection again on its own to name the field. Not for a duplicate key (`message`
/// says so): a JSON value keeps only the last of two, so reading it again would blame another one.
fn refine_detection_error(bytes: &[u8], path: &str, message: &str) -> Option<BatchError> {
    if message.starts_with("duplicate field") {
        return None;
    }
    let index: usize = path.strip_prefix("detections[")?.strip_suffix(']')?.parse().ok()?;
    let root: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let element = root.get("detections")?.get(index)?;
    if !element.is_object() {
        return None; // the error names the detection: it is not an object
    }
    let at = |f: &str| format!("detections[{index}].{f}");
    let kind = element.get("kind").and_then(|k| k.as_str());
    let result = match kind {
        Some("presence") => serde_path_to_error::deserialize::<_, Presence>(element).map(drop),
        Some("sensor") => serde_path_to_error::deserialize::<_, Sensor>(element).map(drop),
        Some("telemetry") => serde_path_to_error::deserialize::<_, Telemetry>(element).map(drop),
        _ => {
            return Some(BatchError::Malformed {
                field: at("kind"),
                message: "must be \"presence\", \"sensor\" or \"telemetry\"".into(),
            })
        }
    };
    let e = result.err()?;
    // A missing field fails at the detection itself (path `.`).
    let field = match e.path().to_string() {
        root if root == "." => format!("detections[{index}]"),
        path => at(&path),
    };
    Some(BatchError::Malformed { field, message: e.into_inner().to_string() })
}

/// Checks a device id: 1..=64 bytes, and nothing that would break an MQTT topic level.
pub fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > MAX_DEVICE_ID_BYTES {
        return Err(format!("is {} bytes, over the limit of {MAX_DEVICE_ID_BYTES}", id.len()));
    }
    if let Some(c) = id.chars().find(|c| matches!(c, '/' | '+' | '#') || c.is_control()) {
        return Err(format!("must not contain {c:?} (it is an MQTT topic level)"));
    }
    // A URL path segment too (`/api/v1/devices/{device_id}/...`), where `.` and `..` are not names.
    if id == "." || id == ".." {
        return Err(format!("must not be `{id}` (it is a URL path segment)"));
    }
    // Invisible or direction-changing characters make one id look like another (Unicode TR #9).
    if let Some(c) = id
        .chars()
        .find(|c| matches!(*c as u32, 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x2069 | 0xFEFF))
    {
        return Err(format!("must not contain the invisible or direction-changing character U+{:04X}", c as u32));
    }
    Ok(())
}

/// Checks a free-text field that goes on the wire (`name`, `location`, a sensor's `node`): at most
/// [`MAX_TEXT_BYTES`] bytes, no control characters. The rule [`Batch::validate`] applies, for
/// callers that check a value before it is ever put in a batch (the edge's config at start).
pub fn validate_text(s: &str) -> Result<(), String> {
    check_text(s)
}

fn check_text(s: &str) -> Result<(), String> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(format!("is {} bytes, over the limit of {MAX_TEXT_BYTES}", s.len()));
    }
    // NUL in particular: PostgreSQL refuses it in TEXT.
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!("must not contain control characters (found {c:?})"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn device_ids_that_are_path_segments_or_hide_characters_are_refused() {
        for bad in [".", "..", "pi\u{202E}1", "pi\u{200B}", "\u{FEFF}pi", "a/b", "a+b", "a#b", ""] {
            assert!(validate_device_id(bad).is_err(), "{bad:?}");
        }
        for good in ["rpi-entrance-01", "pi.1", "...", "gw-lab", "Café"] {
            validate_device_id(good).unwrap();
        }
    }

    #[test]
    fn monotonic_ids_are_in_creation_order_within_a_millisecond() {
        let ids: Vec<crate::command::CommandId> =
            (0..2_000).map(|_| crate::command::CommandId::new_monotonic()).collect();
        assert!(ids.windows(2).all(|w| w[0].to_string() < w[1].to_string()), "not in creation order");
    }

    #[test]
    fn a_uuid_batch_id_is_read_in_any_form_and_written_hyphenated_in_lower_case() {
        let want = "6f9619ff-8b86-d011-b42d-00c04fc964ff";
        for form in [
            "6F9619FF-8B86-D011-B42D-00C04FC964FF",
            "6f9619ff8b86d011b42d00c04fc964ff",
            "{6f9619ff-8b86-d011-b42d-00c04fc964ff}",
            "urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff",
        ] {
            let id: BatchId = form.parse().unwrap();
            assert!(id.is_uuid());
            assert_eq!(id.to_string(), want, "{form}");
        }
        let ulid = BatchId::new();
        assert_eq!(ulid.to_string().parse::<BatchId>().unwrap(), ulid);
        assert!(!ulid.is_uuid());
        assert_ne!(BatchId::from_uuid_bytes(ulid.to_bytes()), ulid, "the form is part of the id");
        let e = "not-an-id".parse::<BatchId>().unwrap_err();
        assert!(e.contains("ULID or a UUID"), "{e}");
    }

    const SPEC_EXAMPLE: &str = r#"{
      "schema": 1,
      "batch_id": "01JD3Q8Z9X6K1V2B3N4M5P6Q7R",
      "device_id": "rpi-entrance-01",
      "seq": 1842,
      "name": "Entrance Pi",
      "location": "Main entrance",
      "timestamp": "2026-11-21T10:30:00Z",
      "detections": [
        {"kind": "presence", "device_hash": "a3f2b1c4d5e6f708", "rssi": -58, "zone": "near",
         "timestamp": "2026-11-21T10:29:55Z"},
        {"kind": "sensor", "node": "c1:0e:5a:33:9f:02", "rssi": -71, "temp": 21.5, "humidity": 40,
         "co2_ppm": 612, "window_open": false, "battery": 87, "timestamp": "2026-11-21T10:29:58Z"}
      ]
    }"#;

    fn parse(s: &str) -> Result<Batch, BatchError> {
        Batch::from_json(s.as_bytes(), &Limits::default())
    }

    fn with(mutate: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(SPEC_EXAMPLE).unwrap();
        mutate(&mut v);
        v.to_string()
    }

    #[test]
    fn spec_example_parses_and_round_trips() {
        let b = parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(b.seq, 1842);
        assert_eq!(b.detections.len(), 2);
        match &b.detections[1] {
            Detection::Sensor(s) => {
                assert_eq!(s.temp, Some(21.5));
                assert_eq!(s.co2_ppm, Some(612));
            }
            other => panic!("expected a sensor detection, got {other:?}"),
        }
        let again = Batch::from_json(&b.to_json(), &Limits::default()).unwrap();
        assert_eq!(again, b);
        // The wire form is what SPEC.md shows, field for field.
        let a: serde_json::Value = serde_json::from_slice(&b.to_json()).unwrap();
        let e: serde_json::Value = serde_json::from_str(SPEC_EXAMPLE).unwrap();
        assert_eq!(a, e);
    }

    #[test]
    fn absent_sensor_values_are_omitted_not_zero_filled() {
        let s = Detection::Sensor(Sensor {
            node: "n".into(),
            rssi: Some(-70),
            temp: None,
            humidity: None,
            co2_ppm: None,
            window_open: None,
            battery: Some(50),
            timestamp: "2026-11-21T10:29:58Z".parse().unwrap(),
        });
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"kind":"sensor","node":"n","rssi":-70,"battery":50,"timestamp":"2026-11-21T10:29:58Z"}"#);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(String, &str)> = vec![
            (with(|v| v["device_id"] = "".into()), "device_id"),
            (with(|v| v["device_id"] = "a/b".into()), "device_id"),
            (with(|v| v["device_id"] = "a+b".into()), "device_id"),
            (with(|v| v["device_id"] = "a#".into()), "device_id"),
            (with(|v| v["device_id"] = "x".repeat(65).into()), "device_id"),
            (with(|v| v["detections"][1]["rssi"] = 21.into()), "detections[1].rssi"),
            (with(|v| v["detections"][0]["rssi"] = (-128).into()), "detections[0].rssi"),
            (with(|v| v["detections"][0]["rssi"] = 100000.into()), "detections[0].rssi"),
            (with(|v| v["timestamp"] = "yesterday".into()), "timestamp"),
            (with(|v| v["detections"][1]["timestamp"] = "2026-13-01T00:00:00Z".into()), "detections[1].timestamp"),
            (with(|v| v["batch_id"] = "nope".into()), "batch_id"),
            (with(|v| v["schema"] = 2.into()), "schema"),
            (with(|v| v["detections"][0]["zone"] = "inside".into()), "detections[0].zone"),
            (with(|v| v["detections"][0]["device_hash"] = "xyz".into()), "detections[0].device_hash"),
            (with(|v| v["detections"][1]["humidity"] = 101.into()), "detections[1].humidity"),
            (with(|v| v["seq"] = (-1).into()), "seq"),
            (with(|v| v["seq"] = u64::MAX.into()), "seq"),
            (with(|v| v["name"] = "nul\u{0}inside".into()), "name"),
            (with(|v| v["detections"][1]["node"] = "a\u{7}b".into()), "detections[1].node"),
        ];
        for (json, field) in cases {
            let err = parse(&json).expect_err(&json);
            assert_eq!(err.field(), field, "{err}");
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    /// The schema is named before anything else, whatever the batch's form: `from_json` parses
    /// once on the well-formed path and only explains a failure afterwards, so each way to get
    /// the schema wrong is pinned here with its message.
    #[test]
    fn a_wrong_or_missing_schema_is_named_first_in_every_form() {
        let unsupported = |v: &str| format!("field `schema`: unsupported schema {v} (this build reads schema 1)");
        let cases: Vec<(String, String)> = vec![
            (with(|v| v["schema"] = 2.into()), unsupported("2")),
            (with(|v| v["schema"] = "1".into()), unsupported("\"1\"")),
            (with(|v| v["schema"] = 1.5.into()), unsupported("1.5")),
            (
                with(|v| v["schema"] = serde_json::Value::Null),
                "field `schema`: is missing (this build reads schema 1)".into(),
            ),
            (
                with(|v| {
                    v.as_object_mut().unwrap().remove("schema");
                }),
                "field `schema`: is missing (this build reads schema 1)".into(),
            ),
            // A future schema that renamed a field: the schema, not the field, is what is wrong.
            (
                with(|v| {
                    v["schema"] = 2.into();
                    v.as_object_mut().unwrap().remove("seq");
                }),
                unsupported("2"),
            ),
            // serde also reads a struct written as an array.
            (r#"[2,"01JD3Q8Z9X6K1V2B3N4M5P6Q7R","pi",1,null,null,"2026-11-21T10:30:00Z",[]]"#.into(), unsupported("2")),
        ];
        for (json, want) in cases {
            let err = parse(&json).expect_err(&json);
            assert_eq!(err.field(), "schema", "{json}: {err}");
            assert_eq!(err.to_string(), want, "{json}");
        }
        // Trailing bytes after a whole batch: named at the root.
        let err = parse(&format!("{SPEC_EXAMPLE} x")).unwrap_err();
        assert_eq!(err.field(), ".", "{err}");
        assert!(err.to_string().contains("trailing characters"), "{err}");
    }

    #[test]
    fn validate_text_is_the_rule_validate_applies_to_name_and_location() {
        for bad in ["Entrance\tPi", "nul\u{0}", &"x".repeat(MAX_TEXT_BYTES + 1)] {
            let e = validate_text(bad).unwrap_err();
            let err = parse(&with(|v| v["name"] = bad.into())).unwrap_err();
            assert_eq!(err.to_string(), format!("field `name`: {e}"));
        }
        validate_text("Entrance Pi").unwrap();
        validate_text(&"é".repeat(MAX_TEXT_BYTES / 2)).unwrap();
    }

    #[test]
    fn a_detection_is_checked_on_its_own_with_a_stable_reason() {
        let b = parse(SPEC_EXAMPLE).unwrap();
        let mut presence = b.detections[0].clone();
        let mut sensor = b.detections[1].clone();
        assert_eq!(validate_detection(&presence), Ok(()));
        assert_eq!(validate_detection(&sensor), Ok(()));
        // +127 is HCI's "RSSI not available"; +79 is not physical either.
        for rssi in [79, 127, 21, -128] {
            if let Detection::Presence(p) = &mut presence {
                p.rssi = rssi;
            }
            let e = validate_detection(&presence).unwrap_err();
            assert_eq!((e.field, e.reason), ("rssi", "rssi_out_of_range"), "{e}");
        }
        if let Detection::Sensor(s) = &mut sensor {
            s.temp = Some(85.1);
        }
        let e = validate_detection(&sensor).unwrap_err();
        assert_eq!((e.field, e.reason), ("temp", "temp_out_of_range"));
        assert_eq!(e.to_string(), "field `temp`: 85.1 °C is outside -40..=85");
    }

    /// Issue #14: a time whose UTC form leaves year ±9999 panicked in `to_offset` (the edge's replay
    /// thread on a capture line, the cloud's ingest on a batch); it is a refused value.
    #[test]
    fn a_timestamp_past_year_9999_in_utc_is_refused_not_a_panic() {
        let err = "9999-12-31T23:59:59-01:00".parse::<Timestamp>().unwrap_err();
        assert!(err.contains("out of range"), "{err}");
        let err = parse(&with(|v| v["detections"][0]["timestamp"] = "9999-12-31T23:59:59-01:00".into())).unwrap_err();
        assert_eq!(err.field(), "detections[0].timestamp", "{err}");
        assert!("9999-12-31T23:59:59+01:00".parse::<Timestamp>().is_ok());
    }

    #[test]
    fn clock_is_synced_when_absent_and_only_written_when_unsynced() {
        let b = parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(b.clock, Clock::Synced);
        assert!(!String::from_utf8(b.to_json()).unwrap().contains("clock"), "a synced batch keeps its old bytes");
        let u = parse(&with(|v| v["clock"] = "unsynced".into())).unwrap();
        assert_eq!(u.clock, Clock::Unsynced);
        assert!(String::from_utf8(u.to_json()).unwrap().ends_with(r#","clock":"unsynced"}"#));
        assert_eq!(parse(&with(|v| v["clock"] = "synced".into())).unwrap().clock, Clock::Synced);
        let e = parse(&with(|v| v["clock"] = "sometimes".into())).unwrap_err();
        assert_eq!(e.field(), "clock", "{e}");
    }

    #[test]
    fn times_outside_the_window_are_refused_by_field_never_a_panic() {
        // Valid RFC 3339, but year 10000 in UTC: converting it used to panic (issue #14).
        let past_9999 = "9999-12-31T23:59:59-01:00";
        let e = parse(&with(|v| v["timestamp"] = past_9999.into())).unwrap_err();
        assert_eq!(e.field(), "timestamp", "{e}");
        assert!(e.to_string().contains("past year 9999"), "{e}");
        let e = parse(&with(|v| v["detections"][1]["timestamp"] = past_9999.into())).unwrap_err();
        assert_eq!(e.field(), "detections[1].timestamp", "{e}");
        let e = parse(&with(|v| v["detections"][0]["timestamp"] = "1969-12-31T23:59:59Z".into())).unwrap_err();
        assert_eq!(e.field(), "detections[0].timestamp", "{e}");
        // The edges of the window are accepted, in any offset that stays within it.
        for ok in
            ["1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59+01:00", "1970-01-01T01:00:00+01:00"]
        {
            assert!(ok.parse::<Timestamp>().is_ok(), "{ok}");
        }
        assert!("1970-01-01T00:59:59+01:00".parse::<Timestamp>().is_err());
    }

    #[test]
    fn device_id_of_exactly_64_bytes_is_fine() {
        parse(&with(|v| v["device_id"] = "x".repeat(64).into())).unwrap();
    }

    #[test]
    fn rssi_edges_are_accepted() {
        parse(&with(|v| v["detections"][0]["rssi"] = (-127).into())).unwrap();
        parse(&with(|v| v["detections"][0]["rssi"] = 20.into())).unwrap();
    }

    #[test]
    fn too_many_detections_is_rejected() {
        let limits = Limits { max_detections: 1 };
        let err = Batch::from_json(SPEC_EXAMPLE.as_bytes(), &limits).unwrap_err();
        assert_eq!(err.field(), "detections");
    }

    #[test]
    fn trailing_garbage_and_truncation_are_malformed() {
        assert!(matches!(parse(&format!("{SPEC_EXAMPLE} x")), Err(BatchError::Malformed { .. })));
        for cut in [1, 10, SPEC_EXAMPLE.len() / 2, SPEC_EXAMPLE.len() - 1] {
            assert!(parse(&SPEC_EXAMPLE[..cut]).is_err());
        }
        assert!(Batch::from_json(&[0xff, 0xfe, 0x00], &Limits::default()).is_err());
    }

    /// A detection object written with its keys in `order` (a permutation of its keys' indexes),
    /// as a sender other than serde may write it.
    fn detection_in_order(d: &serde_json::Value, order: &[usize]) -> String {
        let entries: Vec<(&String, &serde_json::Value)> = d.as_object().unwrap().iter().collect();
        let fields: Vec<String> = order.iter().map(|&i| format!("{:?}:{}", entries[i].0, entries[i].1)).collect();
        format!("{{{}}}", fields.join(","))
    }

    /// The SPEC example with its detections written as `detections` (JSON texts).
    fn example_with_detections(detections: &[String]) -> String {
        let mut v: serde_json::Value = serde_json::from_str(SPEC_EXAMPLE).unwrap();
        v["detections"] = serde_json::Value::Array(vec![]);
        v.to_string().replace(r#""detections":[]"#, &format!(r#""detections":[{}]"#, detections.join(",")))
    }

    /// `Detection` is read by hand with `kind` first and by serde's derive ([`Tagged`]) otherwise:
    /// the two agree on every input here (accepted alike and read alike, or refused alike), in
    /// every order of the keys, with repeated, unknown, nested and escaped keys.
    #[test]
    fn a_detection_reads_as_the_derive_reads_it() {
        let same = |text: &str| -> bool {
            let fast = serde_json::from_str::<Detection>(text);
            let derive = serde_json::from_str::<Tagged>(text).map(Detection::from);
            match (&fast, &derive) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{text}: by hand {fast:?}, by the derive {derive:?}"),
            }
            fast.is_ok()
        };
        let example = parse(SPEC_EXAMPLE).unwrap();
        let telemetry = r#"{"kind":"telemetry","entity_id":7,"fields":{"pose.x":120,"velocity.vx":-3},"timestamp":"2026-11-21T10:29:59Z"}"#;
        let mut objects: Vec<serde_json::Value> =
            example.detections.iter().map(|d| serde_json::to_value(d).unwrap()).collect();
        objects.push(serde_json::from_str(telemetry).unwrap());
        for d in &objects {
            let n = d.as_object().unwrap().len();
            let kind_at = d.as_object().unwrap().keys().position(|k| k == "kind").unwrap();
            // Every rotation of the keys, and `kind` moved to each position.
            for shift in 0..n {
                let rotated: Vec<usize> = (0..n).map(|i| (i + shift) % n).collect();
                let mut moved: Vec<usize> = (0..n).filter(|&i| i != kind_at).collect();
                moved.insert(shift, kind_at);
                for order in [rotated, moved] {
                    let text = detection_in_order(d, &order);
                    assert!(same(&text), "{text}");
                    assert_eq!(
                        serde_json::from_str::<Detection>(&text).unwrap(),
                        serde_json::from_value(d.clone()).unwrap()
                    );
                }
            }
        }
        // `kind` first (by hand) and last (the derive), with one change each.
        let fields = r#""device_hash":"a3f2","rssi":-58,"zone":"near","timestamp":"2026-11-21T10:29:55Z""#;
        let cases: Vec<(String, &str, bool)> = vec![
            (fields.into(), "", true),
            (fields.into(), r#","fw":"1.2""#, true),
            (fields.into(), r#","fw":1,"fw":2"#, true),
            (fields.into(), r#","x":{"$serde_json::private::RawValue":"nope"}"#, true),
            (fields.into(), r#","x":[{"y":[1,{"z":null}]}]"#, true),
            (fields.into(), r#","rssi":-60"#, false),
            (fields.into(), r#","kind":"presence""#, false),
            (fields.into(), r#","kind":"sensor""#, false),
            (fields.replace(r#""rssi""#, r#""\u0072ssi""#), "", true),
            (fields.replace(r#""device_hash":"a3f2","#, ""), "", false),
            (fields.replace(r#""rssi":-58,"#, ""), "", false),
            (fields.replace("-58", r#""loud""#), "", false),
            (fields.replace("near", "inside"), "", false),
        ];
        for (body, extra, ok) in &cases {
            for kind in [
                r#""kind":"presence""#,
                r#""kind":"sensor""#,
                r#""kind":1"#,
                r#""kind":"beacon""#,
                r#""kind":{"presence":null}"#,
                r#""kind":null"#,
            ] {
                let ok = *ok && kind == r#""kind":"presence""#;
                for text in [format!("{{{kind},{body}{extra}}}"), format!("{{{body},{kind}{extra}}}")] {
                    assert_eq!(same(&text), ok, "{text}");
                }
            }
        }
        // Not an object with a kind: the array form (which the derive reads), and worse.
        for text in [
            r#"["presence","a3f2",-58,"near","2026-11-21T10:29:55Z"]"#,
            r#"["sensor"]"#,
            "[]",
            "{}",
            r#"{"kind":"presence"}"#,
            r#""presence""#,
            "null",
            "5",
        ] {
            same(text);
        }

        // Refused batches name the field, `kind` first or not.
        let presence = |kind_first: bool, body: &str| {
            let kind = r#""kind":"presence""#;
            let body = if kind_first { format!("{kind},{body}") } else { format!("{body},{kind}") };
            example_with_detections(&[format!("{{{body}}}")])
        };
        let refused = |json: &str, field: &str, says: &str| {
            let err = parse(json).expect_err(json);
            assert_eq!(err.field(), field, "{json}: {err}");
            assert!(err.to_string().contains(says), "{json}: {err}");
        };
        for kind_first in [true, false] {
            assert!(parse(&presence(kind_first, fields)).is_ok());
            for (extra, says) in
                [(r#","kind":"sensor""#, "duplicate field `kind`"), (r#","rssi":-60"#, "duplicate field `rssi`")]
            {
                // Named where it is found: as the field (`kind` first), else the detection.
                let json = presence(kind_first, &format!("{fields}{extra}"));
                let err = parse(&json).expect_err(&json);
                assert!(err.field().starts_with("detections[0]") && err.to_string().contains(says), "{json}: {err}");
            }
            for bad in [r#""beacon""#, r#""Presence""#, "1", "null", "[]"] {
                let json = presence(kind_first, fields).replace(r#""kind":"presence""#, &format!(r#""kind":{bad}"#));
                refused(&json, "detections[0].kind", "");
            }
            refused(
                &presence(kind_first, &fields.replace(r#""rssi":-58,"#, "")),
                "detections[0]",
                "missing field `rssi`",
            );
            refused(&kind_first_value_wrong(kind_first), "detections[0].rssi", "");
        }
        refused(&example_with_detections(&[format!("{{{fields}}}")]), "detections[0].kind", "must be");
        refused(&example_with_detections(&[r#""presence""#.into()]), "detections[0]", "");
        let all: Vec<String> = objects.iter().map(|d| d.to_string()).collect();
        assert_eq!(parse(&example_with_detections(&all)).unwrap().detections.len(), 3);
    }

    /// A presence whose `rssi` is a string, `kind` first or not.
    fn kind_first_value_wrong(kind_first: bool) -> String {
        let fields = r#""device_hash":"a3f2","rssi":"loud","zone":"near","timestamp":"2026-11-21T10:29:55Z""#;
        let kind = r#""kind":"presence""#;
        let body = if kind_first { format!("{kind},{fields}") } else { format!("{fields},{kind}") };
        example_with_detections(&[format!("{{{body}}}")])
    }

    #[test]
    fn batch_ids_sort_by_time_and_round_trip() {
        let a = BatchId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = BatchId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<BatchId>().unwrap(), a);
        assert_eq!(BatchId::from_bytes(a.to_bytes()), a);
        assert_eq!(a.to_string().len(), 26);
    }

    fn arb_ts() -> impl Strategy<Value = Timestamp> {
        (0i64..4_000_000_000_000_000).prop_map(|us| Timestamp::from_unix_micros(us).unwrap())
    }

    fn arb_detection() -> impl Strategy<Value = Detection> {
        let presence = ("[0-9a-f]{16}", -127i16..=20, 0u8..3, arb_ts()).prop_map(|(h, rssi, z, t)| {
            Detection::Presence(Presence {
                device_hash: h,
                rssi,
                zone: [Zone::Near, Zone::Medium, Zone::Far][z as usize],
                timestamp: t,
            })
        });
        let sensor = (
            "[0-9a-f:]{1,17}",
            -127i16..=20,
            proptest::option::of(-400i32..=850),
            proptest::option::of(0u8..=100),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<bool>()),
            proptest::option::of(0u8..=100),
            arb_ts(),
        )
            .prop_map(|(node, rssi, t10, humidity, co2_ppm, window_open, battery, timestamp)| {
                Detection::Sensor(Sensor {
                    node,
                    rssi: Some(rssi),
                    temp: t10.map(|t| f64::from(t) / 10.0),
                    humidity,
                    co2_ppm,
                    window_open,
                    battery,
                    timestamp,
                })
            });
        prop_oneof![presence, sensor]
    }

    /// Any detection the types allow, valid or not.
    fn arb_any_detection() -> impl Strategy<Value = Detection> {
        let rssi = prop_oneof![-127i16..=20, any::<i16>()];
        let text = |valid: &'static str| prop_oneof![valid, "(?s).{0,300}"];
        let presence = (text("[0-9a-f]{16}"), rssi.clone(), arb_ts()).prop_map(|(h, rssi, t)| {
            Detection::Presence(Presence { device_hash: h, rssi, zone: Zone::Far, timestamp: t })
        });
        let temp = prop_oneof![
            (-400i32..=850).prop_map(|t| f64::from(t) / 10.0),
            -100.0f64..200.0,
            any::<f64>(),
            Just(f64::NAN),
        ];
        let sensor = (
            text("[0-9a-f:]{17}"),
            rssi,
            proptest::option::of(temp),
            proptest::option::of(any::<u8>()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<u8>()),
            arb_ts(),
        )
            .prop_map(|(node, rssi, temp, humidity, co2_ppm, window_open, battery, timestamp)| {
                Detection::Sensor(Sensor {
                    node,
                    rssi: Some(rssi),
                    temp,
                    humidity,
                    co2_ppm,
                    window_open,
                    battery,
                    timestamp,
                })
            });
        prop_oneof![presence, sensor]
    }

    proptest! {
        #[test]
        fn any_valid_batch_round_trips(
            device_id in "[a-zA-Z0-9_.-]{1,64}".prop_filter("a path segment is refused", |d| d != "." && d != ".."),
            seq in 0..=i64::MAX as u64,
            name in proptest::option::of("[ -~]{0,40}"),
            ts in arb_ts(),
            detections in proptest::collection::vec(arb_detection(), 0..20),
            unsynced in any::<bool>(),
        ) {
            let b = Batch {
                schema: 1,
                batch_id: BatchId::new(),
                device_id,
                seq,
                name,
                location: None,
                timestamp: ts,
                detections,
                clock: if unsynced { Clock::Unsynced } else { Clock::Synced },
            };
            let parsed = Batch::from_json(&b.to_json(), &Limits::default()).unwrap();
            prop_assert_eq!(parsed, b);
        }

        /// The edge drops exactly the detections the cloud would refuse a batch for, one at a
        /// time: whatever the edge's check lets through, the cloud stores; whatever it drops, the
        /// cloud would have refused, naming the same field.
        #[test]
        fn the_edge_drops_exactly_what_the_cloud_refuses(d in arb_any_detection()) {
            let batch = Batch {
                schema: 1,
                batch_id: BatchId::new(),
                device_id: "rpi-1".into(),
                seq: 0,
                name: None,
                location: None,
                timestamp: Timestamp::now(),
                detections: vec![d],
                clock: Clock::Synced,
            };
            match validate_detection(&batch.detections[0]) {
                Ok(()) => {
                    let parsed = Batch::from_json(&batch.to_json(), &Limits::default());
                    prop_assert!(parsed.is_ok(), "the edge keeps it, the cloud refuses it: {:?}", parsed);
                }
                Err(e) => {
                    prop_assert!(DETECTION_REASONS.contains(&e.reason), "unlisted reason {}", e.reason);
                    let refused = batch.validate(&Limits::default());
                    prop_assert_eq!(
                        refused.map_err(|r| r.field),
                        Err(format!("detections[0].{}", e.field))
                    );
                }
            }
        }

        #[test]
        fn any_rfc3339_offset_never_panics(
            year in 0i32..=9999, day in 1u8..=28, hour in 0u8..=23, offset_h in -23i8..=23, offset_m in 0u8..=59,
        ) {
            let s = format!("{year:04}-12-{day:02}T{hour:02}:00:00{}{:02}:{offset_m:02}", if offset_h < 0 { '-' } else { '+' }, offset_h.unsigned_abs());
            let _ = s.parse::<Timestamp>();
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Batch::from_json(&bytes, &Limits::default());
        }
    }
}
