//! The storage backends (issue #15): what differs between SQLite and PostgreSQL is behind
//! [`Backend`], one implementation each in `sqlite.rs` and `postgres.rs` (opening the pool, the
//! write transaction, the lock replicas take to migrate, which errors are a lost race). The SQL
//! the two share is portable and written once in `store`; [`on_pool!`] and [`on_tx!`] run it on
//! the backend's own sqlx driver (`SqlitePool`, `PgPool`), with no `Any` layer converting every
//! argument and row on the hot path. Rows are decoded into tuples of plain Rust types, so what
//! reads them does not depend on the backend.

use sqlx::{PgPool, Pool, Postgres, Sqlite, SqlitePool, Transaction};

use super::StoreError;

/// One storage backend: a sqlx database with the behaviour that differs between them.
pub(super) trait Backend: sqlx::Database {
    /// The column type of compressed payloads, spliced into migrations as `{blob}`.
    const BLOB: &'static str;

    /// Opens the pool for `url` (`sqlite:PATH` or `postgres://...`), tuned for this backend.
    ///
    /// Errors: the database's ([`StoreError::Db`]), e.g. unreachable, refused credentials, a
    /// file that cannot be created.
    async fn open(url: &str) -> Result<Pool<Self>, StoreError>;

    /// A transaction that writes. It holds the database's write lock from its first statement
    /// where the backend has one (SQLite), so a read followed by a write cannot fail on a writer
    /// that came in between.
    async fn begin_write(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error>;

    /// A transaction that may migrate the schema: it holds a lock every process on the database
    /// takes before reading `schema_version`, so replicas started together migrate one at a time
    /// (the others then find the schema current).
    async fn begin_migration(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error>;

    /// Whether `e` is a write that lost to a concurrent one and is right to retry: the batch_id
    /// was committed meanwhile (a unique violation), or the database aborted the transaction to
    /// break a deadlock or a serialization failure.
    fn lost_a_race(e: &sqlx::Error) -> bool;
}

/// The pool of the backend a `database` URL names.
/// Each variant holds its backend's own sqlx pool.
#[derive(Debug, Clone)]
pub(super) enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A write transaction on [`Db`]'s backend.
pub(super) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// Runs `$body` with `$p` bound to the backend's native pool (`&SqlitePool` or `&PgPool`): the
/// body is compiled once per backend. Its value must have the same type for both: rows are
/// decoded into tuples inside it, and a statement ends `.map(|r| r.rows_affected())` (each
/// driver has its own result type).
macro_rules! on_pool {
    ($db:expr, $p:ident => $body:expr) => {
        match $db {
            $crate::store::backend::Db::Sqlite($p) => $body,
            $crate::store::backend::Db::Postgres($p) => $body,
        }
    };
}

/// [`on_pool!`] for a [`Tx`]: `$t` is `&mut Transaction<'static, _>` of the backend.
macro_rules! on_tx {
    ($tx:expr, $t:ident => $body:expr) => {
        match $tx {
            $crate::store::backend::Tx::Sqlite($t) => $body,
            $crate::store::backend::Tx::Postgres($t) => $body,
        }
    };
}

pub(super) use {on_pool, on_tx};

impl Db {
    /// Opens the backend `url` names: `sqlite:` is SQLite, anything else PostgreSQL.
    pub(super) async fn open(url: &str) -> Result<Self, StoreError> {
        Ok(if url.starts_with("sqlite:") {
            Db::Sqlite(<Sqlite as Backend>::open(url).await?)
        } else {
            Db::Postgres(<Postgres as Backend>::open(url).await?)
        })
    }

    /// Whether only one transaction writes at a time (SQLite): writes then queue in the store,
    /// and new batches are group-committed.
    pub(super) fn single_writer(&self) -> bool {
        matches!(self, Db::Sqlite(_))
    }

    /// [`Backend::BLOB`] of this backend.
    pub(super) fn blob(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => Sqlite::BLOB,
            Db::Postgres(_) => Postgres::BLOB,
        }
    }

    /// A plain transaction, for one whose first statement writes (so on SQLite it takes the write
    /// lock at once, as [`Backend::begin_write`] makes sure of otherwise).
    pub(super) async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Sqlite(p) => Tx::Sqlite(p.begin().await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    /// [`Backend::begin_write`] of this backend.
    pub(super) async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Sqlite(p) => Tx::Sqlite(Sqlite::begin_write(p).await?),
            Db::Postgres(p) => Tx::Postgres(Postgres::begin_write(p).await?),
        })
    }

    /// [`Backend::begin_migration`] of this backend.
    pub(super) async fn begin_migration(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Sqlite(p) => Tx::Sqlite(Sqlite::begin_migration(p).await?),
            Db::Postgres(p) => Tx::Postgres(Postgres::begin_migration(p).await?),
        })
    }

    /// [`Backend::lost_a_race`] of this backend.
    pub(super) fn lost_a_race(&self, e: &sqlx::Error) -> bool {
        match self {
            Db::Sqlite(_) => Sqlite::lost_a_race(e),
            Db::Postgres(_) => Postgres::lost_a_race(e),
        }
    }
}

impl Tx {
    /// Commits; on error the transaction is rolled back (sqlx does it when it is dropped).
    pub(super) async fn commit(self) -> Result<(), sqlx::Error> {
        on_tx!(self, t => t.commit().await)
    }
}
