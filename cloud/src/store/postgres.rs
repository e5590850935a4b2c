//! PostgreSQL, for replicas (several `backhaul-cloud serve` on one database): sqlx's native
//! PostgreSQL driver. Writers run concurrently; two replicas storing the same batch_id race on the
//! primary key and the loser answers `duplicate` (see `Store::store_batch`).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Pool, Postgres, Transaction};

use super::backend::Backend;
use super::StoreError;

/// Connections per replica: PostgreSQL's default `max_connections` (100) holds six replicas.
const CONNECTIONS: u32 = 16;

/// The advisory lock (PostgreSQL "Advisory Locks", `pg_advisory_xact_lock`) taken by a process
/// that may migrate: "backhaul" in ASCII, so it does not collide with another application's.
const MIGRATION_LOCK: i64 = 0x6261_636b_6861_756c;

impl Backend for Postgres {
    const BLOB: &'static str = "BYTEA";

    async fn open(url: &str) -> Result<Pool<Self>, StoreError> {
        // The server's NOTICEs (e.g. `relation "schema_version" already exists, skipping` at every
        // start) would be logged at INFO and look like a fault: only warnings and errors.
        let options = PgConnectOptions::from_str(url)?.options([("client_min_messages", "warning")]);
        Ok(PgPoolOptions::new()
            .max_connections(CONNECTIONS)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?)
    }

    async fn begin_write(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error> {
        pool.begin().await
    }

    /// Takes [`MIGRATION_LOCK`] for the transaction: released at its commit or rollback, or when
    /// the process dies (its connection closes), so a replica killed mid-migration blocks nobody.
    async fn begin_migration(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
        Ok(tx)
    }

    /// SQLSTATE 23505 (unique violation: the batch_id was committed meanwhile), 40P01 (deadlock
    /// victim), 40001 (serialization failure); PostgreSQL "Appendix A. Error Codes".
    fn lost_a_race(e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Database(d) => {
                d.is_unique_violation() || matches!(d.code().as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }
}
