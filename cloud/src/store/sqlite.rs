//! SQLite, the embedded default: sqlx's native SQLite driver, WAL, `synchronous=FULL` (a batch
//! acked is on disk, SQLite "Write-Ahead Logging" and "PRAGMA synchronous"). One writer at a time:
//! the store queues its writes and group-commits new batches.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite, Transaction};

use super::backend::Backend;
use super::StoreError;

/// Connections in the pool: the writer and readers (WAL lets them read while it writes).
const CONNECTIONS: u32 = 4;
/// Opens of the pool that found the database locked before the error is the caller's (see
/// [`Backend::open`]).
const OPEN_ATTEMPTS: u32 = 20;
/// How long a statement waits for another process's write lock (e.g. `reprocess`), then fails
/// with SQLITE_BUSY: the ingest answers 503 and the sender retries.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

impl Backend for Sqlite {
    const BLOB: &'static str = "BLOB";

    async fn open(url: &str) -> Result<Pool<Self>, StoreError> {
        create_private(url)?;
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // SQLite's temp files in memory: statement journals (a multi-row insert in a
            // transaction keeps one, to undo just that statement; it spilled to a file past
            // 64 KiB), sorts and temporary indexes. No effect on what survives a crash (the WAL
            // does that). What it holds stays small here: the sorts are over the batches table
            // (one short key per batch) or top-N under a LIMIT. A new query or migration that
            // sorts the detection projection without an index would sort it in RAM: index it.
            // Measured side by side, both with the hand-read detections: +6-10% at 50 per batch
            // over HTTP (`bench scenario cloud-http DIR 1000000 50 sqlite 1`), cloud CPU -7%.
            .pragma("temp_store", "memory");
        // Processes opening a new database at the same moment (replicas, or `serve` and
        // `reprocess`) race on switching it to WAL, and SQLite answers that race with "database is
        // locked" at once, without waiting (the busy timeout does not cover it; exqlite issue #138
        // reproduces it with the sqlite3 shell). The loser tries again: the database is in WAL by then.
        let mut attempt = 1;
        loop {
            let pool = SqlitePoolOptions::new()
                .max_connections(CONNECTIONS)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.clone())
                .await;
            match pool {
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("5") && attempt < OPEN_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return Ok(other?),
            }
        }
    }

    /// A transaction whose first statement writes (a no-op `UPDATE` of a counter), so it takes the
    /// write lock at once, waiting up to [`BUSY_TIMEOUT`]: the effect of `BEGIN IMMEDIATE`. A
    /// deferred transaction that reads first and writes later would instead fail at once
    /// (SQLITE_BUSY_SNAPSHOT) when another connection wrote in between, e.g. a `reprocess` in
    /// another process (found by trying it: 40% of posts answered 503 while `reprocess` ran).
    ///
    /// Not `begin_with("BEGIN IMMEDIATE")`: on a full disk SQLite rolls the transaction back by
    /// itself (SQLITE_FULL), sqlx-sqlite 0.9 still counts it open (the depth is not decremented;
    /// sqlx issue #3742 is the same on PostgreSQL), and from then on refuses a custom `BEGIN` on
    /// that connection (`InvalidSavePointStatement`): the cloud answered 503 after space returned
    /// (`tests/tests/cloud_http.rs`, `storage_down_answers_503_and_recovers`). A plain `begin()`
    /// there becomes a `SAVEPOINT`, which SQLite runs as a new transaction.
    async fn begin_write(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("UPDATE counters SET value = value WHERE name = 'batches'").execute(&mut *tx).await?;
        Ok(tx)
    }

    /// `BEGIN IMMEDIATE`: the write lock is the migration lock, taken before `schema_version` is
    /// read; a second process waits for it, then reads the version the first wrote. Safe here from
    /// the connection state [`Self::begin_write`] avoids: a failed migration fails
    /// `Store::connect`, which drops the pool.
    async fn begin_migration(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error> {
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// One writer at a time: a write never races another inside a transaction.
    fn lost_a_race(_: &sqlx::Error) -> bool {
        false
    }
}

/// Creates a new SQLite database file as 0600 whatever the umask (SQLite gives its `-wal` and
/// `-shm` files the database's mode): it holds every device's detections. An existing file is left
/// as it is; `:memory:` has no file.
fn create_private(url: &str) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Db(sqlx::Error::Io(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a batch's ack rests on: every connection of the pool writes through a WAL with
    /// `synchronous=FULL` (2); statement journals stay in memory (`temp_store=MEMORY`, 2).
    #[tokio::test]
    async fn every_connection_is_wal_with_full_sync_and_memory_temp_store() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("t.db").display());
        let pool = <Sqlite as Backend>::open(&url).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..CONNECTIONS {
            let mut c = pool.acquire().await.unwrap();
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut *c).await.unwrap();
            let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut *c).await.unwrap();
            let temp: i64 = sqlx::query_scalar("PRAGMA temp_store").fetch_one(&mut *c).await.unwrap();
            assert_eq!((mode.as_str(), sync, temp), ("wal", 2, 2));
            held.push(c);
        }
    }
}
