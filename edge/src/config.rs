//! The edge's configuration (SPEC.md, "Edge configuration"): a TOML file with every key also
//! settable from the environment (`BACKHAUL_` + the key path, sections joined by `__`), validated at
//! start with errors that name the key and where its value came from.
//!
//! Every duration, size and count has a valid range, written on its field and in the README's table
//! ("Valid ranges"), and checked by [`EdgeConfig::load`] (so by `check-config` and by `run`, before
//! the queue is opened): an error names the key, the value and the range. Every value that goes on
//! the wire (`device_id`, `name`, `location`, the MQTT topic prefix, client id and username) is
//! checked by the rule the cloud applies to it ([`backhaul_shared::batch`], [`backhaul_shared::wire`]),
//! so a device is never started that the cloud would refuse batch after batch.
//!
//! Secrets never live in the file: the hash secret comes from `BACKHAUL_HASH_SECRET` or
//! `decode.hash_secret_file`, the MQTT password from `BACKHAUL_MQTT_PASSWORD` or
//! `transport.mqtt.password_file`, the API key (HTTP auth; over MQTT, the key that verifies the
//! cloud's acks) from `BACKHAUL_API_KEY` or
//! `transport.http.api_key_file` (systemd credentials are files). `check-config` prints them masked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use backhaul_shared::batch::RSSI_RANGE;
use backhaul_shared::config::{self, ByteSize, ConfigError, EnvMap, HumanDuration, Loaded};
use backhaul_shared::tls::{ClientMaterial, ClientTls};
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
    /// On the wire in every batch and every topic: 1..=64 bytes, no `/`, `+`, `#`, no control
    /// characters ([`backhaul_shared::batch::validate_device_id`]).
    pub device_id: String,
    /// On the wire in every batch: at most 256 bytes, no control characters
    /// ([`backhaul_shared::batch::validate_text`]).
    pub name: Option<String>,
    /// As `name`.
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
    /// simulated: detections per second, 0.001..=1,000,000,000 (the benches use 1e9: as fast as the
    /// pipeline takes them).
    pub rate: f64,
    /// simulated: detections over the device's life; 0 = forever.
    pub count: u64,
    /// simulated: distinct advertisers, 1..=1,000,000.
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
    /// 1..=86,400.
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
    /// periods; absent or "0s": one key. 1m..=366 days.
    pub hash_rotation: Option<HumanDuration>,
    /// presence: zone thresholds, dBm (`near` at or above `near_dbm`, `medium` at or above
    /// `medium_dbm`, `far` below). Each -127..=20 (the RSSI range the cloud accepts).
    pub near_dbm: i16,
    pub medium_dbm: i16,
    /// presence: median RSSI per advertiser over this window ("0s": none). 0s..=1h.
    pub smoothing: HumanDuration,
    /// Per advertiser and profile: repeats within this many seconds make no new detection.
    /// 0..=3,600.
    pub dedup_window_s: u64,
    /// thingy52: the manufacturer data's company id and payload size (1..=255 bytes).
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
    /// A batch is cut at this many detections: 1..=10,000 (the cloud's default limit).
    pub max_detections: usize,
    /// ... or when its oldest detection is this old: 10..=3,600,000 ms.
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
    /// The queue's byte budget, bytes of `data_dir` on disk (`queue::Budget::Disk`; about half
    /// of it holds batches): at least one batch of `batch.max_detections` detections of the
    /// largest kind ([`min_queue_bytes`]), at most 16 TiB. sled needs a few MiB whatever it says.
    pub max_bytes: ByteSize,
    pub on_full: OnFull,
    /// How long acked batches are kept for `replay`: 0s (none)..=366 days.
    pub retain_acked: HumanDuration,
    /// How long an enqueue waits for space under `on_full = "block"`: 1s..=1h (keep it below the
    /// unit's `WatchdogSec`).
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TransportMode {
    /// (`MQTT` is the seed agent's spelling.)
    #[default]
    #[serde(alias = "MQTT")]
    Mqtt,
    #[serde(alias = "HTTP")]
    Http,
}

impl TransportMode {
    /// As the config writes it (`transport.mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mqtt => "mqtt",
            Self::Http => "http",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    pub mode: TransportMode,
    /// Batches per second, with `burst`: each 1..=1,000,000 (the top is "no practical limit").
    pub rate_per_sec: u32,
    pub burst: u32,
    /// Batches sent and not yet answered: 1..=1,000.
    pub max_inflight: u32,
    /// MQTT: a batch without the cloud's (or, with `ack = "broker"`, the broker's) answer after
    /// this long is sent again. 1s..=1h.
    pub ack_timeout: HumanDuration,
    /// Longest wait between reconnect attempts or retries (backoff with full jitter): 100ms..=1h.
    pub backoff_max: HumanDuration,
    pub mqtt: MqttSection,
    pub http: HttpSection,
    /// TLS for `mqtts://` and `https://` URLs (issue #16; `backhaul_shared::tls::ClientTls`):
    /// `ca_file` or `roots`, optional `cert_file` + `key_file` (mTLS), optional `server_name`
    /// (MQTT only). Absent with a TLS URL: the system's roots.
    pub tls: Option<ClientTls>,
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
            tls: None,
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
    /// Replaces the url's port (the seed agent's `MQTT_PORT`): 1..=65535.
    pub port: Option<u16>,
    pub ack: AckMode,
    /// The first levels of every topic: not empty, no `+`, `#` or control characters
    /// ([`backhaul_shared::wire::validate_topic_prefix`]).
    pub topic_prefix: String,
    /// Default `backhaul-edge-{device_id}`; the broker keeps the session (and acks) under it. At
    /// most 256 bytes, no control characters.
    pub client_id: Option<String>,
    /// MQTT keep alive: 1s..=65535s (the protocol's field is whole seconds in 16 bits; rumqttc
    /// panics below 1 s).
    pub keep_alive: HumanDuration,
    /// How often the retained status is published: 1s..=1h.
    pub status_interval: HumanDuration,
    /// At most 256 bytes, no control characters.
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
    /// Requests in flight at once (each on its own thread): 1..=64.
    pub workers: u32,
    /// Whole-request timeout: 1s..=10m.
    pub timeout: HumanDuration,
    /// How often the edge asks the cloud for commands (issue #18): 1s..=1h.
    pub command_poll: HumanDuration,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            api_key_file: None,
            workers: 4,
            timeout: HumanDuration(Duration::from_secs(30)),
            command_poll: HumanDuration(Duration::from_secs(10)),
        }
    }
}

impl MqttSection {
    /// The broker's (host, port): the url's, with `host` and `port` applied.
    /// (host, port, tls) of the broker.
    pub fn broker(&self) -> Result<(String, u16, bool), String> {
        let (host, port, tls) = backhaul_shared::wire::parse_mqtt_url(&self.url)?;
        Ok((self.host.clone().unwrap_or(host), self.port.unwrap_or(port), tls))
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
    /// The link's TLS material, loaded and checked (`[transport.tls]`), when its URL asks for TLS.
    pub tls: Option<ClientMaterial>,
}

/// Why no cloud could accept `key` as a device's API key, if so: the cloud refuses keys shorter
/// than 16 characters, and the key is sent as the `X-API-Key` header, so anything but visible
/// ASCII makes every request fail before it leaves. Checked by `run`, `check-config` and `init`.
pub fn api_key_problem(key: &str) -> Option<&'static str> {
    if key.len() < 16 {
        Some("is shorter than 16 characters, which no cloud accepts: use the key the cloud's keys file holds for this device")
    } else if key.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        Some("must be visible ASCII without spaces or line breaks: it is sent as the X-API-Key header")
    } else {
        None
    }
}

/// A secret from `env_var`, else from the file the key `file_key` names (errors name the config,
/// or the variable, that set the key, and the secret file).
fn secret(
    env_var: &str,
    file: Option<&Path>,
    file_key: &str,
    loaded: &Loaded<EdgeConfig>,
) -> Result<Option<Secret>, ConfigError> {
    if let Ok(v) = std::env::var(env_var) {
        if !v.is_empty() {
            return Ok(Some(Secret { value: v, origin: format!("environment variable {env_var}") }));
        }
    }
    let Some(file) = file else { return Ok(None) };
    let value = std::fs::read_to_string(file).map_err(|e| {
        loaded.invalid(
            file_key,
            format!(
                "cannot read the secret file {}: {e} (`backhaul-edge init` writes the hash secret and, given \
                 --api-key-file, the API key; or fix the path)",
                file.display()
            ),
        )
    })?;
    let value = value.trim_end_matches(['\n', '\r']).to_owned();
    if value.is_empty() {
        return Err(loaded.invalid(file_key, format!("the secret file {} is empty", file.display())));
    }
    Ok(Some(Secret { value, origin: format!("file {}", file.display()) }))
}

impl EdgeConfig {
    /// Loads `file` with the environment applied, and checks every rule that can be checked
    /// before starting.
    pub fn load(file: &Path) -> Result<(Loaded<Self>, Secrets), ConfigError> {
        let env_map = EnvMap { prefix: "BACKHAUL_", aliases: SEED_ALIASES, reserved: RESERVED_ENV };
        let loaded: Loaded<Self> = config::load(file, &env_map, std::env::vars()).map_err(|e| {
            // The packaged placeholder sets no key, so it fails here (no device_id): say what it is.
            match std::fs::read_to_string(file) {
                Ok(text) if crate::init::is_placeholder(&text) => ConfigError::Placeholder { file: file.to_owned() },
                _ => e,
            }
        })?;
        let c = &loaded.config;
        check_wire_fields(&loaded)?;
        check_ranges(&loaded)?;
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
        match c.source.kind {
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
            }
            TransportMode::Http
                if !(c.transport.http.url.starts_with("http://") || c.transport.http.url.starts_with("https://")) =>
            {
                return Err(loaded.invalid("transport.http.url", "must start with http:// or https://"));
            }
            TransportMode::Http if c.transport.tls.as_ref().is_some_and(|t| t.server_name.is_some()) => {
                return Err(loaded.invalid(
                    "transport.tls.server_name",
                    "is for MQTT only: over HTTPS the URL's host is the name checked; use a URL whose host the \
                     cloud's certificate names",
                ));
            }
            _ => {}
        }
        let (url_key, url_tls) = match c.transport.mode {
            TransportMode::Mqtt => {
                ("transport.mqtt.url", c.transport.mqtt.broker().map(|(_, _, tls)| tls).unwrap_or(false))
            }
            TransportMode::Http => ("transport.http.url", c.transport.http.url.starts_with("https://")),
        };
        let tls = backhaul_shared::tls::client_material(
            url_tls,
            c.transport.tls.as_ref(),
            "transport.tls",
            url_key,
            backhaul_shared::tls::now(),
        )
        .map_err(|e| loaded.invalid("transport.tls", e.0))?;
        if c.transport.mode == TransportMode::Http {
            crate::forward::http::tls_config(tls.as_ref()).map_err(|e| loaded.invalid("transport.tls", e))?;
        }
        let secrets = Secrets {
            hash_secret: secret(
                "BACKHAUL_HASH_SECRET",
                c.decode.hash_secret_file.as_deref(),
                "decode.hash_secret_file",
                &loaded,
            )?,
            mqtt_password: match secret(
                "BACKHAUL_MQTT_PASSWORD",
                c.transport.mqtt.password_file.as_deref(),
                "transport.mqtt.password_file",
                &loaded,
            )? {
                Some(s) => Some(s),
                None => secret("MQTT_PASSWORD", None, "transport.mqtt.password_file", &loaded)?,
            },
            api_key: secret(
                "BACKHAUL_API_KEY",
                c.transport.http.api_key_file.as_deref(),
                "transport.http.api_key_file",
                &loaded,
            )?,
            tls,
        };
        if let Some(key) = &secrets.api_key {
            if let Some(problem) = api_key_problem(key.expose()) {
                return Err(loaded
                    .invalid("transport.http.api_key_file", format!("the API key (from {}) {problem}", key.origin)));
            }
        }
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
        // Issue #16: over MQTT the cloud signs each ack with this device's API key, and the edge
        // applies no ack it cannot verify; without the key it could never delete a batch.
        if c.transport.mode == TransportMode::Mqtt
            && c.transport.mqtt.ack == AckMode::Cloud
            && secrets.api_key.is_none()
        {
            return Err(loaded.invalid(
                "transport.http.api_key_file",
                "with transport.mode = \"mqtt\" and ack = \"cloud\" the edge needs this device's API key (the one \
                 the cloud's auth.keys_file holds for this device_id, or its fleet key `*` if it has none) to verify \
                 the cloud's acks: set BACKHAUL_API_KEY or transport.http.api_key_file (a file, mode 0600; the \
                 setting serves both modes)",
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
            ("API key (HTTP auth, MQTT ack MAC)", &secrets.api_key),
        ] {
            match s {
                Some(s) => out.push_str(&format!("# {name}: *** (from {})\n", s.origin)),
                None => out.push_str(&format!("# {name}: not set\n")),
            }
        }
        if let Some(tls) = &secrets.tls {
            out.push_str(&format!(
                "# TLS: {} trusted root(s){}, client certificate {}\n",
                tls.roots.len(),
                if tls.webpki { " + Mozilla's" } else { "" },
                if tls.identity.is_some() { "set (key never shown)" } else { "not set" }
            ));
            for w in &tls.warnings {
                out.push_str(&format!("# warning: {w}\n"));
            }
        }
        out
    }
}

/// The longest a detection of any kind this build writes can be on the wire, in bytes (a presence
/// detection is about 120, a Thingy:52 reading with every value about 230; a unit test checks the
/// worst case of each kind stays below this).
pub const MAX_DETECTION_WIRE_BYTES: u64 = 512;

/// What a batch carries besides its detections, at most: the schema, ids, `seq`, `name` and
/// `location` (256 bytes each, JSON-escaped), the timestamp and the source position stored with it.
const MAX_BATCH_OVERHEAD_BYTES: u64 = 4096;

/// The smallest `queue.max_bytes` that holds one batch of `max_detections` detections of the largest
/// kind, uncompressed (the queue compresses, so this is an upper bound), with the queue's per-chunk
/// key overhead. A smaller budget would refuse every full batch (issue #14: `"0B"`, `"1KiB"`).
pub fn min_queue_bytes(max_detections: usize) -> u64 {
    let value = MAX_BATCH_OVERHEAD_BYTES + MAX_DETECTION_WIRE_BYTES.saturating_mul(max_detections as u64);
    // Records are stored in 4 KiB chunks, each under a key of at most 16 bytes.
    value + value.div_ceil(4096) * 16
}

/// Checks every value that goes on the wire with the rule the cloud applies to it.
fn check_wire_fields(loaded: &Loaded<EdgeConfig>) -> Result<(), ConfigError> {
    use backhaul_shared::batch::{validate_device_id, validate_text};
    let c = &loaded.config;
    let rule = |key: &str, r: Result<(), String>| {
        r.map_err(|e| {
            loaded.invalid(key, format!("{e}; the cloud would refuse every batch (this value is on the wire)"))
        })
    };
    rule("device_id", validate_device_id(&c.device_id))?;
    for (key, value) in [("name", &c.name), ("location", &c.location)] {
        if let Some(v) = value {
            rule(key, validate_text(v))?;
        }
    }
    let m = &c.transport.mqtt;
    rule("transport.mqtt.topic_prefix", backhaul_shared::wire::validate_topic_prefix(&m.topic_prefix))?;
    if let Some(id) = &m.client_id {
        let r = if id.is_empty() {
            Err("must not be empty (leave it out for the default)".into())
        } else {
            validate_text(id)
        };
        rule("transport.mqtt.client_id", r)?;
    }
    if let Some(user) = &m.username {
        rule("transport.mqtt.username", validate_text(user))?;
    }
    Ok(())
}

/// `value` within `min..=max`, or an error that names the key, the value and the range.
fn in_range<T: PartialOrd + std::fmt::Display>(
    loaded: &Loaded<EdgeConfig>,
    key: &str,
    value: T,
    (min, max): (T, T),
    why: &str,
) -> Result<(), ConfigError> {
    if min <= value && value <= max {
        return Ok(());
    }
    let why = if why.is_empty() { String::new() } else { format!(": {why}") };
    Err(loaded.invalid(key, format!("{value} is outside the valid range {min}..={max}{why}")))
}

const fn secs(s: u64) -> HumanDuration {
    HumanDuration(Duration::from_secs(s))
}

const fn millis(ms: u64) -> HumanDuration {
    HumanDuration(Duration::from_millis(ms))
}

const DAY: u64 = 24 * 3600;

/// Every duration, size and count against its documented range (the fields' doc comments and the
/// README's "Valid ranges" table say the same).
fn check_ranges(loaded: &Loaded<EdgeConfig>) -> Result<(), ConfigError> {
    let c = &loaded.config;
    let (s, d, b, q, t, m, h) =
        (&c.source, &c.decode, &c.batch, &c.queue, &c.transport, &c.transport.mqtt, &c.transport.http);
    in_range(loaded, "source.rate", s.rate, (0.001, 1e9), "detections per second")?;
    in_range(loaded, "source.devices", s.devices, (1, 1_000_000), "")?;
    in_range(loaded, "source.stall_after_s", s.stall_after_s, (1, DAY), "seconds")?;
    if let Some(r) = d.hash_rotation.filter(|r| !r.0.is_zero()) {
        in_range(loaded, "decode.hash_rotation", r, (secs(60), secs(366 * DAY)), "\"0s\" or absent: no rotation")?;
    }
    let rssi = (i16::try_from(*RSSI_RANGE.start()).unwrap_or(i16::MIN), i16::try_from(*RSSI_RANGE.end()).unwrap_or(0));
    in_range(loaded, "decode.near_dbm", d.near_dbm, rssi, "dBm, the RSSI range the cloud accepts")?;
    in_range(loaded, "decode.medium_dbm", d.medium_dbm, rssi, "dBm, the RSSI range the cloud accepts")?;
    in_range(loaded, "decode.smoothing", d.smoothing, (secs(0), secs(3600)), "")?;
    in_range(loaded, "decode.dedup_window_s", d.dedup_window_s, (0, 3600), "seconds")?;
    in_range(loaded, "decode.payload_len", d.payload_len, (1, 255), "bytes of manufacturer data")?;
    in_range(loaded, "batch.max_detections", b.max_detections, (1, 10_000), "the cloud's default limit is 10000")?;
    in_range(loaded, "batch.max_age_ms", b.max_age_ms, (10, 3_600_000), "milliseconds")?;
    let min_bytes = ByteSize(min_queue_bytes(b.max_detections.min(10_000)));
    in_range(
        loaded,
        "queue.max_bytes",
        q.max_bytes,
        (min_bytes, ByteSize(16 << 40)),
        &format!(
            "bytes of data_dir on disk: at least one batch of batch.max_detections = {} detections (raise \
             queue.max_bytes or lower batch.max_detections), at most 16 TiB; sled needs a few MiB \
             whatever the budget",
            b.max_detections
        ),
    )?;
    in_range(loaded, "queue.retain_acked", q.retain_acked, (secs(0), secs(366 * DAY)), "\"0s\" keeps none")?;
    in_range(loaded, "queue.block_timeout", q.block_timeout, (secs(1), secs(3600)), "")?;
    in_range(loaded, "transport.rate_per_sec", t.rate_per_sec, (1, 1_000_000), "batches per second")?;
    in_range(loaded, "transport.burst", t.burst, (1, 1_000_000), "batches")?;
    in_range(loaded, "transport.max_inflight", t.max_inflight, (1, 1000), "batches")?;
    in_range(loaded, "transport.ack_timeout", t.ack_timeout, (secs(1), secs(3600)), "")?;
    in_range(loaded, "transport.backoff_max", t.backoff_max, (millis(100), secs(3600)), "")?;
    if let Some(port) = m.port {
        in_range(loaded, "transport.mqtt.port", port, (1, u16::MAX), "")?;
    }
    in_range(
        loaded,
        "transport.mqtt.keep_alive",
        m.keep_alive,
        (secs(1), secs(65_535)),
        "MQTT's keep alive is whole seconds, 1 to 65535",
    )?;
    if m.keep_alive.0.subsec_nanos() != 0 {
        return Err(loaded.invalid(
            "transport.mqtt.keep_alive",
            format!("{} is not a whole number of seconds: MQTT's keep alive is whole seconds", m.keep_alive),
        ));
    }
    in_range(loaded, "transport.mqtt.status_interval", m.status_interval, (secs(1), secs(3600)), "")?;
    if let Some(max) = m.max_message_bytes {
        in_range(
            loaded,
            "transport.mqtt.max_message_bytes",
            max,
            (ByteSize(MIN_MESSAGE_BYTES), ByteSize(MAX_MESSAGE_BYTES)),
            "bytes of a whole PUBLISH packet (MQTT's limit is 256 MiB)",
        )?;
    }
    in_range(loaded, "transport.http.workers", h.workers, (1, 64), "")?;
    in_range(loaded, "transport.http.timeout", h.timeout, (secs(1), secs(600)), "")?;
    in_range(loaded, "transport.http.command_poll", h.command_poll, (secs(1), secs(3600)), "")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config with a simulated source (no hash secret needed) plus `extra` lines, loaded as
    /// `check-config` and `run` load it.
    fn load(top: &str, sections: &str) -> Result<EdgeConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.toml");
        // Over MQTT the API key is needed to verify acks: a key file, unless the test names one.
        let key = dir.path().join("api-key");
        std::fs::write(&key, "device-key-pi-1-0123456789").unwrap();
        let key_line = format!("api_key_file = \"{}\"\n", key.display());
        let sections = if sections.contains("api_key_file") {
            sections.to_owned()
        } else if sections.contains("[transport.http]\n") {
            sections.replacen("[transport.http]\n", &format!("[transport.http]\n{key_line}"), 1)
        } else {
            format!("{sections}\n[transport.http]\n{key_line}")
        };
        let text = format!("device_id = \"pi-1\"\n{top}\n[source]\nkind = \"simulated\"\n{sections}\n");
        std::fs::write(&file, text).unwrap();
        EdgeConfig::load(&file).map(|(l, _)| l.config).map_err(|e| e.to_string())
    }

    fn refused(top: &str, sections: &str, key: &str, needles: &[&str]) {
        let e = load(top, sections).expect_err(&format!("{top} {sections} should be refused"));
        assert!(e.contains(&format!("key `{key}`")), "{e}");
        assert!(e.contains("edge.toml"), "the error says where the value came from: {e}");
        for n in needles {
            assert!(e.contains(n), "`{n}` missing from: {e}");
        }
    }

    #[test]
    fn a_keep_alive_below_one_second_is_refused_naming_the_key_the_value_and_the_range() {
        // Issue #13: rumqttc panics on it inside the link thread, which then died quietly.
        refused("", "[transport.mqtt]\nkeep_alive = \"500ms\"", "transport.mqtt.keep_alive", &["500ms", "1s..="]);
        refused(
            "",
            "[transport.mqtt]\nkeep_alive = \"1500ms\"",
            "transport.mqtt.keep_alive",
            &["whole number of seconds"],
        );
        refused("", "[transport.mqtt]\nkeep_alive = \"65536s\"", "transport.mqtt.keep_alive", &["65535"]);
        load("", "[transport.mqtt]\nkeep_alive = \"1s\"").unwrap();
        load("", "[transport.mqtt]\nkeep_alive = \"65535s\"").unwrap();
    }

    #[test]
    fn over_mqtt_with_cloud_acks_the_api_key_is_required_to_verify_them() {
        // Issue #16: without it no ack could be verified, so no batch would ever be deleted.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.toml");
        std::fs::write(&file, "device_id = \"pi-1\"\n[source]\nkind = \"simulated\"\n").unwrap();
        if std::env::var_os("BACKHAUL_API_KEY").is_none() {
            let e = EdgeConfig::load(&file).unwrap_err().to_string();
            assert!(e.contains("BACKHAUL_API_KEY") && e.contains("verify the cloud's acks"), "{e}");
        }
        std::fs::write(
            &file,
            "device_id = \"pi-1\"\n[source]\nkind = \"simulated\"\n[transport.mqtt]\nack = \"broker\"\n",
        )
        .unwrap();
        EdgeConfig::load(&file).unwrap();
    }

    #[test]
    fn every_range_is_checked_at_both_ends() {
        // (section, key, last valid below, first invalid below, last valid above, first invalid above)
        let cases: &[(&str, &str, &str, &str, &str, &str)] = &[
            ("source", "rate", "0.001", "0.0", "1000000000.0", "1000000001.0"),
            ("source", "devices", "1", "0", "1000000", "1000001"),
            ("source", "stall_after_s", "1", "0", "86400", "86401"),
            ("decode", "hash_rotation", "\"1m\"", "\"59s\"", "\"366days\"", "\"367days\""),
            ("decode", "medium_dbm", "-127", "-128", "-60", "21"),
            ("decode", "near_dbm", "-60", "-128", "20", "21"),
            ("decode", "smoothing", "\"0s\"", "\"0s\"", "\"1h\"", "\"61m\""),
            ("decode", "dedup_window_s", "0", "0", "3600", "3601"),
            ("decode", "payload_len", "1", "0", "255", "256"),
            ("batch", "max_detections", "1", "0", "10000", "10001"),
            ("batch", "max_age_ms", "10", "9", "3600000", "3600001"),
            ("queue", "retain_acked", "\"0s\"", "\"0s\"", "\"366days\"", "\"367days\""),
            ("queue", "block_timeout", "\"1s\"", "\"999ms\"", "\"1h\"", "\"61m\""),
            ("transport", "rate_per_sec", "1", "0", "1000000", "1000001"),
            ("transport", "burst", "1", "0", "1000000", "1000001"),
            ("transport", "max_inflight", "1", "0", "1000", "1001"),
            ("transport", "ack_timeout", "\"1s\"", "\"999ms\"", "\"1h\"", "\"61m\""),
            ("transport", "backoff_max", "\"100ms\"", "\"99ms\"", "\"1h\"", "\"61m\""),
            ("transport.mqtt", "port", "1", "0", "65535", "0"),
            ("transport.mqtt", "status_interval", "\"1s\"", "\"999ms\"", "\"1h\"", "\"61m\""),
            ("transport.mqtt", "max_message_bytes", "\"1KiB\"", "\"1023B\"", "\"256MiB\"", "\"257MiB\""),
            ("transport.http", "workers", "1", "0", "64", "65"),
            ("transport.http", "timeout", "\"1s\"", "\"999ms\"", "\"10m\"", "\"601s\""),
            ("transport.http", "command_poll", "\"1s\"", "\"999ms\"", "\"1h\"", "\"61m\""),
        ];
        for (section, key, low_ok, low_bad, high_ok, high_bad) in cases {
            let full = format!("{section}.{key}");
            let at = |v: &str| {
                if *section == "source" {
                    format!("{key} = {v}")
                } else {
                    format!("[{section}]\n{key} = {v}")
                }
            };
            load("", &at(low_ok)).unwrap_or_else(|e| panic!("{full} = {low_ok}: {e}"));
            load("", &at(high_ok)).unwrap_or_else(|e| panic!("{full} = {high_ok}: {e}"));
            for bad in [low_bad, high_bad] {
                if bad == low_ok || bad == high_ok {
                    continue; // no invalid value on that side
                }
                refused("", &at(bad), &full, &["outside the valid range"]);
            }
        }
    }

    #[test]
    fn a_queue_budget_too_small_for_one_batch_is_refused() {
        // Issue #14.
        for small in ["0B", "1KiB"] {
            refused(
                "",
                &format!("[queue]\nmax_bytes = \"{small}\""),
                "queue.max_bytes",
                &[small, "batch.max_detections"],
            );
        }
        let min = min_queue_bytes(500);
        load("", &format!("[queue]\nmax_bytes = {min}")).unwrap();
        refused("", &format!("[queue]\nmax_bytes = {}", min - 1), "queue.max_bytes", &[]);
        // Fewer detections per batch, smaller budget.
        load("", "[batch]\nmax_detections = 50\n[queue]\nmax_bytes = \"48KiB\"").unwrap();
    }

    #[test]
    fn the_largest_detection_of_every_kind_fits_the_per_detection_bound() {
        use backhaul_shared::{Detection, Presence, Sensor, Timestamp, Zone};
        let t: Timestamp = "2026-11-21T10:29:55.123456789Z".parse().unwrap();
        let presence =
            Detection::Presence(Presence { device_hash: "f".repeat(64), rssi: -127, zone: Zone::Medium, timestamp: t });
        let sensor = Detection::Sensor(Sensor {
            node: "c1:0e:5a:33:9f:02".into(),
            rssi: Some(-127),
            temp: Some(-100.0 / 3.0),
            humidity: Some(100),
            co2_ppm: Some(u32::MAX),
            window_open: Some(false),
            battery: Some(100),
            timestamp: t,
        });
        for d in [presence, sensor] {
            let n = serde_json::to_vec(&d).unwrap().len() as u64 + 1; // and a comma
            assert!(n < MAX_DETECTION_WIRE_BYTES, "{n} bytes: {d:?}");
        }
    }

    #[test]
    fn wire_fields_are_checked_with_the_clouds_rules_at_start() {
        // Issue #13: a tab in `name` was accepted here, then the cloud refused every batch.
        refused("name = \"Entrance\\tPi\"", "", "name", &["control characters", "'\\t'"]);
        refused("location = \"Main\\u0000entrance\"", "", "location", &["control characters"]);
        let long = format!("location = \"{}\"", "x".repeat(257));
        refused(&long, "", "location", &["256"]);
        let e = load("", "").unwrap();
        assert_eq!(e.device_id, "pi-1");
        load("name = \"Entrance Pi\"\nlocation = \"Hall B, 2nd floor — east\"", "").unwrap();
        refused("", "[transport.mqtt]\ntopic_prefix = \"fleet/+\"", "transport.mqtt.topic_prefix", &["'+'"]);
        refused("", "[transport.mqtt]\ntopic_prefix = \"/\"", "transport.mqtt.topic_prefix", &["empty"]);
        refused("", "[transport.mqtt]\nclient_id = \"pi\\n1\"", "transport.mqtt.client_id", &[]);
        refused("", "[transport.mqtt]\nclient_id = \"\"", "transport.mqtt.client_id", &[]);
        refused("", "[transport.mqtt]\nusername = \"pi\\u007f\"", "transport.mqtt.username", &[]);
    }

    #[test]
    fn an_api_key_that_cannot_be_a_header_is_refused_without_printing_it() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("api-key");
        std::fs::write(&key_file, "secret\tkey-do-not-print\n").unwrap();
        let top = format!("[transport.http]\napi_key_file = \"{}\"", key_file.display());
        let e = load("", &top).unwrap_err();
        assert!(e.contains("transport.http.api_key_file") && e.contains("X-API-Key"), "{e}");
        assert!(!e.contains("do-not-print"), "the key was printed: {e}");
        std::fs::write(&key_file, "good-key-0123456789\n").unwrap();
        load("", &top).unwrap();
        // Shorter than any key the cloud accepts: refused, not printed.
        std::fs::write(&key_file, "short-key\n").unwrap();
        let e = load("", &top).unwrap_err();
        assert!(e.contains("shorter than 16") && !e.contains("short-key"), "{e}");
    }

    #[test]
    fn a_device_id_with_a_tab_is_refused_as_the_cloud_would() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.toml");
        std::fs::write(&file, "device_id = \"rpi\\tentrance\"\n[source]\nkind = \"simulated\"\n").unwrap();
        let e = EdgeConfig::load(&file).unwrap_err().to_string();
        assert!(e.contains("key `device_id`") && e.contains("'\\t'"), "{e}");
    }
}
