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
//! written. A queue in layout 1 is migrated at open, in atomic steps of [`MIGRATE_STEP`] records
//! with the counters (an interrupted migration goes on at the next open). An older build opening a
//! layout 2 queue sees the retained batches as pending and sends them again: the cloud absorbs
//! them as duplicates.
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
pub(crate) mod layout;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime};

use backhaul_shared::{BatchId, Clock, Detection, Timestamp};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use layout::Counters;
use layout::{StoredBatch, StoredError};

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
    /// What `data_dir` occupies on disk, within 10% (see the module docs, "Byte budget").
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
    #[error("a batch of {size} bytes can never fit the queue budget of {max_bytes} bytes: raise queue.max_bytes or lower batch.max_detections")]
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
    /// inclusive: its walk jumps over them (see `newest_unhanded`).
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
    /// After a reopen: batches found on disk past the counters, so that a retried enqueue does not
    /// store them twice.
    recovered: HashMap<BatchId, u64>,
    /// Number of writes applied (for group commit).
    applied: u64,
    /// The logical limit steered by the disk (see "Byte budget").
    budget: DiskBudget,
}

#[derive(Debug, Default)]
struct DiskBudget {
    /// What the records may take, logical bytes; 0: not set yet (half of `max_bytes`).
    logical_limit: u64,
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
    /// Opens (or creates) the queue in `data_dir`.
    pub fn open(data_dir: &Path, config: QueueConfig) -> Result<Self, QueueOpenError> {
        let dir_err = |source| QueueOpenError::DataDir { data_dir: data_dir.to_owned(), source };
        private_dir(data_dir).map_err(dir_err)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(data_dir.join("lock"))
            .map_err(dir_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(QueueOpenError::Locked { data_dir: data_dir.to_owned() })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(dir_err(e)),
        }
        let path = data_dir.join("queue");
        let db = open_or_move_aside(data_dir, &path, &config)?;
        sync_dir(data_dir).map_err(dir_err)?;
        sync_dir(&path).map_err(dir_err)?;
        let store = Store::new(db, &path).map_err(dir_err)?;
        let storage = |source| QueueOpenError::Storage { path: path.clone(), source };
        let Loaded { mut counters, mut latest_position, .. } = load_counters(&store.tree, true).map_err(storage)?;
        migrate_layout1(&store.tree, &mut counters).map_err(storage)?;
        advance_ack_floor(&store.tree, &mut counters).map_err(storage)?;
        let watermark_path = data_dir.join("queue.watermark");
        let found = std::fs::read(&watermark_path).ok().and_then(|b| layout::Watermark::decode(&b));
        let mut found_loss = false;
        if let Some(w) = found.filter(|w| w.next_seq > counters.next_seq) {
            found_loss = true;
            // Only batches still pending at the last sync can be undelivered.
            let lost = (w.next_seq - counters.next_seq).min(w.pending_batches);
            tracing::error!(
                lost_batches = lost,
                first_seq = counters.next_seq,
                last_seq = w.next_seq - 1,
                "THE QUEUE DATABASE CAME BACK WITH LESS THAN IT HAD: sled dropped batches it had made durable \
                 (damaged files). They are counted as lost and show as seq gaps in the cloud; the queue goes on"
            );
            counters.lost_batches += lost;
            counters.next_seq = w.next_seq;
            counters.produced_batches = counters.produced_batches.max(w.produced_batches);
            counters.produced_detections = counters.produced_detections.max(w.produced_detections);
            if w.source_position.is_some() {
                latest_position = w.source_position;
            }
        }
        // Without it the queue works, only unguarded: a watermark made by root (an offline tool run
        // with sudo) must not keep the service from starting.
        let watermark_file = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&watermark_path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(path = %watermark_path.display(), error = %e, "cannot write the queue's watermark; a sled that loses data will go unnoticed (check the file's owner)");
                None
            }
        };
        let retain_acked = !config.retain_acked.is_zero();
        let queue = Self {
            inner: Arc::new(Inner {
                store: RwLock::new(Some(store)),
                path: path.clone(),
                config,
                state: Mutex::new(State {
                    counters,
                    latest_position,
                    retain_acked,
                    durable_next_seq: counters.next_seq,
                    cursor: counters.ack_floor,
                    ..State::default()
                }),
                space: Condvar::new(),
                sync: Mutex::new(SyncState { watermark: watermark_file, ..SyncState::default() }),
                _lock: lock,
            }),
        };
        if found_loss {
            // Make the finding durable at once: a kill before the next metadata write must not
            // forget it (the watermark will soon agree with sled and say nothing again).
            queue.write_counters().map_err(|source| QueueOpenError::RecordLoss { path: path.clone(), source })?;
        }
        queue.prune_acked().map_err(|source| QueueOpenError::Prune { path: path.clone(), source })?;
        tracing::info!(
            path = %queue.inner.path.display(),
            pending = counters.pending_batches,
            acked_retained = counters.acked_batches,
            next_seq = counters.next_seq,
            "queue open"
        );
        Ok(queue)
    }

    /// The queue's settings.
    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    /// Stores a batch durably and returns its seq and batch_id.
    pub fn enqueue(&self, batch: NewBatch) -> Result<Enqueued, EnqueueError> {
        let mut done = self.enqueue_many(vec![batch])?;
        Ok(done.remove(0))
    }

    /// Stores several batches, in order, with one disk sync for all of them; returns once all are
    /// durable. For a producer that has more than one batch ready (a replay at full speed).
    ///
    /// Errors: [`EnqueueError::TooLarge`] is found before anything is written. On
    /// [`EnqueueError::Full`] (`on_full = "block"` timed out), the first `stored` batches are
    /// stored and durable; retry with the rest. On [`EnqueueError::DiskFull`] some may be stored;
    /// a retry with the same `batch_id`s finds them instead of storing them twice. Under
    /// `drop_oldest`, a full budget may drop an earlier batch of the same call, counted as any drop.
    pub fn enqueue_many(&self, batches: Vec<NewBatch>) -> Result<Vec<Enqueued>, EnqueueError> {
        let max_bytes = self.inner.config.max_bytes;
        let prepared = batches
            .into_iter()
            .map(|batch| {
                let prepared = Prepared::new(batch);
                if prepared.estimate > max_bytes {
                    return Err(EnqueueError::TooLarge { size: prepared.estimate, max_bytes });
                }
                Ok(prepared)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match self.try_enqueue(&prepared) {
                // A full disk behaves like on_full = "block" (dropping batches would not shrink
                // sled's files): wait for space, up to block_timeout, reopening the database, which
                // sled poisons after a failed write.
                Err(EnqueueError::DiskFull) if started.elapsed() < self.inner.config.block_timeout => {
                    std::thread::sleep(pause.min(self.inner.config.block_timeout.saturating_sub(started.elapsed())));
                    pause = (pause * 2).min(Duration::from_secs(1));
                    if let Err(e) = self.reopen() {
                        tracing::warn!(error = %e, "reopening the queue after a full disk failed; retrying");
                    }
                }
                other => return other,
            }
        }
    }

    fn try_enqueue(&self, prepared: &[Prepared]) -> Result<Vec<Enqueued>, EnqueueError> {
        let enqueued_at_ms = now_ms();
        let mut done = Vec::with_capacity(prepared.len());
        let mut full = None;
        let (epoch, ticket) = 'apply: {
            let guard = self.read_store();
            let store = Store::get(&guard).map_err(storage_error)?;
            let mut st = self.lock_state();
            for p in prepared {
                // Stored by an attempt cut short by a disk error, and found on disk at the reopen.
                if let Some(&seq) = st.recovered.get(&p.batch_id) {
                    done.push(Enqueued { seq, batch_id: p.batch_id, dropped: 0 });
                    continue;
                }
                let (st_back, dropped) = match self.make_room(store, st, p.estimate) {
                    Ok(r) => r,
                    // The ones before it are applied: make them durable and say how many.
                    Err(EnqueueError::Full { used, max_bytes, waited, .. }) if !done.is_empty() => {
                        full = Some(EnqueueError::Full { used, max_bytes, waited, stored: done.len() });
                        let st = self.lock_state();
                        break 'apply (st.epoch, st.applied);
                    }
                    Err(e) => return Err(e),
                };
                st = st_back;
                let seq = st.counters.next_seq;
                let record = StoredBatch {
                    batch_id: p.batch_id,
                    seq,
                    enqueued_at_ms,
                    detections: p.detections,
                    source_position: p.source_position.clone(),
                    head: p.parts.head.clone(),
                    tail: Vec::new(),
                }
                .encode_compressed(&p.parts.tail_lz4);
                // Plain inserts: the counters on disk are brought up to date at open by counting
                // the records past their `next_seq` (sled's `apply_batch` would cost two extra log
                // buffer writes, each waited for with sync_file_range).
                chunks::insert(&store.tree, &layout::pending_key(seq), &record).map_err(|e| storage_error(e.into()))?;
                st.counters.next_seq += 1;
                st.counters.pending_batches += 1;
                st.counters.pending_bytes += chunks::stored_size(9, record.len());
                st.counters.produced_batches += 1;
                st.counters.produced_detections += u64::from(p.detections);
                if let Some(pos) = &p.source_position {
                    st.latest_position = Some(pos.clone());
                }
                st.applied += 1;
                // Bound what the next open must count (see `load_counters`).
                if st.counters.next_seq.is_multiple_of(META_EVERY_ENQUEUES) {
                    write_meta(store, &mut st, sled::Batch::default()).map_err(storage_error)?;
                }
                done.push(Enqueued { seq, batch_id: p.batch_id, dropped });
            }
            (st.epoch, st.applied)
        };
        self.sync_to(epoch, ticket).map_err(storage_error)?;
        self.lock_state().recovered.clear();
        match full {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the in-memory state possibly inconsistent with disk;
        // the durable state is always consistent (atomic writes), so recover the guard and go on.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_store(&self) -> RwLockReadGuard<'_, Option<Store>> {
        self.inner.store.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes and reopens the database after a write failed (sled refuses every operation after
    /// one failed write), and starts over from what is on disk, as after a restart: the counters are
    /// read back, nothing is in flight, and the writes applied before are not counted as durable
    /// (their enqueues retry).
    fn reopen(&self) -> Result<(), QueueError> {
        let mut sync = self.inner.sync.lock().unwrap_or_else(|p| p.into_inner());
        let mut slot = self.inner.store.write().unwrap_or_else(|p| p.into_inner());
        // sled releases its file lock when the last handle is dropped.
        drop(slot.take());
        let db = open_sled(&self.inner.path, &self.inner.config)?;
        let store = Store::new(db, &self.inner.path)?;
        store.db.flush()?;
        store.log_file.sync_data()?;
        let Loaded { mut counters, latest_position, tail } = load_counters(&store.tree, true)?;
        advance_ack_floor(&store.tree, &mut counters)?;
        let mut st = self.lock_state();
        st.counters = counters;
        st.latest_position = latest_position;
        st.durable_next_seq = counters.next_seq;
        // Writes applied before now may be lost: their enqueues must not count as durable.
        st.epoch += 1;
        st.recovered = tail.into_iter().collect();
        // Start over as after a restart: everything not acked on disk is pending and is sent again
        // (acks not written before the failure are forgotten; the cloud absorbs the resends).
        st.unwritten_acks.clear();
        st.in_flight.clear();
        st.handed.clear();
        st.retry.clear();
        st.newest_handed.clear();
        st.cursor = counters.ack_floor;
        st.applied += 1;
        sync.durable = st.applied;
        *slot = Some(store);
        tracing::warn!(next_seq = counters.next_seq, "queue database reopened after a disk error");
        Ok(())
    }

    /// Frees budget for `needed` bytes as the policy says. Returns the guard (Block waits on it).
    fn make_room<'a>(
        &'a self,
        store: &Store,
        mut st: MutexGuard<'a, State>,
        needed: u64,
    ) -> Result<(MutexGuard<'a, State>, u64), EnqueueError> {
        let used = |st: &State| st.counters.pending_bytes + st.counters.acked_bytes + st.counters.dead_bytes;
        let max = self.logical_limit(&mut st);
        st.budget.written_since += needed;
        if used(&st) + needed <= max {
            return Ok((st, 0));
        }
        // Delivered batches go first, then dead letters (refused for good, kept only for inspection).
        let over = used(&st) + needed - max;
        prune_acked_locked(store, &mut st, None, Some(over)).map_err(storage_error)?;
        if used(&st) + needed <= max {
            return Ok((st, 0));
        }
        let over = used(&st) + needed - max;
        prune_dead_locked(store, &mut st, over).map_err(storage_error)?;
        if used(&st) + needed <= max {
            return Ok((st, 0));
        }
        match self.inner.config.on_full {
            OnFull::DropOldest => {
                let over = used(&st) + needed - max;
                let dropped = drop_oldest_locked(store, &mut st, over).map_err(storage_error)?;
                // What is left is in flight (bounded by max_inflight): go over budget by that much
                // rather than refuse a new batch.
                Ok((st, dropped))
            }
            OnFull::Block => {
                let started = Instant::now();
                let timeout = self.inner.config.block_timeout;
                tracing::warn!(
                    used = used(&st),
                    max_bytes = max,
                    "queue full; enqueue waits for acks (on_full = block)"
                );
                loop {
                    let left = timeout.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(EnqueueError::Full {
                            used: used(&st),
                            max_bytes: max,
                            waited: started.elapsed(),
                            stored: 0,
                        });
                    }
                    st = self.inner.space.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
                    let over = (used(&st) + needed).saturating_sub(max);
                    prune_acked_locked(store, &mut st, None, Some(over)).map_err(storage_error)?;
                    if used(&st) + needed <= max {
                        return Ok((st, 0));
                    }
                }
            }
        }
    }

    /// The logical limit of the records' bytes, measuring the disk when it is due (see "Byte
    /// budget" in the module docs).
    fn logical_limit(&self, st: &mut State) -> u64 {
        let max = self.inner.config.max_bytes;
        if self.inner.config.budget == Budget::Logical || max == u64::MAX {
            return max;
        }
        let b = &mut st.budget;
        if b.logical_limit == 0 {
            b.logical_limit = max / 20 * 9;
        }
        let due = b.measured_at.is_none_or(|t| t.elapsed() >= BUDGET_MEASURE_EVERY) || b.written_since >= max / 64;
        if !due {
            return b.logical_limit;
        }
        let used = st.counters.pending_bytes + st.counters.acked_bytes + st.counters.dead_bytes;
        let disk = self.inner.path.parent().map_or(0, budget_disk_bytes);
        let b = &mut st.budget;
        let target = max / 20 * 17;
        if disk > max / 20 * 19 && disk > b.disk_bytes {
            // Near the budget and growing: shrink in proportion.
            b.logical_limit = u64::try_from(u128::from(used) * u128::from(target) / u128::from(disk)).unwrap_or(0);
        } else if disk < max / 5 * 4 {
            // Room: grow into it at the measured ratio of disk to logical bytes.
            let ratio = (disk as f64 / used.max(1) as f64).clamp(1.0, 4.0);
            let grow = ((target - disk) as f64 / ratio) as u64;
            b.logical_limit = b.logical_limit.max(used.saturating_add(grow));
        }
        b.logical_limit = b.logical_limit.clamp(max / 3, max);
        b.disk_bytes = disk;
        b.measured_at = Some(Instant::now());
        b.written_since = 0;
        b.logical_limit
    }

    /// Makes everything applied up to `ticket` durable, sharing the sync with concurrent callers.
    fn sync_to(&self, epoch: u64, ticket: u64) -> Result<(), QueueError> {
        let mut sync = self.inner.sync.lock().unwrap_or_else(|p| p.into_inner());
        if self.lock_state().epoch != epoch {
            return Err(QueueError::Reopened);
        }
        if sync.durable >= ticket {
            return Ok(()); // someone else's sync covered our write
        }
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let (target, next_seq, watermark) = {
            let st = self.lock_state();
            let c = &st.counters;
            let watermark = layout::Watermark {
                next_seq: c.next_seq,
                pending_batches: c.pending_batches,
                produced_batches: c.produced_batches,
                produced_detections: c.produced_detections,
                source_position: st.latest_position.clone(),
            };
            (st.applied, c.next_seq, watermark)
        };
        store.db.flush()?;
        if self.inner.config.durability == Durability::Fsync {
            // Blob files first: the log that points to them must not be durable before they are.
            sync_new_blobs(&self.inner.path.join("blobs"), &mut sync.blobs_synced)?;
            store.log_file.sync_data()?;
        }
        if let Some(file) = sync.watermark.as_ref().filter(|_| self.inner.config.durability == Durability::Fsync) {
            // Synced after sled's log (see `layout::Watermark`): it never claims more than sled
            // had made durable, and it survives the power cuts that can cost sled data (issue
            // #17). A failure only weakens the check.
            let bytes = watermark.encode();
            let written = std::os::unix::fs::FileExt::write_all_at(file, &bytes, 0)
                .and_then(|()| file.set_len(bytes.len() as u64))
                .and_then(|()| file.sync_data());
            if let Err(e) = written {
                tracing::warn!(error = %e, "writing queue.watermark failed; a sled that loses data at the next start may go unnoticed");
            }
        }
        sync.durable = target;
        sync.syncs += 1;
        let mut st = self.lock_state();
        st.durable_next_seq = st.durable_next_seq.max(next_seq);
        Ok(())
    }

    /// Writes the counters (with any acks in memory) and makes them durable.
    fn write_counters(&self) -> Result<(), QueueError> {
        let (epoch, ticket) = {
            let guard = self.read_store();
            let store = Store::get(&guard)?;
            let mut st = self.lock_state();
            write_meta(store, &mut st, sled::Batch::default())?;
            (st.epoch, st.applied)
        };
        self.sync_to(epoch, ticket)
    }

    /// Writes pending acks and makes every write so far durable.
    pub fn flush(&self) -> Result<(), QueueError> {
        let (epoch, ticket) = {
            let guard = self.read_store();
            let store = Store::get(&guard)?;
            let mut st = self.lock_state();
            if !st.unwritten_acks.is_empty() {
                write_meta(store, &mut st, sled::Batch::default())?;
            }
            st.applied += 1;
            (st.epoch, st.applied)
        };
        self.sync_to(epoch, ticket)
    }

    /// Hands out the oldest pending batch that is not in flight, or `None`.
    pub fn next_batch(&self) -> Result<Option<QueuedBatch>, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        loop {
            let (record, from_retry) = if let Some(seq) = st.retry.pop_first() {
                match chunks::get(&store.tree, &layout::pending_key(seq))? {
                    Some(r) => (r, true),
                    None => continue, // dropped or acked meanwhile
                }
            } else {
                let from = layout::pending_key(st.cursor);
                match chunks::records(store.tree.range(from..=layout::pending_key(u64::MAX))).next() {
                    Some(r) => (r?, false),
                    None => return Ok(None),
                }
            };
            let Some(seq) = layout::pending_key_seq(&record.prefix) else { continue };
            if seq >= st.durable_next_seq {
                // Not synced yet: a crash could still take it back. Its enqueue is about to return.
                return Ok(None);
            }
            // Only the scan moves the cursor: a retried batch may lie past records not visited yet
            // (one handed out by `next_newest_batch`), which must not be skipped.
            if !from_retry {
                st.cursor = st.cursor.max(seq + 1);
                while st.newest_handed.first_key_value().is_some_and(|(_, &hi)| hi < st.cursor) {
                    st.newest_handed.pop_first();
                }
            }
            if st.in_flight.contains(&seq) || st.unwritten_acks.contains_key(&seq) || is_acked(&store.tree, seq)? {
                continue;
            }
            if let Some(batch) = hand_out_locked(store, &mut st, seq, &record)? {
                return Ok(Some(batch));
            }
        }
    }

    /// Marks a batch acknowledged: it leaves pending (kept for replay for `retain_acked`).
    ///
    /// The marker is written to disk with the next group of acks ([`ACK_WRITE_GROUP`]), the next
    /// [`Queue::flush`], [`Queue::prune_acked`], or any other write of the counters; an ack lost
    /// in a crash only means the batch is sent again, which the cloud absorbs as a duplicate.
    pub fn ack(&self, batch_id: BatchId) -> Result<AckOutcome, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        let Some((seq, value_len)) = st.handed.remove(&batch_id) else { return Ok(AckOutcome::Unknown) };
        st.in_flight.remove(&seq);
        st.retry.remove(&seq);
        st.counters.pending_batches = st.counters.pending_batches.saturating_sub(1);
        st.counters.pending_bytes = st.counters.pending_bytes.saturating_sub(chunks::stored_size(9, value_len));
        st.counters.acked_total += 1;
        if st.retain_acked {
            st.counters.acked_batches += 1;
            st.counters.acked_bytes += chunks::stored_size(9, value_len) + layout::ACK_MARKER_BYTES;
        }
        st.unwritten_acks.insert(seq, now_ms());
        if st.unwritten_acks.len() >= ACK_WRITE_GROUP {
            write_meta(store, &mut st, sled::Batch::default())?;
        }
        drop(st);
        self.inner.space.notify_all();
        Ok(AckOutcome::Acked)
    }

    /// Moves a handed-out batch that the cloud refused for good (a `rejected` ack, HTTP 400, 413,
    /// 422) from pending to the dead-letter tree, with `reason`; it is counted, kept for inspection
    /// (`queue export`) within the byte budget, and never sent again. Written at once (it is rare).
    pub fn dead_letter(&self, batch_id: BatchId, reason: &str) -> Result<AckOutcome, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        let Some(&(seq, _)) = st.handed.get(&batch_id) else { return Ok(AckOutcome::Unknown) };
        if st.unwritten_acks.contains_key(&seq) {
            return Ok(AckOutcome::Unknown); // acked meanwhile: the earlier answer stands
        }
        let Some(record) = chunks::get(&store.tree, &layout::pending_key(seq))? else {
            st.handed.remove(&batch_id);
            return Ok(AckOutcome::Unknown);
        };
        let size = record.stored_size();
        let mut write = sled::Batch::default();
        chunks::move_into(&mut write, &record, &layout::dead_key(seq));
        let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
        write.insert(&layout::dead_reason_key(seq)[..], reason.as_bytes());
        // The counters change only if the write does (write_meta writes st.counters).
        let before = st.counters;
        let c = &mut st.counters;
        c.pending_batches = c.pending_batches.saturating_sub(1);
        c.pending_bytes = c.pending_bytes.saturating_sub(size);
        c.dead_batches += 1;
        c.dead_bytes += size;
        c.dead_total += 1;
        if let Err(e) = write_meta(store, &mut st, write) {
            st.counters = before;
            return Err(e);
        }
        st.handed.remove(&batch_id);
        st.in_flight.remove(&seq);
        st.retry.remove(&seq);
        tracing::error!(
            seq,
            %batch_id,
            reason = %reason,
            dead_letters = st.counters.dead_batches,
            "batch moved to the dead-letter tree, never sent again (the reason says why; inspect with `backhaul-edge queue export`)"
        );
        drop(st);
        self.inner.space.notify_all();
        Ok(AckOutcome::Acked)
    }

    /// Hands out the newest durable pending batch that is not in flight, or `None`: the forwarder
    /// alternates this with [`Queue::next_batch`] so live data is not stuck behind a backlog.
    pub fn next_newest_batch(&self) -> Result<Option<QueuedBatch>, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        let Some(last) = st.durable_next_seq.checked_sub(1) else { return Ok(None) };
        loop {
            let retry_newest = st.retry.last().copied();
            let walked = newest_unhanded(store, &mut st, last, retry_newest)?;
            let Some(seq) = walked.or(retry_newest) else { return Ok(None) };
            st.retry.remove(&seq);
            mark_handed(&mut st.newest_handed, seq);
            // Gone: dropped meanwhile (a retried seq); a damaged one is quarantined and skipped.
            let Some(record) = chunks::get(&store.tree, &layout::pending_key(seq))? else { continue };
            if let Some(batch) = hand_out_locked(store, &mut st, seq, &record)? {
                return Ok(Some(batch));
            }
        }
    }

    /// Puts an in-flight batch back to pending (e.g. after a reconnect); it is handed out again
    /// before newer batches.
    pub fn nack(&self, batch_id: BatchId) -> bool {
        let mut st = self.lock_state();
        let Some(&(seq, _)) = st.handed.get(&batch_id) else { return false };
        if st.in_flight.remove(&seq) {
            st.retry.insert(seq);
            true
        } else {
            false
        }
    }

    /// Puts every in-flight batch back to pending.
    pub fn nack_all(&self) -> usize {
        let mut st = self.lock_state();
        let seqs = std::mem::take(&mut st.in_flight);
        let n = seqs.len();
        st.retry.extend(seqs);
        n
    }

    /// Removes acked batches older than `retain_acked`. Returns how many.
    pub fn prune_acked(&self) -> Result<u64, QueueError> {
        let cutoff = now_ms().saturating_sub(self.inner.config.retain_acked.as_millis() as u64);
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        let n = prune_acked_locked(store, &mut st, Some(cutoff), None)?;
        drop(st);
        if n > 0 {
            self.inner.space.notify_all();
        }
        Ok(n)
    }

    /// Puts batches acked in `[since, until)` (ack time) back to pending under their original
    /// `batch_id` and `seq`, for an operator's replay: their markers are removed and the ack floor
    /// lowered to the oldest of them, so a restart before they are sent finds them too. Walks every
    /// marker (one per retained batch). Returns how many.
    pub fn requeue_acked(&self, since: SystemTime, until: Option<SystemTime>) -> Result<u64, QueueError> {
        let ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let (since, until) = (ms(since), until.map(ms).unwrap_or(u64::MAX));
        let ticket = {
            let guard = self.read_store();
            let store = Store::get(&guard)?;
            let mut st = self.lock_state();
            if !st.unwritten_acks.is_empty() {
                write_meta(store, &mut st, sled::Batch::default())?;
            }
            let mut seqs = Vec::new();
            for item in store.tree.range(layout::ack_marker_key(0)..=layout::ack_marker_key(u64::MAX)) {
                let (key, value) = item?;
                let acked_at = layout::decode_ack_marker(&value);
                if let Some(seq) = layout::pending_key_seq(&key).filter(|_| (since..until).contains(&acked_at)) {
                    seqs.push(seq);
                }
            }
            // Damaged records are quarantined first, so the requeue below is one atomic write.
            let mut found = Vec::new();
            for seq in seqs {
                let Some(record) = chunks::get(&store.tree, &layout::pending_key(seq))? else { continue };
                match StoredBatch::decode_header(&record.value) {
                    Ok(_) => found.push((seq, record.stored_size())),
                    Err(e) => quarantine_locked(store, &mut st, &record, &e)?,
                }
            }
            let Some(&(oldest, _)) = found.first() else { return Ok(0) };
            let mut write = sled::Batch::default();
            let mut counters = st.counters;
            for &(seq, size) in &found {
                write.remove(&layout::ack_marker_key(seq)[..]);
                counters.acked_batches = counters.acked_batches.saturating_sub(1);
                counters.acked_bytes = counters.acked_bytes.saturating_sub(size + layout::ACK_MARKER_BYTES);
                counters.pending_batches += 1;
                counters.pending_bytes += size;
            }
            counters.ack_floor = counters.ack_floor.min(oldest);
            let before = st.counters;
            st.counters = counters;
            if let Err(e) = write_meta(store, &mut st, write) {
                st.counters = before;
                return Err(e);
            }
            st.retry.extend(found.iter().map(|f| f.0));
            tracing::info!(batches = found.len(), "requeued acked batches for replay");
            (st.epoch, st.applied, found.len() as u64)
        };
        self.sync_to(ticket.0, ticket.1)?;
        Ok(ticket.2)
    }

    /// The newest time a batch in this queue carries, for the clock floor (`crate::clock`): the
    /// `timestamp` of the newest stored batch (pending or retained acked) and dead-lettered batch,
    /// and the time of the newest ack marker. `None` for an empty queue. Reads at most two records.
    pub fn newest_batch_time(&self) -> Result<Option<Timestamp>, QueueError> {
        #[derive(Deserialize)]
        struct TimeOnly {
            timestamp: Timestamp,
        }
        let guard = self.inner.store.read().unwrap_or_else(|p| p.into_inner());
        let store = Store::get(&guard)?;
        let mut newest: Option<Timestamp> = None;
        // The newest marker's ack time (acks are written about in seq order).
        if let Some((_, value)) =
            store.tree.range([layout::ACK_MARKER]..[layout::ACK_MARKER + 1]).next_back().transpose()?
        {
            let acked = layout::decode_ack_marker(&value);
            newest = newest.max(Timestamp::from_unix_millis(acked as i64));
        }
        for tree_byte in [layout::PENDING, layout::DEAD] {
            let Some((key, _)) = store.tree.range([tree_byte]..[tree_byte + 1]).next_back().transpose()? else {
                continue;
            };
            let Some(len) = chunks::prefix_len(&key).filter(|l| key.len() >= *l) else { continue };
            let Some(record) = chunks::get(&store.tree, &key[..len])? else { continue };
            // A damaged record says nothing here; it is quarantined when it is read for sending.
            let time = StoredBatch::decode(&record.value)
                .ok()
                .and_then(|b| serde_json::from_slice::<TimeOnly>(&b.json()).ok())
                .map(|t| t.timestamp);
            newest = newest.max(time);
        }
        Ok(newest)
    }

    /// The last source position stored with a batch.
    pub fn source_position(&self) -> Result<Option<Vec<u8>>, QueueError> {
        Ok(self.lock_state().latest_position.clone())
    }

    /// Counts by state and the budget's use.
    pub fn stats(&self) -> Result<Stats, QueueError> {
        // Before the store guard: the lock order is sync, store, state.
        let syncs_since_open = self.inner.sync.lock().unwrap_or_else(|p| p.into_inner()).syncs;
        let guard = self.read_store();
        let st = self.lock_state();
        let c = st.counters;
        let in_flight = st.in_flight.len() as u64;
        let max = self.inner.config.max_bytes;
        let budget_bytes = match (self.inner.config.budget, st.budget.logical_limit) {
            (Budget::Disk, 0) if max != u64::MAX => max / 20 * 9,
            (Budget::Disk, limit) if limit > 0 => limit,
            _ => max,
        };
        // The counters live in memory: they are reported even while the database is closed after
        // a disk error (a full disk is exactly when an operator looks); only the age needs it. The
        // age is read under the same lock, from the state the queue acts on: nothing unacked
        // means no age, and a batch whose ack is not written yet is not pending.
        let oldest_pending_age_s = match Store::get(&guard) {
            Ok(store) if c.pending_batches > 0 => {
                oldest_unacked_enqueued_ms(store, &st).map(|at| now_ms().saturating_sub(at) / 1000)
            }
            _ => None,
        };
        drop(st);
        Ok(Stats {
            pending: c.pending_batches.saturating_sub(in_flight),
            in_flight,
            acked_retained: c.acked_batches,
            bytes: c.pending_bytes + c.acked_bytes + c.dead_bytes,
            budget_bytes,
            pending_bytes: c.pending_bytes,
            acked_bytes: c.acked_bytes,
            oldest_pending_age_s,
            produced_batches: c.produced_batches,
            produced_detections: c.produced_detections,
            dropped_batches: c.dropped_batches,
            dropped_detections: c.dropped_detections,
            quarantined: c.quarantined,
            acked_total: c.acked_total,
            dead_letters: c.dead_batches,
            dead_lettered_total: c.dead_total,
            lost_batches: c.lost_batches,
            next_seq: c.next_seq,
            syncs_since_open,
        })
    }

    /// What `data_dir` occupies on its filesystem, bytes: the allocated size (`st_blocks` x 512,
    /// as `du` counts it) of every file and directory in it, sled's own overhead and set-aside
    /// (`corrupt-*`) databases included. [`Stats::bytes`] is what the budget counts; this is the
    /// card's view. A directory walk, taken only where it is shown (`/status`, `queue stats`),
    /// not by [`Queue::stats`], which the forwarder calls too.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.path.parent().map_or(0, allocated_bytes)
    }

    /// Reads every record and checks it. It changes nothing but writing the acks still in memory.
    pub fn verify(&self) -> Result<VerifyReport, QueueError> {
        // Write pending acks first, so the records on disk are what the counters describe.
        self.flush()?;
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut report = VerifyReport::default();
        let any_size = backhaul_shared::Limits { max_detections: usize::MAX };
        for record in chunks::records(store.tree.iter()) {
            let record = record?;
            let key = &record.prefix;
            match key.first() {
                Some(&layout::PENDING) | Some(&layout::ACKED) | Some(&layout::DEAD) => {
                    match StoredBatch::decode(&record.value) {
                        Ok(b) => match backhaul_shared::Batch::from_json(&b.json(), &any_size) {
                            Ok(batch) if batch.batch_id == b.batch_id && batch.seq == b.seq => report.ok += 1,
                            Ok(_) => {
                                report.bad.push(format!("{}: header and JSON disagree on batch_id or seq", hex(key)))
                            }
                            Err(e) => report.bad.push(format!("{}: stored JSON does not parse: {e}", hex(key))),
                        },
                        Err(e) => report.bad.push(format!("{}: {e}", hex(key))),
                    }
                }
                Some(&layout::QUARANTINE) => report.quarantined += 1,
                _ => {}
            }
        }
        let counted = recount(&store.tree, None, false)?.counters;
        let stored = self.lock_state().counters;
        if (counted.pending_batches, counted.acked_batches) != (stored.pending_batches, stored.acked_batches) {
            report.bad.push(format!(
                "counters disagree with the records: counters say {} pending and {} acked, records are {} and {}",
                stored.pending_batches, stored.acked_batches, counted.pending_batches, counted.acked_batches
            ));
        }
        Ok(report)
    }

    /// Every stored record, for `queue export`.
    pub fn export(&self, mut each: impl FnMut(ExportedRecord) -> io::Result<()>) -> Result<(), ExportError> {
        self.flush()?;
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        for record in chunks::records(store.tree.iter()) {
            let record = record.map_err(QueueError::from)?;
            let (key, value) = (&record.prefix, &record.value);
            let (state, acked_at_ms) = match key.first() {
                Some(&layout::PENDING) => {
                    let marker = layout::pending_key_seq(key)
                        .map(|seq| store.tree.get(layout::ack_marker_key(seq)))
                        .transpose()
                        .map_err(QueueError::from)?
                        .flatten();
                    match marker {
                        Some(m) => ("acked", Some(layout::decode_ack_marker(&m))),
                        None => ("pending", None),
                    }
                }
                Some(&layout::ACKED) => ("acked", layout::acked_key_time(key)),
                Some(&layout::DEAD) => ("dead_letter", None),
                Some(&layout::QUARANTINE) => ("quarantined", None),
                _ => continue,
            };
            let reason = match (key.first(), layout::pending_key_seq(key)) {
                (Some(&layout::DEAD), Some(seq)) => store
                    .tree
                    .get(layout::dead_reason_key(seq))
                    .map_err(QueueError::from)?
                    .map(|r| String::from_utf8_lossy(&r).into_owned()),
                _ => None,
            };
            let exported = match StoredBatch::decode(value) {
                Ok(b) => ExportedRecord {
                    reason,
                    state,
                    key: hex(key),
                    seq: Some(b.seq),
                    batch_id: Some(b.batch_id.to_string()),
                    enqueued_at_ms: Some(b.enqueued_at_ms),
                    acked_at_ms,
                    detections: Some(b.detections),
                    batch: serde_json::from_slice(&b.json()).ok(),
                    error: None,
                    raw_hex: None,
                },
                Err(e) => ExportedRecord {
                    reason,
                    state,
                    key: hex(key),
                    seq: None,
                    batch_id: None,
                    enqueued_at_ms: None,
                    acked_at_ms,
                    detections: None,
                    batch: None,
                    error: Some(e.to_string()),
                    raw_hex: Some(hex(value)),
                },
            };
            each(exported).map_err(ExportError::Write)?;
        }
        Ok(())
    }

    /// Test hook: writes raw bytes under a pending key, as a damaged disk would leave them.
    #[doc(hidden)]
    pub fn debug_overwrite_pending(&self, seq: u64, value: &[u8]) -> Result<(), QueueError> {
        {
            let guard = self.read_store();
            let store = Store::get(&guard)?;
            if let Some(old) = chunks::get(&store.tree, &layout::pending_key(seq))? {
                let mut write = sled::Batch::default();
                chunks::remove_into(&mut write, &old);
                store.tree.apply_batch(write)?;
            }
            chunks::insert(&store.tree, &layout::pending_key(seq), value)?;
        }
        self.flush()
    }

    /// Test hook: the raw stored value of a pending record.
    #[doc(hidden)]
    pub fn debug_pending_raw(&self, seq: u64) -> Result<Option<Vec<u8>>, QueueError> {
        let guard = self.read_store();
        Ok(chunks::get(&Store::get(&guard)?.tree, &layout::pending_key(seq))?.map(|r| r.value))
    }
}

/// When the oldest batch not yet acknowledged (pending or in flight) was enqueued, ms since the
/// epoch: the first record from the ack floor on with neither a marker nor an ack still waiting
/// in memory to be written (acks are written in groups, see [`ACK_WRITE_GROUP`]). A record that
/// fails its check is passed over too (it is quarantined when it is handed out). `None` on a read
/// error: the age is not known.
fn oldest_unacked_enqueued_ms(store: &Store, st: &State) -> Option<u64> {
    let mut last = None;
    let from = layout::pending_key(st.counters.ack_floor);
    for key in store.tree.range(from..=layout::pending_key(u64::MAX)).keys() {
        let key = key.ok()?;
        let seq = layout::pending_key_seq(&key)?;
        if last == Some(seq) || st.unwritten_acks.contains_key(&seq) || is_acked(&store.tree, seq).ok()? {
            last = Some(seq);
            continue; // another chunk of a record passed over, or an acked batch
        }
        last = Some(seq);
        let record = chunks::get(&store.tree, &layout::pending_key(seq)).ok()??;
        if let Ok(h) = StoredBatch::decode_header(&record.value) {
            return Some(h.enqueued_at_ms);
        }
    }
    None
}

/// The newest durable batch at or above the cursor that is neither in flight nor acked, and newer
/// than `retry_newest`: the keys walked backwards from `last`, jumping over the ranges already
/// handed out from this end ([`State::newest_handed`]), so that draining a backlog from the newest
/// end does not walk its acked batches again on every call. Below the cursor every batch was
/// visited by the scan: it is acked, in flight, or in `retry`. Batches passed over are added to
/// the ranges.
fn newest_unhanded(
    store: &Store,
    st: &mut State,
    last: u64,
    retry_newest: Option<u64>,
) -> Result<Option<u64>, QueueError> {
    let mut upper = last;
    let mut passed = Vec::new();
    let found = 'walk: loop {
        if upper < st.cursor || retry_newest.is_some_and(|r| r >= upper) {
            break None;
        }
        if let Some((&lo, &hi)) = st.newest_handed.range(..=upper).next_back() {
            if hi >= upper {
                match lo.checked_sub(1) {
                    Some(below) => {
                        upper = below;
                        continue;
                    }
                    None => break None,
                }
            }
        }
        let lower = st.newest_handed.range(..upper).next_back().map_or(0, |(_, &hi)| hi + 1).max(st.cursor);
        let mut to = layout::pending_key(upper).to_vec();
        to.extend_from_slice(&[0xff, 0xff]);
        for key in store.tree.range(layout::pending_key(lower).to_vec()..=to).keys().rev() {
            let key = key?;
            let Some(seq) = layout::pending_key_seq(&key).filter(|_| key.len() == 11 && key[9..] == [0, 0]) else {
                continue;
            };
            if retry_newest.is_some_and(|r| r >= seq) {
                break 'walk None;
            }
            if st.in_flight.contains(&seq) || st.unwritten_acks.contains_key(&seq) || is_acked(&store.tree, seq)? {
                passed.push(seq);
                continue;
            }
            break 'walk Some(seq);
        }
        match lower.checked_sub(1) {
            Some(below) if lower > st.cursor => upper = below,
            _ => break None,
        }
    };
    for seq in passed {
        mark_handed(&mut st.newest_handed, seq);
    }
    Ok(found)
}

/// Adds `seq` to the disjoint ranges (lo → hi, inclusive), merging neighbours.
fn mark_handed(ranges: &mut std::collections::BTreeMap<u64, u64>, seq: u64) {
    let (mut lo, mut hi) = (seq, seq);
    if let Some((&l, &h)) = ranges.range(..=seq).next_back() {
        if h >= seq {
            return;
        }
        if h + 1 == seq {
            lo = l;
        }
    }
    if let Some(h) = seq.checked_add(1).and_then(|next| ranges.remove(&next)) {
        hi = h;
    }
    ranges.insert(lo, hi);
}

/// Decodes a pending record and marks it in flight; a record that fails its check is quarantined
/// (and `None` returned, so the caller looks further).
fn hand_out_locked(
    store: &Store,
    st: &mut State,
    seq: u64,
    record: &chunks::Record,
) -> Result<Option<QueuedBatch>, QueueError> {
    match StoredBatch::decode(&record.value) {
        Ok(b) => {
            st.in_flight.insert(seq);
            st.handed.insert(b.batch_id, (seq, record.value.len()));
            Ok(Some(QueuedBatch {
                seq,
                batch_id: b.batch_id,
                detections: b.detections,
                enqueued_at_ms: b.enqueued_at_ms,
                payload: b.json(),
            }))
        }
        Err(e) => {
            quarantine_locked(store, st, record, &e)?;
            Ok(None)
        }
    }
}

/// Drops the oldest pending batches that are not in flight until `to_free` bytes are freed.
fn drop_oldest_locked(store: &Store, st: &mut State, to_free: u64) -> Result<u64, QueueError> {
    let mut freed = 0;
    let mut write = sled::Batch::default();
    let mut counters = st.counters;
    let mut dropped = Vec::new();
    let from = layout::pending_key(st.counters.ack_floor);
    for record in chunks::records(store.tree.range(from..=layout::pending_key(u64::MAX))) {
        if freed >= to_free {
            break;
        }
        let record = record?;
        let Some(seq) = layout::pending_key_seq(&record.prefix) else { continue };
        if st.in_flight.contains(&seq) || st.unwritten_acks.contains_key(&seq) || is_acked(&store.tree, seq)? {
            continue;
        }
        let size = record.stored_size();
        let detections = match StoredBatch::decode_header(&record.value) {
            Ok(b) => {
                st.handed.remove(&b.batch_id);
                u64::from(b.detections)
            }
            // Unreadable anyway: count the batch, its detections are unknown.
            Err(_) => 0,
        };
        chunks::remove_into(&mut write, &record);
        counters.pending_batches = counters.pending_batches.saturating_sub(1);
        counters.pending_bytes = counters.pending_bytes.saturating_sub(size);
        counters.dropped_batches += 1;
        counters.dropped_detections += detections;
        freed += size;
        dropped.push((seq, detections));
    }
    if dropped.is_empty() {
        return Ok(0);
    }
    st.counters = counters;
    write_meta(store, st, write)?;
    for (seq, _) in &dropped {
        st.retry.remove(seq);
    }
    tracing::warn!(
        batches = dropped.len(),
        detections = dropped.iter().map(|d| d.1).sum::<u64>(),
        first_seq = dropped.first().map(|d| d.0),
        last_seq = dropped.last().map(|d| d.0),
        total_dropped = counters.dropped_batches,
        "queue over its byte budget: dropped the oldest pending batches (on_full = drop_oldest)"
    );
    Ok(dropped.len() as u64)
}

/// Moves a record that failed its check to quarantine, counted and logged.
fn quarantine_locked(
    store: &Store,
    st: &mut State,
    record: &chunks::Record,
    error: &StoredError,
) -> Result<(), QueueError> {
    let key = &record.prefix;
    if let (Some(&layout::PENDING), Some(seq)) = (key.first(), layout::pending_key_seq(key)) {
        // A late ack of it must not count it again.
        st.handed.retain(|_, (s, _)| *s != seq);
        st.in_flight.remove(&seq);
        st.retry.remove(&seq);
    }
    let mut counters = st.counters;
    counters.quarantined += 1;
    let size = record.stored_size();
    let mut write = sled::Batch::default();
    let marker = layout::pending_key_seq(key).map(layout::ack_marker_key);
    match key.first() {
        Some(&layout::PENDING) if marker.map(|m| store.tree.contains_key(m)).transpose()? == Some(true) => {
            // A retained acked batch (read by a replay): its marker goes with it.
            write.remove(&marker.expect("checked")[..]);
            counters.acked_batches = counters.acked_batches.saturating_sub(1);
            counters.acked_bytes = counters.acked_bytes.saturating_sub(size + layout::ACK_MARKER_BYTES);
        }
        Some(&layout::PENDING) => {
            counters.pending_batches = counters.pending_batches.saturating_sub(1);
            counters.pending_bytes = counters.pending_bytes.saturating_sub(size);
        }
        Some(&layout::ACKED) => {
            counters.acked_batches = counters.acked_batches.saturating_sub(1);
            counters.acked_bytes = counters.acked_bytes.saturating_sub(size);
        }
        Some(&layout::DEAD) => {
            counters.dead_batches = counters.dead_batches.saturating_sub(1);
            counters.dead_bytes = counters.dead_bytes.saturating_sub(size);
        }
        _ => {}
    }
    chunks::move_into(&mut write, record, &layout::quarantine_key(key));
    st.counters = counters;
    write_meta(store, st, write)?;
    tracing::error!(
        key = %hex(key),
        error = %error,
        quarantined_total = counters.quarantined,
        "queue record failed its integrity check: moved to quarantine (inspect with `backhaul-edge queue export`); the queue goes on"
    );
    Ok(())
}

/// Removes retained acked batches (record and marker together) oldest seq first: those acked
/// before `before_ms` (stopping at the first marker acked later: acks are written about in seq
/// order, so a late one holds back at most the few after it, for at most `retain_acked`), or until
/// `bytes` are freed. In atomic writes of at most [`PRUNE_STEP`] batches with the counters.
fn prune_acked_locked(
    store: &Store,
    st: &mut State,
    before_ms: Option<u64>,
    bytes: Option<u64>,
) -> Result<u64, QueueError> {
    // Acks still in memory first, so that what is pruned is everything acked.
    if !st.unwritten_acks.is_empty() {
        write_meta(store, st, sled::Batch::default())?;
    }
    let (mut n, mut freed) = (0u64, 0u64);
    let mut from = 0;
    loop {
        let mut write = sled::Batch::default();
        let mut counters = st.counters;
        let mut step = 0;
        let mut done = true;
        for item in store.tree.range(layout::ack_marker_key(from)..=layout::ack_marker_key(u64::MAX)) {
            if bytes.is_some_and(|b| freed >= b) {
                break;
            }
            let (key, value) = item?;
            let Some(seq) = layout::pending_key_seq(&key) else { continue };
            if before_ms.is_some_and(|before| layout::decode_ack_marker(&value) >= before) {
                break;
            }
            if step == PRUNE_STEP {
                done = false;
                from = seq;
                break;
            }
            write.remove(key);
            let size = match chunks::get(&store.tree, &layout::pending_key(seq))? {
                Some(record) => {
                    chunks::remove_into(&mut write, &record);
                    record.stored_size()
                }
                None => 0, // a marker whose record is gone (quarantined): only the marker is left
            };
            counters.acked_batches = counters.acked_batches.saturating_sub(1);
            counters.acked_bytes = counters.acked_bytes.saturating_sub(size + layout::ACK_MARKER_BYTES);
            freed += size + layout::ACK_MARKER_BYTES;
            n += 1;
            step += 1;
        }
        if step > 0 {
            st.counters = counters;
            write_meta(store, st, write)?;
        }
        if done {
            return Ok(n);
        }
    }
}

/// Removes dead letters oldest first until `bytes` are freed (the budget needs the room); one
/// atomic write with the counters.
fn prune_dead_locked(store: &Store, st: &mut State, bytes: u64) -> Result<u64, QueueError> {
    let mut write = sled::Batch::default();
    let mut counters = st.counters;
    let (mut n, mut freed) = (0u64, 0u64);
    let mut upto = layout::dead_key(u64::MAX).to_vec();
    upto.extend_from_slice(&[0xff, 0xff]); // the last key's chunks too
    for record in chunks::records(store.tree.range(layout::dead_key(0).to_vec()..upto)) {
        if freed >= bytes {
            break;
        }
        let record = record?;
        let size = record.stored_size();
        chunks::remove_into(&mut write, &record);
        if let Some(seq) = layout::pending_key_seq(&record.prefix) {
            write.remove(&layout::dead_reason_key(seq)[..]);
        }
        counters.dead_batches = counters.dead_batches.saturating_sub(1);
        counters.dead_bytes = counters.dead_bytes.saturating_sub(size);
        freed += size;
        n += 1;
    }
    if n > 0 {
        st.counters = counters;
        write_meta(store, st, write)?;
        tracing::warn!(batches = n, "queue over its byte budget: removed the oldest dead-lettered batches");
    }
    Ok(n)
}

/// Whether the batch `seq` has an ack marker on disk.
fn is_acked(tree: &sled::Tree, seq: u64) -> sled::Result<bool> {
    tree.contains_key(layout::ack_marker_key(seq))
}

/// Moves `c.ack_floor` up to the first batch without an ack marker (or to `next_seq` if there is
/// none). Walks keys only, from the old floor: each acked batch is passed once, and the walk stops
/// at the first pending one.
fn advance_ack_floor(tree: &sled::Tree, c: &mut Counters) -> sled::Result<()> {
    let mut last = None;
    for key in tree.range(layout::pending_key(c.ack_floor)..=layout::pending_key(u64::MAX)).keys() {
        let key = key?;
        let Some(seq) = layout::pending_key_seq(&key) else { continue };
        if last == Some(seq) {
            continue;
        }
        last = Some(seq);
        if !is_acked(tree, seq)? {
            c.ack_floor = seq;
            return Ok(());
        }
    }
    c.ack_floor = c.ack_floor.max(c.next_seq);
    Ok(())
}

/// Batches per atomic write when pruning and when migrating layout 1.
const PRUNE_STEP: usize = 4096;
const MIGRATE_STEP: usize = 1024;

/// Migrates the acked batches of layout 1 (moved to `h` + acked_at + seq) to layout 2: back under
/// `p` + seq with an ack marker. Atomic steps of [`MIGRATE_STEP`] batches, each with the counters,
/// so a crash during it leaves a queue that opens and goes on migrating. Returns how many moved.
fn migrate_layout1(tree: &sled::Tree, c: &mut Counters) -> sled::Result<u64> {
    let mut moved = 0u64;
    loop {
        let records = chunks::records(tree.range([layout::ACKED]..[layout::ACKED + 1]))
            .take(MIGRATE_STEP)
            .collect::<sled::Result<Vec<_>>>()?;
        if records.is_empty() {
            break;
        }
        let mut write = sled::Batch::default();
        for record in &records {
            let key = &record.prefix;
            let (Some(acked_at), Some(seq)) = (layout::acked_key_time(key), key.get(9..17)) else { continue };
            let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
            chunks::move_into(&mut write, record, &layout::pending_key(seq));
            write.insert(&layout::ack_marker_key(seq)[..], &layout::encode_ack_marker(acked_at)[..]);
            c.acked_bytes = c.acked_bytes.saturating_sub(record.stored_size())
                + chunks::stored_size(9, record.value.len())
                + layout::ACK_MARKER_BYTES;
        }
        write.insert(layout::META_COUNTERS, c.encode());
        tree.apply_batch(write)?;
        moved += records.len() as u64;
    }
    if moved > 0 {
        tracing::info!(batches = moved, "migrated the queue's retained acked batches to ack markers (layout 2)");
    }
    Ok(moved)
}

/// The counters are written at least every this many enqueues, so that an open after a crash
/// counts at most this many records past them.
const META_EVERY_ENQUEUES: u64 = 1024;

/// A dead letter's reason is kept up to this many characters.
const MAX_REASON_CHARS: usize = 512;

/// Acks are written in groups of this many (or sooner, see [`Queue::ack`]).
pub const ACK_WRITE_GROUP: usize = 64;

/// Applies `write` together with every unwritten ack, the counters and the latest source position,
/// as one atomic sled batch. Every write of the counters goes through here, so the counters on disk
/// always describe the records on disk (up to the enqueues after `next_seq`, counted at open).
///
/// An ack is a marker (no read of the record) or, with `retain_acked = 0`, the record's removal.
/// After the write the ack floor is moved in memory; it is persisted with the next write (a lower
/// floor on disk is always true).
fn write_meta(store: &Store, st: &mut State, mut write: sled::Batch) -> Result<(), QueueError> {
    for (&seq, &acked_at_ms) in &st.unwritten_acks {
        if st.retain_acked {
            write.insert(&layout::ack_marker_key(seq)[..], &layout::encode_ack_marker(acked_at_ms)[..]);
        } else if let Some(record) = chunks::get(&store.tree, &layout::pending_key(seq))? {
            chunks::remove_into(&mut write, &record);
        }
    }
    write.insert(layout::META_COUNTERS, st.counters.encode());
    if let Some(pos) = &st.latest_position {
        write.insert(layout::META_SOURCE_POSITION, pos.as_slice());
    }
    store.tree.apply_batch(write)?;
    st.unwritten_acks.clear();
    st.applied += 1;
    // The write is done: a failed walk only leaves the floor lower, which is still true.
    if let Err(e) = advance_ack_floor(&store.tree, &mut st.counters) {
        tracing::warn!(error = %e, "moving the queue's ack floor failed; a restart scans a little more");
    }
    Ok(())
}
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

fn storage_error(e: QueueError) -> EnqueueError {
    // Unavailable: a reopen after a disk error failed, most likely for the same reason.
    // Reopened: the write was lost with the failed database; the caller's retry loop redoes it.
    if e.is_disk_full() || matches!(e, QueueError::Unavailable | QueueError::Reopened) {
        tracing::error!(error = %e, "the disk holding the queue is full; the batch was not stored");
        EnqueueError::DiskFull
    } else {
        EnqueueError::Storage(e)
    }
}

/// A batch made ready for the lock: id assigned, JSON serialized and compressed, size known.
struct Prepared {
    batch_id: BatchId,
    detections: u32,
    parts: WireParts,
    source_position: Option<Vec<u8>>,
    /// Bytes the budget will count (the seq's digits are in the fixed-size header).
    estimate: u64,
}

impl Prepared {
    fn new(batch: NewBatch) -> Self {
        let batch_id = batch.batch_id.unwrap_or_default();
        let parts = WireParts::new(&batch, batch_id);
        let position_len = batch.source_position.as_ref().map_or(0, Vec::len);
        Self {
            batch_id,
            detections: u32::try_from(batch.detections.len()).unwrap_or(u32::MAX),
            estimate: chunks::stored_size(9, parts.stored_len() + position_len + 64),
            parts,
            source_position: batch.source_position,
        }
    }
}

/// The batch's wire JSON split around `seq`, serialized before the seq is known (outside the lock),
/// so that under the lock only a concatenation remains. The field order is the one of
/// [`backhaul_shared::Batch`], and the result is byte-identical to `Batch::to_json`.
struct WireParts {
    /// `{"schema":1,"batch_id":"…","device_id":"…"`
    head: Vec<u8>,
    /// `"name":…,"location":…,"timestamp":"…","detections":[…]}`
    #[cfg_attr(not(test), allow(dead_code))]
    tail: Vec<u8>,
    /// `tail`, LZ4-compressed outside the lock.
    tail_lz4: Vec<u8>,
}

impl WireParts {
    fn new(b: &NewBatch, batch_id: BatchId) -> Self {
        #[derive(Serialize)]
        struct Head<'a> {
            schema: u32,
            batch_id: BatchId,
            device_id: &'a str,
        }
        #[derive(Serialize)]
        struct Tail<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            name: &'a Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            location: &'a Option<String>,
            timestamp: Timestamp,
            detections: &'a [Detection],
            #[serde(skip_serializing_if = "Clock::is_synced")]
            clock: Clock,
        }
        let mut head = serde_json::to_vec(&Head {
            schema: backhaul_shared::batch::SCHEMA_VERSION,
            batch_id,
            device_id: &b.device_id,
        })
        .expect("serializes");
        head.pop(); // the closing brace
        let mut tail = serde_json::to_vec(&Tail {
            name: &b.name,
            location: &b.location,
            timestamp: b.timestamp,
            detections: &b.detections,
            clock: b.clock,
        })
        .expect("serializes");
        tail.remove(0); // the opening brace
        let tail_lz4 = layout::compress_tail(&tail);
        Self { head, tail, tail_lz4 }
    }

    /// Bytes stored for the batch's JSON (head plain, tail compressed).
    fn stored_len(&self) -> usize {
        self.head.len() + self.tail_lz4.len()
    }

    #[cfg(test)]
    fn json(&self, seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.head.len() + self.tail.len() + 32);
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b",\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.push(b',');
        out.extend_from_slice(&self.tail);
        out
    }
}

/// Creates `data_dir` (and missing parents) as 0700 whatever the umask: the queue holds what the
/// Pi heard, and sled creates its files with the process's umask (022 outside systemd:
/// world-readable), so the directory is what keeps them private. An existing directory that others
/// may read is made private only if it is the queue's own (empty, or holding its `lock` file):
/// a `data_dir` pointed at a shared directory (`/var/lib`, `/tmp`) is left as it is, with a warning.
fn private_dir(data_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir)?;
    let mode = std::fs::metadata(data_dir)?.permissions().mode();
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let ours = data_dir.join("lock").exists() || std::fs::read_dir(data_dir)?.next().is_none();
    if ours && mode & 0o1000 == 0 {
        tracing::info!(data_dir = %data_dir.display(), mode = format!("{:o}", mode & 0o777), "making data_dir private (0700)");
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
    } else {
        tracing::warn!(
            data_dir = %data_dir.display(),
            mode = format!("{:o}", mode & 0o7777),
            "data_dir may be read by other users and is not the queue's own directory: use a directory of its \
             own (e.g. /var/lib/backhaul)"
        );
        Ok(())
    }
}

/// What the disk budget counts: `data_dir`'s allocated bytes without the databases set aside as
/// `corrupt-*` (kept for an operator to inspect, not the queue's to prune).
fn budget_disk_bytes(data_dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::symlink_metadata(data_dir).map_or(0, |m| m.blocks() * 512);
    let Ok(entries) = std::fs::read_dir(data_dir) else { return own };
    own + entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with("corrupt-"))
        .map(|e| allocated_bytes(&e.path()))
        .sum::<u64>()
}

/// How often the disk budget measures `data_dir` at most (also every 1/64 of `max_bytes`
/// enqueued): a directory walk of a few files.
pub const BUDGET_MEASURE_EVERY: Duration = Duration::from_millis(100);

/// The allocated size of `path` and everything under it, bytes (`st_blocks` x 512, what `du -B1`
/// reports); entries that vanish while it walks count 0.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            total += entries.filter_map(Result::ok).map(|e| allocated_bytes(&e.path())).sum::<u64>();
        }
    }
    total
}

fn sled_config(path: &Path, config: &QueueConfig) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(config.cache_capacity)
        .mode(sled::Mode::LowSpace)
        // Our own syncs make enqueues durable; this periodic flush covers acks and pruning.
        .flush_every_ms(Some(1000))
}

/// Opens sled, turning a panic (sled 0.34 can panic on damaged files) into `Corruption`, and
/// waiting out sled's own file lock if an earlier handle in this process is still closing: we hold
/// `data_dir/lock`, so no other process has this database, and sled's background threads close the
/// file a moment after the handle is dropped.
fn open_sled(path: &Path, config: &QueueConfig) -> Result<sled::Db, sled::Error> {
    let open_once = || {
        let cfg = sled_config(path, config);
        // Caught on purpose: the service's panic hook must let this one unwind to here.
        match backhaul_shared::panics::catch(|| {
            failpoint_panic_at_sled_open();
            cfg.open()
        }) {
            Ok(r) => r,
            Err(msg) => {
                tracing::error!(panic = %msg, "sled panicked while opening the queue");
                Err(sled::Error::Corruption { at: None, bt: () })
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open_once() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Test-only fault injection: `BACKHAUL_FAILPOINT=panic_at_sled_open` makes the first sled open
/// of the process panic, as sled does on some damaged files.
fn failpoint_panic_at_sled_open() {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if std::env::var("BACKHAUL_FAILPOINT").is_ok_and(|v| v == "panic_at_sled_open")
        && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        panic!("FAILPOINT panic_at_sled_open: sled panicking on damaged files");
    }
}

/// Opens sled; if it reports corruption (or panics), moves the database aside to
/// `data_dir/corrupt-<time>/` and starts a fresh one.
fn open_or_move_aside(data_dir: &Path, path: &Path, config: &QueueConfig) -> Result<sled::Db, QueueOpenError> {
    let open = || open_sled(path, config);
    match open() {
        Ok(db) => Ok(db),
        Err(e @ sled::Error::Corruption { .. }) => {
            let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
            let aside = data_dir.join(format!("corrupt-{stamp}"));
            tracing::error!(
                error = %e,
                moved_to = %aside.display(),
                "THE QUEUE DATABASE IS CORRUPT and cannot be opened: moved it aside and starting a fresh queue. \
                 Batches in it were not sent; keep the moved directory for inspection"
            );
            match std::fs::rename(path, &aside) {
                // Nothing on disk to move (sled failed before it wrote anything).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => other.map_err(|source| QueueOpenError::DataDir { data_dir: data_dir.to_owned(), source })?,
            }
            open().map_err(|source| QueueOpenError::Storage { path: path.to_owned(), source })
        }
        Err(source) => Err(QueueOpenError::Storage { path: path.to_owned(), source }),
    }
}

/// What [`load_counters`] found.
struct Loaded {
    counters: Counters,
    /// The source position stored with the newest batch.
    latest_position: Option<Vec<u8>>,
    /// batch_id → seq of the records past the persisted counters.
    tail: Vec<(BatchId, u64)>,
}

/// The counters and latest source position as of the records on disk: the persisted counters
/// (written by `write_meta`: with every ack group, drop, prune, quarantine, requeue, every 1024th
/// enqueue and at close), brought up to date by counting the batches enqueued after them
/// (seq ≥ their `next_seq`; an enqueue writes only its record). Recounted from every record if the
/// counters are missing or damaged. With `repair`, a torn newest record (an interrupted enqueue)
/// is discarded; without, nothing is changed.
fn load_counters(tree: &sled::Tree, repair: bool) -> Result<Loaded, sled::Error> {
    let stored_position = tree.get(layout::META_SOURCE_POSITION)?.map(|p| p.to_vec());
    let mut c = match tree.get(layout::META_COUNTERS)? {
        Some(v) => match Counters::decode(&v) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the queue's counters record is damaged; recounting from the records");
                return recount(tree, stored_position, repair);
            }
        },
        None => return recount(tree, stored_position, repair),
    };
    let mut position = stored_position;
    let mut tail = Vec::new();
    let mut last = None;
    for record in chunks::records(tree.range(layout::pending_key(c.next_seq)..=layout::pending_key(u64::MAX))) {
        let record = record?;
        let Some(seq) = layout::pending_key_seq(&record.prefix) else { continue };
        c.pending_batches += 1;
        c.pending_bytes += record.stored_size();
        c.produced_batches += 1;
        c.next_seq = seq + 1;
        // A damaged record is counted here and quarantined when it is read.
        if let Ok(h) = StoredBatch::decode_header(&record.value) {
            c.produced_detections += u64::from(h.detections);
            if h.source_position.is_some() {
                position = h.source_position;
            }
            tail.push((h.batch_id, seq));
        }
        last = Some(record);
    }
    if let Some(record) = last.filter(|r| repair && is_torn(r)) {
        discard_interrupted_enqueue(tree, &record, &mut c)?;
    }
    Ok(Loaded { counters: c, latest_position: position, tail })
}

/// Whether a record looks like an enqueue cut short: chunks are written in order, each whole, so a
/// torn record is chunks 0..k, all full-sized, adding up to less than its frame declares. (A
/// complete record whose length field was damaged is a multiple of the chunk size only by chance:
/// it is quarantined when read instead.)
fn is_torn(record: &chunks::Record) -> bool {
    let contiguous = record
        .keys
        .iter()
        .enumerate()
        .all(|(i, k)| k.len() >= 2 && usize::from(u16::from_be_bytes([k[k.len() - 2], k[k.len() - 1]])) == i);
    contiguous
        && record.value.len().is_multiple_of(chunks::CHUNK_SIZE)
        && backhaul_shared::record::is_incomplete(&record.value)
}

/// The newest record is torn: its enqueue was interrupted by a crash before it returned (chunks
/// are written in one go under the lock, before the sync), so it was never reported stored. Remove
/// it and reuse its seq.
fn discard_interrupted_enqueue(
    tree: &sled::Tree,
    record: &chunks::Record,
    c: &mut Counters,
) -> Result<(), sled::Error> {
    let mut write = sled::Batch::default();
    chunks::remove_into(&mut write, record);
    tree.apply_batch(write)?;
    c.pending_batches = c.pending_batches.saturating_sub(1);
    c.pending_bytes = c.pending_bytes.saturating_sub(record.stored_size());
    c.produced_batches = c.produced_batches.saturating_sub(1);
    if let Some(seq) = layout::pending_key_seq(&record.prefix) {
        c.next_seq = seq;
    }
    tracing::warn!(
        seq = c.next_seq,
        "discarded the last batch of an enqueue interrupted by a crash (it was never reported stored)"
    );
    Ok(())
}

/// Counts every record (when the counters record is missing or damaged). What was produced and
/// dropped before can't be known: produced counts what is still stored.
fn recount(tree: &sled::Tree, stored_position: Option<Vec<u8>>, repair: bool) -> Result<Loaded, sled::Error> {
    let mut c = Counters::default();
    let mut max_seq: Option<u64> = None;
    // The newest position stored in a record, by seq; else the one in the metadata.
    let mut newest_position: Option<(u64, Vec<u8>)> = None;
    let mut last_pending = None;
    let mut tail = Vec::new();
    for record in chunks::records(tree.iter()) {
        let record = record?;
        let key = &record.prefix;
        let marked = match layout::pending_key_seq(key).filter(|_| key.first() == Some(&layout::PENDING)) {
            Some(seq) => is_acked(tree, seq)?,
            None => false,
        };
        let (count, bytes) = match key.first() {
            Some(&layout::PENDING) if marked => {
                c.acked_bytes += layout::ACK_MARKER_BYTES;
                (&mut c.acked_batches, &mut c.acked_bytes)
            }
            Some(&layout::PENDING) => (&mut c.pending_batches, &mut c.pending_bytes),
            Some(&layout::ACKED) => (&mut c.acked_batches, &mut c.acked_bytes),
            Some(&layout::DEAD) => (&mut c.dead_batches, &mut c.dead_bytes),
            Some(&layout::QUARANTINE) => {
                c.quarantined += 1;
                continue;
            }
            _ => continue,
        };
        *count += 1;
        *bytes += record.stored_size();
        c.produced_batches += 1;
        if let Some(seq) = layout::pending_key_seq(key).filter(|_| key.first() == Some(&layout::PENDING)) {
            max_seq = max_seq.max(Some(seq));
        }
        if let Ok(h) = StoredBatch::decode_header(&record.value) {
            c.produced_detections += u64::from(h.detections);
            max_seq = max_seq.max(Some(h.seq));
            if key.first() == Some(&layout::PENDING) && !marked {
                tail.push((h.batch_id, h.seq));
            }
            if let Some(pos) = h.source_position {
                if newest_position.as_ref().is_none_or(|(seq, _)| h.seq > *seq) {
                    newest_position = Some((h.seq, pos));
                }
            }
        }
        if key.first() == Some(&layout::PENDING) {
            last_pending = Some(record);
        }
    }
    c.next_seq = max_seq.map_or(0, |seq| seq + 1);
    if let Some(record) = last_pending.filter(|r| repair && is_torn(r)) {
        if layout::pending_key_seq(&record.prefix).map(|s| s + 1) == Some(c.next_seq) {
            discard_interrupted_enqueue(tree, &record, &mut c)?;
        }
    }
    let latest_position = newest_position.map(|(_, p)| p).or(stored_position);
    Ok(Loaded { counters: c, latest_position, tail })
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsyncs the blob files not synced yet, then the blob directory. (With records in 4 KiB chunks
/// sled should never write a blob; this is the safety net if it does.)
fn sync_new_blobs(dir: &Path, synced: &mut std::collections::HashSet<u64>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut present = std::collections::HashSet::new();
    let mut any = false;
    for entry in entries {
        let entry = entry?;
        let Some(n) = entry.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else { continue };
        present.insert(n);
        if !synced.contains(&n) {
            match File::open(entry.path()) {
                Ok(f) => f.sync_data()?,
                // sled deletes blobs whose page was rewritten: nothing left to sync.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            any = true;
        }
    }
    if any {
        sync_dir(dir)?;
    }
    *synced = present;
    Ok(())
}

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
