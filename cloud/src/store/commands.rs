//! Commands to devices (issue #18), in the `commands` table (migration 6): one row per command,
//! created `queued` by an operator, `delivered` once published to the broker or fetched by the
//! device over HTTP, then `done` or `failed` with the device's `result` (final: a second answer
//! changes nothing).
//!
//! | column | meaning |
//! | --- | --- |
//! | `command_id` | the ULID, primary key (the device's idempotency key for the command) |
//! | `device_id`, `kind` | whom, and what (`replay`, `set_rate`, ...) |
//! | `body` | the command as JSON (`{"kind": ..., ...}`), as validated at creation |
//! | `status` | `queued`, `delivered`, `done`, `failed` |
//! | `result` | the device's answer, JSON text (at most [`MAX_RESULT_BYTES`]) |
//! | `created_at`, `delivered_at`, `published_at`, `done_at` | UTC µs; `published_at` is the last MQTT publish |
//! | `publishes`, `next_publish_at` | MQTT publishes so far, and when the next is due (UTC µs; [`republish_delay`]) |
//!
//! Never reorder or rename these columns: they are persisted.

use backhaul_shared::command::{CommandId, CommandKind, CommandMessage, CommandResult, CommandStatus};
use backhaul_shared::Timestamp;
use serde::Serialize;

use super::backend::on_pool;
use super::{ts_string, Store, StoreError};

/// How long a command may stay unanswered before the cloud fails it as expired: an hour past
/// the age at which an edge refuses to run it ([`backhaul_shared::command::COMMAND_TTL`]), so a
/// command that ran has had time to be answered.
pub const EXPIRE_AFTER: std::time::Duration =
    std::time::Duration::from_secs(backhaul_shared::command::COMMAND_TTL.as_secs() + 3600);

/// How long after its `publishes`-th MQTT publish a command still unanswered is published again:
/// 1 min, doubling, at most 1 h. Only while its device is online: a device that is away gets
/// the copy its persistent session holds when it returns, and one copy is enough.
pub fn republish_delay(publishes: i64) -> std::time::Duration {
    let minutes = 1u64 << publishes.clamp(0, 6);
    std::time::Duration::from_secs((minutes * 60).min(3600))
}

/// The largest result kept, bytes of JSON text; a larger one is replaced by an error saying so.
pub const MAX_RESULT_BYTES: usize = 64 << 10;

/// A command as the API shows it (`GET /api/v1/devices/{device_id}/commands`; SPEC.md "Wave 2
/// additions"). Times are RFC 3339.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct CommandRow {
    pub command_id: String,
    pub device_id: String,
    pub kind: String,
    /// The command itself (`{"kind": ..., ...}`).
    #[schema(value_type = Object)]
    pub command: serde_json::Value,
    pub status: String,
    /// What the device answered: any JSON value (SPEC.md, "Commands").
    #[schema(value_type = Option<Value>)]
    pub result: Option<serde_json::Value>,
    pub created_at: String,
    pub delivered_at: Option<String>,
    pub done_at: Option<String>,
}

/// What recording a device's answer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Recorded: the command is now `done` or `failed`.
    Recorded,
    /// It was final already (an answer sent again): nothing changed.
    AlreadyFinal,
    /// No such command for this device.
    Unknown,
}

/// Which commands a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    All,
    Status(CommandStatus),
    /// Not answered yet: `queued` or `delivered` (what a device fetches over HTTP).
    Open,
}

const COLUMNS: &str = "command_id, device_id, kind, body, status, result, created_at, delivered_at, done_at";

/// The [`COLUMNS`], in order.
type Columns = (String, String, String, String, String, Option<String>, i64, Option<i64>, Option<i64>);

fn row((command_id, device_id, kind, body, status, result, created_at, delivered_at, done_at): Columns) -> CommandRow {
    CommandRow {
        command_id,
        device_id,
        kind,
        command: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        status,
        result: result.map(|s| serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s))),
        created_at: ts_string(created_at),
        delivered_at: delivered_at.map(ts_string),
        done_at: done_at.map(ts_string),
    }
}

/// The commands room of the store: see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Commands<'s>(pub(super) &'s Store);

impl Commands<'_> {
    /// Records a new `queued` command for `device_id`. Errors: the database's.
    pub async fn create(&self, device_id: &str, kind: &CommandKind) -> Result<CommandRow, StoreError> {
        // In creation order: commands are published by id, and two created in one millisecond
        // must not swap (found by the conformance suite, 1 run in about 10 under load).
        let id = CommandId::new_monotonic();
        let body = serde_json::to_string(kind).expect("a command serializes");
        let now = Timestamp::now().unix_micros();
        let _writer = self.0.writer().await;
        let sql =
            "INSERT INTO commands (command_id, device_id, kind, body, status, created_at) VALUES ($1, $2, $3, $4, 'queued', $5)";
        let command_id = id.to_string();
        on_pool!(&self.0.db, p => sqlx::query(sql)
            .bind(&command_id)
            .bind(device_id)
            .bind(kind.name())
            .bind(&body)
            .bind(now)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(CommandRow {
            command_id: id.to_string(),
            device_id: device_id.to_owned(),
            kind: kind.name().to_owned(),
            command: serde_json::from_str(&body).expect("just serialized"),
            status: CommandStatus::Queued.as_str().to_owned(),
            result: None,
            created_at: ts_string(now),
            delivered_at: None,
            done_at: None,
        })
    }

    /// Whether `device_id` has ever sent a batch or a status to this cloud.
    pub async fn device_known(&self, device_id: &str) -> Result<bool, StoreError> {
        let sql = "SELECT 1 FROM devices WHERE device_id = $1";
        Ok(on_pool!(&self.0.db, p => sqlx::query(sql).bind(device_id).fetch_optional(p).await?.is_some()))
    }

    /// One command of `device_id`, if it exists.
    pub async fn get(&self, device_id: &str, command_id: &str) -> Result<Option<CommandRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM commands WHERE device_id = $1 AND command_id = $2");
        let r: Option<Columns> = on_pool!(&self.0.db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(device_id)
            .bind(command_id)
            .fetch_optional(p)
            .await)?;
        Ok(r.map(row))
    }

    /// `device_id`'s commands, at most `limit`: the open ones ([`Filter::Open`], what a device
    /// fetches) oldest first, in the order they are to run; any other listing newest first.
    pub async fn list(&self, device_id: &str, filter: Filter, limit: i64) -> Result<Vec<CommandRow>, StoreError> {
        let (condition, status) = match filter {
            Filter::All => ("", None),
            Filter::Status(s) => (" AND status = $2", Some(s.as_str())),
            Filter::Open => (" AND status IN ('queued', 'delivered')", None),
        };
        let limit_at = if status.is_some() { "$3" } else { "$2" };
        let order = if filter == Filter::Open { "" } else { " DESC" };
        let sql = format!(
            "SELECT {COLUMNS} FROM commands WHERE device_id = $1{condition} ORDER BY command_id{order} LIMIT {limit_at}"
        );
        let rows: Vec<Columns> = on_pool!(&self.0.db, p => {
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(device_id);
            if let Some(s) = status {
                q = q.bind(s);
            }
            q.bind(limit).fetch_all(p).await
        })?;
        Ok(rows.into_iter().map(row).collect())
    }

    /// Marks a command handed to its device: `queued` becomes `delivered`. `publishes`: the
    /// MQTT publishes made so far including this one (`None`: fetched over HTTP), which sets
    /// when it is next due ([`republish_delay`]).
    pub async fn delivered(&self, device_id: &str, command_id: &str, publishes: Option<i64>) -> Result<(), StoreError> {
        let now = Timestamp::now().unix_micros();
        let n = publishes.unwrap_or(0);
        let next = now + republish_delay(n).as_micros() as i64;
        let _writer = self.0.writer().await;
        let sql = "UPDATE commands SET status = CASE WHEN status = 'queued' THEN 'delivered' ELSE status END,
                delivered_at = COALESCE(delivered_at, $1),
                published_at = CASE WHEN $2 > 0 THEN $1 ELSE published_at END,
                publishes = CASE WHEN $2 > 0 THEN $2 ELSE publishes END,
                next_publish_at = $3
             WHERE device_id = $4 AND command_id = $5";
        on_pool!(&self.0.db, p => sqlx::query(sql)
            .bind(now)
            .bind(n)
            .bind(next)
            .bind(device_id)
            .bind(command_id)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Puts off a command's next publish (its device has no key to sign it with) for an hour.
    pub async fn postpone(&self, device_id: &str, command_id: &str) -> Result<(), StoreError> {
        let next = Timestamp::now().unix_micros() + 3_600_000_000;
        let _writer = self.0.writer().await;
        let sql = "UPDATE commands SET next_publish_at = $1 WHERE device_id = $2 AND command_id = $3";
        on_pool!(&self.0.db, p => sqlx::query(sql).bind(next).bind(device_id).bind(command_id).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Records the device's answer, unless the command is final already (the first answer
    /// stands). `status` must be `done` or `failed` (the caller checks).
    pub async fn finish(&self, device_id: &str, result: &CommandResult) -> Result<Finished, StoreError> {
        let mut text = serde_json::to_string(&result.result).unwrap_or_else(|_| "null".into());
        if text.len() > MAX_RESULT_BYTES {
            text = serde_json::json!({
                "error": format!("the device's result was {} bytes, over the {MAX_RESULT_BYTES} kept", text.len())
            })
            .to_string();
        }
        let now = Timestamp::now().unix_micros();
        let id = result.command_id.to_string();
        let _writer = self.0.writer().await;
        let sql =
            "UPDATE commands SET status = $1, result = $2, done_at = $3, delivered_at = COALESCE(delivered_at, $3)
                   WHERE device_id = $4 AND command_id = $5 AND status IN ('queued', 'delivered')";
        let done = on_pool!(&self.0.db, p => sqlx::query(sql)
            .bind(result.status.as_str())
            .bind(&text)
            .bind(now)
            .bind(device_id)
            .bind(&id)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        drop(_writer);
        if done > 0 {
            return Ok(Finished::Recorded);
        }
        Ok(match self.get(device_id, &id).await? {
            Some(_) => Finished::AlreadyFinal,
            None => Finished::Unknown,
        })
    }

    /// Commands to publish over MQTT, oldest first, at most `limit`: every `queued` one whose
    /// publish is not put off, and `delivered` ones unanswered whose next publish is due
    /// ([`republish_delay`]) and whose device is online (the device may have missed it: a
    /// session the broker dropped, a result lost on the way back; it runs each command once and
    /// answers a redelivery from its record). Each with the publishes made so far.
    pub async fn to_publish(&self, limit: i64) -> Result<Vec<(String, CommandMessage, i64)>, StoreError> {
        let now = Timestamp::now().unix_micros();
        let sql = "SELECT c.device_id, c.command_id, c.body, c.publishes FROM commands c
             WHERE (c.status = 'queued' AND (c.next_publish_at IS NULL OR c.next_publish_at < $1))
                OR (c.status = 'delivered' AND c.next_publish_at < $1
                    AND EXISTS (SELECT 1 FROM devices d WHERE d.device_id = c.device_id AND d.online = 1))
             ORDER BY c.command_id LIMIT $2";
        let rows: Vec<(String, String, String, i64)> =
            on_pool!(&self.0.db, p => sqlx::query_as(sql).bind(now).bind(limit).fetch_all(p).await)?;
        let mut out = Vec::with_capacity(rows.len());
        for (device, id, body, publishes) in rows {
            let (Ok(command_id), Ok(command)) = (id.parse::<CommandId>(), serde_json::from_str(&body)) else {
                tracing::warn!(command_id = %id, "a stored command does not parse; skipped");
                continue;
            };
            out.push((device, CommandMessage { command_id, command }, publishes));
        }
        Ok(out)
    }

    /// Fails the commands still unanswered that were created before `created_before_us` (the
    /// device never came back for them). Returns how many.
    pub async fn expire(&self, created_before_us: i64) -> Result<u64, StoreError> {
        let now = Timestamp::now().unix_micros();
        let result = serde_json::json!({
            "error": "expired: the device did not answer in time (is it online? send the command again once it is)"
        })
        .to_string();
        let _writer = self.0.writer().await;
        let sql = "UPDATE commands SET status = 'failed', result = $1, done_at = $2
                   WHERE status IN ('queued', 'delivered') AND created_at < $3";
        Ok(on_pool!(&self.0.db, p => sqlx::query(sql)
            .bind(&result)
            .bind(now)
            .bind(created_before_us)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?)
    }
}
