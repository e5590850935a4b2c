//! `backhaul-cloud serve --config FILE` settings (SPEC.md, "Cloud command line and configuration"),
//! and the API keys.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use std::time::Duration;

use backhaul_shared::config::{self, ByteSize, EnvMap, HumanDuration, Loaded};
use serde::Deserialize;

/// Environment variables under `BACKHAUL_` that are not config keys: the cloud's own secrets, and
/// the edge's and the operator tools' (`BACKHAUL_HASH_SECRET`, `BACKHAUL_API_KEY`), which a shell or
/// a host running both may have set and which the cloud ignores.
pub const RESERVED_ENV: &[&str] = &[
    "BACKHAUL_API_KEYS",
    "BACKHAUL_MQTT_PASSWORD",
    "BACKHAUL_LOG",
    "BACKHAUL_FAILPOINT",
    "BACKHAUL_HASH_SECRET",
    "BACKHAUL_API_KEY",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// HTTP listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `sqlite:PATH` or `postgres://…`.
    pub database: String,
    /// Largest batch accepted, as an HTTP body (413 above) or an MQTT message payload (the cloud
    /// announces it to the broker, which then drops bigger messages for it). 1 KiB..=64 MiB;
    /// default 1 MiB.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: ByteSize,
    /// Most detections in one batch. 1..=100,000; default 10,000.
    #[serde(default = "default_max_detections")]
    pub max_detections: usize,
    /// HTTP bulk posts handled at once; beyond that the answer is 429. 0..=4,096 (0 turns every
    /// bulk post away: an MQTT-only cloud); default 64.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_ingest: usize,
    /// Open HTTP connections at most; more wait in the kernel's accept queue until one closes.
    /// 1..=65,536; default 512 (the unit's `LimitNOFILE` is 65,536).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Dashboards' live streams (`GET /api/v1/live`) open at once; more are answered 503. Each
    /// holds one of `max_connections`, so it must be below it (ingest keeps the rest).
    /// 0..`max_connections`; default 100, or half of `max_connections` if that is less.
    #[serde(default)]
    pub max_live_clients: Option<usize>,
    /// A client must send a request's headers within this (or the connection is closed; idle
    /// keep-alive connections too). 1 s..=5 min; default 10 s.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: HumanDuration,
    /// A client must send a bulk post's body within this, once its headers are in (408 after).
    /// 1 s..=10 min; default 30 s.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout: HumanDuration,
    /// An ingress with work waiting that finishes none of it for this long is stalled: `/health`
    /// answers 503 and the systemd watchdog stops (issue #14). 5 s..=1 h; default 60 s.
    #[serde(default = "default_stall_after")]
    pub ingest_stall_after: HumanDuration,
    /// Batches per second each device may send (HTTP: 429 with Retry-After above it; MQTT: the
    /// message is PUBACKed unstored and the edge resends it after its ack timeout). 0 turns the
    /// limit off. 0..=1,000,000; default 100 (twice an edge's default `rate_per_sec`).
    #[serde(default = "default_device_rate")]
    pub device_rate_per_sec: u32,
    /// Batches a device may send at once above its rate. 1..=1,000,000; default 200.
    #[serde(default = "default_device_burst")]
    pub device_burst: u32,
    pub mqtt: Option<MqttConfig>,
    /// The seed senders' MQTT topics (issue #20), each off by default; needs `[mqtt]`.
    #[serde(default)]
    pub compat: CompatConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// TLS on the HTTP listener (issue #16): `cert_file`, `key_file`, optional `client_ca_file`
    /// (mTLS: a client's certificate must name the `device_id` it posts for, in its CN or a DNS
    /// subjectAltName). Reloaded on SIGHUP. Absent: plain HTTP (behind a TLS proxy, or a LAN).
    pub tls: Option<backhaul_shared::tls::ServerTls>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default = "default_mqtt_url")]
    pub url: String,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    #[serde(default = "default_group")]
    pub shared_group: String,
    /// Fixed per replica: the broker keeps this client's session (and its unacked messages).
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// The password comes from `BACKHAUL_MQTT_PASSWORD`, never from the file.
    pub username: Option<String>,
    /// How long the broker keeps this replica's session (its subscriptions and the messages not yet
    /// PUBACKed) after the connection is lost (MQTT 5 Session Expiry Interval). Absent: never, so a
    /// restarted cloud finds everything waiting. With several replicas in one shared group, a short
    /// one (e.g. "10s") lets the others take over a dead replica's share once it expires; what its
    /// session held is then dropped by the broker and resent by the edges (`ack = "cloud"` only: an
    /// edge with `ack = "broker"` would lose it). 0s..=365d.
    pub session_expiry: Option<HumanDuration>,
    /// TLS for an `mqtts://` url (`backhaul_shared::tls::ClientTls`: `ca_file` or `roots`,
    /// optional `cert_file` + `key_file`, optional `server_name`). Absent with `mqtts://`: the
    /// system's roots.
    pub tls: Option<backhaul_shared::tls::ClientTls>,
}

/// `[compat]` (SPEC.md, "Seed compatibility"; `crate::compat`): which seed senders' MQTT topics
/// this cloud subscribes to, shared by the replicas of `mqtt.shared_group` like the batches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompatConfig {
    /// The BLE presence agent's topic (`"tfg/detections/raw"` as deployed): every device on it,
    /// the device in the payload. Absent: not subscribed. A topic name, 1..=256 bytes, no `+`/`#`.
    pub tfg_topic: Option<String>,
    /// Thingy:52 gateways' `{gateway_id}/{node_mac}/update`.
    #[serde(default)]
    pub thingy_topics: bool,
    /// Fleet clients' `rpi/{client_id}/heartbeat` and `rpi/{client_id}/state`.
    #[serde(default)]
    pub fleet_topics: bool,
}

impl CloudConfig {
    /// `max_live_clients`, or its default: 100, or half of `max_connections` if that is less.
    pub fn live_clients(&self) -> usize {
        self.max_live_clients.unwrap_or_else(|| (self.max_connections / 2).min(100))
    }
}

impl CompatConfig {
    /// Whether any seed MQTT topic is on.
    pub fn any(&self) -> bool {
        self.tfg_topic.is_some() || self.thingy_topics || self.fleet_topics
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `device_id = "key"` lines (TOML); `"*" = "key"` is a fleet-wide key.
    pub keys_file: Option<PathBuf>,
}

impl MqttConfig {
    /// The broker link's TLS material, loaded and checked: `None` for an `mqtt://` url. Errors
    /// name `mqtt.url` or `mqtt.tls` and the file.
    pub fn tls_material(&self) -> Result<Option<backhaul_shared::tls::ClientMaterial>> {
        let (_, _, url_tls) = parse_mqtt_url(&self.url)?;
        Ok(backhaul_shared::tls::client_material(
            url_tls,
            self.tls.as_ref(),
            "mqtt.tls",
            "mqtt.url",
            backhaul_shared::tls::now(),
        )?)
    }
}

fn default_device_rate() -> u32 {
    100
}

fn default_device_burst() -> u32 {
    200
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_max_body() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_max_detections() -> usize {
    10_000
}
fn default_max_concurrent() -> usize {
    64
}
fn default_max_connections() -> usize {
    512
}

fn default_header_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_body_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_stall_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_mqtt_url() -> String {
    "mqtt://127.0.0.1:1883".into()
}
fn default_prefix() -> String {
    backhaul_shared::wire::DEFAULT_PREFIX.into()
}
fn default_group() -> String {
    "ingest".into()
}
fn default_client_id() -> String {
    "backhaul-cloud-1".into()
}

impl CloudConfig {
    /// Loads and validates `file` with the environment applied.
    pub fn load(file: &Path) -> Result<Loaded<Self>> {
        let env_map = EnvMap { prefix: "BACKHAUL_", aliases: &[], reserved: RESERVED_ENV };
        let loaded: Loaded<Self> = config::load(file, &env_map, std::env::vars())?;
        let c = &loaded.config;
        c.listen_addr().map_err(|e| loaded.invalid("listen", e.to_string()))?;
        if !(c.database.starts_with("sqlite:") || c.database.starts_with("postgres://")) {
            return Err(loaded.invalid("database", "must be sqlite:PATH or postgres://…").into());
        }
        check_ranges(&loaded)?;
        if let Some(t) = &c.compat.tfg_topic {
            if t.is_empty() || t.len() > 256 || t.contains(['+', '#']) || t.starts_with('$') || t.contains('\0') {
                return Err(loaded
                    .invalid(
                        "compat.tfg_topic",
                        "must be a topic name of 1..=256 bytes, without + or # (e.g. tfg/detections/raw)",
                    )
                    .into());
            }
        }
        if let (Some(t), Some(m)) = (&c.compat.tfg_topic, &c.mqtt) {
            let levels: Vec<&str> = t.split('/').collect();
            let overlaps = matches!(levels.as_slice(), ["rpi", _, "heartbeat" | "state"] | [_, _, "update"])
                || t.starts_with(&format!("{}/", m.topic_prefix.trim_end_matches('/')));
            if overlaps {
                return Err(loaded
                    .invalid(
                        "compat.tfg_topic",
                        "overlaps the Thingy, fleet or backhaul topics ({gateway}/{node}/update, rpi/{client}/..., mqtt.topic_prefix/...): pick another",
                    )
                    .into());
            }
        }
        if c.compat.any() && c.mqtt.is_none() {
            return Err(loaded
                .invalid("compat", "the seed MQTT topics need an [mqtt] section (the broker to read them from)")
                .into());
        }
        if let Some(m) = &c.mqtt {
            parse_mqtt_url(&m.url).map_err(|e| loaded.invalid("mqtt.url", e.to_string()))?;
            if m.topic_prefix.is_empty() || m.topic_prefix.contains(['+', '#']) {
                return Err(loaded.invalid("mqtt.topic_prefix", "must be non-empty, without + or #").into());
            }
        }
        Ok(loaded)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.listen.parse().with_context(|| format!("`{}` is not an address like 127.0.0.1:8080", self.listen))
    }
}

/// `value` within `min..=max`, or an error naming the key and the range.
fn in_range<T: PartialOrd + std::fmt::Display>(
    loaded: &Loaded<CloudConfig>,
    key: &str,
    value: T,
    (min, max): (T, T),
) -> Result<()> {
    if min <= value && value <= max {
        return Ok(());
    }
    Err(loaded.invalid(key, format!("{value} is outside the valid range {min}..={max}")).into())
}

/// Every size, count and duration against its documented range (the fields' doc comments and the
/// README's "Valid ranges" table say the same).
fn check_ranges(loaded: &Loaded<CloudConfig>) -> Result<()> {
    let c = &loaded.config;
    let secs = |s| HumanDuration(Duration::from_secs(s));
    in_range(loaded, "max_body_bytes", c.max_body_bytes, (ByteSize(1 << 10), ByteSize(64 << 20)))?;
    in_range(loaded, "max_detections", c.max_detections, (1, 100_000))?;
    in_range(loaded, "max_concurrent_ingest", c.max_concurrent_ingest, (0, 4096))?;
    in_range(loaded, "max_connections", c.max_connections, (1, 65_536))?;
    if let Some(n) = c.max_live_clients {
        in_range(loaded, "max_live_clients", n, (0, c.max_connections - 1))?;
    }
    in_range(loaded, "header_read_timeout", c.header_read_timeout, (secs(1), secs(300)))?;
    in_range(loaded, "body_read_timeout", c.body_read_timeout, (secs(1), secs(600)))?;
    in_range(loaded, "ingest_stall_after", c.ingest_stall_after, (secs(5), secs(3600)))?;
    in_range(loaded, "device_rate_per_sec", c.device_rate_per_sec, (0, 1_000_000))?;
    in_range(loaded, "device_burst", c.device_burst, (1, 1_000_000))?;
    if let Some(expiry) = c.mqtt.as_ref().and_then(|m| m.session_expiry) {
        in_range(loaded, "mqtt.session_expiry", expiry, (secs(0), secs(365 * 24 * 3600)))?;
    }
    Ok(())
}

/// `mqtt://host:port` or `mqtts://host:port` → (host, port, tls).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16, bool)> {
    backhaul_shared::wire::parse_mqtt_url(url).map_err(anyhow::Error::msg)
}

/// API keys: which device each key may post for (`None` = any device, the `*` key).
#[derive(Clone)]
pub struct ApiKeys {
    keys: Vec<(Option<String>, Vec<u8>)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

/// Who a request's key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyScope {
    Fleet,
    Device(String),
}

impl KeyScope {
    pub fn allows(&self, device_id: &str) -> bool {
        match self {
            KeyScope::Fleet => true,
            KeyScope::Device(d) => d == device_id,
        }
    }
}

impl ApiKeys {
    /// From the keys file and `BACKHAUL_API_KEYS` (`device=key,device2=key2`; `*=key` fleet-wide).
    pub fn load(file: Option<&Path>, env: Option<&str>) -> Result<Self> {
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        if let Some(file) = file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the API keys file {} (auth.keys_file)", file.display()))?;
            // Never toml's own message: it quotes the line, which holds a key.
            let table: toml::Table = text.parse().map_err(|e| {
                anyhow::anyhow!(
                    "API keys file {} is not `device_id = \"key\"` lines (TOML): {}",
                    file.display(),
                    config::syntax_error(&text, &e)
                )
            })?;
            for (device, key) in table {
                let Some(key) = key.as_str() else {
                    bail!("API keys file {}: the key for `{device}` must be a quoted string", file.display());
                };
                map.insert(device, key.to_owned());
            }
        }
        if let Some(env) = env {
            for pair in env.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let Some((device, key)) = pair.split_once('=') else {
                    bail!("BACKHAUL_API_KEYS must be `device=key,device2=key2` (an entry has no `=`)");
                };
                map.insert(device.trim().to_owned(), key.trim().to_owned());
            }
        }
        if let Some((device, _)) = map.iter().find(|(_, k)| k.len() < 16) {
            bail!("the API key for `{device}` is shorter than 16 characters: use a long random key");
        }
        if map.is_empty() {
            bail!("no API keys configured: set auth.keys_file (device_id = \"key\" lines) or BACKHAUL_API_KEYS");
        }
        let keys = map.into_iter().map(|(device, key)| ((device != "*").then_some(device), key.into_bytes())).collect();
        Ok(Self { keys })
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true: loading refuses an empty set.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key that signs acks for `device_id` ([`backhaul_shared::wire::ack_mac`]): the device's
    /// own key, else the fleet key (`*`), the one its edge must then hold. `None`: no key could
    /// have posted for it, and its edge ignores unsigned acks.
    pub fn ack_key(&self, device_id: &str) -> Option<&[u8]> {
        let own = self.keys.iter().find(|(d, _)| d.as_deref() == Some(device_id));
        own.or_else(|| self.keys.iter().find(|(d, _)| d.is_none())).map(|(_, k)| k.as_slice())
    }

    /// The scope of a presented key, comparing in constant time against every key.
    pub fn check(&self, presented: &str) -> Option<KeyScope> {
        use subtle::ConstantTimeEq;
        let presented = presented.as_bytes();
        let mut found = None;
        for (device, key) in &self.keys {
            // ct_eq on slices of different lengths is false without comparing contents.
            if bool::from(key.as_slice().ct_eq(presented)) && found.is_none() {
                found = Some(match device {
                    Some(d) => KeyScope::Device(d.clone()),
                    None => KeyScope::Fleet,
                });
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_file_and_env_with_scopes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.toml");
        std::fs::write(&file, "\"rpi-1\" = \"key-for-rpi-1-0123456789\"\n\"*\" = \"fleet-key-0123456789\"\n").unwrap();
        let keys = ApiKeys::load(Some(&file), Some("rpi-2=key-for-rpi-2-0123456789")).unwrap();
        assert_eq!(keys.check("key-for-rpi-1-0123456789"), Some(KeyScope::Device("rpi-1".into())));
        assert_eq!(keys.check("key-for-rpi-2-0123456789"), Some(KeyScope::Device("rpi-2".into())));
        assert_eq!(keys.check("fleet-key-0123456789"), Some(KeyScope::Fleet));
        assert_eq!(keys.check("nope"), None);
        assert_eq!(keys.ack_key("rpi-1"), Some(&b"key-for-rpi-1-0123456789"[..]), "a device signs with its own key");
        assert_eq!(keys.ack_key("rpi-9"), Some(&b"fleet-key-0123456789"[..]), "else with the fleet key");
        assert_eq!(keys.check(""), None);
        assert!(!format!("{keys:?}").contains("fleet-key"), "keys never appear in Debug output");
    }

    #[test]
    fn every_limit_outside_its_range_is_refused_naming_the_key_and_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cloud.toml");
        for (line, key, range) in [
            ("max_connections = 0", "max_connections", "1..=65536"),
            ("header_read_timeout = \"0s\"", "header_read_timeout", "1s..=5m"),
            ("body_read_timeout = \"1h\"", "body_read_timeout", "1s..=10m"),
            ("ingest_stall_after = \"1s\"", "ingest_stall_after", "5s..=1h"),
            ("max_body_bytes = \"1GiB\"", "max_body_bytes", "..="),
            ("max_detections = 0", "max_detections", "1..=100000"),
            ("max_live_clients = 512", "max_live_clients", "0..=511"),
        ] {
            std::fs::write(&file, format!("database = \"sqlite:/tmp/x.db\"\n{line}\n")).unwrap();
            let e = CloudConfig::load(&file).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(range) && e.contains("outside the valid range"), "{line}: {e}");
        }
        std::fs::write(&file, "database = \"sqlite:/tmp/x.db\"\n").unwrap();
        let c = CloudConfig::load(&file).unwrap().config;
        assert_eq!((c.max_connections, c.ingest_stall_after.0.as_secs()), (512, 60), "defaults are in range");
    }

    #[test]
    fn a_syntax_error_in_the_keys_file_never_shows_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.toml");
        std::fs::write(&file, "\"*\" = \"fleet-key-SECRET-0123456789\n").unwrap();
        let e = format!("{:#}", ApiKeys::load(Some(&file), None).unwrap_err());
        assert!(!e.contains("SECRET"), "{e}");
        assert!(e.contains("line 1") && e.contains("not shown"), "{e}");
    }

    #[test]
    fn no_keys_or_short_keys_are_refused_with_a_clear_error() {
        let e = ApiKeys::load(None, None).unwrap_err().to_string();
        assert!(e.contains("keys_file") && e.contains("BACKHAUL_API_KEYS"), "{e}");
        let e = ApiKeys::load(None, Some("rpi=short")).unwrap_err().to_string();
        assert!(e.contains("shorter than 16"), "{e}");
    }
}
