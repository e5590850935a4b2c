//! The durable batch queue: every decoded batch is written here, durably, before anything else
//! happens, and leaves only when the cloud (or broker) acknowledged it.
//!
//! # Storage
//! One sled 0.34.7 database in `data_dir/queue/`, one tree, with logical trees as key prefixes
//! (see [`layout`]) so that every state change is a single atomic `apply_batch`:
//!
//! | key | value | meaning |
//! | --- | --- | --- |
//! | `p` + seq (BE) | framed [`layout::StoredBatch`] | pending: waiting, or in flight |
//! | `h` + acked_at_ms (BE) + seq (BE) | the same record | acked, retained for `retain_acked` for replay |
//! | `q` + original key | the raw bytes as found | quarantined: failed its checksum |
//! | `mcounters` | framed [`Counters`] | counts, updated in the same write as what they count |
//! | `msource_position` | opaque bytes | where a resumable source stands, written with each batch |
//!
//! Every record goes through the shared CRC framing (`backhaul_shared::record`).
//!
//! # States
//! pending → in flight (handed out by [`Queue::next_batch`]) → acked ([`Queue::ack`]), or back to
//! pending ([`Queue::nack`]). "In flight" lives only in memory: after a restart everything that was in
//! flight is pending again, and is sent again (the cloud absorbs the duplicate by `batch_id`).
//!
//! # Invariants
//! - A batch is deleted from pending only after its ack (or, under `on_full = "drop_oldest"`, by the
//!   byte budget, which counts every dropped batch and detection: the cloud sees a `seq` gap).
//! - [`Queue::enqueue`] returns only once the batch is durable: after sled's `flush` (which on Linux
//!   ends in `sync_file_range`, enough for a process kill but not for a power cut, sled #1452) we
//!   `fdatasync` sled's log file ourselves and `fsync` any new blob file (sled 0.34 writes values over
//!   ~128 KiB to `blobs/` and never syncs them) and the blob directory. [`Durability::Flush`] skips
//!   the extra syncs for tests and benchmarks that only need to survive a kill.
//! - Group commit: concurrent enqueues apply their writes in memory under the state lock, then meet
//!   at the sync lock. The first to get it syncs everything applied so far, and the others find their
//!   write already durable, so N producers share one flush.
//! - Delivery is at least once: acks are not synced one by one (a lost ack only means a resend, which
//!   the cloud deduplicates); they become durable with the next enqueue's sync or sled's periodic flush.
//! - seqs are assigned in commit order under the state lock, so a crash leaves no hole in `seq`.
//! - A record that fails its check on read is moved to quarantine, counted and logged with its key;
//!   the queue goes on. A database sled cannot open (its `Corruption` error, or a panic while opening)
//!   is moved aside to `data_dir/corrupt-<time>/` and a fresh queue is started, loudly: an unattended
//!   device must come back up.
//! - One process per `data_dir`: an advisory lock on `data_dir/lock`.
//!
//! # Byte budget
//! `max_bytes` bounds the bytes of keys and records of pending and retained acked batches. When a
//! new batch does not fit, retained acked batches are pruned first (oldest first: they are delivered),
//! then `drop_oldest` drops the oldest pending batches that are not in flight, while `block` makes
//! `enqueue` wait for acks to free space, up to `block_timeout`, then fail with
//! [`EnqueueError::Full`]. sled's files are larger than the logical bytes (its log keeps old versions
//! until segments are cleaned), so leave headroom on the disk.
//!
//! # Walk-through
//! - write: `enqueue` → serialize the wire JSON (outside the lock) → lock state → make room →
//!   seq = next_seq → one `apply_batch` of record + counters (+ source position) → unlock → sync.
//! - read: `next_batch` → the oldest retried (nacked or requeued) batch, else the next seq after the
//!   cursor → decode (quarantine on failure) → mark in flight.
//! - ack: move `p`+seq to `h`+now+seq with the counters, in one `apply_batch`.
//! - recover: open → counters from `mcounters` (recounted from the records if missing or damaged) →
//!   nothing in flight, cursor at the start → prune acked batches older than `retain_acked`.

pub(crate) mod layout;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime};

use backhaul_shared::{BatchId, Detection, Timestamp};
use serde::Serialize;
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

/// Queue settings.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Budget for pending + retained acked records, in bytes.
    pub max_bytes: u64,
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
    /// Bytes of pending + retained records (what the budget counts).
    pub bytes: u64,
    pub pending_bytes: u64,
    pub acked_bytes: u64,
    pub oldest_pending_age_s: Option<u64>,
    pub produced_batches: u64,
    pub produced_detections: u64,
    pub dropped_batches: u64,
    pub dropped_detections: u64,
    pub quarantined: u64,
    pub acked_total: u64,
    pub next_seq: u64,
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
}

#[derive(Debug, Error)]
pub enum EnqueueError {
    #[error("the queue is full ({used} of {max_bytes} bytes) and on_full = \"block\": waited {waited:?} for the forwarder to free space; is the link down? raise queue.max_bytes or use on_full = \"drop_oldest\"")]
    Full { used: u64, max_bytes: u64, waited: Duration },
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
    /// sled's in-memory `apply_batch`, never across a disk sync, and never from async code.
    state: Mutex<State>,
    /// Signalled when acks or pruning free budget (for `OnFull::Block`).
    space: Condvar,
    /// The group-commit lock: held while syncing; guards the highest durable write ticket.
    sync: Mutex<SyncState>,
    /// Held for the life of the queue: one process per data_dir.
    _lock: File,
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
    /// Pending seqs below the cursor to hand out again first: nacked or requeued.
    retry: BTreeSet<u64>,
    /// Next seq to look at in the pending range.
    cursor: u64,
    /// batch_id → seq of every batch handed out since open and not yet acked.
    handed: HashMap<BatchId, u64>,
    /// Number of writes applied (for group commit).
    applied: u64,
}

#[derive(Debug, Default)]
struct SyncState {
    durable: u64,
    /// Highest blob file number already fsynced.
    blobs_synced: u64,
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
        std::fs::create_dir_all(data_dir).map_err(dir_err)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
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
        let counters = load_counters(&store.tree).map_err(storage)?;
        let queue = Self {
            inner: Arc::new(Inner {
                store: RwLock::new(Some(store)),
                path: path.clone(),
                config,
                state: Mutex::new(State { counters, ..State::default() }),
                space: Condvar::new(),
                sync: Mutex::new(SyncState::default()),
                _lock: lock,
            }),
        };
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
        let batch_id = BatchId::new();
        let detections = u32::try_from(batch.detections.len()).unwrap_or(u32::MAX);
        let parts = WireParts::new(&batch, batch_id);
        // Size is known before the seq: the seq's digits change it by a few bytes at most.
        let estimate = (parts.len() + 64 + 9) as u64;
        let max_bytes = self.inner.config.max_bytes;
        if estimate > max_bytes {
            return Err(EnqueueError::TooLarge { size: estimate, max_bytes });
        }
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match self.try_enqueue(&parts, batch_id, detections, estimate, batch.source_position.as_deref()) {
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

    fn try_enqueue(
        &self,
        parts: &WireParts,
        batch_id: BatchId,
        detections: u32,
        estimate: u64,
        source_position: Option<&[u8]>,
    ) -> Result<Enqueued, EnqueueError> {
        let enqueued_at_ms = now_ms();
        let (ticket, seq, dropped) = {
            let guard = self.read_store();
            let store = Store::get(&guard).map_err(storage_error)?;
            let (mut st, dropped) = self.make_room(store, self.lock_state(), estimate)?;
            let seq = st.counters.next_seq;
            let record = StoredBatch { batch_id, seq, enqueued_at_ms, detections, json: parts.json(seq) }.encode();
            let size = (record.len() + 9) as u64;
            let mut counters = st.counters;
            counters.next_seq += 1;
            counters.pending_batches += 1;
            counters.pending_bytes += size;
            counters.produced_batches += 1;
            counters.produced_detections += u64::from(detections);
            let mut write = sled::Batch::default();
            write.insert(&layout::pending_key(seq), record);
            write.insert(layout::META_COUNTERS, counters.encode());
            if let Some(pos) = source_position {
                write.insert(layout::META_SOURCE_POSITION, pos);
            }
            store.tree.apply_batch(write).map_err(|e| storage_error(e.into()))?;
            st.counters = counters;
            st.applied += 1;
            (st.applied, seq, dropped)
        };
        self.sync_to(ticket).map_err(storage_error)?;
        Ok(Enqueued { seq, batch_id, dropped })
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
    /// one failed write). In-flight batches stay in flight; the counters are read back from disk,
    /// and the cursor restarts so that a batch whose ack was lost with the failed write is sent again.
    fn reopen(&self) -> Result<(), QueueError> {
        let mut sync = self.inner.sync.lock().unwrap_or_else(|p| p.into_inner());
        let mut slot = self.inner.store.write().unwrap_or_else(|p| p.into_inner());
        // sled releases its file lock when the last handle is dropped.
        drop(slot.take());
        let db = sled_config(&self.inner.path, &self.inner.config).open()?;
        let store = Store::new(db, &self.inner.path)?;
        store.db.flush()?;
        store.log_file.sync_data()?;
        let counters = load_counters(&store.tree)?;
        let mut st = self.lock_state();
        st.counters = counters;
        st.cursor = 0;
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
        let max = self.inner.config.max_bytes;
        let used = |st: &State| st.counters.pending_bytes + st.counters.acked_bytes;
        if used(&st) + needed <= max {
            return Ok((st, 0));
        }
        // Delivered batches go first.
        let over = used(&st) + needed - max;
        prune_acked_locked(store, &mut st, None, Some(over)).map_err(storage_error)?;
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
                        return Err(EnqueueError::Full { used: used(&st), max_bytes: max, waited: started.elapsed() });
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

    /// Makes everything applied up to `ticket` durable, sharing the sync with concurrent callers.
    fn sync_to(&self, ticket: u64) -> Result<(), QueueError> {
        let mut sync = self.inner.sync.lock().unwrap_or_else(|p| p.into_inner());
        if sync.durable >= ticket {
            return Ok(()); // someone else's sync covered our write
        }
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let target = self.lock_state().applied;
        store.db.flush()?;
        if self.inner.config.durability == Durability::Fsync {
            store.log_file.sync_data()?;
            sync.blobs_synced = sync_new_blobs(&self.inner.path.join("blobs"), sync.blobs_synced)?;
        }
        sync.durable = target;
        Ok(())
    }

    /// Makes every write so far durable (acks included).
    pub fn flush(&self) -> Result<(), QueueError> {
        let ticket = {
            let mut st = self.lock_state();
            st.applied += 1;
            st.applied
        };
        self.sync_to(ticket)
    }

    /// Hands out the oldest pending batch that is not in flight, or `None`.
    pub fn next_batch(&self) -> Result<Option<QueuedBatch>, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        loop {
            let (key, value) = if let Some(seq) = st.retry.pop_first() {
                match store.tree.get(layout::pending_key(seq))? {
                    Some(v) => (layout::pending_key(seq).to_vec(), v),
                    None => continue, // dropped or acked meanwhile
                }
            } else {
                let from = layout::pending_key(st.cursor);
                match store.tree.range(from..=layout::pending_key(u64::MAX)).next() {
                    Some(item) => {
                        let (k, v) = item?;
                        (k.to_vec(), v)
                    }
                    None => return Ok(None),
                }
            };
            let Some(seq) = layout::pending_key_seq(&key) else { continue };
            st.cursor = st.cursor.max(seq + 1);
            if st.in_flight.contains(&seq) {
                continue;
            }
            match StoredBatch::decode(&value) {
                Ok(b) => {
                    st.in_flight.insert(seq);
                    st.handed.insert(b.batch_id, seq);
                    return Ok(Some(QueuedBatch {
                        seq,
                        batch_id: b.batch_id,
                        detections: b.detections,
                        enqueued_at_ms: b.enqueued_at_ms,
                        payload: b.json,
                    }));
                }
                Err(e) => quarantine_locked(store, &mut st, &key, &value, &e)?,
            }
        }
    }

    /// Marks a batch acknowledged: it leaves pending (kept for replay for `retain_acked`).
    pub fn ack(&self, batch_id: BatchId) -> Result<AckOutcome, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut st = self.lock_state();
        let Some(seq) = st.handed.remove(&batch_id) else { return Ok(AckOutcome::Unknown) };
        st.in_flight.remove(&seq);
        st.retry.remove(&seq);
        let key = layout::pending_key(seq);
        let Some(value) = store.tree.get(key)? else { return Ok(AckOutcome::Unknown) };
        let size = (key.len() + value.len()) as u64;
        let mut counters = st.counters;
        counters.pending_batches = counters.pending_batches.saturating_sub(1);
        counters.pending_bytes = counters.pending_bytes.saturating_sub(size);
        counters.acked_total += 1;
        let mut write = sled::Batch::default();
        write.remove(&key);
        if !self.inner.config.retain_acked.is_zero() {
            let hkey = layout::acked_key(now_ms(), seq);
            counters.acked_batches += 1;
            counters.acked_bytes += (hkey.len() + value.len()) as u64;
            write.insert(&hkey, value);
        }
        write.insert(layout::META_COUNTERS, counters.encode());
        store.tree.apply_batch(write)?;
        st.counters = counters;
        st.applied += 1;
        drop(st);
        self.inner.space.notify_all();
        Ok(AckOutcome::Acked)
    }

    /// Puts an in-flight batch back to pending (e.g. after a reconnect); it is handed out again
    /// before newer batches.
    pub fn nack(&self, batch_id: BatchId) -> bool {
        let mut st = self.lock_state();
        let Some(&seq) = st.handed.get(&batch_id) else { return false };
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
    /// `batch_id` and `seq`, for an operator's replay. Returns how many.
    pub fn requeue_acked(&self, since: SystemTime, until: Option<SystemTime>) -> Result<u64, QueueError> {
        let ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let start = layout::acked_key(ms(since), 0);
        let end = layout::acked_key(until.map(ms).unwrap_or(u64::MAX), 0);
        let ticket = {
            let guard = self.read_store();
            let store = Store::get(&guard)?;
            let mut st = self.lock_state();
            // Damaged records are quarantined first, so the move below is one atomic write.
            let mut found = Vec::new();
            for item in store.tree.range(start..end) {
                let (key, value) = item?;
                match StoredBatch::decode(&value) {
                    Ok(b) => found.push((key, value, b.seq)),
                    Err(e) => quarantine_locked(store, &mut st, &key, &value, &e)?,
                }
            }
            if found.is_empty() {
                return Ok(0);
            }
            let mut write = sled::Batch::default();
            let mut counters = st.counters;
            for (key, value, seq) in &found {
                let pkey = layout::pending_key(*seq);
                counters.acked_batches = counters.acked_batches.saturating_sub(1);
                counters.acked_bytes = counters.acked_bytes.saturating_sub((key.len() + value.len()) as u64);
                counters.pending_batches += 1;
                counters.pending_bytes += (pkey.len() + value.len()) as u64;
                write.remove(key);
                write.insert(&pkey, value);
            }
            write.insert(layout::META_COUNTERS, counters.encode());
            store.tree.apply_batch(write)?;
            st.counters = counters;
            st.applied += 1;
            st.retry.extend(found.iter().map(|f| f.2));
            tracing::info!(batches = found.len(), "requeued acked batches for replay");
            (st.applied, found.len() as u64)
        };
        self.sync_to(ticket.0)?;
        Ok(ticket.1)
    }

    /// The last source position stored with a batch.
    pub fn source_position(&self) -> Result<Option<Vec<u8>>, QueueError> {
        let guard = self.read_store();
        Ok(Store::get(&guard)?.tree.get(layout::META_SOURCE_POSITION)?.map(|v| v.to_vec()))
    }

    /// Counts by state and the budget's use.
    pub fn stats(&self) -> Result<Stats, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let st = self.lock_state();
        let c = st.counters;
        let in_flight = st.in_flight.len() as u64;
        drop(st);
        let oldest_pending_age_s = match store.tree.range(layout::pending_key(0)..=layout::pending_key(u64::MAX)).next()
        {
            Some(item) => {
                let (_, v) = item?;
                StoredBatch::decode(&v).ok().map(|b| now_ms().saturating_sub(b.enqueued_at_ms) / 1000)
            }
            None => None,
        };
        Ok(Stats {
            pending: c.pending_batches.saturating_sub(in_flight),
            in_flight,
            acked_retained: c.acked_batches,
            bytes: c.pending_bytes + c.acked_bytes,
            pending_bytes: c.pending_bytes,
            acked_bytes: c.acked_bytes,
            oldest_pending_age_s,
            produced_batches: c.produced_batches,
            produced_detections: c.produced_detections,
            dropped_batches: c.dropped_batches,
            dropped_detections: c.dropped_detections,
            quarantined: c.quarantined,
            acked_total: c.acked_total,
            next_seq: c.next_seq,
        })
    }

    /// Reads every record and checks it, without changing anything.
    pub fn verify(&self) -> Result<VerifyReport, QueueError> {
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        let mut report = VerifyReport::default();
        let any_size = backhaul_shared::Limits { max_detections: usize::MAX };
        for item in store.tree.iter() {
            let (key, value) = item?;
            match key.first() {
                Some(&layout::PENDING) | Some(&layout::ACKED) => match StoredBatch::decode(&value) {
                    Ok(b) => match backhaul_shared::Batch::from_json(&b.json, &any_size) {
                        Ok(batch) if batch.batch_id == b.batch_id && batch.seq == b.seq => report.ok += 1,
                        Ok(_) => report.bad.push(format!("{}: header and JSON disagree on batch_id or seq", hex(&key))),
                        Err(e) => report.bad.push(format!("{}: stored JSON does not parse: {e}", hex(&key))),
                    },
                    Err(e) => report.bad.push(format!("{}: {e}", hex(&key))),
                },
                Some(&layout::QUARANTINE) => report.quarantined += 1,
                _ => {}
            }
        }
        let counted = recount(&store.tree)?;
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
        let guard = self.read_store();
        let store = Store::get(&guard)?;
        for item in store.tree.iter() {
            let (key, value) = item.map_err(QueueError::from)?;
            let (state, acked_at_ms) = match key.first() {
                Some(&layout::PENDING) => ("pending", None),
                Some(&layout::ACKED) => ("acked", layout::acked_key_time(&key)),
                Some(&layout::QUARANTINE) => ("quarantined", None),
                _ => continue,
            };
            let record = match StoredBatch::decode(&value) {
                Ok(b) => ExportedRecord {
                    state,
                    key: hex(&key),
                    seq: Some(b.seq),
                    batch_id: Some(b.batch_id.to_string()),
                    enqueued_at_ms: Some(b.enqueued_at_ms),
                    acked_at_ms,
                    detections: Some(b.detections),
                    batch: serde_json::from_slice(&b.json).ok(),
                    error: None,
                    raw_hex: None,
                },
                Err(e) => ExportedRecord {
                    state,
                    key: hex(&key),
                    seq: None,
                    batch_id: None,
                    enqueued_at_ms: None,
                    acked_at_ms,
                    detections: None,
                    batch: None,
                    error: Some(e.to_string()),
                    raw_hex: Some(hex(&value)),
                },
            };
            each(record).map_err(ExportError::Write)?;
        }
        Ok(())
    }

    /// Test hook: writes raw bytes under a pending key, as a damaged disk would leave them.
    #[doc(hidden)]
    pub fn debug_overwrite_pending(&self, seq: u64, value: &[u8]) -> Result<(), QueueError> {
        {
            let guard = self.read_store();
            Store::get(&guard)?.tree.insert(layout::pending_key(seq), value)?;
        }
        self.flush()
    }

    /// Test hook: the raw stored value of a pending record.
    #[doc(hidden)]
    pub fn debug_pending_raw(&self, seq: u64) -> Result<Option<Vec<u8>>, QueueError> {
        let guard = self.read_store();
        Ok(Store::get(&guard)?.tree.get(layout::pending_key(seq))?.map(|v| v.to_vec()))
    }
}

/// Drops the oldest pending batches that are not in flight until `to_free` bytes are freed.
fn drop_oldest_locked(store: &Store, st: &mut State, to_free: u64) -> Result<u64, QueueError> {
    let mut freed = 0;
    let mut write = sled::Batch::default();
    let mut counters = st.counters;
    let mut dropped = Vec::new();
    for item in store.tree.range(layout::pending_key(0)..=layout::pending_key(u64::MAX)) {
        if freed >= to_free {
            break;
        }
        let (key, value) = item?;
        let Some(seq) = layout::pending_key_seq(&key) else { continue };
        if st.in_flight.contains(&seq) {
            continue;
        }
        let size = (key.len() + value.len()) as u64;
        let detections = match StoredBatch::decode(&value) {
            Ok(b) => {
                st.handed.remove(&b.batch_id);
                u64::from(b.detections)
            }
            // Unreadable anyway: count the batch, its detections are unknown.
            Err(_) => 0,
        };
        write.remove(key.as_ref());
        counters.pending_batches -= 1;
        counters.pending_bytes = counters.pending_bytes.saturating_sub(size);
        counters.dropped_batches += 1;
        counters.dropped_detections += detections;
        freed += size;
        dropped.push((seq, detections));
    }
    if dropped.is_empty() {
        return Ok(0);
    }
    write.insert(layout::META_COUNTERS, counters.encode());
    store.tree.apply_batch(write)?;
    for (seq, _) in &dropped {
        st.retry.remove(seq);
    }
    st.counters = counters;
    st.applied += 1;
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
    key: &[u8],
    value: &[u8],
    error: &StoredError,
) -> Result<(), QueueError> {
    let mut counters = st.counters;
    counters.quarantined += 1;
    let size = (key.len() + value.len()) as u64;
    match key.first() {
        Some(&layout::PENDING) => {
            counters.pending_batches = counters.pending_batches.saturating_sub(1);
            counters.pending_bytes = counters.pending_bytes.saturating_sub(size);
        }
        Some(&layout::ACKED) => {
            counters.acked_batches = counters.acked_batches.saturating_sub(1);
            counters.acked_bytes = counters.acked_bytes.saturating_sub(size);
        }
        _ => {}
    }
    let mut write = sled::Batch::default();
    write.insert(layout::quarantine_key(key), value);
    write.remove(key);
    write.insert(layout::META_COUNTERS, counters.encode());
    store.tree.apply_batch(write)?;
    st.counters = counters;
    st.applied += 1;
    tracing::error!(
        key = %hex(key),
        error = %error,
        quarantined_total = counters.quarantined,
        "queue record failed its integrity check: moved to quarantine (inspect with `backhaul-edge queue export`); the queue goes on"
    );
    Ok(())
}

/// Removes acked batches oldest first: those acked before `before_ms`, or until `bytes` are freed.
fn prune_acked_locked(
    store: &Store,
    st: &mut State,
    before_ms: Option<u64>,
    bytes: Option<u64>,
) -> Result<u64, QueueError> {
    let end = layout::acked_key(before_ms.unwrap_or(u64::MAX), 0);
    let mut write = sled::Batch::default();
    let mut counters = st.counters;
    let (mut n, mut freed) = (0u64, 0u64);
    for item in store.tree.range(layout::acked_key(0, 0)..end) {
        if bytes.is_some_and(|b| freed >= b) {
            break;
        }
        let (key, value) = item?;
        let size = (key.len() + value.len()) as u64;
        write.remove(key);
        counters.acked_batches = counters.acked_batches.saturating_sub(1);
        counters.acked_bytes = counters.acked_bytes.saturating_sub(size);
        freed += size;
        n += 1;
    }
    if n > 0 {
        write.insert(layout::META_COUNTERS, counters.encode());
        store.tree.apply_batch(write)?;
        st.counters = counters;
        st.applied += 1;
    }
    Ok(n)
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
    if e.is_disk_full() || matches!(e, QueueError::Unavailable) {
        tracing::error!(error = %e, "the disk holding the queue is full; the batch was not stored");
        EnqueueError::DiskFull
    } else {
        EnqueueError::Storage(e)
    }
}

/// The batch's wire JSON split around `seq`, serialized before the seq is known (outside the lock),
/// so that under the lock only a concatenation remains. The field order is the one of
/// [`backhaul_shared::Batch`], and the result is byte-identical to `Batch::to_json`.
struct WireParts {
    /// `{"schema":1,"batch_id":"…","device_id":"…"`
    head: Vec<u8>,
    /// `"name":…,"location":…,"timestamp":"…","detections":[…]}`
    tail: Vec<u8>,
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
        })
        .expect("serializes");
        tail.remove(0); // the opening brace
        Self { head, tail }
    }

    fn len(&self) -> usize {
        self.head.len() + self.tail.len() + ",\"seq\":".len() + 20 + 1
    }

    fn json(&self, seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b",\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.push(b',');
        out.extend_from_slice(&self.tail);
        out
    }
}

fn sled_config(path: &Path, config: &QueueConfig) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(config.cache_capacity)
        .mode(sled::Mode::LowSpace)
        // Our own syncs make enqueues durable; this periodic flush covers acks and pruning.
        .flush_every_ms(Some(1000))
}

/// Opens sled; if it reports corruption (or panics, as sled 0.34 can on damaged files), moves the
/// database aside to `data_dir/corrupt-<time>/` and starts a fresh one.
fn open_or_move_aside(data_dir: &Path, path: &Path, config: &QueueConfig) -> Result<sled::Db, QueueOpenError> {
    let open = || {
        let cfg = sled_config(path, config);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cfg.open())) {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                Err(sled::Error::Corruption { at: None, bt: () }).inspect_err(|_| {
                    tracing::error!(panic = %msg, "sled panicked while opening the queue");
                })
            }
        }
    };
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
            std::fs::rename(path, &aside)
                .map_err(|source| QueueOpenError::DataDir { data_dir: data_dir.to_owned(), source })?;
            open().map_err(|source| QueueOpenError::Storage { path: path.to_owned(), source })
        }
        Err(source) => Err(QueueOpenError::Storage { path: path.to_owned(), source }),
    }
}

/// The persisted counters, or a recount from the records if they are missing or damaged.
fn load_counters(tree: &sled::Tree) -> Result<Counters, sled::Error> {
    match tree.get(layout::META_COUNTERS)? {
        Some(v) => match Counters::decode(&v) {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::error!(error = %e, "the queue's counters record is damaged; recounting from the records");
                recount(tree)
            }
        },
        None => recount(tree),
    }
}

/// Counts pending and acked records (used when the counters record is missing or damaged).
fn recount(tree: &sled::Tree) -> Result<Counters, sled::Error> {
    let mut c = Counters::default();
    let mut max_seq = None;
    for item in tree.iter() {
        let (key, value) = item?;
        let size = (key.len() + value.len()) as u64;
        match key.first() {
            Some(&layout::PENDING) => {
                c.pending_batches += 1;
                c.pending_bytes += size;
                max_seq = max_seq.max(layout::pending_key_seq(&key));
            }
            Some(&layout::ACKED) => {
                c.acked_batches += 1;
                c.acked_bytes += size;
                if let Ok(b) = StoredBatch::decode(&value) {
                    max_seq = max_seq.max(Some(b.seq));
                }
            }
            Some(&layout::QUARANTINE) => c.quarantined += 1,
            _ => {}
        }
    }
    c.next_seq = max_seq.map_or(0, |s| s + 1);
    Ok(c)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsyncs blob files numbered above `synced`, then the blob directory; returns the new high mark.
fn sync_new_blobs(dir: &Path, synced: u64) -> io::Result<u64> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(synced),
        Err(e) => return Err(e),
    };
    let mut high = synced;
    let mut any = false;
    for entry in entries {
        let entry = entry?;
        let Some(n) = entry.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else { continue };
        if n > synced {
            File::open(entry.path())?.sync_data()?;
            high = high.max(n);
            any = true;
        }
    }
    if any {
        sync_dir(dir)?;
    }
    Ok(high)
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
mod tests;
