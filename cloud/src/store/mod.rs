//! Storage on SQLite (the embedded default: WAL, `synchronous=FULL`) or PostgreSQL (replicas), each
//! through its own sqlx driver behind [`backend::Backend`] (`sqlite.rs`, `postgres.rs`); the SQL they
//! share is portable and written once here. Timestamps are integers (UTC microseconds).
//!
//! The schema is created by the migrations below, applied in order and recorded in
//! `schema_version`. Never edit or reorder a released migration; add a new one.
//!
//! # Layout (issue #15): the ack path writes the batch, not its detections
//!
//! A batch is acknowledged once one transaction has written, in `batches`, its index fields
//! (`batch_id`, `device_id`, `seq`, `payload_sha256`, `received_at`, `detections` (the count), `via`,
//! `first_ts`/`last_ts` (UTC µs of its earliest and latest detection)) and `payload`: the exact bytes
//! it arrived as, LZ4-compressed (`lz4_flex`'s block format with the uncompressed size prepended as a
//! little-endian u32; never change this format without a migration that rewrites old rows); and the
//! device's row (with `max_span_us`, the widest `last_ts - first_ts` of its batches that are not
//! *wide*, see below) and the counters. Nothing is written per detection.
//!
//! `GET /api/v1/detections` is served from the batches themselves ([`Store::detections`], in
//! `detections.rs`): the batches' time ranges are the index. A page (newest first) reads the
//! batches whose range can hold its rows, newest `last_ts` first (indexes `batches_time` and
//! `batches_device_time`, bounded below by the device's `max_span_us`), decodes their payloads
//! and stops once no further batch can hold a newer row than the page's last. A batch whose range
//! is wider than one hour ([`detections::WIDE_SPAN_US`], e.g. its clock was set mid-batch) is
//! found through the partial index `batches_wide` instead, so that one such batch does not widen
//! every scan. Acked is therefore readable at once, on every replica.
//!
//! The `detections` table (one row per detection) holds only batches stored before migration 4,
//! which have no payload: their rows are their only copy, and reads merge them in. Migration 5
//! removed the rows the former projection had derived from payloads. The `projected` column is
//! no longer read (kept: persisted columns are never dropped or reordered).
//! [`Store::reprocess`] (`backhaul-cloud reprocess`) re-derives the index fields from the payloads
//! after a decoder fix.

use std::time::Duration;

use backhaul_shared::{Batch, DeviceStatus, Timestamp, Zone};
use serde::Serialize;
use thiserror::Error;

mod backend;
mod commands;
mod detections;
mod postgres;
mod sqlite;

use backend::{on_pool, on_tx, Db, Tx};

pub use commands::{republish_delay, CommandRow, Commands, Filter as CommandFilter, Finished, EXPIRE_AFTER};
pub use detections::Reprocessed;

/// Schema migrations, in order. Portable SQL: it runs on SQLite and PostgreSQL.
const MIGRATIONS: &[&[&str]] = &[
    // 1: the first schema (issue #4).
    &[
        "CREATE TABLE IF NOT EXISTS batches (
        batch_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        payload_sha256 TEXT NOT NULL,
        received_at BIGINT NOT NULL,
        detections BIGINT NOT NULL,
        via TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS batches_device_seq ON batches (device_id, seq)",
        "CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY,
        name TEXT,
        location TEXT,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        last_seq BIGINT NOT NULL,
        batches BIGINT NOT NULL,
        detections BIGINT NOT NULL,
        online INTEGER NOT NULL DEFAULT 0,
        status_json TEXT,
        status_at BIGINT)",
        "CREATE TABLE IF NOT EXISTS detections (
        batch_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        device_id TEXT NOT NULL,
        ts BIGINT NOT NULL,
        kind TEXT NOT NULL,
        rssi INTEGER NOT NULL,
        device_hash TEXT,
        zone TEXT,
        node TEXT,
        temp DOUBLE PRECISION,
        humidity INTEGER,
        co2_ppm BIGINT,
        window_open INTEGER,
        battery INTEGER,
        PRIMARY KEY (batch_id, idx))",
        "CREATE INDEX IF NOT EXISTS detections_device_ts ON detections (device_id, ts)",
        "CREATE INDEX IF NOT EXISTS detections_ts ON detections (ts)",
        "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        "INSERT INTO counters (name, value) VALUES ('batches', 0), ('detections', 0), ('duplicates', 0),
        ('rejected', 0), ('dead_letters', 0) ON CONFLICT (name) DO NOTHING",
        "CREATE TABLE IF NOT EXISTS dead_letters (
        received_at BIGINT NOT NULL,
        via TEXT NOT NULL,
        topic TEXT,
        device_id TEXT,
        size BIGINT NOT NULL,
        error TEXT NOT NULL)",
    ],
    // 2 (issue #13): batches a device stamped while its wall clock was below its clock floor.
    &["ALTER TABLE devices ADD COLUMN clock_unsynced_batches BIGINT NOT NULL DEFAULT 0"],
    // 3 (issue #14): messages whose handling panicked (dead-lettered too).
    &["INSERT INTO counters (name, value) VALUES ('panics', 0) ON CONFLICT (name) DO NOTHING"],
    // 4 (issue #15): the ack path writes the batch (its payload compressed); detections become a
    // projection (see the module doc). `{blob}` is BLOB on SQLite, BYTEA on PostgreSQL.
    &[
        "ALTER TABLE batches ADD COLUMN payload {blob}",
        "ALTER TABLE batches ADD COLUMN projected INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE batches ADD COLUMN first_ts BIGINT",
        "ALTER TABLE batches ADD COLUMN last_ts BIGINT",
        "CREATE INDEX IF NOT EXISTS batches_unprojected ON batches (received_at, batch_id) WHERE projected = 0",
    ],
    // 5 (issue #15): detections are read from the batches (see the module doc); the rows the
    // projection derived from payloads go. `3600000000` is `detections::WIDE_SPAN_US`, spelled out
    // because SQLite uses a partial index only for a query that repeats its condition literally.
    &[
        "ALTER TABLE devices ADD COLUMN max_span_us BIGINT NOT NULL DEFAULT 0",
        "UPDATE devices SET max_span_us = COALESCE((SELECT MAX(b.last_ts - b.first_ts) FROM batches b
            WHERE b.device_id = devices.device_id AND b.payload IS NOT NULL
              AND b.last_ts - b.first_ts <= 3600000000), 0)",
        "CREATE INDEX IF NOT EXISTS batches_time ON batches (last_ts, batch_id, first_ts)",
        "CREATE INDEX IF NOT EXISTS batches_device_time ON batches (device_id, last_ts, batch_id, first_ts)",
        "CREATE INDEX IF NOT EXISTS batches_wide ON batches (last_ts, batch_id) WHERE last_ts - first_ts > 3600000000",
        "DELETE FROM detections WHERE batch_id IN (SELECT batch_id FROM batches WHERE payload IS NOT NULL)",
        "DROP INDEX IF EXISTS batches_unprojected",
    ],
    // 6 (issue #18): commands to devices (see `commands.rs`).
    &[
        "CREATE TABLE IF NOT EXISTS commands (
        command_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        status TEXT NOT NULL,
        result TEXT,
        created_at BIGINT NOT NULL,
        delivered_at BIGINT,
        published_at BIGINT,
        done_at BIGINT,
        publishes BIGINT NOT NULL DEFAULT 0,
        next_publish_at BIGINT)",
        "CREATE INDEX IF NOT EXISTS commands_device ON commands (device_id, command_id)",
        // The ledger (issue #18): `devices.batches` when the last full status was recorded.
        "ALTER TABLE devices ADD COLUMN stored_at_status BIGINT NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS commands_open ON commands (command_id) WHERE status IN ('queued', 'delivered')",
    ],
    // 7 (issue #20): a seed fleet client's last heartbeat; its liveness is that, not a status.
    // And the batches of seed senders (`via` `http-seed`, `mqtt-seed`), which a Pi's backhaul-edge
    // never counted: the ledger leaves them out.
    &[
        "ALTER TABLE devices ADD COLUMN heartbeat_at BIGINT",
        "ALTER TABLE devices ADD COLUMN seed_batches BIGINT NOT NULL DEFAULT 0",
    ],
];

/// How a seed sender's batches are marked in `batches.via` (`http-seed`, `mqtt-seed`, issue #20).
pub const SEED_VIA_SUFFIX: &str = "-seed";

/// A device that sends heartbeats (a seed fleet client, issue #20) is online while its last one is
/// at most this old (they come every 500 ms; the cloud records one per [`HEARTBEAT_WRITE_EVERY`]).
pub const HEARTBEAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A device's heartbeats are written at most this often (the rest only counted in memory).
pub const HEARTBEAT_WRITE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The database was migrated by a newer build (`schema_version` above what this one knows).
    #[error(
        "the database's schema is version {found}, newer than this build knows ({known}): a newer backhaul-cloud \
         migrated it; run that version (every replica on one database must run the same version)"
    )]
    NewerSchema { found: i64, known: i64 },
    /// The group transaction this batch was written in failed.
    #[error("database: {0}")]
    Group(String),
}

/// A batch waiting for the next group transaction.
#[derive(Debug)]
struct WriteRequest {
    /// The batch's index fields for its `batches` row and what it adds to its device's row,
    /// computed before the writer's turn (no copy of its detections).
    row: NewRow,
    /// [`crate::ingest::payload_hash`] of the bytes it arrived as: a resend must match it.
    hash: String,
    /// The adapter it came through (`http`, `mqtt`, ...).
    via: String,
    /// The bytes the batch arrived as, compressed (see the module doc).
    payload: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Result<Outcome, String>>,
}

/// Whether [`Store::store_batch`] reads the batch_id before it takes the write path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Read it first: a resend then ends there, with no write lock and no transaction (for
    /// callers that expect many resends).
    First,
    /// Straight to the write, which finds a batch stored before in its transaction: the caller
    /// looked it up already (e.g. [`Store::duplicate_of`] found nothing), or expects it new.
    Done,
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    /// Already stored with the same payload: nothing new written.
    Duplicate,
    /// Already stored with a different payload under the same batch_id.
    Conflict,
}

#[derive(Debug)]
pub struct Store {
    db: Db,
    /// SQLite allows one writer: writes queue here rather than fail with SQLITE_BUSY.
    write_lock: Option<tokio::sync::Mutex<()>>,
    /// Duplicates and conflicts counted since the last write: a duplicate is found with a read
    /// (before the write path, or in a group's transaction that then writes nothing), costs no
    /// fsync, and is added to the counters by the next write or [`Self::flush_counts`]. A crash
    /// loses these counts only, never a batch.
    unwritten_duplicates: std::sync::atomic::AtomicI64,
    unwritten_rejected: std::sync::atomic::AtomicI64,
    /// Group commit: batches for the write path (new ones, and those not looked up before, see
    /// [`Lookup`]) wait here; whoever holds the write lock next writes all of them
    /// in one transaction (one fsync), and answers each. A std Mutex: held only to push or take.
    pending: std::sync::Mutex<Vec<WriteRequest>>,
    /// One [`Self::flush_counts`] at a time.
    flushing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Stats {
    pub batches: i64,
    pub detections: i64,
    pub duplicates: i64,
    pub rejected: i64,
    pub dead_letters: i64,
    /// Messages whose handling panicked (each also a dead letter): a bug to look into.
    pub panics: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeviceRow {
    pub device_id: String,
    pub name: Option<String>,
    pub location: Option<String>,
    pub last_seen: String,
    /// From `liveness`: the device's last status (or last will), or a heartbeat within
    /// [`HEARTBEAT_TIMEOUT`]; false when nothing tells (`liveness` `none`).
    pub online: bool,
    /// What `online` comes from: `status` (a backhaul-edge's status and last will), `heartbeat`
    /// (a seed fleet client's, issue #20) or `none` (a sender that says nothing of its liveness:
    /// `online` is then only a guess, false).
    pub liveness: String,
    pub batches: i64,
    pub detections: i64,
    pub last_seq: i64,
    /// seq numbers missing below `last_seq` (dropped at the edge, or not arrived yet).
    pub gaps: i64,
    /// The device's last status as it sent it (`backhaul_shared::DeviceStatus`; SPEC.md, "Device
    /// status"), or null before the first.
    #[schema(value_type = Option<Object>)]
    pub status: Option<serde_json::Value>,
    /// Batches stamped while the device's wall clock was below its clock floor (`"clock":
    /// "unsynced"`): their times are the device's estimates.
    pub clock_unsynced_batches: i64,
    /// The conservation ledger (issue #18), from the device's last status with counters.
    pub ledger: Option<Ledger>,
    /// What the device holds and when it will have sent it, from the same status.
    pub backlog: Option<Backlog>,
}

/// `produced = stored + queued + dropped + quarantined + lost + dead_lettered`, in batches
/// (issue #18): `produced`, `queued` (pending + in flight), `dropped` (the queue's byte budget),
/// `quarantined`, `lost` and `dead_lettered` are the edge's counters from its last status (sent
/// every `transport.mqtt.status_interval` and when it stops); `stored` is what this cloud held
/// for the device when that status was recorded (the device's batch count, copied in the same
/// statement: no clocks compared), or, after a clean stop, what it holds now.
///
/// `difference` is `produced` minus the right-hand side. A batch the edge counts as queued may
/// be stored already: it is in flight with its ack on the way, its ack was lost in a crash (acks
/// are written in groups), or a replay put it back; so the ledger is `balanced` when
/// `difference` is between `-queued` and 0. It proves that nothing is lost once the queue is
/// empty (then `difference` must be 0). Above 0: batches the device produced that are nowhere
/// (lost between edge and cloud). Below `-queued`: the cloud holds more than the device knows of
/// (its data_dir was reset, or moved aside after damage; rarely, a batch dropped by the byte
/// budget after it had been sent and stored).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Ledger {
    pub produced: i64,
    pub stored: i64,
    pub queued: i64,
    pub in_flight: i64,
    pub dropped: i64,
    pub quarantined: i64,
    pub lost: i64,
    pub dead_lettered: i64,
    pub balanced: bool,
    pub difference: i64,
    /// When the counters were reported (RFC 3339).
    pub reported_at: String,
}

/// `backlog` of a device (SPEC.md "Wave 2 additions"): batches it holds to send, the oldest's
/// age (s), and its drain rate (batches/s) and ETA (s) as it last reported them.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Backlog {
    pub batches: u64,
    pub oldest_age_s: Option<u64>,
    pub drain_rate: Option<f64>,
    pub eta_s: Option<u64>,
}

fn ledger_of(status: &DeviceStatus, stored: i64, reported_at: String) -> Option<Ledger> {
    let n = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    let produced = n(status.produced_batches)?;
    let queued = n(status.queue_depth).unwrap_or(0);
    let dropped = n(status.dropped_batches).unwrap_or(0);
    let quarantined = n(status.quarantined).unwrap_or(0);
    let lost = n(status.lost_batches).unwrap_or(0);
    let dead_lettered = n(status.dead_lettered).unwrap_or(0);
    let in_flight = n(status.in_flight).unwrap_or(0);
    // In i128: counters come from devices, and one absurd status must not overflow the listing.
    let accounted =
        [stored, queued, dropped, quarantined, lost, dead_lettered].iter().map(|&v| i128::from(v)).sum::<i128>();
    let difference = (i128::from(produced) - accounted).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    Some(Ledger {
        produced,
        stored,
        queued,
        in_flight,
        dropped,
        quarantined,
        lost,
        dead_lettered,
        balanced: (-queued..=0).contains(&difference),
        difference,
        reported_at,
    })
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DetectionRow {
    pub device_id: String,
    pub batch_id: String,
    pub kind: String,
    pub timestamp: String,
    /// dBm; absent for telemetry and for sensor updates relayed without it (issue #20).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rssi: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temp: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub humidity: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub co2_ppm: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_open: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub battery: Option<i64>,
    /// A telemetry detection's entity (issue #20).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity_id: Option<i64>,
    /// A telemetry detection's numbers, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<std::collections::BTreeMap<String, f64>>,
    /// Paging position of this row.
    #[serde(skip)]
    pub cursor: String,
}

/// A page query on detections.
#[derive(Debug, Clone, Default)]
pub struct DetectionQuery {
    pub device_id: Option<String>,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
    pub limit: i64,
    /// (ts, batch_id, idx) of the last row of the previous page.
    pub after: Option<(i64, String, i64)>,
}

fn zone_str(z: Zone) -> &'static str {
    match z {
        Zone::Near => "near",
        Zone::Medium => "medium",
        Zone::Far => "far",
    }
}

fn ts_string(us: i64) -> String {
    Timestamp::from_unix_micros(us).map(|t| t.to_string()).unwrap_or_default()
}

impl Store {
    /// Connects (`sqlite:PATH`, created 0600 if missing; or `postgres://...`) and applies the
    /// migrations.
    ///
    /// Errors: the database's ([`StoreError::Db`]); [`StoreError::NewerSchema`] when a newer build
    /// migrated it.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let db = Db::open(url).await?;
        let store = Self {
            write_lock: db.single_writer().then(|| tokio::sync::Mutex::new(())),
            db,
            unwritten_duplicates: Default::default(),
            unwritten_rejected: Default::default(),
            pending: Default::default(),
            flushing: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations this database lacks, one transaction each, under the backend's
    /// migration lock: replicas started together migrate one at a time, and each reads the
    /// version under the lock.
    async fn migrate(&self) -> Result<(), StoreError> {
        let known = MIGRATIONS.len() as i64;
        // A migration of a large database can outlast systemd's start timeout (the service then
        // restarts, rolls the migration back, and loops): ask for more time while it runs, and
        // while this replica waits for the lock held by another that migrates.
        let extend = tokio::spawn(async {
            loop {
                backhaul_shared::link::notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(90_000_000)]);
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        let _stop_extending = crate::AbortOnDrop(extend);
        let mut announced = false;
        loop {
            let mut tx = self.db.begin_migration().await?;
            let current: i64 = on_tx!(&mut tx, t => async {
                sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
                    .execute(&mut **t)
                    .await?;
                sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetch_one(&mut **t).await
            }
            .await)?;
            if current > known {
                return Err(StoreError::NewerSchema { found: current, known });
            }
            if current == known {
                tx.commit().await?;
                return Ok(());
            }
            if !announced {
                announced = true;
                tracing::info!(
                    from = current,
                    to = known,
                    "migrating the database (a large one takes a while; the start waits)"
                );
            }
            let version = current + 1;
            let blob = self.db.blob();
            on_tx!(&mut tx, t => async {
                for sql in MIGRATIONS[current as usize] {
                    // Only the column type is spliced in, from the backend's constant.
                    sqlx::query(sqlx::AssertSqlSafe(sql.replace("{blob}", blob))).execute(&mut **t).await?;
                }
                sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                    .bind(version)
                    .execute(&mut **t)
                    .await
                    .map(|r| r.rows_affected())
            }
            .await)?;
            tx.commit().await?;
            tracing::info!(version, "database migrated");
        }
    }

    /// The commands to devices (issue #18).
    pub fn commands(&self) -> Commands<'_> {
        Commands(self)
    }

    /// Whether `device_id` runs backhaul-edge: it has sent a status (issue #20: a seed sender's
    /// message for such a device is refused, so the shared seed topic cannot write as it).
    pub async fn runs_edge(&self, device_id: &str) -> Result<bool, StoreError> {
        let sql = "SELECT 1 FROM devices WHERE device_id = $1 AND status_json IS NOT NULL";
        Ok(on_pool!(&self.db, p => sqlx::query(sql).bind(device_id).fetch_optional(p).await?.is_some()))
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        on_pool!(&self.db, p => sqlx::query("SELECT 1").fetch_one(p).await.is_ok())
    }

    /// Stores a validated batch in one transaction: its row in `batches` (index fields, payload
    /// hash, compressed payload; see the module doc), its device's row and the counters; or counts
    /// a duplicate or a conflict. Concurrent new batches
    /// share a transaction (group commit); each is still all or nothing. `lookup`: whether the
    /// caller has already looked the batch_id up (then the read before the write is skipped; the
    /// write still finds a batch stored meanwhile).
    pub async fn store_batch(
        &self,
        batch: &Batch,
        raw: &[u8],
        payload_sha256: &str,
        via: &str,
        lookup: Lookup,
    ) -> Result<Outcome, StoreError> {
        let batch_id = batch.batch_id.to_string();
        // The common resend: already stored. A read, no write lock, no transaction.
        if lookup == Lookup::First {
            if let Some(outcome) = self.seen(None, &batch_id, payload_sha256).await? {
                return Ok(outcome);
            }
        }
        let payload = lz4_flex::compress_prepend_size(raw);
        let row = NewRow::of(batch);
        if self.write_lock.is_none() {
            // PostgreSQL: no single writer, so no leader to gather a group; each writes its own.
            // Another writer (a replica, or a concurrent request here) may commit the same batch_id
            // between our read and our insert: the insert then fails on the primary key, and the
            // batch is answered as the resend it is (issue #15: it was a 503, then a duplicate).
            for attempt in 1..=RACE_ATTEMPTS {
                let (reply, _) = tokio::sync::oneshot::channel();
                let own = [WriteRequest {
                    row: row.clone(),
                    hash: payload_sha256.to_owned(),
                    via: via.to_owned(),
                    payload: payload.clone(),
                    reply,
                }];
                match self.write_group(&own).await {
                    Ok(outcomes) => return Ok(outcomes[0]),
                    Err(StoreError::Db(e)) if self.db.lost_a_race(&e) && attempt < RACE_ATTEMPTS => {
                        if let Some(outcome) = self.seen(None, &batch_id, payload_sha256).await? {
                            return Ok(outcome);
                        }
                        // A deadlock victim (counters, devices), not stored: write it again.
                    }
                    Err(e) => return Err(e),
                }
            }
            unreachable!("the last attempt returns");
        }
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        self.lock_pending().push(WriteRequest {
            row,
            hash: payload_sha256.to_owned(),
            via: via.to_owned(),
            payload,
            reply,
        });
        let _writer = self.writer().await;
        // Written by the previous holder of the lock, with its group?
        if let Ok(result) = answer.try_recv() {
            return result.map_err(StoreError::Group);
        }
        let group = std::mem::take(&mut *self.lock_pending());
        match self.write_group(&group).await {
            Ok(outcomes) => {
                for (request, outcome) in group.into_iter().zip(outcomes) {
                    let _ = request.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for request in group {
                    let _ = request.reply.send(Err(message.clone()));
                }
            }
        }
        answer.try_recv().unwrap_or_else(|_| Err("the batch was not written".to_owned())).map_err(StoreError::Group)
    }

    /// SQLite's single-writer lock (none for PostgreSQL).
    async fn writer(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.write_lock {
            Some(l) => Some(l.lock().await),
            None => None,
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Vec<WriteRequest>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a group of new batches in one transaction, in a number of statements that does not
    /// grow with the group: one multi-row `INSERT ... ON CONFLICT (batch_id) DO NOTHING RETURNING
    /// batch_id` per [`INSERT_ROWS`] batches, one multi-row upsert of the devices' rows per
    /// [`DEVICE_ROWS`] devices, and the counters ([`Self::write_counts`]; none when the group
    /// stored nothing). Each statement is a round trip, and on SQLite a hand-off to sqlx's worker
    /// thread and back: at 50 detections per batch, a statement (or two) per batch cost more than
    /// the rest of the ingest. A batch_id the insert did not return is stored already (by another writer, a
    /// replica, or twice in this group): it is read back and answered as a duplicate or a conflict.
    async fn write_group(&self, group: &[WriteRequest]) -> Result<Vec<Outcome>, StoreError> {
        let now = Timestamp::now().unix_micros();
        // The first statement writes (the insert), so SQLite's write lock is taken at once.
        let mut tx = self.db.begin().await?;
        // Each batch_id once per insert: which of two rows with one key a multi-row insert keeps
        // is then not a question.
        let mut offered = std::collections::HashSet::new();
        let firsts: Vec<&WriteRequest> = group.iter().filter(|r| offered.insert(r.row.batch_id.as_str())).collect();
        let mut inserted = std::collections::HashSet::new();
        for chunk in firsts.chunks(INSERT_ROWS) {
            inserted.extend(insert_batches(&mut tx, chunk, now).await?);
        }
        let mut outcomes = Vec::with_capacity(group.len());
        // What the new batches add to the devices' rows and to the counters, for the whole group.
        // Devices in sorted order, so concurrent transactions (PostgreSQL replicas) take their
        // rows in the same order.
        let mut devices: std::collections::BTreeMap<&str, DeviceDelta> = Default::default();
        let (mut batches, mut detections) = (0i64, 0i64);
        for request in group {
            let row = &request.row;
            if inserted.remove(&row.batch_id) {
                devices.entry(&row.device_id).or_default().add(row, &request.via);
                batches += 1;
                detections += row.detections;
                outcomes.push(Outcome::Stored);
                continue;
            }
            match self.seen(Some(&mut tx), &row.batch_id, &request.hash).await? {
                Some(outcome) => outcomes.push(outcome),
                None => {
                    return Err(StoreError::Group(format!(
                        "batch {} was neither inserted nor found stored (a bug to report)",
                        row.batch_id
                    )))
                }
            }
        }
        if !devices.is_empty() {
            upsert_devices(&mut tx, &devices, now).await?;
        }
        // A group of only resends wrote nothing: its duplicates stay counted in memory
        // (written by the next write, or by `flush_counts` within 5 s), so it costs no fsync.
        let taken = if batches == 0 {
            (0, 0)
        } else {
            self.write_counts(&mut tx, &[("batches", batches), ("detections", detections)]).await?
        };
        self.commit_counted(tx, taken).await?;
        Ok(outcomes)
    }
}

/// Batches per `INSERT` statement of a group: 10 parameters each, within SQLite's 32,766 and
/// PostgreSQL's 65,535 bound parameters per statement.
const INSERT_ROWS: usize = 256;

/// What a new batch's row in `batches` (its index fields, see the module doc) and its device's
/// row are written from: not the batch itself, whose detections a copy would duplicate.
#[derive(Debug, Clone)]
struct NewRow {
    batch_id: String,
    device_id: String,
    name: Option<String>,
    location: Option<String>,
    clock_synced: bool,
    seq: i64,
    detections: i64,
    /// UTC µs of its earliest and latest detection (none without detections).
    first_ts: Option<i64>,
    last_ts: Option<i64>,
    /// What it adds to its device's `max_span_us` ([`detections::narrow_span`]).
    span: i64,
}

impl NewRow {
    fn of(batch: &Batch) -> Self {
        let times = batch.detections.iter().map(|d| d.timestamp().unix_micros());
        let (first_ts, last_ts) = (times.clone().min(), times.max());
        Self {
            batch_id: batch.batch_id.to_string(),
            device_id: batch.device_id.clone(),
            name: batch.name.clone(),
            location: batch.location.clone(),
            clock_synced: batch.clock.is_synced(),
            seq: i64::try_from(batch.seq).unwrap_or(i64::MAX),
            detections: batch.detections.len() as i64,
            first_ts,
            last_ts,
            span: detections::narrow_span(first_ts, last_ts),
        }
    }
}

/// The `VALUES` of a multi-row statement: `rows` copies of `row` (a parenthesised list of
/// placeholders `$1..=$per` and literals), joined by commas, row `i`'s placeholders renumbered
/// from `i * per + 1`. Only placeholders are spliced into SQL this way; values are bound.
fn values_list(row: &str, per: usize, rows: usize) -> String {
    let mut out = String::with_capacity(rows * (row.len() + 2 * per + 2));
    for i in 0..rows {
        if i > 0 {
            out.push_str(", ");
        }
        let mut rest = row;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..=at]);
            let digits = rest[at + 1..].bytes().take_while(u8::is_ascii_digit).count();
            let n: usize = rest[at + 1..at + 1 + digits].parse().expect("`$` starts a placeholder");
            out.push_str(&(i * per + n).to_string());
            rest = &rest[at + 1 + digits..];
        }
        out.push_str(rest);
    }
    out
}

/// Writes of one batch on PostgreSQL before its error is the caller's (see [`Store::store_batch`]).
const RACE_ATTEMPTS: u32 = 4;

/// The index rows of new batches with their compressed payloads, in `tx`, each batch_id once (the
/// ack path: no detection rows, see the module doc). Returns the batch_ids inserted: one already
/// stored is left as it is.
async fn insert_batches(tx: &mut Tx, rows: &[&WriteRequest], now: i64) -> Result<Vec<String>, sqlx::Error> {
    let mut sql = String::from(
        "INSERT INTO batches (batch_id, device_id, seq, payload_sha256, received_at, detections, via, payload,
                              projected, first_ts, last_ts) VALUES ",
    );
    sql.push_str(&values_list("($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $10)", 10, rows.len()));
    sql.push_str(" ON CONFLICT (batch_id) DO NOTHING RETURNING batch_id");
    // Only placeholders are spliced in; values are bound.
    on_tx!(tx, t => {
        let mut q = sqlx::query_scalar(sqlx::AssertSqlSafe(sql));
        for request in rows {
            let row = &request.row;
            q = q
                .bind(&row.batch_id)
                .bind(&row.device_id)
                .bind(row.seq)
                .bind(&request.hash)
                .bind(now)
                .bind(row.detections)
                .bind(&request.via)
                .bind(&request.payload)
                .bind(row.first_ts)
                .bind(row.last_ts);
        }
        q.fetch_all(&mut **t).await
    })
}

/// What the new batches of one group add to their device's row.
#[derive(Debug)]
struct DeviceDelta {
    /// The last name and location a batch of the group carried (a batch without keeps the row's).
    name: Option<String>,
    location: Option<String>,
    last_seq: i64,
    batches: i64,
    detections: i64,
    clock_unsynced_batches: i64,
    max_span_us: i64,
    /// Of `batches`, those of seed senders (issue #20).
    seed_batches: i64,
}

impl Default for DeviceDelta {
    fn default() -> Self {
        Self {
            name: None,
            location: None,
            last_seq: i64::MIN,
            batches: 0,
            detections: 0,
            clock_unsynced_batches: 0,
            max_span_us: 0,
            seed_batches: 0,
        }
    }
}

impl DeviceDelta {
    fn add(&mut self, row: &NewRow, via: &str) {
        self.seed_batches += i64::from(via.ends_with(SEED_VIA_SUFFIX));
        if row.name.is_some() {
            self.name.clone_from(&row.name);
        }
        if row.location.is_some() {
            self.location.clone_from(&row.location);
        }
        self.last_seq = self.last_seq.max(row.seq);
        self.batches += 1;
        self.detections += row.detections;
        self.clock_unsynced_batches += i64::from(!row.clock_synced);
        self.max_span_us = self.max_span_us.max(row.span);
    }
}

/// Devices per upsert statement of a group: 10 parameters each (see [`INSERT_ROWS`]).
const DEVICE_ROWS: usize = 256;

/// Adds a group's [`DeviceDelta`]s to their devices' rows (each created on its first batch), in
/// `tx`: one multi-row upsert per [`DEVICE_ROWS`] devices, not one per device (each statement is a
/// round trip; at 50 detections per batch from 8 devices, eight of them were most of a group's
/// statements). `devices` is sorted by device_id and each appears once: PostgreSQL takes the
/// rows' locks in the order of the `VALUES`, so concurrent replicas take them in one order, and
/// one statement may not update a row twice.
async fn upsert_devices(
    tx: &mut Tx,
    devices: &std::collections::BTreeMap<&str, DeviceDelta>,
    now: i64,
) -> Result<(), sqlx::Error> {
    let devices: Vec<(&&str, &DeviceDelta)> = devices.iter().collect();
    for chunk in devices.chunks(DEVICE_ROWS) {
        let mut sql = String::from(
            "INSERT INTO devices (device_id, name, location, first_seen, last_seen, last_seq, batches, detections,
                clock_unsynced_batches, max_span_us, seed_batches) VALUES ",
        );
        sql.push_str(&values_list("($1, $2, $3, $4, $4, $5, $6, $7, $8, $9, $10)", 10, chunk.len()));
        sql.push_str(
            " ON CONFLICT (device_id) DO UPDATE SET
            seed_batches = devices.seed_batches + excluded.seed_batches,
            name = COALESCE(excluded.name, devices.name),
            location = COALESCE(excluded.location, devices.location),
            last_seen = excluded.last_seen,
            last_seq = CASE WHEN excluded.last_seq > devices.last_seq THEN excluded.last_seq ELSE devices.last_seq END,
            batches = devices.batches + excluded.batches,
            detections = devices.detections + excluded.detections,
            clock_unsynced_batches = devices.clock_unsynced_batches + excluded.clock_unsynced_batches,
            max_span_us = CASE WHEN excluded.max_span_us > devices.max_span_us THEN excluded.max_span_us
                ELSE devices.max_span_us END",
        );
        // Only placeholders are spliced in; values are bound.
        on_tx!(tx, t => {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (device_id, d) in chunk {
                q = q
                    .bind(**device_id)
                    .bind(&d.name)
                    .bind(&d.location)
                    .bind(now)
                    .bind(d.last_seq)
                    .bind(d.batches)
                    .bind(d.detections)
                    .bind(d.clock_unsynced_batches)
                    .bind(d.max_span_us)
                    .bind(d.seed_batches);
            }
            q.execute(&mut **t).await.map(|r| r.rows_affected())
        })?;
    }
    Ok(())
}

impl Store {
    /// Whether `batch_id` is stored: a duplicate (same payload hash) or a conflict, counted. Read
    /// in `tx` if given, else on the pool.
    async fn seen(
        &self,
        tx: Option<&mut Tx>,
        batch_id: &str,
        payload_sha256: &str,
    ) -> Result<Option<Outcome>, StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let sql = "SELECT payload_sha256 FROM batches WHERE batch_id = $1";
        let existing: Option<String> = match tx {
            Some(tx) => on_tx!(tx, t => sqlx::query_scalar(sql).bind(batch_id).fetch_optional(&mut **t).await)?,
            None => on_pool!(&self.db, p => sqlx::query_scalar(sql).bind(batch_id).fetch_optional(p).await)?,
        };
        Ok(existing.map(|hash| {
            if hash == payload_sha256 {
                self.unwritten_duplicates.fetch_add(1, Relaxed);
                Outcome::Duplicate
            } else {
                self.unwritten_rejected.fetch_add(1, Relaxed);
                Outcome::Conflict
            }
        }))
    }

    /// The device of the stored batch `batch_id` if its payload's SHA-256 is `payload_sha256` (a
    /// resend), else `None` (not stored, or stored with another payload). A read; counts nothing
    /// (see [`Self::count_duplicate`]).
    ///
    /// Errors: the database's ([`StoreError::Db`]).
    pub async fn duplicate_of(&self, batch_id: &str, payload_sha256: &str) -> Result<Option<StoredBatch>, StoreError> {
        let sql = "SELECT device_id, payload_sha256, seq, detections FROM batches WHERE batch_id = $1";
        let row: Option<(String, String, i64, i64)> =
            on_pool!(&self.db, p => sqlx::query_as(sql).bind(batch_id).fetch_optional(p).await)?;
        let Some((device_id, hash, seq, detections)) = row else { return Ok(None) };
        if hash != payload_sha256 {
            return Ok(None);
        }
        Ok(Some(StoredBatch {
            device_id,
            seq: u64::try_from(seq).unwrap_or(0),
            detections: u64::try_from(detections).unwrap_or(0),
        }))
    }

    /// `device_id`'s latest `limit` batches by `seq`, newest first (the dashboard's batches over
    /// time, issue #19).
    pub async fn recent_batches(&self, device_id: &str, limit: i64) -> Result<Vec<BatchRow>, StoreError> {
        let sql = "SELECT batch_id, seq, received_at, detections, via FROM batches WHERE device_id = $1
                   ORDER BY seq DESC LIMIT $2";
        let rows: Vec<(String, i64, i64, i64, String)> =
            on_pool!(&self.db, p => sqlx::query_as(sql).bind(device_id).bind(limit).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(batch_id, seq, received_at, detections, via)| BatchRow {
                batch_id,
                seq,
                received_at: ts_string(received_at),
                detections,
                via,
            })
            .collect())
    }

    /// Counts a duplicate answered without [`Self::store_batch`] (written with the next write).
    pub fn count_duplicate(&self) {
        self.unwritten_duplicates.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Adds the duplicates and conflicts counted in memory to the counters, in `tx`; returns what
    /// it took, for [`Self::commit_counted`].
    async fn write_unwritten_counts(&self, tx: &mut Tx) -> Result<(i64, i64), sqlx::Error> {
        self.write_counts(tx, &[]).await
    }

    /// Adds `add` (counter, amount) and the duplicates and conflicts counted in memory to the
    /// counters, in `tx`: one statement on SQLite ([`bump_all`]), one per counter that changes on
    /// PostgreSQL; returns the in-memory counts it took, for [`Self::commit_counted`].
    ///
    /// On PostgreSQL one statement per counter, in one fixed order everywhere (batches,
    /// detections, dead_letters, panics, duplicates, rejected), so concurrent transactions take the
    /// rows' locks in the same order. A single `UPDATE ... WHERE name IN (...)` does not: its scan
    /// meets the rows in their physical order, which changes as they are updated, and replicas
    /// then deadlock (measured: new batches at 50 per batch fell from 35,000 to 19,000 det/s).
    async fn write_counts(&self, tx: &mut Tx, add: &[(&'static str, i64)]) -> Result<(i64, i64), sqlx::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let dup = self.unwritten_duplicates.swap(0, Relaxed);
        let rej = self.unwritten_rejected.swap(0, Relaxed);
        let changes: Vec<(&str, i64)> =
            add.iter().copied().chain([("duplicates", dup), ("rejected", rej)]).filter(|&(_, by)| by != 0).collect();
        let result = async {
            if self.db.single_writer() {
                // No concurrent writer to deadlock with: one statement for all.
                return bump_all(tx, &changes).await;
            }
            for &(name, by) in &changes {
                bump(tx, name, by).await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // Not written: keep them for the next write.
            self.unwritten_duplicates.fetch_add(dup, Relaxed);
            self.unwritten_rejected.fetch_add(rej, Relaxed);
            return Err(e);
        }
        Ok((dup, rej))
    }

    /// Commits `tx`, which carries the counts `taken` by [`Self::write_unwritten_counts`]; if the
    /// commit fails they are kept for the next write.
    async fn commit_counted(&self, tx: Tx, (dup, rej): (i64, i64)) -> Result<(), sqlx::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let result = tx.commit().await;
        if result.is_err() {
            self.unwritten_duplicates.fetch_add(dup, Relaxed);
            self.unwritten_rejected.fetch_add(rej, Relaxed);
        }
        result
    }

    /// A write transaction: see [`backend::Backend::begin_write`].
    async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        self.db.begin_write().await
    }

    /// Writes the duplicates and conflicts counted in memory (`serve` calls it every 5 s and at
    /// shutdown, so that every replica's counts reach `/api/v1/stats`). Nothing to write: no
    /// transaction. One flush at a time: the one at shutdown waits for one in progress.
    ///
    /// Errors: the database's ([`StoreError::Db`]); the counts are kept for the next write.
    pub async fn flush_counts(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let _one = self.flushing.lock().await;
        if self.unwritten_duplicates.load(Relaxed) == 0 && self.unwritten_rejected.load(Relaxed) == 0 {
            return Ok(());
        }
        let _writer = self.writer().await;
        let mut tx = self.begin_write().await?;
        let taken = self.write_unwritten_counts(&mut tx).await?;
        self.commit_counted(tx, taken).await?;
        Ok(())
    }

    /// Counts a batch rejected before storage (invalid, or not allowed).
    pub async fn count_rejected(&self) -> Result<(), StoreError> {
        let _writer = self.writer().await;
        let mut tx = self.begin_write().await?;
        self.unwritten_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let taken = self.write_unwritten_counts(&mut tx).await?;
        self.commit_counted(tx, taken).await?;
        Ok(())
    }

    /// Records an unusable message (kept for inspection: where it came from, its size, why);
    /// `panicked`: its handling panicked, also counted in `panics`.
    pub async fn dead_letter(
        &self,
        via: &str,
        topic: Option<&str>,
        device_id: Option<&str>,
        size: usize,
        error: &str,
        panicked: bool,
    ) -> Result<(), StoreError> {
        let _writer = self.writer().await;
        let mut tx = self.begin_write().await?;
        let sql =
            "INSERT INTO dead_letters (received_at, via, topic, device_id, size, error) VALUES ($1, $2, $3, $4, $5, $6)";
        let error: String = error.chars().take(500).collect();
        on_tx!(&mut tx, t => sqlx::query(sql)
            .bind(Timestamp::now().unix_micros())
            .bind(via)
            .bind(topic)
            .bind(device_id)
            .bind(size as i64)
            .bind(&error)
            .execute(&mut **t)
            .await
            .map(|r| r.rows_affected()))?;
        // Counters in one fixed order everywhere (batches, detections, dead_letters, panics, duplicates,
        // rejected), so concurrent PostgreSQL transactions cannot deadlock on them.
        bump(&mut tx, "dead_letters", 1).await?;
        if panicked {
            bump(&mut tx, "panics", 1).await?;
        }
        self.unwritten_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let taken = self.write_unwritten_counts(&mut tx).await?;
        self.commit_counted(tx, taken).await?;
        Ok(())
    }

    /// Records a device's status message (online, queue depth, drops, the ledger's counters). A
    /// last will (`{"online":false}`, nothing else) changes only `online`: the counters of the
    /// last full status stay for the ledger. `retained`: an MQTT retained status, delivered again
    /// when the cloud subscribes; it is old, so it is recorded only for a device without one.
    pub async fn device_status(
        &self,
        device_id: &str,
        status: &DeviceStatus,
        retained: bool,
    ) -> Result<(), StoreError> {
        let _writer = self.writer().await;
        let now = Timestamp::now().unix_micros();
        if *status == (DeviceStatus { online: status.online, ..DeviceStatus::default() }) {
            let sql = "INSERT INTO devices (device_id, first_seen, last_seen, last_seq, batches, detections, online)
                       VALUES ($1, $2, $2, -1, 0, 0, $3)
                       ON CONFLICT (device_id) DO UPDATE SET online = excluded.online";
            let online = i32::from(status.online);
            on_pool!(&self.db, p => sqlx::query(sql).bind(device_id).bind(now).bind(online).execute(p).await.map(|r| r.rows_affected()))?;
            return Ok(());
        }
        let json = serde_json::to_string(status).unwrap_or_default();
        let sql =
            "INSERT INTO devices (device_id, first_seen, last_seen, last_seq, batches, detections, online, status_json, status_at)
             VALUES ($1, $2, $2, -1, 0, 0, $3, $4, $2)
             ON CONFLICT (device_id) DO UPDATE SET online = excluded.online,
                status_json = CASE WHEN $5 = 1 AND devices.status_json IS NOT NULL THEN devices.status_json
                                   ELSE excluded.status_json END,
                stored_at_status = CASE WHEN $5 = 1 AND devices.status_json IS NOT NULL THEN devices.stored_at_status
                                        ELSE devices.batches - devices.seed_batches END,
                status_at = CASE WHEN $5 = 1 AND devices.status_at IS NOT NULL THEN devices.status_at
                                 ELSE excluded.status_at END";
        let (online, retained) = (i32::from(status.online), i32::from(retained));
        on_pool!(&self.db, p => sqlx::query(sql)
            .bind(device_id)
            .bind(now)
            .bind(online)
            .bind(&json)
            .bind(retained)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Records a heartbeat of `device_id` at `at_us` (µs since the Unix epoch): its last seen
    /// time, and its liveness unless it runs backhaul-edge (whose status and last will say), no
    /// row of its own (issue #20). The device is created if new.
    pub async fn heartbeat(&self, device_id: &str, at_us: i64) -> Result<(), StoreError> {
        let _writer = self.writer().await;
        let sql = "INSERT INTO devices (device_id, first_seen, last_seen, last_seq, batches, detections, heartbeat_at)
             VALUES ($1, $2, $2, -1, 0, 0, $2)
             ON CONFLICT (device_id) DO UPDATE SET
                heartbeat_at = CASE WHEN excluded.heartbeat_at > COALESCE(devices.heartbeat_at, 0)
                                    THEN excluded.heartbeat_at ELSE devices.heartbeat_at END,
                last_seen = CASE WHEN excluded.last_seen > devices.last_seen AND devices.status_json IS NULL
                                 THEN excluded.last_seen ELSE devices.last_seen END";
        on_pool!(&self.db, p => sqlx::query(sql).bind(device_id).bind(at_us).execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let sql = "SELECT name, value FROM counters";
        let rows: Vec<(String, i64)> = on_pool!(&self.db, p => sqlx::query_as(sql).fetch_all(p).await)?;
        let mut s = Stats { batches: 0, detections: 0, duplicates: 0, rejected: 0, dead_letters: 0, panics: 0 };
        for (name, value) in rows {
            match name.as_str() {
                "batches" => s.batches = value,
                "detections" => s.detections = value,
                "duplicates" => {
                    s.duplicates = value + self.unwritten_duplicates.load(std::sync::atomic::Ordering::Relaxed)
                }
                "rejected" => s.rejected = value + self.unwritten_rejected.load(std::sync::atomic::Ordering::Relaxed),
                "dead_letters" => s.dead_letters = value,
                "panics" => s.panics = value,
                _ => {}
            }
        }
        Ok(s)
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        // `online` is INTEGER (int4 on PostgreSQL): cast, so both backends decode an i64.
        let sql = "SELECT d.device_id, d.name, d.location, d.last_seen, CAST(d.online AS BIGINT), d.batches, d.detections,
                    d.last_seq, d.status_json,
                    (SELECT COALESCE(MAX(b.seq) + 1 - COUNT(DISTINCT b.seq), 0) FROM batches b WHERE b.device_id = d.device_id),
                    d.clock_unsynced_batches, d.status_at, d.stored_at_status, d.heartbeat_at, d.seed_batches
             FROM devices d ORDER BY d.device_id";
        let rows: Vec<DeviceColumns> = on_pool!(&self.db, p => sqlx::query_as(sql).fetch_all(p).await)?;
        Ok(rows.into_iter().map(device_row).collect())
    }
}

impl Store {
    /// The `seq` ranges missing below a device's highest stored `seq` (dropped at the edge, lost,
    /// or not arrived yet), lowest first, at most `limit`; counted from 0, as `gaps` in
    /// `GET /api/v1/devices` (an edge's seqs start at 0).
    pub async fn gaps(&self, device_id: &str, limit: i64) -> Result<Vec<SeqGap>, StoreError> {
        let sql = "SELECT MIN(seq) FROM batches WHERE device_id = $1";
        let first: Option<i64> = on_pool!(&self.db, p => sqlx::query_scalar(sql).bind(device_id).fetch_one(p).await)?;
        let mut gaps = Vec::new();
        if let Some(first) = first.filter(|f| *f > 0) {
            gaps.push(SeqGap { first: 0, last: first - 1 });
        }
        let sql = "SELECT seq, next FROM (SELECT seq, LEAD(seq) OVER (ORDER BY seq) AS next FROM batches WHERE device_id = $1) t
                   WHERE next - seq > 1 ORDER BY seq LIMIT $2";
        let rows: Vec<(i64, i64)> =
            on_pool!(&self.db, p => sqlx::query_as(sql).bind(device_id).bind(limit).fetch_all(p).await)?;
        for (seq, next) in rows {
            gaps.push(SeqGap { first: seq + 1, last: next - 1 });
        }
        gaps.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(gaps)
    }

    /// The newest dead letters (unusable messages kept for inspection), newest first, at most
    /// `limit`.
    pub async fn dead_letters(&self, limit: i64) -> Result<Vec<DeadLetterRow>, StoreError> {
        let sql = "SELECT received_at, via, topic, device_id, size, error FROM dead_letters
                   ORDER BY received_at DESC LIMIT $1";
        // received_at, via, topic, device_id, size, error
        type Columns = (i64, String, Option<String>, Option<String>, i64, String);
        let rows: Vec<Columns> = on_pool!(&self.db, p => sqlx::query_as(sql).bind(limit).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(received_at, via, topic, device_id, size, error)| DeadLetterRow {
                received_at: ts_string(received_at),
                via,
                topic,
                device_id,
                size,
                error,
            })
            .collect())
    }
}

/// Missing `seq` numbers `first..=last` of a device.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SeqGap {
    pub first: i64,
    pub last: i64,
}

/// A dead letter: where an unusable message came from, its size (bytes) and why it was refused.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeadLetterRow {
    pub received_at: String,
    pub via: String,
    pub topic: Option<String>,
    pub device_id: Option<String>,
    pub size: i64,
    pub error: String,
}

/// A stored batch found by [`Store::duplicate_of`]: whose it is, its `seq` and its detections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub device_id: String,
    pub seq: u64,
    pub detections: u64,
}

/// One of a device's batches (`GET /api/v1/devices/{device_id}/batches`): its idempotency key,
/// `seq`, when this cloud stored it (RFC 3339), its detections and the adapter (`http`, `mqtt`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BatchRow {
    pub batch_id: String,
    pub seq: i64,
    pub received_at: String,
    pub detections: i64,
    pub via: String,
}

/// Adds each `(counter, by)` of `changes` in one statement (one round trip, not one per counter).
/// Only where one transaction writes at a time (SQLite): on PostgreSQL concurrent transactions
/// would take the rows' locks in their physical order and deadlock (see [`Store::write_counts`]).
async fn bump_all(tx: &mut Tx, changes: &[(&str, i64)]) -> Result<(), sqlx::Error> {
    match changes {
        [] => return Ok(()),
        [(name, by)] => return bump(tx, name, *by).await,
        _ => {}
    }
    let whens: String = (0..changes.len()).map(|i| format!(" WHEN ${} THEN ${}", 2 * i + 1, 2 * i + 2)).collect();
    let names: Vec<String> = (0..changes.len()).map(|i| format!("${}", 2 * i + 1)).collect();
    let sql =
        format!("UPDATE counters SET value = value + CASE name{whens} ELSE 0 END WHERE name IN ({})", names.join(", "));
    // Only placeholders are spliced in; names and amounts are bound.
    on_tx!(tx, t => {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (name, by) in changes {
            q = q.bind(*name).bind(*by);
        }
        q.execute(&mut **t).await.map(|r| r.rows_affected())
    })?;
    Ok(())
}

async fn bump(tx: &mut Tx, counter: &str, by: i64) -> Result<(), sqlx::Error> {
    let sql = "UPDATE counters SET value = value + $1 WHERE name = $2";
    on_tx!(tx, t => sqlx::query(sql).bind(by).bind(counter).execute(&mut **t).await.map(|r| r.rows_affected()))?;
    Ok(())
}

/// The columns [`Store::devices`] selects, in order.
type DeviceColumns = (
    String,         // device_id
    Option<String>, // name
    Option<String>, // location
    i64,            // last_seen
    i64,            // online
    i64,            // batches
    i64,            // detections
    i64,            // last_seq
    Option<String>, // status_json
    i64,            // gaps
    i64,            // clock_unsynced_batches
    Option<i64>,    // status_at
    i64,            // stored_at_status
    Option<i64>,    // heartbeat_at
    i64,            // seed_batches
);

fn device_row(r: DeviceColumns) -> DeviceRow {
    let (
        device_id,
        name,
        location,
        last_seen,
        online,
        batches,
        detections,
        last_seq,
        status,
        gaps,
        clock_unsynced_batches,
        status_at,
        stored_at_status,
        heartbeat_at,
        seed_batches,
    ) = r;
    // A backhaul-edge says whether it is online (its status, its last will); a seed fleet client
    // by its heartbeats; anything else (an HTTP agent, a gateway) cannot tell.
    let (online, liveness) = match (&status, heartbeat_at) {
        (Some(_), _) => (online != 0, "status"),
        (None, Some(at)) => {
            (Timestamp::now().unix_micros().saturating_sub(at) <= HEARTBEAT_TIMEOUT.as_micros() as i64, "heartbeat")
        }
        (None, None) => (false, "none"),
    };
    let reported_at = status_at.map(ts_string).unwrap_or_default();
    let parsed: Option<DeviceStatus> = status.as_deref().and_then(|s| serde_json::from_str(s).ok());
    // After a clean stop (its last full status says offline) nothing more comes: compare with
    // everything stored, so the batches stored after that status was recorded (acked by the
    // broker, `ack = "broker"`) count.
    let stored = match &parsed {
        Some(st) if !st.online => batches - seed_batches,
        _ => stored_at_status,
    };
    let ledger = parsed.as_ref().and_then(|st| ledger_of(st, stored, reported_at));
    let backlog = parsed.as_ref().filter(|st| st.queue_depth.is_some()).map(|st| Backlog {
        batches: st.queue_depth.unwrap_or(0),
        oldest_age_s: st.oldest_pending_age_s,
        drain_rate: st.drain_rate,
        eta_s: st.eta_s,
    });
    DeviceRow {
        ledger,
        backlog,
        device_id,
        name,
        location,
        last_seen: ts_string(last_seen),
        online,
        liveness: liveness.into(),
        batches,
        detections,
        last_seq,
        status: status.and_then(|s| serde_json::from_str(&s).ok()),
        gaps,
        clock_unsynced_batches,
    }
}

#[cfg(test)]
impl Store {
    /// The SQLite pool, for tests that look at the rows.
    fn sqlite(&self) -> &sqlx::SqlitePool {
        match &self.db {
            Db::Sqlite(p) => p,
            Db::Postgres(_) => panic!("not SQLite"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Executor;

    /// A connection pool of one to a new SQLite database at `url`, without the store's migrations.
    async fn raw_sqlite(url: &str) -> sqlx::SqlitePool {
        use std::str::FromStr;
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).unwrap().create_if_missing(true);
        sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap()
    }

    #[test]
    fn values_list_renumbers_each_rows_placeholders() {
        assert_eq!(values_list("($1, $2, 1, $2)", 2, 1), "($1, $2, 1, $2)");
        assert_eq!(values_list("($1, $2, 1, $2)", 2, 3), "($1, $2, 1, $2), ($3, $4, 1, $4), ($5, $6, 1, $6)");
        let ten = values_list("($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", 10, 12);
        assert!(ten.ends_with("($111, $112, $113, $114, $115, $116, $117, $118, $119, $120)"), "{ten}");
        assert_eq!(values_list("($1)", 1, 0), "");
    }

    /// Issue #14: outside systemd (umask 022) the database was world-readable.
    #[tokio::test]
    async fn a_new_database_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ingest.db");
        let store = Store::connect(&format!("sqlite:{}", path.display())).await.unwrap();
        drop(store);
        for file in [path.clone(), dir.path().join("ingest.db-wal")] {
            if let Ok(meta) = std::fs::metadata(&file) {
                assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", file.display());
            }
        }
        assert!(path.exists());
    }

    /// Issue #15: the ack path stores the batch with its payload and no detection rows; what was
    /// acked is readable at once from the batches; `reprocess` re-derives their index without
    /// duplicates.
    #[tokio::test]
    async fn acked_batches_are_read_from_their_payloads_and_reprocessed_without_duplicates() {
        use backhaul_shared::{Detection, Presence, Zone};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite:{}", dir.path().join("ingest.db").display())).await.unwrap();
        for seq in 0..3u64 {
            let b = Batch {
                schema: 1,
                batch_id: backhaul_shared::BatchId::new(),
                device_id: "pi".into(),
                seq,
                name: None,
                location: None,
                timestamp: Timestamp::now(),
                detections: (0..4)
                    .map(|i| {
                        Detection::Presence(Presence {
                            device_hash: format!("{:016x}", seq * 10 + i),
                            rssi: -60,
                            zone: Zone::Near,
                            timestamp: Timestamp::now(),
                        })
                    })
                    .collect(),
                clock: Default::default(),
            };
            let raw = b.to_json();
            assert_eq!(store.store_batch(&b, &raw, "h", "test", Lookup::First).await.unwrap(), Outcome::Stored);
        }
        let count = |sql: &'static str| {
            let pool = store.sqlite().clone();
            async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
        };
        assert_eq!(count("SELECT COUNT(*) FROM detections").await, 0, "no detection rows on the ack path");
        let q =
            DetectionQuery { device_id: Some("pi".into()), since_us: None, until_us: None, limit: 100, after: None };
        let keys = |rows: Vec<DetectionRow>| {
            let mut k: Vec<_> = rows.into_iter().map(|r| r.cursor).collect();
            k.sort();
            k
        };
        let first = keys(store.detections(&q).await.unwrap());
        assert_eq!(first.len(), 12, "acked is readable at once");
        let done = store.reprocess(None, None).await.unwrap();
        assert_eq!(done, Reprocessed { reindexed: 3, undecodable: 0, skipped: 0 });
        assert_eq!(keys(store.detections(&q).await.unwrap()), first, "the same rows, none twice");
        assert_eq!(count("SELECT COUNT(*) FROM detections").await, 0);
        assert_eq!(store.reprocess(None, Some("other")).await.unwrap().reindexed, 0);
        assert_eq!(store.reprocess(Some(i64::MAX), None).await.unwrap().reindexed, 0);
    }

    /// A database of schema 4 (the projection wrote detection rows for batches with a payload) is
    /// migrated: the derived rows go, reads serve each detection once, from the payload or, for a
    /// batch stored before schema 4, from its rows.
    #[tokio::test]
    async fn a_database_of_schema_4_keeps_every_detection_once() {
        use backhaul_shared::{Detection, Presence};
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("ingest.db").display());
        let t = |us: i64| Timestamp::from_unix_micros(1_795_996_800_000_000 + us).unwrap();
        let batch = Batch {
            schema: 1,
            batch_id: backhaul_shared::BatchId::new(),
            device_id: "pi".into(),
            seq: 1,
            name: None,
            location: None,
            timestamp: t(0),
            detections: [10, 30]
                .iter()
                .map(|&us| {
                    Detection::Presence(Presence {
                        device_hash: "00000000000000ab".into(),
                        rssi: -60,
                        zone: Zone::Near,
                        timestamp: t(us),
                    })
                })
                .collect(),
            clock: Default::default(),
        };
        let id = batch.batch_id.to_string();
        let old = backhaul_shared::BatchId::new().to_string();
        {
            let pool = raw_sqlite(&url).await;
            pool.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)").await.unwrap();
            for (i, statements) in MIGRATIONS[..4].iter().enumerate() {
                for sql in *statements {
                    pool.execute(sqlx::AssertSqlSafe(sql.replace("{blob}", "BLOB"))).await.unwrap();
                }
                sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                    .bind(i as i64 + 1)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            pool.execute(
                "INSERT INTO devices (device_id, first_seen, last_seen, last_seq, batches, detections)
                 VALUES ('pi', 0, 0, 1, 2, 4)",
            )
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO batches (batch_id, device_id, seq, payload_sha256, received_at, detections, via,
                                      payload, projected, first_ts, last_ts)
                 VALUES ($1, 'pi', 1, 'h', 1, 2, 'http', $2, 1, $3, $4)",
            )
            .bind(id.clone())
            .bind(lz4_flex::compress_prepend_size(&batch.to_json()))
            .bind(t(10).unix_micros())
            .bind(t(30).unix_micros())
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO batches (batch_id, device_id, seq, payload_sha256, received_at, detections, via)
                 VALUES ($1, 'pi', 0, 'h', 0, 2, 'http')",
            )
            .bind(old.clone())
            .execute(&pool)
            .await
            .unwrap();
            // The projection's rows of the new batch, and the only copy of the old one's.
            for (batch_id, idx, us) in [(&id, 0, 10), (&id, 1, 30), (&old, 0, 20), (&old, 1, 40)] {
                sqlx::query(
                    "INSERT INTO detections (batch_id, idx, device_id, ts, kind, rssi, device_hash, zone)
                     VALUES ($1, $2, 'pi', $3, 'presence', -60, '00000000000000ab', 'near')",
                )
                .bind(batch_id.clone())
                .bind(idx)
                .bind(t(us).unix_micros())
                .execute(&pool)
                .await
                .unwrap();
            }
            pool.close().await;
        }
        let store = Store::connect(&url).await.unwrap();
        let q = DetectionQuery { device_id: Some("pi".into()), limit: 100, ..Default::default() };
        let rows: Vec<_> = store.detections(&q).await.unwrap().into_iter().map(|r| (r.timestamp, r.batch_id)).collect();
        let want: Vec<_> = [(40, &old), (30, &id), (20, &old), (10, &id)]
            .iter()
            .map(|(us, b)| (t(*us).to_string(), (*b).clone()))
            .collect();
        assert_eq!(rows, want);
        let span: i64 = sqlx::query_scalar("SELECT max_span_us FROM devices WHERE device_id = 'pi'")
            .fetch_one(store.sqlite())
            .await
            .unwrap();
        assert_eq!(span, 20);
    }

    /// A database made by a build before migration 2 (issue #13) opens, is migrated, and counts
    /// unsynced batches from then on; its rows are kept.
    #[tokio::test]
    async fn a_database_of_schema_1_is_migrated_and_counts_unsynced_batches() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("ingest.db").display());
        {
            let pool = raw_sqlite(&url).await;
            pool.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)").await.unwrap();
            for sql in MIGRATIONS[0] {
                pool.execute(*sql).await.unwrap();
            }
            pool.execute("INSERT INTO schema_version (version) VALUES (1)").await.unwrap();
            pool.execute(
                "INSERT INTO devices (device_id, first_seen, last_seen, last_seq, batches, detections)
                 VALUES ('old-pi', 0, 0, 4, 5, 50)",
            )
            .await
            .unwrap();
            pool.close().await;
        }
        let store = Store::connect(&url).await.unwrap();
        let batch = |device: &str, seq: u64, clock| Batch {
            schema: 1,
            batch_id: backhaul_shared::BatchId::new(),
            device_id: device.into(),
            seq,
            name: None,
            location: None,
            timestamp: Timestamp::now(),
            detections: Vec::new(),
            clock,
        };
        for (seq, clock) in [(5, backhaul_shared::Clock::Unsynced), (6, backhaul_shared::Clock::Synced)] {
            let b = batch("old-pi", seq, clock);
            assert_eq!(
                store.store_batch(&b, &b.to_json(), &b.batch_id.to_string(), "test", Lookup::First).await.unwrap(),
                Outcome::Stored
            );
        }
        let b = batch("new-pi", 0, backhaul_shared::Clock::Unsynced);
        store.store_batch(&b, &b.to_json(), "h", "test", Lookup::First).await.unwrap();
        let devices = store.devices().await.unwrap();
        let row = |id: &str| devices.iter().find(|d| d.device_id == id).unwrap().clone();
        assert_eq!((row("old-pi").batches, row("old-pi").clock_unsynced_batches), (7, 1));
        assert_eq!((row("new-pi").batches, row("new-pi").clock_unsynced_batches), (1, 1));
    }
}
