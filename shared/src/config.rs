//! Configuration loading shared by both binaries: a TOML file, overridable key by key from the
//! environment, validated at start with errors that name the key and where it came from.
//!
//! A key `a.b.c` (section `[a.b]`, key `c`) is overridden by `{PREFIX}A__B__C`, e.g.
//! `BACKHAUL_TRANSPORT__MQTT__URL` or `BACKHAUL_DEVICE_ID`: sections are joined with a double
//! underscore. Callers may add aliases (plain names mapped to keys) and reserve names under the prefix
//! that are not keys (secrets such as `BACKHAUL_HASH_SECRET`). Any other variable under the prefix that
//! names no key is an error, so a typo in a unit file is caught at start rather than silently ignored.
//!
//! Environment values are strings; each is read as a TOML boolean, integer or float when it looks like
//! one and as a string otherwise, and read as a string after all if the key wants a string (a
//! `device_id` of `"1234"` stays a string).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Env(String),
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "config file {}", p.display()),
            Origin::Env(v) => write!(f, "environment variable {v}"),
            Origin::Default => f.write_str("the built-in default"),
        }
    }
}

/// Why a configuration could not be loaded. Each message names the file or variable and the key.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source} (check the path given to --config)", file.display())]
    Read { file: PathBuf, source: std::io::Error },
    #[error("config file {} is not valid TOML: {message}", file.display())]
    Syntax { file: PathBuf, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Invalid { key: String, origin: Origin, message: String },
    /// The placeholder config the backhaul-edge package installs (issue #21), found where a config
    /// was expected.
    #[error("config file {} is the placeholder the package installed: write this machine's config first, with `sudo backhaul-edge init --url URL` (URL: the broker's mqtts:// or the cloud's https:// URL; see the README, \"Running on a Pi\")", file.display())]
    Placeholder { file: PathBuf },
    #[error("environment variable {var} does not name a config key (for `{key}`); remove it or fix its spelling (sections are joined with `__`, e.g. BACKHAUL_TRANSPORT__MQTT__URL)")]
    UnknownEnv { var: String, key: String },
}

/// A loaded configuration and the provenance of its values.
#[derive(Debug)]
pub struct Loaded<T> {
    pub config: T,
    pub file: PathBuf,
    /// Keys set from the environment, with the variable that set each.
    pub from_env: BTreeMap<String, String>,
}

impl<T> Loaded<T> {
    /// Where `key` (dotted) got its value.
    pub fn origin_of(&self, key: &str) -> Origin {
        match self.from_env.get(key) {
            Some(var) => Origin::Env(var.clone()),
            None => Origin::File(self.file.clone()),
        }
    }

    /// An error about `key` that names where its value came from.
    pub fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { key: key.to_owned(), origin: self.origin_of(key), message: message.into() }
    }
}

/// How environment variables map onto keys.
#[derive(Debug, Clone, Default)]
pub struct EnvMap<'a> {
    /// e.g. `BACKHAUL_`.
    pub prefix: &'a str,
    /// Extra names and the dotted keys they set, e.g. `("MQTT_BROKER", "transport.mqtt.host")`.
    pub aliases: &'a [(&'a str, &'a str)],
    /// Names under the prefix that are not config keys (secrets, log filters).
    pub reserved: &'a [&'a str],
}

/// Loads `file`, applies the environment `env` (pass `std::env::vars()`), and deserializes `T`.
///
/// `T` should use `#[serde(deny_unknown_fields)]` so a misspelt key is an error naming it.
pub fn load<T: DeserializeOwned>(
    file: &Path,
    env_map: &EnvMap<'_>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded<T>, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read { file: file.to_owned(), source })?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
        file: file.to_owned(),
        message: syntax_error(&text, &e),
    })?;
    from_table(table, file, env_map, env)
}

/// A TOML syntax error as "line L, column C: what is wrong", without the line itself: toml's own
/// message quotes it, and a config line may hold a pasted secret that must not reach a log.
pub fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', "; ");
    let Some(before) = e.span().and_then(|span| text.get(..span.start)) else { return message };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message} (the line is not shown: it may hold a secret)")
}

/// Like [`load`], from an already parsed table (`file` is only used in messages).
pub fn from_table<T: DeserializeOwned>(
    mut table: toml::Table,
    file: &Path,
    env_map: &EnvMap<'_>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded<T>, ConfigError> {
    let mut from_env = BTreeMap::new();
    let mut env_values: BTreeMap<String, String> = BTreeMap::new();
    for (var, value) in env {
        let key = if let Some((_, key)) = env_map.aliases.iter().find(|(name, _)| *name == var) {
            (*key).to_owned()
        } else if let Some(rest) = var.strip_prefix(env_map.prefix).filter(|_| !env_map.prefix.is_empty()) {
            if env_map.reserved.contains(&var.as_str()) {
                continue;
            }
            rest.split("__").map(str::to_ascii_lowercase).collect::<Vec<_>>().join(".")
        } else {
            continue;
        };
        from_env.insert(key.clone(), var);
        env_values.insert(key, value);
    }
    for (key, value) in &env_values {
        set_path(&mut table, key, guess_type(value)).map_err(|message| ConfigError::Invalid {
            key: key.clone(),
            origin: Origin::Env(from_env[key].clone()),
            message,
        })?;
    }

    // Deserialize; when a key set from the environment was guessed to be a number or boolean but the
    // config wants a string, set it as a string and try again.
    let mut retried = std::collections::BTreeSet::new();
    loop {
        match serde_path_to_error::deserialize::<_, T>(toml::Value::Table(table.clone())) {
            Ok(config) => return Ok(Loaded { config, file: file.to_owned(), from_env }),
            Err(e) => {
                let key = e.path().to_string();
                let message = e.inner().to_string();
                if let Some(raw) = env_values.get(&key) {
                    if !retried.contains(&key) && !matches!(guess_type(raw), toml::Value::String(_)) {
                        retried.insert(key.clone());
                        set_path(&mut table, &key, toml::Value::String(raw.clone())).expect("the key was set before");
                        continue;
                    }
                }
                // An unknown field is reported at its parent's path; name the variable if it came
                // from the environment.
                if message.starts_with("unknown field") {
                    let field = message.split('`').nth(1).unwrap_or_default();
                    let full = if key == field || key.ends_with(&format!(".{field}")) {
                        key.clone()
                    } else if key == "." || key.is_empty() {
                        field.to_owned()
                    } else {
                        format!("{key}.{field}")
                    };
                    // The variable may name a key inside a section that does not exist at all.
                    let inside = format!("{full}.");
                    let var = from_env
                        .get(&full)
                        .or_else(|| from_env.iter().find(|(k, _)| k.starts_with(&inside)).map(|(_, var)| var));
                    if let Some(var) = var {
                        return Err(ConfigError::UnknownEnv { var: var.clone(), key: full });
                    }
                    return Err(ConfigError::Invalid { key: full, origin: Origin::File(file.to_owned()), message });
                }
                let origin = match from_env.get(&key) {
                    Some(var) => Origin::Env(var.clone()),
                    None => Origin::File(file.to_owned()),
                };
                return Err(ConfigError::Invalid { key, origin, message });
            }
        }
    }
}

fn guess_type(raw: &str) -> toml::Value {
    if let Ok(b) = raw.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(f) = raw.parse::<f64>() {
        if f.is_finite() {
            return toml::Value::Float(f);
        }
    }
    // An inline array, e.g. profiles = ["presence"].
    if raw.trim_start().starts_with('[') {
        if let Ok(t) = format!("v = {raw}").parse::<toml::Table>() {
            if let Some(v) = t.get("v") {
                return v.clone();
            }
        }
    }
    toml::Value::String(raw.to_owned())
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().ok_or_else(|| "empty key".to_owned())?;
    let mut t = table;
    for part in parts {
        let entry = t.entry(part.to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = match entry {
            toml::Value::Table(inner) => inner,
            _ => return Err(format!("`{part}` is a value, not a section")),
        };
    }
    t.insert(last.to_owned(), value);
    Ok(())
}

/// A size in bytes, written as an integer or with a unit: `"512MiB"`, `"64 KiB"`, `"1GB"`, `"4096"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (like \"512MiB\")"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            "tb" => 1_000_000_000_000,
            "tib" | "t" => 1 << 40,
            other => return Err(format!("`{s}`: unknown size unit `{other}` (use B, KiB, MiB, GiB, KB, MB, GB)")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written for people: `"24h"`, `"90s"`, `"1h 30m"`, `"500ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| format!("`{s}` is not a duration (like \"24h\" or \"500ms\"): {e}"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        device_id: String,
        #[serde(default)]
        queue: Queue,
        #[serde(default)]
        transport: Transport,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Queue {
        max_bytes: ByteSize,
        retain_acked: HumanDuration,
    }

    impl Default for Queue {
        fn default() -> Self {
            Self { max_bytes: ByteSize(1 << 20), retain_acked: HumanDuration(Duration::from_secs(3600)) }
        }
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Transport {
        rate_per_sec: u32,
        mqtt: Mqtt,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Mqtt {
        url: String,
        verbose: bool,
    }

    const MAP: EnvMap<'static> = EnvMap {
        prefix: "BACKHAUL_",
        aliases: &[("MQTT_BROKER", "transport.mqtt.url")],
        reserved: &["BACKHAUL_HASH_SECRET"],
    };

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Loaded<Demo>, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.toml");
        std::fs::write(&file, toml).unwrap();
        load(&file, &MAP, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn file_values_and_defaults() {
        let l = load_str("device_id = \"pi\"\n[queue]\nmax_bytes = \"512MiB\"\n", &[]).unwrap();
        assert_eq!(l.config.queue.max_bytes, ByteSize(512 << 20));
        assert_eq!(l.config.queue.retain_acked.0, Duration::from_secs(3600));
    }

    #[test]
    fn env_overrides_key_by_key_with_types() {
        let l = load_str(
            "device_id = \"pi\"\n[transport]\nrate_per_sec = 5\n",
            &[
                ("BACKHAUL_TRANSPORT__RATE_PER_SEC", "50"),
                ("BACKHAUL_TRANSPORT__MQTT__VERBOSE", "true"),
                ("BACKHAUL_DEVICE_ID", "1234"),
                ("MQTT_BROKER", "mqtt://10.0.0.1:1883"),
                ("BACKHAUL_HASH_SECRET", "s3cret"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(l.config.transport.rate_per_sec, 50);
        assert!(l.config.transport.mqtt.verbose);
        assert_eq!(l.config.device_id, "1234", "a numeric-looking string stays a string");
        assert_eq!(l.config.transport.mqtt.url, "mqtt://10.0.0.1:1883");
        assert_eq!(l.origin_of("transport.rate_per_sec"), Origin::Env("BACKHAUL_TRANSPORT__RATE_PER_SEC".into()));
    }

    #[test]
    fn required_key_may_come_from_env_only() {
        let l = load_str("", &[("BACKHAUL_DEVICE_ID", "pi-env")]).unwrap();
        assert_eq!(l.config.device_id, "pi-env");
    }

    #[test]
    fn errors_name_key_and_origin() {
        let e = load_str("device_id = \"pi\"\n[queue]\nmax_bytes = \"lots\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("queue.max_bytes") && e.contains("edge.toml"), "{e}");

        let e =
            load_str("device_id = \"pi\"\n", &[("BACKHAUL_TRANSPORT__RATE_PER_SEC", "fast")]).unwrap_err().to_string();
        assert!(e.contains("BACKHAUL_TRANSPORT__RATE_PER_SEC") && e.contains("transport.rate_per_sec"), "{e}");

        let e = load_str("device_id = \"pi\"\n[queue]\nmax_byte = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("queue.max_byte") && e.contains("unknown field"), "{e}");

        // A section the program does not have (e.g. the edge's `queue` given to the cloud).
        let e = load_str("device_id = \"pi\"\n", &[("BACKHAUL_NOSUCH__RETAIN", "0s")]).unwrap_err().to_string();
        assert!(e.contains("BACKHAUL_NOSUCH__RETAIN") && !e.contains("config file"), "{e}");
        let e = load_str("device_id = \"pi\"\n", &[("BACKHAUL_TRANSPORT_MQTT_URL", "x")]).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownEnv { .. }), "{e}");
        assert!(e.to_string().contains("BACKHAUL_TRANSPORT_MQTT_URL"), "{e}");

        let e = load_str("device_id = \n", &[]).unwrap_err().to_string();
        assert!(e.contains("not valid TOML") && e.contains("line 1"), "{e}");

        let e = load_str("", &[]).unwrap_err().to_string();
        assert!(e.contains("device_id"), "{e}");
    }

    #[test]
    fn missing_file_says_so() {
        let e = load::<Demo>(Path::new("/nonexistent/edge.toml"), &MAP, []).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/edge.toml") && e.contains("--config"), "{e}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!("64 KiB".parse::<ByteSize>().unwrap(), ByteSize(64 << 10));
        assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
    }

    #[test]
    fn a_syntax_error_names_the_line_and_never_echoes_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edge.toml");
        std::fs::write(&file, "device_id = \"a\"\n\n[transport]\nhunter2-s3cr3t-pasted-here\n").unwrap();
        let err = load::<toml::Table>(&file, &EnvMap::default(), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("line 4, column "), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(!err.contains("hunter2") && !err.contains("s3cr3t"), "the line is never echoed: {err}");
    }
}
