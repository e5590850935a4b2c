//! `backhaul-cloud serve --config FILE` settings (SPEC.md, "Cloud command line and configuration"),
//! and the API keys.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use backhaul_shared::config::{self, ByteSize, EnvMap, Loaded};
use serde::Deserialize;

/// Environment variables under `BACKHAUL_` that are not config keys.
pub const RESERVED_ENV: &[&str] =
    &["BACKHAUL_API_KEYS", "BACKHAUL_MQTT_PASSWORD", "BACKHAUL_LOG", "BACKHAUL_FAILPOINT"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// HTTP listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `sqlite:PATH` or `postgres://…`.
    pub database: String,
    /// Largest HTTP body accepted (413 above).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: ByteSize,
    /// Most detections in one batch.
    #[serde(default = "default_max_detections")]
    pub max_detections: usize,
    /// Ingests in progress at once; beyond that HTTP answers 429 and MQTT stops reading.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_ingest: usize,
    pub mqtt: Option<MqttConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
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
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `device_id = "key"` lines (TOML); `"*" = "key"` is a fleet-wide key.
    pub keys_file: Option<PathBuf>,
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

/// `mqtt://host:port` → (host, port).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16)> {
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
            let table: toml::Table = text.parse().with_context(|| {
                format!("API keys file {} is not `device_id = \"key\"` lines (TOML)", file.display())
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
        assert_eq!(keys.check(""), None);
        assert!(!format!("{keys:?}").contains("fleet-key"), "keys never appear in Debug output");
    }

    #[test]
    fn no_keys_or_short_keys_are_refused_with_a_clear_error() {
        let e = ApiKeys::load(None, None).unwrap_err().to_string();
        assert!(e.contains("keys_file") && e.contains("BACKHAUL_API_KEYS"), "{e}");
        let e = ApiKeys::load(None, Some("rpi=short")).unwrap_err().to_string();
        assert!(e.contains("shorter than 16"), "{e}");
    }
}
