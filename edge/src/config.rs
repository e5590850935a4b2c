//! The edge's configuration (SPEC.md, "Edge configuration"): a TOML file with every key also
//! settable from the environment (`BACKHAUL_` + the key path, sections joined by `__`), validated at
//! start with errors that name the key and where its value came from.
//!
//! Secrets never live in the file: the hash secret comes from `BACKHAUL_HASH_SECRET` or
//! `decode.hash_secret_file`, the MQTT password from `BACKHAUL_MQTT_PASSWORD` or
//! `transport.mqtt.password_file`, the HTTP API key from `BACKHAUL_API_KEY` or
//! `transport.http.api_key_file` (systemd credentials are files). `check-config` prints them masked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use backhaul_shared::config::{self, ByteSize, ConfigError, EnvMap, HumanDuration, Loaded};
use serde::{Deserialize, Serialize};

use crate::queue::{OnFull, QueueConfig};

/// Environment variables under `BACKHAUL_` that are not config keys.
pub const RESERVED_ENV: &[&str] =
    &["BACKHAUL_HASH_SECRET", "BACKHAUL_MQTT_PASSWORD", "BACKHAUL_API_KEY", "BACKHAUL_LOG", "BACKHAUL_FAILPOINT"];

/// The seed agent's environment names, still honoured so existing unit files keep working.
/// (`MQTT_PASSWORD` is read as a secret, like `BACKHAUL_MQTT_PASSWORD`.)
pub const SEED_ALIASES: &[(&str, &str)] = &[
    ("DEVICE_ID", "device_id"),
    ("COMMUNICATION_MODE", "transport.mode"),
    ("MQTT_BROKER", "transport.mqtt.host"),
    ("MQTT_PORT", "transport.mqtt.port"),
    ("MQTT_USERNAME", "transport.mqtt.username"),
    ("HTTP_BASE_URL", "transport.http.url"),
];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    pub device_id: String,
    pub name: Option<String>,
    pub location: Option<String>,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Loopback status and Prometheus metrics.
    #[serde(default = "default_status_listen")]
    pub status_listen: String,
    #[serde(default)]
    pub source: SourceConfig,
    #[serde(default)]
    pub decode: DecodeConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub queue: QueueSection,
    #[serde(default)]
    pub transport: TransportConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    #[default]
    Ble,
    Simulated,
    Replay,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// simulated: detections per second.
    pub rate: f64,
    /// simulated: detections over the device's life; 0 = forever.
    pub count: u64,
    /// simulated: distinct advertisers.
    pub devices: u32,
    /// simulated: seed of the deterministic generator.
    pub seed: u64,
    /// replay: a capture written by `scan --record`.
    pub path: Option<PathBuf>,
    /// replay: `fast` (as fast as the pipeline takes it) or `recorded` (the capture's own pace).
    pub pace: ReplayPace,
    /// ble: the adapter to use (default: the first).
    pub adapter: Option<String>,
    /// ble: only advertisers of these service UUIDs (default: everything).
    pub services: Vec<String>,
    /// ble: nothing heard for this many seconds while scanning is a stall: the scan is restarted.
    pub stall_after_s: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: SourceKind::Ble,
            rate: 10.0,
            count: 0,
            devices: 50,
            seed: 1,
            path: None,
            pace: ReplayPace::Fast,
            adapter: None,
            services: Vec::new(),
            stall_after_s: 120,
        }
    }
}

/// How a capture is replayed. Either way detections carry the capture's times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReplayPace {
    #[default]
    Fast,
    Recorded,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    pub profiles: Vec<String>,
    pub hash_secret_file: Option<PathBuf>,
    /// presence: derive the hash key per period (e.g. "24h"), so hashes cannot be linked across
    /// periods; absent: one key.
    pub hash_rotation: Option<HumanDuration>,
    /// presence: zone thresholds, dBm (`near` at or above `near_dbm`, `medium` at or above
    /// `medium_dbm`, `far` below).
    pub near_dbm: i16,
    pub medium_dbm: i16,
    /// presence: median RSSI per advertiser over this window ("0s": none).
    pub smoothing: HumanDuration,
    /// Per advertiser and profile: repeats within this many seconds make no new detection.
    pub dedup_window_s: u64,
    /// thingy52: the manufacturer data's company id and payload size.
    pub company_id: u16,
    pub payload_len: usize,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            profiles: vec!["presence".into(), "thingy52".into()],
            hash_secret_file: None,
            hash_rotation: None,
            near_dbm: -60,
            medium_dbm: -75,
            smoothing: HumanDuration(Duration::ZERO),
            dedup_window_s: 10,
            company_id: 0xFFFF,
            payload_len: 14,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_detections: usize,
    pub max_age_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_detections: 500, max_age_ms: 5000 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSection {
    pub max_bytes: ByteSize,
    pub on_full: OnFull,
    pub retain_acked: HumanDuration,
    /// How long an enqueue waits for space under `on_full = "block"`.
    pub block_timeout: HumanDuration,
}

impl Default for QueueSection {
    fn default() -> Self {
        let q = QueueConfig::default();
        Self {
            max_bytes: ByteSize(q.max_bytes),
            on_full: q.on_full,
            retain_acked: HumanDuration(q.retain_acked),
            block_timeout: HumanDuration(q.block_timeout),
        }
    }
}

impl QueueSection {
    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            max_bytes: self.max_bytes.0,
            on_full: self.on_full,
            retain_acked: self.retain_acked.0,
            block_timeout: self.block_timeout.0,
            ..QueueConfig::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TransportMode {
    /// (`MQTT` is the seed agent's spelling.)
    #[default]
    #[serde(alias = "MQTT")]
    Mqtt,
    #[serde(alias = "HTTP")]
    Http,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    pub mode: TransportMode,
    /// Batches per second, with `burst`.
    pub rate_per_sec: u32,
    pub burst: u32,
    pub max_inflight: u32,
    /// MQTT: a batch without the cloud's (or, with `ack = "broker"`, the broker's) answer after
    /// this long is sent again.
    pub ack_timeout: HumanDuration,
    /// Longest wait between reconnect attempts or retries (backoff with full jitter).
    pub backoff_max: HumanDuration,
    pub mqtt: MqttSection,
    pub http: HttpSection,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            mode: TransportMode::Mqtt,
            rate_per_sec: 50,
            burst: 100,
            max_inflight: 32,
            ack_timeout: HumanDuration(Duration::from_secs(30)),
            backoff_max: HumanDuration(Duration::from_secs(60)),
            mqtt: MqttSection::default(),
            http: HttpSection::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    #[default]
    Cloud,
    Broker,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    pub url: String,
    /// Replaces the url's host (the seed agent's `MQTT_BROKER`).
    pub host: Option<String>,
    /// Replaces the url's port (the seed agent's `MQTT_PORT`).
    pub port: Option<u16>,
    pub ack: AckMode,
    pub topic_prefix: String,
    /// Default `backhaul-edge-{device_id}`; the broker keeps the session (and acks) under it.
    pub client_id: Option<String>,
    pub keep_alive: HumanDuration,
    /// How often the retained status is published.
    pub status_interval: HumanDuration,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The MQTT protocol version: `"5"` (default) or `"3.1.1"`. Only MQTT 5 lets the broker
    /// refuse a publish (a PUBACK reason code of 0x80 or more, e.g. 0x87 not authorized) and tell
    /// its maximum packet size in the CONNACK; with 3.1.1 a broker that drops a publish (an ACL)
    /// still PUBACKs it, so `ack = "broker"` is refused with it.
    pub protocol: MqttProtocol,
    /// The largest MQTT message the edge may send, in bytes (the whole PUBLISH packet), when the
    /// broker does not say so itself (MQTT 5 brokers may announce theirs in the CONNACK; the
    /// smaller of the two applies). Batches are cut to fit; a queued batch that cannot fit is
    /// dead-lettered with a reason naming the limit. Range 1 KiB to 256 MiB (the MQTT maximum,
    /// OASIS MQTT 5.0 section 2.2.3); absent: no limit of our own.
    pub max_message_bytes: Option<ByteSize>,
}

/// MQTT protocol version (OASIS MQTT 3.1.1 or 5.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum MqttProtocol {
    #[default]
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

impl<'de> Deserialize<'de> for MqttProtocol {
    /// `"5"`, `5`, `"5.0"`, or `"3.1.1"`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MqttProtocol;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#""5" or "3.1.1""#)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MqttProtocol, E> {
                match v {
                    5 => Ok(MqttProtocol::V5),
                    _ => Err(E::custom(format!(r#"unknown MQTT protocol {v}: use "5" or "3.1.1""#))),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MqttProtocol, E> {
                match v {
                    "5" | "5.0" => Ok(MqttProtocol::V5),
                    "3.1.1" => Ok(MqttProtocol::V311),
                    _ => Err(E::custom(format!(r#"unknown MQTT protocol `{v}`: use "5" or "3.1.1""#))),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The smallest `transport.mqtt.max_message_bytes`: a batch of one detection must fit.
pub const MIN_MESSAGE_BYTES: u64 = 1024;
/// The largest MQTT packet (OASIS MQTT 5.0 section 2.2.3: a remaining length of at most
/// 268,435,455 bytes), rounded down to 256 MiB.
pub const MAX_MESSAGE_BYTES: u64 = 256 << 20;

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            url: "mqtt://127.0.0.1:1883".into(),
            host: None,
            port: None,
            ack: AckMode::Cloud,
            topic_prefix: backhaul_shared::wire::DEFAULT_PREFIX.into(),
            client_id: None,
            keep_alive: HumanDuration(Duration::from_secs(15)),
            status_interval: HumanDuration(Duration::from_secs(30)),
            username: None,
            password_file: None,
            protocol: MqttProtocol::V5,
            max_message_bytes: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    pub url: String,
    pub api_key_file: Option<PathBuf>,
    /// Requests in flight at once (each on its own thread).
    pub workers: u32,
    /// Whole-request timeout.
    pub timeout: HumanDuration,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            api_key_file: None,
            workers: 4,
            timeout: HumanDuration(Duration::from_secs(30)),
        }
    }
}

impl MqttSection {
    /// The broker's (host, port): the url's, with `host` and `port` applied.
    pub fn broker(&self) -> Result<(String, u16), String> {
        let (host, port) = backhaul_shared::wire::parse_mqtt_url(&self.url)?;
        Ok((self.host.clone().unwrap_or(host), self.port.unwrap_or(port)))
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/backhaul")
}

fn default_status_listen() -> String {
    "127.0.0.1:9901".into()
}

/// A secret and where it came from, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    pub origin: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(*** from {})", self.origin)
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.value
    }
}

/// The secrets the edge needs, each from the environment or a file.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    pub hash_secret: Option<Secret>,
    pub mqtt_password: Option<Secret>,
    pub api_key: Option<Secret>,
}

fn secret(env_var: &str, file: Option<&Path>, file_key: &str) -> Result<Option<Secret>, ConfigError> {
    if let Ok(v) = std::env::var(env_var) {
        if !v.is_empty() {
            return Ok(Some(Secret { value: v, origin: format!("environment variable {env_var}") }));
        }
    }
    let Some(file) = file else { return Ok(None) };
    let value = std::fs::read_to_string(file).map_err(|e| ConfigError::Invalid {
        key: file_key.to_owned(),
        origin: config::Origin::File(file.to_owned()),
        message: format!("cannot read the secret file: {e}"),
    })?;
    let value = value.trim_end_matches(['\n', '\r']).to_owned();
    if value.is_empty() {
        return Err(ConfigError::Invalid {
            key: file_key.to_owned(),
            origin: config::Origin::File(file.to_owned()),
            message: "the secret file is empty".into(),
        });
    }
    Ok(Some(Secret { value, origin: format!("file {}", file.display()) }))
}

impl EdgeConfig {
    /// Loads `file` with the environment applied, and checks every rule that can be checked
    /// before starting.
    pub fn load(file: &Path) -> Result<(Loaded<Self>, Secrets), ConfigError> {
        let env_map = EnvMap { prefix: "BACKHAUL_", aliases: SEED_ALIASES, reserved: RESERVED_ENV };
        let loaded: Loaded<Self> = config::load(file, &env_map, std::env::vars())?;
        let c = &loaded.config;
        backhaul_shared::batch::validate_device_id(&c.device_id).map_err(|e| loaded.invalid("device_id", e))?;
        c.status_listen
            .parse::<SocketAddr>()
            .map_err(|e| loaded.invalid("status_listen", format!("`{}` is not an address: {e}", c.status_listen)))
            .and_then(|a| {
                if a.ip().is_loopback() {
                    Ok(())
                } else {
                    Err(loaded.invalid(
                        "status_listen",
                        "must be a loopback address (127.0.0.1 or [::1]): it is unauthenticated",
                    ))
                }
            })?;
        if c.batch.max_detections == 0 || c.batch.max_detections > 10_000 {
            return Err(loaded.invalid("batch.max_detections", "must be 1..=10000"));
        }
        if c.transport.rate_per_sec == 0 || c.transport.burst == 0 || c.transport.max_inflight == 0 {
            let key = if c.transport.rate_per_sec == 0 {
                "transport.rate_per_sec"
            } else if c.transport.burst == 0 {
                "transport.burst"
            } else {
                "transport.max_inflight"
            };
            return Err(loaded.invalid(key, "must be at least 1"));
        }
        match c.source.kind {
            SourceKind::Simulated if !(c.source.rate > 0.0 && c.source.rate.is_finite()) => {
                return Err(loaded.invalid("source.rate", "must be a positive number of detections per second"));
            }
            SourceKind::Replay if c.source.path.is_none() => {
                return Err(loaded.invalid("source.path", "the replay source needs a capture file (`scan --record`)"));
            }
            _ => {}
        }
        match c.transport.mode {
            TransportMode::Mqtt => {
                let m = &c.transport.mqtt;
                m.broker().map_err(|e| loaded.invalid("transport.mqtt.url", e))?;
                if m.protocol == MqttProtocol::V311 && m.ack == AckMode::Broker {
                    return Err(loaded.invalid(
                        "transport.mqtt.ack",
                        "ack = \"broker\" is not safe with protocol = \"3.1.1\": an MQTT 3.1.1 broker PUBACKs \
                         a publish its ACL dropped (the protocol has no way to refuse one), so batches would be \
                         deleted as delivered while nobody received them. Use protocol = \"5\" (a refusal is \
                         then a PUBACK reason code) or ack = \"cloud\"",
                    ));
                }
                if let Some(ByteSize(n)) = m.max_message_bytes {
                    if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&n) {
                        return Err(loaded.invalid(
                            "transport.mqtt.max_message_bytes",
                            format!("{n} bytes is out of range: must be 1KiB..=256MiB"),
                        ));
                    }
                }
            }
            TransportMode::Http if !c.transport.http.url.starts_with("http://") => {
                let why = if c.transport.http.url.starts_with("https://") {
                    "https:// is not supported by this build yet (no TLS): use http:// to a local TLS proxy"
                } else {
                    "must start with http://"
                };
                return Err(loaded.invalid("transport.http.url", why));
            }
            _ => {}
        }
        if c.transport.http.workers == 0 {
            return Err(loaded.invalid("transport.http.workers", "must be at least 1"));
        }
        let secrets = Secrets {
            hash_secret: secret(
                "BACKHAUL_HASH_SECRET",
                c.decode.hash_secret_file.as_deref(),
                "decode.hash_secret_file",
            )?,
            mqtt_password: match secret(
                "BACKHAUL_MQTT_PASSWORD",
                c.transport.mqtt.password_file.as_deref(),
                "transport.mqtt.password_file",
            )? {
                Some(s) => Some(s),
                None => secret("MQTT_PASSWORD", None, "transport.mqtt.password_file")?,
            },
            api_key: secret(
                "BACKHAUL_API_KEY",
                c.transport.http.api_key_file.as_deref(),
                "transport.http.api_key_file",
            )?,
        };
        if let Some(p) = c.decode.profiles.iter().find(|p| !["presence", "thingy52"].contains(&p.as_str())) {
            return Err(loaded
                .invalid("decode.profiles", format!("unknown profile `{p}`: the profiles are presence and thingy52")));
        }
        if c.decode.near_dbm < c.decode.medium_dbm {
            return Err(loaded.invalid("decode.near_dbm", "must be at or above decode.medium_dbm"));
        }
        let hashes_addresses =
            c.decode.profiles.iter().any(|p| p == "presence") && c.source.kind != SourceKind::Simulated;
        if hashes_addresses && secrets.hash_secret.is_none() {
            return Err(loaded.invalid(
                "decode.hash_secret_file",
                "the presence profile needs a hash secret: set BACKHAUL_HASH_SECRET or decode.hash_secret_file \
                 (an unkeyed hash of a MAC address can be reversed by brute force)",
            ));
        }
        Ok((loaded, secrets))
    }

    /// The effective settings as TOML, secrets shown only as where they come from.
    pub fn effective(&self, secrets: &Secrets) -> String {
        let mut out = toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print the settings: {e}\n"));
        out.push_str("\n# secrets (values never shown)\n");
        for (name, s) in [
            ("hash secret", &secrets.hash_secret),
            ("MQTT password", &secrets.mqtt_password),
            ("HTTP API key", &secrets.api_key),
        ] {
            match s {
                Some(s) => out.push_str(&format!("# {name}: *** (from {})\n", s.origin)),
                None => out.push_str(&format!("# {name}: not set\n")),
            }
        }
        out
    }
}
