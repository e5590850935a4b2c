//! `backhaul-edge init` (SPEC.md, "Wave 2 additions", Edge; issue #21): a commented config for
//! this Pi and its secrets, written once.
//!
//! What it writes, and never overwrites:
//! - the config (`--config`, default `/etc/backhaul/edge.toml`), mode 0644: the device id (the
//!   host name unless `--device-id`), the transport mode and URL (the mode follows the URL's
//!   scheme), the BLE source, and the credential files below. An existing config is kept as it
//!   is, unless it is the placeholder the package ships ([`PLACEHOLDER_MARKER`]);
//! - `hash_secret` in the credentials directory (default `/etc/backhaul/credentials`, created
//!   mode 0700), mode 0600: 32 bytes from the kernel's CSPRNG (`/dev/urandom`) as 64 hex digits,
//!   the key of the presence profile's address hashes (SPEC.md, "Edge configuration");
//! - `api_key` there, mode 0600, from `BACKHAUL_API_KEY` or `--api-key-file` when given: the
//!   key the cloud's keys file holds for this device.
//!
//! Every file is written to a temporary name and synced, then published: renamed over the
//! placeholder, else hard-linked, which fails if anything is there, so nothing that exists is
//! ever overwritten and a power cut leaves either nothing or the whole file. Running it again
//! changes nothing and says so.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::TransportMode;

/// The first line of the config the .deb ships at `/etc/backhaul/edge.toml` before `init` ran.
pub const PLACEHOLDER_MARKER: &str = "# backhaul-edge: placeholder, not configured yet";

/// Whether `text` is the packaged placeholder: its first line is [`PLACEHOLDER_MARKER`] and it
/// sets no key (comments only). `init` replaces it; loading it is an error that says to run
/// `init`. A file an operator edited into a real config (keys set) is never taken for it.
pub fn is_placeholder(text: &str) -> bool {
    text.lines().next() == Some(PLACEHOLDER_MARKER) && text.parse::<toml::Table>().is_ok_and(|t| t.is_empty())
}

/// Host names that images ship with (Raspberry Pi OS's `raspberrypi`) or that mean none: never a
/// device id by default.
const SHARED_HOST_NAMES: &[&str] = &["raspberrypi", "localhost", "localhost.localdomain", "debian", "ubuntu", "(none)"];

/// What `init` was asked for.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Default: this machine's host name (`/proc/sys/kernel/hostname`).
    pub device_id: Option<String>,
    /// Default: from the URL's scheme; MQTT without a URL.
    pub mode: Option<TransportMode>,
    /// `mqtt://`, `mqtts://`, `http://` or `https://`. Default: the mode's default URL on this
    /// machine (`mqtt://127.0.0.1:1883`, `http://127.0.0.1:8080`), with a warning.
    pub url: Option<String>,
    /// Where the config goes (`/etc/backhaul/edge.toml`); absolute, as it is written into nothing
    /// but the messages.
    pub config: PathBuf,
    /// Where `hash_secret` and `api_key` go (`/etc/backhaul/credentials`, the directory the
    /// systemd unit loads credentials from); written into the config, so absolute.
    pub credentials_dir: PathBuf,
    /// The queue's directory written into the config (`/var/lib/backhaul`, the unit's
    /// StateDirectory); absolute.
    pub data_dir: PathBuf,
    /// The device's API key, if given (`BACKHAUL_API_KEY` or `--api-key-file`).
    pub api_key: Option<String>,
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// It existed and was left as it was.
    Kept,
    /// Neither existed nor could be written by `init` (the API key without one given).
    Missing,
}

/// What `init` did, and what to do next.
#[derive(Debug)]
pub struct InitReport {
    pub config: Outcome,
    pub hash_secret: Outcome,
    pub api_key: Outcome,
    /// Lines for the operator: what was done, warnings, and the next commands.
    pub lines: Vec<String>,
}

/// Runs `init`.
///
/// # Errors
/// A device id or URL the edge would refuse (with the rule and what to pass instead), a mode that
/// contradicts the URL's scheme, an API key the cloud would refuse, and any file that cannot be
/// created, named with its path.
pub fn init(o: &InitOptions) -> Result<InitReport> {
    let mut lines = Vec::new();
    let existing = match fs::symlink_metadata(&o.config) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Existing::Nothing,
        Err(e) => bail!("looking at {}: {e}", o.config.display()),
        // Anything there (even a dangling link) is someone's: only the placeholder is replaced.
        Ok(_) => match fs::read_to_string(&o.config).unwrap_or_default() {
            text if is_placeholder(&text) => Existing::Placeholder,
            text if text.lines().next() == Some(PLACEHOLDER_MARKER) => bail!(
                "{} still starts with the placeholder's first line but sets keys (edited by hand?): remove that line \
                 to keep it as this Pi's config, or remove the file to have init write one",
                o.config.display()
            ),
            text => Existing::Config { url: configured_url(&text) },
        },
    };
    // What the config will say, checked before anything is written; nothing if it is kept.
    let plan = match existing {
        Existing::Config { .. } => None,
        Existing::Nothing | Existing::Placeholder => {
            let device_id = match &o.device_id {
                Some(id) => {
                    backhaul_shared::batch::validate_device_id(id)
                        .map_err(|e| anyhow::anyhow!("--device-id {id:?}: {e}"))?;
                    id.clone()
                }
                None => device_id_from_host(
                    fs::read_to_string("/proc/sys/kernel/hostname")
                        .context("reading this machine's host name for the device id: pass --device-id")?
                        .trim(),
                )?,
            };
            let mut warnings = Vec::new();
            let (mode, url) = mode_and_url(o.mode, o.url.as_deref(), &mut warnings)?;
            Some((device_id, mode, url, warnings))
        }
    };
    if let Some(problem) = o.api_key.as_deref().and_then(crate::config::api_key_problem) {
        bail!("the API key given {problem}");
    }

    create_private_dir(&o.credentials_dir, &mut lines)?;
    let hash_secret_path = o.credentials_dir.join("hash_secret");
    let api_key_path = o.credentials_dir.join("api_key");

    let config = match plan {
        None => {
            lines.push(format!(
                "kept {}: it exists (edit it, or remove it and run init again to write a new one)",
                o.config.display()
            ));
            if let (Some(want), Existing::Config { url: Some(have) }) = (&o.url, &existing) {
                if want != have {
                    lines.push(format!(
                        "warning: the kept config sends to {have}, not to --url {want}: edit it, or remove it and run \
                         init again"
                    ));
                }
            }
            Outcome::Kept
        }
        Some((device_id, mode, url, mut warnings)) => {
            if let Some(parent) = o.config.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_dirs(parent, 0o755)?;
            }
            let text = render_config(&device_id, mode, &url, &o.data_dir, &hash_secret_path, &api_key_path);
            // Renamed over the placeholder; where there was nothing, linked, so a file that
            // appeared since the look above is kept.
            if write_atomically(&o.config, text.as_bytes(), 0o644, existing == Existing::Placeholder)? {
                lines.push(format!(
                    "wrote {} for device {device_id:?} ({} to {url})",
                    o.config.display(),
                    mode.as_str()
                ));
                lines.append(&mut warnings);
                Outcome::Written
            } else {
                lines.push(format!("kept {}: it appeared while init ran", o.config.display()));
                Outcome::Kept
            }
        }
    };

    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading 32 random bytes from /dev/urandom for the hash secret")?;
    let hash_secret = if write_atomically(&hash_secret_path, hex::encode(bytes).as_bytes(), 0o600, false)? {
        lines.push(format!(
            "wrote {} (mode 0600): the key of the presence hashes; use the same one on every Pi of a deployment whose \
             hashes the cloud should match",
            hash_secret_path.display()
        ));
        Outcome::Written
    } else {
        lines.push(format!("kept {}: a hash secret is never overwritten", hash_secret_path.display()));
        Outcome::Kept
    };

    let api_key = match &o.api_key {
        Some(key) if write_atomically(&api_key_path, key.as_bytes(), 0o600, false)? => {
            lines.push(format!("wrote {} (mode 0600)", api_key_path.display()));
            Outcome::Written
        }
        Some(_) => {
            lines.push(format!(
                "kept {}: an API key is never overwritten; the key given was not written (remove the file to replace it)",
                api_key_path.display()
            ));
            Outcome::Kept
        }
        None if fs::symlink_metadata(&api_key_path).is_ok() => {
            lines.push(format!("kept {}: an API key is never overwritten", api_key_path.display()));
            Outcome::Kept
        }
        None => Outcome::Missing,
    };

    lines.push(String::new());
    let config_arg = o.config.display();
    if api_key == Outcome::Missing {
        lines.push(format!(
            "No API key yet: the service needs the key the cloud's keys file holds for this device. Put it in \
             {path} (mode 0600): run init again with the key on standard input, \
             `printf '%s' \"$KEY\" | sudo backhaul-edge init --api-key-file -`. Then:",
            path = api_key_path.display()
        ));
    } else {
        lines.push("Next:".into());
    }
    lines.push(format!("  sudo backhaul-edge check-config --config {config_arg}"));
    lines.push("  sudo systemctl enable --now backhaul-edge".into());
    Ok(InitReport { config, hash_secret, api_key, lines })
}

/// What `init` found where the config goes.
#[derive(Debug, PartialEq, Eq)]
enum Existing {
    Nothing,
    /// The package's placeholder, untouched: replaced.
    Placeholder,
    /// Someone's config, kept; the URL it sends to, if it says.
    Config {
        url: Option<String>,
    },
}

/// The URL a config sends to (its mode's), if it says.
fn configured_url(text: &str) -> Option<String> {
    let table: toml::Table = text.parse().ok()?;
    let transport = table.get("transport")?.as_table()?;
    let mode = transport.get("mode").and_then(|m| m.as_str()).unwrap_or("mqtt").to_ascii_lowercase();
    transport.get(mode.as_str())?.get("url")?.as_str().map(str::to_owned)
}

/// This machine's host name as its device id, unless the edge would refuse it or many machines
/// share it.
fn device_id_from_host(host: &str) -> Result<String> {
    backhaul_shared::batch::validate_device_id(host)
        .map_err(|e| anyhow::anyhow!("the host name {host:?} cannot be a device id ({e}): pass --device-id"))?;
    if SHARED_HOST_NAMES.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        bail!(
            "the host name {host:?} is a default that many machines share, and two Pis with one device id would mix \
             their batches in the cloud: pass --device-id, or give this Pi its own host name \
             (`sudo hostnamectl set-hostname rpi-entrance-01`) and run init again"
        );
    }
    Ok(host.to_owned())
}

/// The mode and URL to write: the URL's scheme decides the mode; `--mode` must agree with it.
fn mode_and_url(
    mode: Option<TransportMode>,
    url: Option<&str>,
    lines: &mut Vec<String>,
) -> Result<(TransportMode, String)> {
    let Some(url) = url else {
        let mode = mode.unwrap_or(TransportMode::Mqtt);
        let url = match mode {
            TransportMode::Mqtt => "mqtt://127.0.0.1:1883",
            TransportMode::Http => "http://127.0.0.1:8080",
        };
        lines.push(format!(
            "warning: no --url: the config sends to {url}, on this machine; pass --url (e.g. mqtts://broker.example.org) \
             or edit the config"
        ));
        return Ok((mode, url.to_owned()));
    };
    let from_url = if url.starts_with("mqtt://") || url.starts_with("mqtts://") {
        TransportMode::Mqtt
    } else if url.starts_with("http://") || url.starts_with("https://") {
        TransportMode::Http
    } else {
        bail!("--url {url:?}: the scheme must be mqtt://, mqtts:// (TLS), http:// or https:// (TLS)");
    };
    if let Some(m) = mode.filter(|m| *m != from_url) {
        bail!(
            "--mode {} contradicts --url {url:?}, which is {}: leave out --mode, or pass a URL of that mode",
            m.as_str(),
            from_url.as_str()
        );
    }
    if from_url == TransportMode::Mqtt {
        backhaul_shared::wire::parse_mqtt_url(url).map_err(|e| anyhow::anyhow!("--url {url:?}: {e}"))?;
    } else if url.split_once("://").is_some_and(|(_, rest)| rest.split('/').next().is_some_and(|a| a.contains('@'))) {
        bail!(
            "--url {url:?} has a user or password in it: the API key is the credential, never a URL (configs show it)"
        );
    }
    if url.chars().any(|c| c.is_control() || c == '"' || c == '\\' || c.is_whitespace()) {
        bail!("--url {url:?}: a URL has no spaces, quotes, backslashes or control characters");
    }
    Ok((from_url, url.to_owned()))
}

/// Creates `dir` (mode 0700) and its missing parents (mode 0755, so the service's user can reach
/// the config beside it), or warns if it exists with access for others.
fn create_private_dir(dir: &Path, lines: &mut Vec<String>) -> Result<()> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                lines.push(format!(
                    "warning: {} is mode {mode:04o}: others can list it; `chmod 0700 {}`",
                    dir.display(),
                    dir.display()
                ));
            }
            Ok(())
        }
        Ok(_) => bail!("{} exists and is not a directory: move it away, or pass --credentials-dir", dir.display()),
        Err(_) => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_dirs(parent, 0o755)?;
            }
            create_dirs(dir, 0o700)
        }
    }
}

/// Creates `dir` and its missing parents, each given `mode` whatever the umask; existing ones are
/// left as they are.
fn create_dirs(dir: &Path, mode: u32) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs(parent, 0o755)?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        r => r.with_context(|| format!("creating {} (run init as root)", dir.display()))?,
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", dir.display()))
}

/// Writes `bytes` to `path` through a temporary file in the same directory: synced, given
/// `mode` (whatever the umask), published, and the directory synced. With `replace` the file is
/// renamed over `path`; without, it is linked to `path`, which fails if anything is there (even a
/// link), so nothing is ever overwritten: `Ok(false)` then, and nothing changed.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], mode: u32, replace: bool) -> Result<bool> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("a file name")?.to_string_lossy();
    let mut random = [0u8; 8];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random)).context("reading /dev/urandom")?;
    let tmp = dir.join(format!(".{name}.init-{}", hex::encode(random)));
    let result: Result<bool> = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {} (run init as root, e.g. with sudo)", tmp.display()))?;
        // The mode passed to open is masked by the umask.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        let published = if replace {
            fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
            true
        } else {
            match fs::hard_link(&tmp, path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(e).with_context(|| format!("linking {} to {}", tmp.display(), path.display())),
            }
        };
        fs::File::open(dir)?.sync_all()?;
        Ok(published)
    })();
    let _ = fs::remove_file(&tmp);
    result.with_context(|| format!("writing {}", path.display()))
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The commented config `init` writes. The values it spells out are the defaults
/// (`the_rendered_config_spells_out_the_defaults` checks they stay so).
pub fn render_config(
    device_id: &str,
    mode: TransportMode,
    url: &str,
    data_dir: &Path,
    hash_secret: &Path,
    api_key: &Path,
) -> String {
    let (mqtt_url, http_url) = match mode {
        TransportMode::Mqtt => (url, "http://127.0.0.1:8080"),
        TransportMode::Http => ("mqtt://127.0.0.1:1883", url),
    };
    format!(
        r#"# backhaul-edge configuration, written by `backhaul-edge init`.
# Every key, its default and its valid range: the README's "Configuration" section.
# Check it with `backhaul-edge check-config --config FILE`; secrets never go in this file.

# On the wire in every batch and topic: 1..=64 bytes, no '/', '+', '#'.
device_id = {device_id}
# name = "Entrance Pi"
# location = "Main entrance"
# The durable queue (the systemd unit's StateDirectory).
data_dir = {data_dir}
# Status and Prometheus metrics, loopback only: `backhaul-edge status`.
status_listen = "127.0.0.1:9901"

[source]
# ble (this Pi's radio through BlueZ) | replay (path = a `scan --record` capture) | simulated
kind = "ble"

[decode]
profiles = ["presence", "thingy52"]
# The key of the presence hashes (HMAC-SHA256 of each address; raw addresses never leave the Pi).
# Under systemd the unit passes it as a credential instead (LoadCredential=hash_secret).
hash_secret_file = {hash_secret}

[batch]
max_detections = 500
max_age_ms = 5000

[queue]
# What data_dir may occupy on disk (about half of it holds batches); past it retained batches are
# pruned, then the oldest pending batch is dropped (or on_full = "block").
max_bytes = "512MiB"
on_full = "drop_oldest"
# Acked batches kept for `backhaul-edge replay`.
retain_acked = "24h"

[transport]
mode = "{mode}"
rate_per_sec = 50
burst = 100

[transport.mqtt]
url = {mqtt_url}
# cloud: a batch is deleted when the cloud stored it (needs the API key); broker: on the PUBACK.
ack = "cloud"
# username = {device_id}   # with password_file, if the broker wants a login

[transport.http]
url = {http_url}
# The key the cloud's keys file holds for this device: it signs HTTP posts and verifies the
# cloud's acks over MQTT. Under systemd: LoadCredential=api_key.
api_key_file = {api_key}

# TLS for mqtts:// and https:// URLs: the system's roots unless a section says otherwise.
# [transport.tls]
# ca_file = "/etc/backhaul/pki/ca.pem"
# cert_file = "/etc/backhaul/pki/{device_id_bare}.pem"
# key_file = "/etc/backhaul/credentials/tls_key"
"#,
        device_id = toml_string(device_id),
        device_id_bare = device_id,
        data_dir = toml_string(&data_dir.to_string_lossy()),
        hash_secret = toml_string(&hash_secret.to_string_lossy()),
        mode = mode.as_str(),
        mqtt_url = toml_string(mqtt_url),
        http_url = toml_string(http_url),
        api_key = toml_string(&api_key.to_string_lossy()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> InitOptions {
        InitOptions {
            device_id: Some("rpi-hall-02".into()),
            mode: None,
            url: Some("mqtts://broker.example.org".into()),
            config: dir.join("etc/edge.toml"),
            credentials_dir: dir.join("etc/credentials"),
            data_dir: dir.join("data"),
            api_key: Some("key-of-rpi-hall-02-0123456789".into()),
        }
    }

    #[test]
    fn the_rendered_config_spells_out_the_defaults() {
        use crate::config::{BatchConfig, EdgeConfig, TransportConfig};
        let text = render_config(
            "pi-1",
            TransportMode::Http,
            "https://c.example.org",
            Path::new("/var/lib/backhaul"),
            Path::new("/s"),
            Path::new("/k"),
        );
        let c: EdgeConfig = toml::from_str(&text).unwrap();
        let d: EdgeConfig = toml::from_str("device_id = \"pi-1\"").unwrap();
        let (b, t) = (BatchConfig::default(), TransportConfig::default());
        assert_eq!((c.batch.max_detections, c.batch.max_age_ms), (b.max_detections, b.max_age_ms));
        assert_eq!((c.transport.rate_per_sec, c.transport.burst), (t.rate_per_sec, t.burst));
        assert_eq!(c.queue.queue_config(), d.queue.queue_config());
        assert_eq!((c.status_listen, c.decode.profiles), (d.status_listen, d.decode.profiles));
        assert_eq!((c.transport.mode, c.transport.http.url.as_str()), (TransportMode::Http, "https://c.example.org"));
    }

    #[test]
    fn the_mode_follows_the_url_and_a_contradiction_is_refused() {
        let mut l = Vec::new();
        assert_eq!(mode_and_url(None, Some("https://c.example.org"), &mut l).unwrap().0, TransportMode::Http);
        assert_eq!(mode_and_url(None, Some("mqtt://b:1883"), &mut l).unwrap().0, TransportMode::Mqtt);
        let e = mode_and_url(Some(TransportMode::Mqtt), Some("http://c:8080"), &mut l).unwrap_err().to_string();
        assert!(e.contains("--mode mqtt contradicts") && e.contains("which is http"), "{e}");
        let e = mode_and_url(None, Some("ftp://x"), &mut l).unwrap_err().to_string();
        assert!(e.contains("scheme must be"), "{e}");
        let e = mode_and_url(None, Some("mqtt://b\" x"), &mut l).unwrap_err().to_string();
        assert!(e.contains("no spaces, quotes"), "{e}");
        assert!(l.is_empty());
        let (m, u) = mode_and_url(Some(TransportMode::Http), None, &mut l).unwrap();
        assert_eq!((m, u.as_str()), (TransportMode::Http, "http://127.0.0.1:8080"));
        assert!(l[0].starts_with("warning: no --url"), "{l:?}");
    }

    #[test]
    fn a_host_name_that_many_machines_share_is_no_device_id() {
        assert_eq!(device_id_from_host("rpi-hall-02").unwrap(), "rpi-hall-02");
        let e = device_id_from_host("raspberrypi").unwrap_err().to_string();
        assert!(e.contains("many machines share") && e.contains("--device-id"), "{e}");
        let e = device_id_from_host("a+b").unwrap_err().to_string();
        assert!(e.contains("cannot be a device id") && e.contains("--device-id"), "{e}");
    }

    #[test]
    fn bad_device_ids_and_api_keys_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        for (id, key, want) in [
            ("a/b", None, "--device-id \"a/b\""),
            ("", None, "--device-id \"\""),
            ("ok", Some("short"), "shorter than 16"),
            ("ok", Some("0123456789abcdef\n"), "visible ASCII"),
        ] {
            let o = InitOptions { device_id: Some(id.into()), api_key: key.map(Into::into), ..opts(dir.path()) };
            let e = format!("{:#}", init(&o).unwrap_err());
            assert!(e.contains(want), "{id:?} {key:?}: {e}");
        }
        assert!(!dir.path().join("etc").exists(), "nothing is written for refused input");
    }

    #[test]
    fn init_writes_once_and_a_rerun_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let r = init(&o).unwrap();
        assert_eq!((r.config, r.hash_secret, r.api_key), (Outcome::Written, Outcome::Written, Outcome::Written));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&o.credentials_dir), 0o700);
        assert_eq!(mode(&o.credentials_dir.join("hash_secret")), 0o600);
        assert_eq!(mode(&o.credentials_dir.join("api_key")), 0o600);
        assert_eq!(mode(&o.config), 0o644);
        let secret = fs::read_to_string(o.credentials_dir.join("hash_secret")).unwrap();
        assert_eq!(secret.len(), 64);
        assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
        let config = fs::read_to_string(&o.config).unwrap();
        assert!(config.contains("device_id = \"rpi-hall-02\"") && config.contains("mode = \"mqtt\""), "{config}");
        assert!(config.contains("url = \"mqtts://broker.example.org\""), "{config}");
        assert!(r.lines.iter().any(|l| l.contains("systemctl enable --now backhaul-edge")), "{:?}", r.lines);
        // No leftovers of the atomic writes.
        let names: Vec<_> = fs::read_dir(&o.credentials_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");

        let again =
            init(&InitOptions { url: Some("http://elsewhere:8080".into()), api_key: None, ..o.clone() }).unwrap();
        assert_eq!((again.config, again.hash_secret, again.api_key), (Outcome::Kept, Outcome::Kept, Outcome::Kept));
        assert_eq!(fs::read_to_string(&o.config).unwrap(), config);
        assert_eq!(fs::read_to_string(o.credentials_dir.join("hash_secret")).unwrap(), secret);
    }

    #[test]
    fn parents_are_reachable_and_links_are_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        // A dangling link where the hash secret goes: someone's, never followed or replaced.
        fs::DirBuilder::new().recursive(true).create(dir.path().join("etc")).unwrap();
        create_dirs(&o.credentials_dir, 0o700).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), o.credentials_dir.join("hash_secret")).unwrap();
        let r = init(&o).unwrap();
        assert_eq!(r.hash_secret, Outcome::Kept);
        assert!(!dir.path().join("elsewhere").exists());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&o.credentials_dir), 0o700);

        // Missing parents are made 0755 whatever the umask: the service's user reads the config.
        let fresh = tempfile::tempdir().unwrap();
        let o = opts(fresh.path());
        init(&o).unwrap();
        assert_eq!(mode(&fresh.path().join("etc")), 0o755);
        assert_eq!(mode(&o.credentials_dir), 0o700);
        assert_eq!(mode(&o.config), 0o644);
    }

    #[test]
    fn an_edited_placeholder_is_refused_and_a_kept_config_with_another_url_is_said() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        create_dirs(o.config.parent().unwrap(), 0o755).unwrap();
        fs::write(&o.config, format!("{PLACEHOLDER_MARKER}\ndevice_id = \"x\"\n")).unwrap();
        let e = format!("{:#}", init(&o).unwrap_err());
        assert!(e.contains("still starts with the placeholder's first line") && e.contains("remove that line"), "{e}");
        assert!(!o.credentials_dir.exists(), "nothing written");

        fs::remove_file(&o.config).unwrap();
        init(&o).unwrap();
        let again = init(&InitOptions { url: Some("https://other.example.org".into()), ..o.clone() }).unwrap();
        assert!(
            again.lines.iter().any(|l| l.contains("sends to mqtts://broker.example.org, not to --url https://other")),
            "{:?}",
            again.lines
        );
        let same = init(&o).unwrap();
        assert!(!same.lines.iter().any(|l| l.starts_with("warning")), "{:?}", same.lines);
    }

    #[test]
    fn a_url_with_a_password_or_a_path_is_refused() {
        let mut l = Vec::new();
        for url in ["mqtt://user:pw@host:1883", "https://user:pw@cloud.example.org", "mqtt://host:1883/x?y=1"] {
            let e = mode_and_url(None, Some(url), &mut l).unwrap_err().to_string();
            assert!(e.contains("user or password") || e.contains("path or query"), "{url}: {e}");
        }
        assert!(mode_and_url(None, Some("https://cloud.example.org/ingest"), &mut l).is_ok());
    }

    #[test]
    fn only_the_untouched_placeholder_counts_as_one() {
        assert!(is_placeholder(&format!("{PLACEHOLDER_MARKER}\n# comments only\n")));
        assert!(!is_placeholder(&format!("{PLACEHOLDER_MARKER}\ndevice_id = \"pi-1\"\n")), "edited: a real config");
        assert!(!is_placeholder(&format!("# a comment\n{PLACEHOLDER_MARKER}\n")));
        assert!(!is_placeholder("device_id = \"pi-1\"\n"));
    }

    #[test]
    fn the_packaged_placeholder_is_replaced_and_an_existing_secret_kept() {
        let dir = tempfile::tempdir().unwrap();
        let o = InitOptions { api_key: None, ..opts(dir.path()) };
        fs::create_dir_all(o.config.parent().unwrap()).unwrap();
        fs::write(&o.config, format!("{PLACEHOLDER_MARKER}\n# run init\n")).unwrap();
        fs::DirBuilder::new().mode(0o700).create(&o.credentials_dir).unwrap();
        fs::write(o.credentials_dir.join("hash_secret"), "the deployment's secret").unwrap();
        let r = init(&o).unwrap();
        assert_eq!((r.config, r.hash_secret, r.api_key), (Outcome::Written, Outcome::Kept, Outcome::Missing));
        assert!(!fs::read_to_string(&o.config).unwrap().contains(PLACEHOLDER_MARKER));
        assert_eq!(fs::read_to_string(o.credentials_dir.join("hash_secret")).unwrap(), "the deployment's secret");
        assert!(r.lines.iter().any(|l| l.starts_with("No API key yet")), "{:?}", r.lines);
    }
}
