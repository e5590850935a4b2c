//! Commands from the cloud to one device, and their results (issue #18; SPEC.md "Wave 2
//! additions": MQTT `{prefix}/{device_id}/commands` and `{prefix}/{device_id}/command-results`,
//! HTTP `/api/v1/devices/{device_id}/commands`).
//!
//! A command is typed ([`CommandKind`]), never free-form: an operator can replay, change the send
//! rate, cut the open batch, ask for the status or restart the BLE scan, nothing else. Its
//! [`CommandId`] (a ULID) is its idempotency key: an edge records it durably before running it,
//! so a command delivered twice runs once, and answers a second delivery with the result it
//! recorded.
//!
//! Over MQTT both directions travel in a [`Signed`] envelope: the JSON text of a
//! [`CommandMessage`] or a [`CommandResult`], and an HMAC-SHA256 over it keyed with the device's
//! API key (the key acks are signed with, [`crate::wire::ack_mac`]): whoever can publish on a
//! device's topics but does not hold its key can neither command it nor forge its answers.
//! Over HTTP the API key and TLS authenticate both ends, so bodies are plain JSON.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::batch::Timestamp;

/// A command's id: a ULID made by the cloud when the command is created (26 characters, Crockford
/// base32); sortable by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommandId(ulid::Ulid);

crate::batch::ulid_id!(CommandId, "command id");

/// What a command asks (the body of `POST /api/v1/devices/{device_id}/commands`). Unknown
/// fields are refused, so a misspelt `until` is an error, not a replay without an end.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CommandKind {
    /// Requeue the retained, already acked batches whose ack time is in `[since, until)` under
    /// their original batch ids (the cloud counts them as duplicates, or stores what it lost).
    Replay {
        #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
        since: Timestamp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = DateTime))]
        until: Option<Timestamp>,
    },
    /// Send at most `rate_per_sec` batches per second with bursts of `burst` (each
    /// 1..=1,000,000, as `transport.rate_per_sec` and `transport.burst`), from now on and after
    /// restarts, until another `set_rate`.
    SetRate { rate_per_sec: u32, burst: u32 },
    /// Cut the batch being filled now, without waiting for `batch.max_age_ms`.
    Flush,
    /// Answer with the device's status (`GET /status` of the edge).
    Ping,
    /// Restart the BLE scan and reopen the adapter.
    Rescan,
}

/// The age (from its id's time) past which an edge refuses to run a command: one that old was
/// either answered long ago or given up on by the cloud (which fails it an hour later), and a
/// captured one must not be replayed onto a device forever. Edges keep their journal of
/// commands run at least this long.
pub const COMMAND_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Percent-encodes `s` as one URL path segment (RFC 3986: everything but unreserved characters):
/// a device id may hold characters a URL cannot carry as they are.
pub fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The range of `rate_per_sec` and `burst` (the edge's `transport.rate_per_sec` and
/// `transport.burst` have the same).
pub const RATE_RANGE: (u32, u32) = (1, 1_000_000);

impl CommandKind {
    /// The `kind` on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Replay { .. } => "replay",
            Self::SetRate { .. } => "set_rate",
            Self::Flush => "flush",
            Self::Ping => "ping",
            Self::Rescan => "rescan",
        }
    }

    /// Checks the fields' ranges; the error names the field and says what is allowed.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        match self {
            Self::Replay { since, until: Some(until) } if until <= since => {
                Err(("until", format!("`until` ({until}) must be after `since` ({since})")))
            }
            Self::SetRate { rate_per_sec, burst } => {
                for (field, v) in [("rate_per_sec", *rate_per_sec), ("burst", *burst)] {
                    if !(RATE_RANGE.0..=RATE_RANGE.1).contains(&v) {
                        return Err((
                            field,
                            format!("`{field}` is {v}; allowed: {} to {}", RATE_RANGE.0, RATE_RANGE.1),
                        ));
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Parses a command's body as the cloud receives it, validated. The error names the field
    /// when it can (`kind` for an unknown kind, the name of a field the kind does not take).
    pub fn parse(body: &[u8]) -> Result<Self, (Option<String>, String)> {
        let hint = "kinds: replay {since, until?}, set_rate {rate_per_sec, burst}, flush, ping, rescan";
        let given: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| (None, format!("the body is not JSON: {e} ({hint})")))?;
        let Some(fields) = given.as_object() else {
            return Err((None, format!("the body must be a JSON object ({hint})")));
        };
        let kind: Self = serde_json::from_value(given.clone()).map_err(|e| {
            let text = e.to_string();
            let quoted = |after: &str| text.split(after).nth(1).and_then(|r| r.split('`').nth(1)).map(str::to_owned);
            let field = if text.contains("unknown variant") || text.contains("missing field `kind`") {
                Some("kind".to_owned())
            } else {
                quoted("unknown field").or_else(|| quoted("missing field"))
            };
            (field, format!("{text} ({hint})"))
        })?;
        // Unit kinds (ping, flush, rescan) take no fields, and serde lets extra ones through there.
        let known = serde_json::to_value(&kind).expect("a command serializes");
        if let Some(extra) = fields.iter().find(|(k, v)| !v.is_null() && known.get(k.as_str()).is_none()) {
            return Err((
                Some(extra.0.clone()),
                format!("unknown field `{}` for kind `{}` ({hint})", extra.0, kind.name()),
            ));
        }
        kind.validate().map_err(|(f, m)| (Some(f.to_owned()), m))?;
        Ok(kind)
    }
}

/// A command as a device receives it. `command` is kept as JSON, so that an edge that does not
/// know its kind can still answer `failed` under its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMessage {
    pub command_id: CommandId,
    /// A [`CommandKind`] as JSON (`{"kind": ..., ...}`).
    pub command: serde_json::Value,
}

/// Where a command is. `queued` → `delivered` (published to the broker, or fetched over HTTP)
/// → `done` or `failed` (the device answered). Final states never change.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Queued,
    Delivered,
    Done,
    Failed,
}

impl CommandStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed)
    }
}

impl FromStr for CommandStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "queued" => Ok(Self::Queued),
            "delivered" => Ok(Self::Delivered),
            "done" => Ok(Self::Done),
            "failed" => Ok(Self::Failed),
            _ => Err(format!("`{s}` is not a command status (queued, delivered, done, failed)")),
        }
    }
}

/// A device's answer to a command: `status` is `done` or `failed`; `result` says what happened
/// (e.g. `{"requeued_batches": 12}`, or `{"error": "..."}`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub command_id: CommandId,
    pub status: CommandStatus,
    #[cfg_attr(feature = "openapi", schema(value_type = Value))]
    pub result: serde_json::Value,
    /// When the device finished running it.
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub finished_at: Timestamp,
}

/// An MQTT command or result: `body` is the JSON text of a [`CommandMessage`] or a
/// [`CommandResult`]; `mac` is [`envelope_mac`] over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub body: String,
    pub mac: String,
}

/// What a [`Signed`] envelope carries; part of the MAC, so a command cannot be replayed as a
/// result or the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Command,
    Result,
}

impl Purpose {
    fn tag(self) -> &'static str {
        match self {
            Self::Command => "backhaul-command-v1",
            Self::Result => "backhaul-command-result-v1",
        }
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn envelope_hmac(key: &[u8], purpose: Purpose, device_id: &str, body: &str) -> HmacSha256 {
    use hmac::{KeyInit, Mac};
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{}\n{device_id}\n{body}", purpose.tag()).as_bytes());
    mac
}

/// HMAC-SHA256 (RFC 2104) keyed with the device's API key over the UTF-8 bytes of
/// `"{tag}\n{device_id}\n{body}"`, tag `backhaul-command-v1` or `backhaul-command-result-v1`;
/// lowercase hex. Never change the message without a new tag.
pub fn envelope_mac(key: &[u8], purpose: Purpose, device_id: &str, body: &str) -> String {
    use hmac::Mac;
    envelope_hmac(key, purpose, device_id, body).finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

impl Signed {
    /// Signs the JSON text of `value` for `device_id`.
    pub fn seal<T: Serialize>(value: &T, purpose: Purpose, device_id: &str, key: &[u8]) -> Self {
        let body = serde_json::to_string(value).expect("a command serializes");
        let mac = envelope_mac(key, purpose, device_id, &body);
        Self { body, mac }
    }

    /// The body, if the MAC verifies for `device_id` under `key` (compared in constant time).
    pub fn open(&self, purpose: Purpose, device_id: &str, key: &[u8]) -> Option<&str> {
        use hmac::Mac;
        let tag = crate::wire::from_hex(&self.mac)?;
        envelope_hmac(key, purpose, device_id, &self.body).verify_slice(&tag).ok()?;
        Some(&self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_with_their_fields_and_refuse_the_rest_naming_the_field() {
        let ok = |s: &str| CommandKind::parse(s.as_bytes()).unwrap();
        assert_eq!(
            ok(r#"{"kind":"replay","since":"2026-11-30T10:00:00Z"}"#),
            CommandKind::Replay { since: "2026-11-30T10:00:00Z".parse().unwrap(), until: None }
        );
        assert_eq!(
            ok(r#"{"kind":"set_rate","rate_per_sec":5,"burst":10}"#),
            CommandKind::SetRate { rate_per_sec: 5, burst: 10 }
        );
        for k in ["flush", "ping", "rescan"] {
            assert_eq!(ok(&format!(r#"{{"kind":"{k}"}}"#)).name(), k);
        }
        let err = |s: &str| CommandKind::parse(s.as_bytes()).unwrap_err();
        assert_eq!(err(r#"{"kind":"reboot"}"#).0.as_deref(), Some("kind"));
        assert_eq!(err(r#"{"since":"2026-11-30T10:00:00Z"}"#).0.as_deref(), Some("kind"));
        assert_eq!(
            err(r#"{"kind":"replay","since":"2026-11-30T10:00:00Z","untill":"x"}"#).0.as_deref(),
            Some("untill")
        );
        assert_eq!(err(r#"{"kind":"set_rate","rate_per_sec":5,"brust":10}"#).0.as_deref(), Some("brust"));
        assert_eq!(err(r#"{"kind":"set_rate","rate_per_sec":5}"#).0.as_deref(), Some("burst"));
        assert_eq!(err(r#"{"kind":"ping","extra":1}"#).0.as_deref(), Some("extra"));
        assert!(err("[1]").1.contains("JSON object"));
        assert_eq!(ok(r#"{"kind":"replay","since":"2026-11-30T10:00:00Z","until":null}"#).name(), "replay");
        assert!(err(r#"{"kind":"replay","since":"yesterday"}"#).1.contains("RFC 3339"));
        assert_eq!(
            err(r#"{"kind":"replay","since":"2026-11-30T10:00:00Z","until":"2026-11-30T09:00:00Z"}"#).0.as_deref(),
            Some("until")
        );
        assert_eq!(err(r#"{"kind":"set_rate","rate_per_sec":0,"burst":10}"#).0.as_deref(), Some("rate_per_sec"));
        assert_eq!(err(r#"{"kind":"set_rate","rate_per_sec":1,"burst":1000001}"#).0.as_deref(), Some("burst"));
        assert!(err(r#"{"kind":"set_rate","rate_per_sec":-1,"burst":1}"#).1.contains("-1"));
        assert!(err("not json").0.is_none());
    }

    #[test]
    fn an_envelope_opens_only_with_its_key_device_and_purpose() {
        let key = b"device-key-0123456789";
        let m = CommandMessage { command_id: CommandId::new(), command: serde_json::json!({"kind": "ping"}) };
        let s = Signed::seal(&m, Purpose::Command, "pi-1", key);
        let body = s.open(Purpose::Command, "pi-1", key).unwrap();
        assert_eq!(serde_json::from_str::<CommandMessage>(body).unwrap(), m);
        assert!(s.open(Purpose::Command, "pi-2", key).is_none(), "another device");
        assert!(s.open(Purpose::Result, "pi-1", key).is_none(), "a command is not a result");
        assert!(s.open(Purpose::Command, "pi-1", b"another-key-0123456789").is_none());
        let tampered = Signed { body: s.body.replace("ping", "rescan"), ..s.clone() };
        assert!(tampered.open(Purpose::Command, "pi-1", key).is_none());
        assert!(Signed { mac: "zz".into(), ..s }.open(Purpose::Command, "pi-1", key).is_none());
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"k",b"backhaul-command-v1\npi\n{}",hashlib.sha256).hexdigest())'
        assert_eq!(
            envelope_mac(b"k", Purpose::Command, "pi", "{}"),
            "9bda51f24be4bc3ee20a5954291f8caeb9e7f51ea09077872ffc0c46db7c5d5e"
        );
    }
}
