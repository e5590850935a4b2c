//! The durable batch queue: every decoded batch is written here, durably, before anything else
//! happens, and leaves only when the cloud (or broker) acknowledged it.
//!
//! # Storage
//! One sled 0.34.7 database in `data_dir/queue/`, one tree, with logical trees as key prefixes
//! (see [`layout`]). A record (one batch) is stored as chunks of at most 4 KiB under its key +
//! a chunk index ([`chunks`] says why: sled's memory grows with value size, not `cache_capacity`).
//!
//! | key | value | meaning |
//! | --- | --- | --- |
//! | `p` + seq (BE) + chunk | framed [`layout::StoredBatch`], in pieces | a batch: pending (waiting, or in flight), or acked if it has a marker |
//! | `a` + seq (BE) | acked_at_ms (u64 BE) | ack marker: the batch `p` + seq is acked, retained `retain_acked` for replay |
//! | `q` + original key | the pieces as found | quarantined: failed its checksum |
//! | `d` + seq (BE) + chunk | the same record | dead-lettered: refused by the cloud for good |
//! | `r` + seq (BE) | UTF-8 text | why that dead letter was refused |
//! | `mcounters` | framed [`Counters`] | counts as of the last metadata write (see below), and the ack floor |
//! | `msource_position` | opaque bytes | the newest source position as of that write |
//!
//! Every record goes through the shared CRC framing (`backhaul_shared::record`): the CRC covers
//! the whole record, so a missing, extra or damaged chunk is detected. The record carries the
//! batch's wire JSON (head plain, detections LZ4-compressed), its batch_id, seq, enqueue time,
//! detection count and the source position after it.
//!
//! Layout 1 (before issue #17) moved an acked batch to `h` + acked_at + seq: every batch was
//! written twice. Layout 2 writes a 17-byte marker instead and leaves the record where it was
//! written. A queue in layout 1 is migrated at open, in atomic steps of
//! [`MIGRATE_STEP`](retain::MIGRATE_STEP) records with the counters (an interrupted migration goes
//! on at the next open). An older build opening a layout 2 queue sees the retained batches as
//! pending and sends them again: the cloud absorbs them as duplicates.
//!
//! # States
//! pending → in flight (handed out by [`Queue::next_batch`]) → acked ([`Queue::ack`]), or back to
//! pending ([`Queue::nack`]). "In flight" lives only in memory: after a restart everything that was
//! in flight is pending again, and is sent again (the cloud absorbs the duplicate by `batch_id`).
//! Every batch below the ack floor ([`Counters::ack_floor`]) is acked: after a restart the pending
//! scan starts there, not at the oldest retained batch.
//!
//! # Writes, and why the counters can be trusted
//! - An enqueue writes only its record's chunks, with plain inserts (sled's atomic `apply_batch`
//!   costs two extra log-buffer writes, each waited for). Batch and source position are one record,
//!   so they are never separated by a crash.
//! - Every other change (acks, drops, pruning, quarantine, replay) goes through `write_meta`: one
//!   atomic `apply_batch` of the change, the counters and the newest source position.
//! - So the counters on disk describe every record with a seq below their `next_seq`; at open the
//!   records from `next_seq` on are counted in (a range scan; the counters are rewritten every 1024
//!   enqueues to keep it short). The newest such record can be torn (chunks missing) only if its
//!   enqueue was cut by a crash before it returned: it is discarded and its seq reused.
//! - Acks are kept in memory and written in groups of 64 (and at flush, prune, close): a lost ack
//!   only means a resend, which the cloud deduplicates.
//!
//! # Invariants
//! - A batch is deleted from pending only after its ack, or under `on_full = "drop_oldest"` by the
//!   byte budget (which counts every dropped batch and detection: the cloud sees a `seq` gap), or
//!   moved to quarantine when it fails its check. (The torn record of an enqueue that never
//!   returned is discarded at open.)
//! - Only durable batches are handed out: a batch a crash could still take back is never sent.
//! - [`Queue::enqueue`] returns only once the batch is durable: after sled's `flush` (which on Linux
//!   ends in `sync_file_range`, enough for a process kill but not for a power cut, sled #1452) we
//!   `fdatasync` sled's log file ourselves and `fsync` any new blob file (sled 0.34 writes large log
//!   messages to `blobs/` and never syncs them) and the blob directory (checked with strace: one
//!   `fdatasync` of `queue/db` after sled's `sync_file_range` for every sync). [`Durability::Flush`]
//!   skips the extra syncs for tests and benchmarks that only need to survive a kill.
//! - Group commit: concurrent enqueues apply their writes in memory under the state lock, then meet
//!   at the sync lock; the first to get it syncs everything applied so far, and the others find
//!   their write already durable. [`Queue::enqueue_many`] puts several batches under one sync.
//! - seqs are assigned in write order under the state lock, so a crash leaves no hole in `seq`.
//! - A record that fails its check on read is moved to quarantine, counted and logged with its key;
//!   the queue goes on. A database sled cannot open (its `Corruption` error, or a panic while
//!   opening) is moved aside to `data_dir/corrupt-<time>/` and a fresh queue is started, loudly: an
//!   unattended device must come back up.
//! - A full disk (ENOSPC) makes `enqueue` wait like `on_full = "block"`; sled refuses all work after
//!   one failed write, so the database is closed and reopened (it sits behind an RwLock) until space
//!   returns. A write applied before a reopen is not taken as durable: its enqueue retries (and
//!   finds its batch if it did reach the disk). Lock order: `sync`, then `store`, then `state`.
//!   Known limit: an enqueue blocked by `on_full = "block"` holds the store's read lock, so a
//!   reopen waits for it (up to `block_timeout`).
//! - One process per `data_dir`: an advisory lock on `data_dir/lock`.
//! - sled's recovery stops at the first damaged log entry and drops everything after it without
//!   an error. `data_dir/queue.watermark` ([`layout::Watermark`], outside sled, rewritten after
//!   every sync) says what was durable; a sled that comes back with less is noticed at open: the
//!   missing batches are counted (`lost_batches`), their seqs are not reused (the cloud shows the
//!   gaps) and a resumable source goes on after them.
//!
//! # Byte budget
//! `max_bytes` bounds what `data_dir` occupies on disk (allocated blocks, as `du` counts them;
//! databases set aside as `corrupt-*` are not counted), sled's own overhead included
//! ([`Budget::Disk`], issue #17). sled's files are about twice the logical bytes of the records in
//! them (measured: 1.8-2.1x; its log keeps old page versions until segments are cleaned), so the
//! queue keeps a *logical limit* on the bytes of keys and records (compressed) of pending,
//! retained acked and dead-lettered batches, and steers it by measuring the disk: it starts at
//! 45% of `max_bytes`; while the disk is over 95% of `max_bytes` *and growing* it shrinks in
//! proportion to 85% of it (sled reuses freed space before it grows its file, but returns it only
//! when the file's last segments are free, so a disk that is over and not growing is left alone
//! rather than pruned again and again); while the disk is under 80% of `max_bytes` it grows into
//! the room (to 85%) at the measured ratio. It stays within a third and all of `max_bytes`: sled's garbage
//! is not proportional to what it holds, and a budget that shrank without a floor would drop
//! pending batches for it. Measured every
//! [`BUDGET_MEASURE_EVERY`] or every 1/64 of `max_bytes` enqueued, whichever comes first.
//!
//! When a new batch does not fit the logical limit, retained acked batches are pruned first
//! (oldest first: they are delivered), then dead letters, then `drop_oldest` drops the oldest
//! pending batches that are neither in flight nor acked, while `block` makes `enqueue` wait for
//! acks to free space, up to `block_timeout`, then fail with [`EnqueueError::Full`].
//!
//! # Walk-through
//! - write: `enqueue` → serialize the wire JSON and compress it (outside the lock) → lock state →
//!   make room → seq = next_seq → insert the record's chunks → unlock → group sync.
//! - read: `next_batch` → the oldest retried (nacked or requeued) batch, else the first record
//!   after the cursor → check (quarantine on failure) → mark in flight.
//! - ack: in memory at once; written as a marker `a`+seq → now with the next metadata write (or,
//!   with `retain_acked = 0`, as the record's removal), which then moves the ack floor.
//! - prune: walk the markers oldest seq first; remove marker and record together.
//! - recover: open → counters from `mcounters` plus the records past them (all records are counted
//!   if the counters are missing or damaged) → migrate layout 1 → nothing in flight, cursor at the
//!   ack floor → prune acked batches older than `retain_acked`.

mod chunks;
mod inspect;
pub(crate) mod layout;
mod ledger;
mod read;
mod recover;
mod retain;
mod write;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime};

use backhaul_shared::{BatchId, Clock, Detection, Timestamp};
use serde::Serialize;
use thiserror::Error;

pub use inspect::allocated_bytes;
pub use layout::Counters;
use ledger::write_meta;

/// When `enqueue` may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// sled's flush, then fdatasync of its log and fsync of new blob files: survives power loss.
    #[default]
    Fsync,
    /// sled's flush only (`sync_file_range`): survives a process kill, maybe not a power cut.
    Flush,
}

/// What `enqueue` does when the byte budget is exhausted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Drop the oldest pending batches (counted; a `seq` gap in the cloud).
    #[default]
    DropOldest,
    /// Wait for space, up to `block_timeout`.
    Block,
}

/// What `max_bytes` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Budget {
    /// What `data_dir` occupies on disk, steered toward it by measurement (see the module docs,
    /// "Byte budget"; the README's "Queue layout 2" says how close it stays).
    #[default]
    Disk,
    /// The logical bytes of keys and records only: exact, for tests and benchmarks that count
    /// records. sled's files are then about twice that.
    Logical,
}

/// Queue settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Budget, in bytes: of `data_dir` on disk, or of the records (see [`Budget`]).
    pub max_bytes: u64,
    pub budget: Budget,
    pub on_full: OnFull,
    /// Longest `enqueue` waits for space under `OnFull::Block`.
    pub block_timeout: Duration,
    /// How long acked batches are kept for replay; zero keeps none.
    pub retain_acked: Duration,
    /// sled's page cache. Small: a Pi has little memory.
    pub cache_capacity: u64,
    pub durability: Durability,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_bytes: 512 << 20,
            budget: Budget::Disk,
            on_full: OnFull::DropOldest,
            block_timeout: Duration::from_secs(30),
            retain_acked: Duration::from_secs(24 * 3600),
            cache_capacity: 4 << 20,
            durability: Durability::Fsync,
        }
    }
}

/// A batch to enqueue; the queue gives it its `batch_id` and `seq`.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub device_id: String,
    pub name: Option<String>,
    pub location: Option<String>,
    /// When the batch was cut.
    pub timestamp: Timestamp,
    pub detections: Vec<Detection>,
    /// Where a resumable source stands after this batch; stored in the same atomic write.
    pub source_position: Option<Vec<u8>>,
    /// The idempotency key, if the caller made it; `None`: the queue makes one. A caller that
    /// retries an enqueue that failed (a full disk) must pass the same key, so that an attempt
    /// that did reach the disk is found instead of stored twice.
    pub batch_id: Option<BatchId>,
    /// Whether its times came from a trusted wall clock (see `crate::clock`); written to the wire
    /// JSON only when unsynced.
    pub clock: Clock,
}

/// A batch handed out for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedBatch {
    pub seq: u64,
    pub batch_id: BatchId,
    pub detections: u32,
    /// When it was enqueued, ms since the epoch.
    pub enqueued_at_ms: u64,
    /// The wire JSON, byte-identical on every send.
    pub payload: Vec<u8>,
}

/// Receipt of a durable enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub seq: u64,
    pub batch_id: BatchId,
    /// Batches dropped to make room for this one (`drop_oldest`).
    pub dropped: u64,
}

/// A snapshot of the queue's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Stats {
    /// Waiting to be handed out (not in flight).
    pub pending: u64,
    pub in_flight: u64,
    pub acked_retained: u64,
    /// Bytes of pending, retained and dead-lettered records (logical: keys and compressed values).
    pub bytes: u64,
    /// What `bytes` may reach now: the logical limit the disk budget steers (see "Byte budget";
    /// `max_bytes` itself with [`Budget::Logical`]).
    pub budget_bytes: u64,
    pub pending_bytes: u64,
    pub acked_bytes: u64,
    /// Age of the oldest batch not yet acknowledged (pending or in flight); `None` when there is
    /// none (or the database is closed after a disk error).
    pub oldest_pending_age_s: Option<u64>,
    pub produced_batches: u64,
    pub produced_detections: u64,
    pub dropped_batches: u64,
    pub dropped_detections: u64,
    pub quarantined: u64,
    pub acked_total: u64,
    /// Batches the cloud refused for good, kept for inspection (`queue export`), and ever.
    pub dead_letters: u64,
    pub dead_lettered_total: u64,
    /// Batches sled lost in damaged files, found at a start (see `layout::Watermark`).
    pub lost_batches: u64,
    pub next_seq: u64,
    /// Disk syncs since the queue was opened (with group commit, fewer than enqueues).
    pub syncs_since_open: u64,
}

#[derive(Debug, Error)]
pub enum QueueOpenError {
    #[error("another process holds the queue lock on data_dir {}: is another backhaul-edge running on this data_dir? Stop it (systemctl stop backhaul-edge) or use `backhaul-edge status`", data_dir.display())]
    Locked { data_dir: PathBuf },
    #[error("cannot use data_dir {}: {source} (check that it exists or can be created, and that this user may write to it)", data_dir.display())]
    DataDir { data_dir: PathBuf, source: io::Error },
    #[error("cannot open the queue database in {}: {source}", path.display())]
    Storage { path: PathBuf, source: sled::Error },
    #[error("pruning old acked batches in {} at start: {source}", path.display())]
    Prune { path: PathBuf, source: QueueError },
    #[error("recording the batches sled lost in {} at start: {source}", path.display())]
    RecordLoss { path: PathBuf, source: QueueError },
}

#[derive(Debug, Error)]
pub enum EnqueueError {
    #[error("the queue is full ({used} of the {max_bytes} bytes of batches that fit queue.max_bytes on disk) and on_full = \"block\": waited {waited:?} for the forwarder to free space; is the link down? raise queue.max_bytes or use on_full = \"drop_oldest\"")]
    Full {
        used: u64,
        max_bytes: u64,
        waited: Duration,
        /// How many of the batches given to [`Queue::enqueue_many`] were stored (durably) before
        /// the one that did not fit: a retry passes only the rest.
        stored: usize,
    },
    #[error("a batch of {size} bytes can never fit the queue (it may hold as little as {max_bytes} bytes of batches): raise queue.max_bytes or lower batch.max_detections")]
    TooLarge { size: u64, max_bytes: u64 },
    #[error("the disk holding the queue is full (ENOSPC); the batch was not stored: free space on the data_dir's filesystem")]
    DiskFull,
    #[error("queue storage failed: {0}")]
    Storage(#[from] QueueError),
}

/// A storage failure of an operation other than enqueue.
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("syncing the queue to disk: {0}")]
    Sync(#[from] io::Error),
    #[error("the queue's database is closed after a disk error and could not be reopened yet; free space on the data_dir's filesystem")]
    Unavailable,
    #[error("the queue's database was reopened after a disk error before this write was synced; retry it")]
    Reopened,
}

impl QueueError {
    fn is_disk_full(&self) -> bool {
        let io = match self {
            QueueError::Sled(sled::Error::Io(e)) => e,
            QueueError::Sync(e) => e,
            _ => return false,
        };
        // sled re-creates the io::Error when it clones its stored global error, keeping only the kind.
        io.raw_os_error() == Some(libc_enospc()) || io.kind() == io::ErrorKind::StorageFull
    }
}

/// The durable queue. Cheap to clone: clones share one database.
#[derive(Debug, Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The open database; `None` only while it is being reopened after a disk error, or if that
    /// failed. An RwLock: operations share it, only a reopen takes it exclusively.
    /// Lock order: `sync`, then `store`, then `state`.
    store: RwLock<Option<Store>>,
    /// `data_dir/queue`.
    path: PathBuf,
    config: QueueConfig,
    /// In-memory state and the write order. A std Mutex: it is held only for in-memory work and
    /// sled writes (which may wait for sled's log buffers), never across our sync, and never from
    /// async code.
    state: Mutex<State>,
    /// Signalled when acks or pruning free budget (for `OnFull::Block`).
    space: Condvar,
    /// The group-commit lock: held while syncing; guards the highest durable write ticket.
    sync: Mutex<SyncState>,
    /// Held for the life of the queue: one process per data_dir.
    _lock: File,
}

impl Drop for Inner {
    /// A clean close writes the acks still in memory, so they are not sent again.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(store) = self.store.get_mut().unwrap_or_else(|p| p.into_inner()).as_ref() {
            if let Err(e) = write_meta(store, st, sled::Batch::default()) {
                tracing::warn!(error = %e, "writing acks and counters at close failed; recounted at the next open");
            }
            if let Err(e) = store.db.flush() {
                tracing::warn!(error = %e, "flushing the queue at close failed");
            }
        }
    }
}

#[derive(Debug)]
struct Store {
    db: sled::Db,
    /// Everything lives in the default tree (see the module docs).
    tree: sled::Tree,
    /// sled's log file, for our fdatasync.
    log_file: File,
}

impl Store {
    fn new(db: sled::Db, path: &Path) -> io::Result<Self> {
        let log_file = File::open(path.join("db"))?;
        let tree: sled::Tree = (*db).clone();
        Ok(Self { db, tree, log_file })
    }

    fn get(guard: &Option<Store>) -> Result<&Store, QueueError> {
        guard.as_ref().ok_or(QueueError::Unavailable)
    }
}

#[derive(Debug, Default)]
struct State {
    counters: Counters,
    /// seqs handed out and not yet acked or nacked.
    in_flight: BTreeSet<u64>,
    /// Pending seqs to hand out again first: nacked or requeued (below the cursor, or past it when
    /// `next_newest_batch` handed them out).
    retry: BTreeSet<u64>,
    /// Next seq to look at in the pending range.
    cursor: u64,
    /// Seqs at or above the cursor that `next_newest_batch` handed out or passed over (in flight,
    /// acked, or nacked into `retry`, which it compares on its own), as disjoint ranges lo → hi,
    /// inclusive: its walk jumps over them (see `read::newest_unhanded`).
    newest_handed: std::collections::BTreeMap<u64, u64>,
    /// batch_id → (seq, record length) of every batch handed out since open and not yet acked.
    handed: HashMap<BatchId, (u64, usize)>,
    /// Acked batches whose marker (or removal) is not written yet: seq → acked_at_ms.
    /// Written in groups (see [`ACK_WRITE_GROUP`]) with the counters; lost in a crash, they are
    /// simply sent again.
    unwritten_acks: std::collections::BTreeMap<u64, u64>,
    /// The source position stored with the newest batch.
    latest_position: Option<Vec<u8>>,
    /// `retain_acked` is not zero: acked batches keep their record and get a marker.
    retain_acked: bool,
    /// Every seq below this is durable: only those are handed out, so nothing is sent that a
    /// crash could take back (and whose seq would then be reused for other detections).
    durable_next_seq: u64,
    /// Raised by every reopen after a disk error: a write applied before it is not known durable.
    epoch: u64,
    /// After a reopen: batches found on disk that a retried enqueue must not store twice (past
    /// the counters, or applied by an enqueue that had not returned), batch_id → seq.
    recovered: HashMap<BatchId, u64>,
    /// batch_id → seq of every batch applied by an enqueue that has not returned yet: a reopen
    /// after a disk error keeps those still on disk in `recovered` (a prune or a drop in the same
    /// `enqueue_many` may have written counters past them, so the tail scan would miss them).
    unsynced: HashMap<BatchId, u64>,
    /// Number of writes applied (for group commit).
    applied: u64,
    /// The logical limit steered by the disk (see "Byte budget").
    budget: DiskBudget,
}

#[derive(Debug, Default)]
struct DiskBudget {
    /// What the records may take, logical bytes; 0: not set yet (45% of `max_bytes`).
    logical_limit: u64,
    /// When the limit was last shrunk, and the disk then: a shrink waits [`BUDGET_SHRINK_COOLDOWN`]
    /// and real growth (1/64 of `max_bytes`) after the last one, so sled's garbage spikes do not
    /// compound into cut after cut.
    last_shrink: Option<(Instant, u64)>,
    /// `data_dir`'s allocated bytes at the last measurement.
    disk_bytes: u64,
    measured_at: Option<Instant>,
    /// Logical bytes enqueued since then.
    written_since: u64,
}

#[derive(Debug, Default)]
struct SyncState {
    /// `data_dir/queue.watermark` (see [`layout::Watermark`]), rewritten after every sync.
    watermark: Option<File>,
    durable: u64,
    /// Blob files already fsynced (sled names them by number).
    blobs_synced: std::collections::HashSet<u64>,
    /// Disk syncs done since open (group commit: fewer than enqueues).
    syncs: u64,
}

/// The outcome of an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    Acked,
    /// Not handed out since the queue was opened, or already acked or dropped: nothing to do.
    Unknown,
}

impl Queue {
    /// The queue's settings.
    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the in-memory state possibly inconsistent with disk;
        // the durable state is always consistent (atomic writes), so recover the guard and go on.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_store(&self) -> RwLockReadGuard<'_, Option<Store>> {
        self.inner.store.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Acks are written in groups of this many (or sooner, see [`Queue::ack`]).
pub const ACK_WRITE_GROUP: usize = 64;

/// Result of [`Queue::verify`].
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub ok: u64,
    pub quarantined: u64,
    /// One line per problem, naming the key.
    pub bad: Vec<String>,
}

/// One line of `queue export`.
#[derive(Debug, Serialize)]
pub struct ExportedRecord {
    pub state: &'static str,
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enqueued_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the cloud refused a dead-lettered batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_hex: Option<String>,
}

#[derive(Debug, Error)]
pub enum ExportError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("writing the export: {0}")]
    Write(io::Error),
}

/// How often the disk budget measures `data_dir` at most (also every 1/64 of `max_bytes`
/// enqueued): a directory walk of a few files.
pub const BUDGET_MEASURE_EVERY: Duration = Duration::from_millis(100);

/// Shortest time between two shrinks of the disk budget's logical limit.
pub const BUDGET_SHRINK_COOLDOWN: Duration = Duration::from_secs(2);

const fn libc_enospc() -> i32 {
    28 // ENOSPC on Linux
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests;
