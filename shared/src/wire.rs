//! The other messages on the wire (acks, device status) and the MQTT topic layout (SPEC.md, "MQTT topics").

use serde::{Deserialize, Serialize};

use crate::batch::BatchId;

/// The default topic prefix.
pub const DEFAULT_PREFIX: &str = "backhaul";

/// `mqtt://host[:port]` or `mqtts://host[:port]` (TLS, [`crate::tls`]) → (host, port, tls); the
/// port is 1883 or 8883 by default (IANA's MQTT ports).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16, bool), String> {
    let (rest, tls) = match (url.strip_prefix("mqtt://"), url.strip_prefix("mqtts://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => return Err(format!("`{url}` is not mqtt://HOST:PORT or mqtts://HOST:PORT")),
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') {
        return Err(format!(
            "`{url}` has a user or password in it: the username goes in its own setting and the password in a \
             password file, never in a URL (which configs and logs show)"
        ));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(format!("`{url}` has a path or query: an MQTT URL is mqtt://HOST:PORT or mqtts://HOST:PORT"));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| format!("bad port in `{url}`"))?),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(format!("no host in `{url}`"));
    }
    Ok((host.to_owned(), port, tls))
}

/// Checks a topic prefix (edge `transport.mqtt.topic_prefix`, cloud `mqtt.topic_prefix`): not empty
/// once leading and trailing `/` are trimmed (as [`Topics::new`] does), no `+` or `#` (wildcards in a
/// topic name make the broker refuse the PUBLISH), no control characters (MQTT forbids U+0000), and
/// short enough that a topic stays far below the broker's limits.
pub fn validate_topic_prefix(prefix: &str) -> Result<(), String> {
    if prefix.trim_matches('/').is_empty() {
        return Err("must not be empty".into());
    }
    if prefix.len() > crate::batch::MAX_TEXT_BYTES {
        return Err(format!("is {} bytes, over the limit of {}", prefix.len(), crate::batch::MAX_TEXT_BYTES));
    }
    if let Some(c) = prefix.chars().find(|c| matches!(c, '+' | '#') || c.is_control()) {
        return Err(format!("must not contain {c:?} (it is part of every MQTT topic name)"));
    }
    Ok(())
}

/// Builds and parses the topics of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Topics {
    /// `prefix` without leading or trailing `/`.
    pub fn new(prefix: impl Into<String>) -> Self {
        let prefix: String = prefix.into();
        Self { prefix: prefix.trim_matches('/').to_owned() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{prefix}/{device_id}/batches`: edge → cloud, QoS 1.
    pub fn batches(&self, device_id: &str) -> String {
        format!("{}/{device_id}/batches", self.prefix)
    }

    /// `{prefix}/{device_id}/acks`: cloud → edge, QoS 1.
    pub fn acks(&self, device_id: &str) -> String {
        format!("{}/{device_id}/acks", self.prefix)
    }

    /// `{prefix}/{device_id}/status`: edge → cloud, QoS 1, retained, with a last will.
    pub fn status(&self, device_id: &str) -> String {
        format!("{}/{device_id}/status", self.prefix)
    }

    /// The cloud's subscription: `$share/{group}/{prefix}/+/batches`.
    pub fn shared_batches_filter(&self, group: &str) -> String {
        format!("$share/{group}/{}/+/batches", self.prefix)
    }

    /// `{prefix}/+/status`.
    pub fn all_status_filter(&self) -> String {
        format!("{}/+/status", self.prefix)
    }

    /// `{prefix}/{device_id}/commands`: cloud → edge, QoS 1 (issue #18).
    pub fn commands(&self, device_id: &str) -> String {
        format!("{}/{device_id}/commands", self.prefix)
    }

    /// `{prefix}/{device_id}/command-results`: edge → cloud, QoS 1 (issue #18).
    pub fn command_results(&self, device_id: &str) -> String {
        format!("{}/{device_id}/command-results", self.prefix)
    }

    /// The cloud's subscription to every device's command results, shared by its replicas:
    /// `$share/{group}/{prefix}/+/command-results`.
    pub fn shared_command_results_filter(&self, group: &str) -> String {
        format!("$share/{group}/{}/+/command-results", self.prefix)
    }

    /// The device id and kind (`batches`, `acks`, `status`) of a topic under this prefix.
    pub fn parse<'t>(&self, topic: &'t str) -> Option<(&'t str, TopicKind)> {
        let rest = topic.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?;
        let (device, kind) = rest.split_once('/')?;
        if device.is_empty() {
            return None;
        }
        let kind = match kind {
            "batches" => TopicKind::Batches,
            "acks" => TopicKind::Acks,
            "status" => TopicKind::Status,
            "commands" => TopicKind::Commands,
            "command-results" => TopicKind::CommandResults,
            _ => return None,
        };
        Some((device, kind))
    }
}

/// What a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Batches,
    Acks,
    Status,
    /// Cloud → edge commands (issue #18).
    Commands,
    /// Edge → cloud command results (issue #18).
    CommandResults,
}

/// The cloud's answer to one or more batches, on `{prefix}/{device_id}/acks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckMessage {
    pub acks: Vec<Ack>,
}

/// The fate of one batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub batch_id: BatchId,
    pub status: AckStatus,
    /// Why, for `rejected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// [`ack_mac`] of this ack, lowercase hex (64 characters). An edge applies only acks whose MAC
    /// it can verify (issue #16): anyone who can publish on an acks topic could otherwise make it
    /// delete batches the cloud never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Ack {
    /// An ack signed with `key` (the device's API key, see [`ack_mac`]).
    pub fn signed(device_id: &str, batch_id: BatchId, status: AckStatus, reason: Option<String>, key: &[u8]) -> Self {
        let mac = Some(ack_mac(key, device_id, &batch_id, status));
        Self { batch_id, status, reason, mac }
    }

    /// Whether this ack carries a valid MAC for `device_id` under `key` (compared in constant time).
    pub fn verify(&self, device_id: &str, key: &[u8]) -> bool {
        let Some(mac) = &self.mac else { return false };
        let Some(tag) = from_hex(mac) else { return false };
        use hmac::Mac;
        ack_hmac(key, device_id, &self.batch_id, self.status).verify_slice(&tag).is_ok()
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The MAC of an ack: HMAC-SHA256 (RFC 2104, FIPS 180-4) keyed with the device's API key (the key
/// the cloud's keys file holds for `device_id`, or its fleet key `*` if the device has none; the
/// edge holds it as `BACKHAUL_API_KEY`), over the UTF-8 bytes of
/// `"backhaul-ack-v1\n{device_id}\n{batch_id}\n{status}"` where `status` is `stored`,
/// `duplicate` or `rejected`; lowercase hex. The `reason` is not covered: it is only shown.
/// Never change this message without a new version tag: edges and clouds of two releases must agree.
pub fn ack_mac(key: &[u8], device_id: &str, batch_id: &BatchId, status: AckStatus) -> String {
    use hmac::Mac;
    ack_hmac(key, device_id, batch_id, status).finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn ack_hmac(key: &[u8], device_id: &str, batch_id: &BatchId, status: AckStatus) -> HmacSha256 {
    use hmac::{KeyInit, Mac};
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("backhaul-ack-v1\n{device_id}\n{batch_id}\n{}", status.as_str()).as_bytes());
    mac
}

pub(crate) fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// Newly stored.
    Stored,
    /// Already stored with the same payload; nothing new was written.
    Duplicate,
    /// Will never be stored (invalid, or the key was used for a different payload). Final.
    Rejected,
}

impl AckStatus {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Stored => "stored",
            AckStatus::Duplicate => "duplicate",
            AckStatus::Rejected => "rejected",
        }
    }
}

/// An edge device's status, retained on `{prefix}/{device_id}/status`. The last will is
/// `{"online":false}`, so every field but `online` is optional.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DeviceStatus {
    pub online: bool,
    /// Batches waiting to be sent (pending + in flight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age_s: Option<u64>,
    /// Batches dropped by the queue's byte budget since the queue was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_batches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_detections: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
    /// The conservation ledger's counters (issue #18), in batches since the queue was created
    /// unless named otherwise: produced (every batch enqueued, cuts included), in flight (part of
    /// `queue_depth`), quarantined (failed their checksum), lost (damaged queue files, found at a
    /// start), dead-lettered (refused by the cloud for good, ever). The cloud checks
    /// `produced = stored + queue_depth + dropped + quarantined + lost + dead_lettered`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub produced_batches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub produced_detections: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_batches: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_lettered: Option<u64>,
    /// Detections dropped before batching for breaking the wire contract, since the edge started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_invalid: Option<u64>,
    /// Batches per second the backlog (`queue_depth`) shrank over the last 10 s (acks less what
    /// arrived; negative: it grew), and the seconds until nothing is pending at that rate (0 with
    /// nothing pending; absent while it does not shrink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
    /// The link's transport, `mqtt` or `http` (the dashboard's "link mode", issue #19).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Detections dropped before batching, by reason (the keys of
    /// [`crate::batch::DETECTION_REASONS`]), since the edge started; they sum to `dropped_invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_invalid_by_reason: Option<std::collections::BTreeMap<String, u64>>,
    /// Times the detection source (the BLE scanner) was reopened after failing, since start, and
    /// its last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_recoveries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_prefixes_that_break_a_topic_are_refused() {
        for good in ["backhaul", "site/3/backhaul", "backhaul/"] {
            validate_topic_prefix(good).unwrap();
        }
        for bad in ["", "/", "a/+/b", "fleet#", "back\thaul", "nul\u{0}"] {
            assert!(validate_topic_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn topics_build_and_parse() {
        let t = Topics::new("backhaul/");
        assert_eq!(t.batches("pi-1"), "backhaul/pi-1/batches");
        assert_eq!(t.acks("pi-1"), "backhaul/pi-1/acks");
        assert_eq!(t.status("pi-1"), "backhaul/pi-1/status");
        assert_eq!(t.shared_batches_filter("ingest"), "$share/ingest/backhaul/+/batches");
        assert_eq!(t.parse("backhaul/pi-1/batches"), Some(("pi-1", TopicKind::Batches)));
        assert_eq!(t.parse("backhaul/pi-1/status"), Some(("pi-1", TopicKind::Status)));
        assert_eq!(t.parse("backhaulx/pi-1/batches"), None);
        assert_eq!(t.parse("backhaul//batches"), None);
        assert_eq!(t.parse("backhaul/pi-1/other"), None);
        assert_eq!(t.parse("backhaul/pi-1/commands"), Some(("pi-1", TopicKind::Commands)));
        assert_eq!(t.parse("backhaul/pi-1/command-results"), Some(("pi-1", TopicKind::CommandResults)));
        assert_eq!(t.shared_command_results_filter("g"), "$share/g/backhaul/+/command-results");
        assert_eq!(t.parse("backhaul/a/b/batches"), None);
    }

    #[test]
    fn mqtt_urls_parse_with_a_default_port_per_scheme() {
        assert_eq!(parse_mqtt_url("mqtt://broker.local:1884"), Ok(("broker.local".into(), 1884, false)));
        assert_eq!(parse_mqtt_url("mqtt://10.0.0.2"), Ok(("10.0.0.2".into(), 1883, false)));
        assert!(parse_mqtt_url("mqtt://user:pw@host:1883").unwrap_err().contains("never in a URL"));
        assert!(parse_mqtt_url("mqtt://host:1883/path?x=1").unwrap_err().contains("path or query"));
        assert_eq!(parse_mqtt_url("mqtts://b"), Ok(("b".into(), 8883, true)));
        assert_eq!(parse_mqtt_url("mqtts://b:18883/"), Ok(("b".into(), 18883, true)));
        assert!(parse_mqtt_url("http://b").is_err());
        assert!(parse_mqtt_url("mqtt://:1883").is_err());
        assert!(parse_mqtt_url("mqtt://b:notaport").is_err());
    }

    #[test]
    fn ack_message_matches_spec() {
        let json = r#"{"acks":[{"batch_id":"01JD3Q8Z9X6K1V2B3N4M5P6Q7R","status":"stored"},{"batch_id":"01JD3Q8Z9X6K1V2B3N4M5P6Q7S","status":"rejected","reason":"bad"}]}"#;
        let m: AckMessage = serde_json::from_str(json).unwrap();
        assert_eq!(m.acks[1].status, AckStatus::Rejected);
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
    }

    const KNOWN_MAC: &str = "f4f4b69735159723aef77d92390e036248375f4659bde380011e59a27214af97";

    #[test]
    fn an_ack_verifies_only_with_its_key_device_batch_and_status() {
        let id: BatchId = "01JD3Q8Z9X6K1V2B3N4M5P6Q7R".parse().unwrap();
        let other: BatchId = "01JD3Q8Z9X6K1V2B3N4M5P6Q7S".parse().unwrap();
        let key = b"device-key-0123456789";
        let ack = Ack::signed("pi-1", id, AckStatus::Stored, None, key);
        assert!(ack.verify("pi-1", key));
        assert!(!ack.verify("pi-2", key), "another device");
        assert!(!ack.verify("pi-1", b"another-key-0123456789"), "another key");
        assert!(!Ack { batch_id: other, ..ack.clone() }.verify("pi-1", key), "another batch");
        for status in [AckStatus::Duplicate, AckStatus::Rejected] {
            assert!(!Ack { status, ..ack.clone() }.verify("pi-1", key), "another status");
        }
        let zeros = "0".repeat(64);
        for bad in ["", "zz", "abc", "é1", zeros.as_str()] {
            assert!(!Ack { mac: Some(bad.into()), ..ack.clone() }.verify("pi-1", key), "{bad:?}");
        }
        assert!(!Ack { mac: None, ..ack.clone() }.verify("pi-1", key), "unsigned");
        // The reason is not covered: it is only shown.
        assert!(Ack { reason: Some("x".into()), ..ack.clone() }.verify("pi-1", key));
        // A known vector, computed independently:
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"device-key-0123456789",
        //   b"backhaul-ack-v1\npi-1\n01JD3Q8Z9X6K1V2B3N4M5P6Q7R\nstored",hashlib.sha256).hexdigest())'
        assert_eq!(ack.mac.as_deref(), Some(KNOWN_MAC));
    }

    #[test]
    fn last_will_parses_as_status() {
        let s: DeviceStatus = serde_json::from_str(r#"{"online":false}"#).unwrap();
        assert_eq!(s, DeviceStatus::default());
    }
}
