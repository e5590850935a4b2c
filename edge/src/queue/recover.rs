//! Opening and recovering: the data_dir (private, locked), sled (a panic or corruption moves the
//! database aside), the counters as of the records on disk (the tail past them counted in, a torn
//! last enqueue discarded, a recount when they are missing), and the reopen after a disk error.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use backhaul_shared::BatchId;

use super::layout::{self, Counters, StoredBatch};
use super::ledger::{Change, Held};
use super::retain::{advance_ack_floor, is_acked, migrate_layout1};
use super::write::sync_dir;
use super::{chunks, Inner, Queue, QueueConfig, QueueError, QueueOpenError, State, Store, SyncState};

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
            counters.apply(Change::Lost {
                batches: lost,
                next_seq: w.next_seq,
                produced_batches: w.produced_batches,
                produced_detections: w.produced_detections,
            });
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

    /// Closes and reopens the database after a write failed (sled refuses every operation after
    /// one failed write), and starts over from what is on disk, as after a restart: the counters are
    /// read back, nothing is in flight, and the writes applied before are not counted as durable
    /// (their enqueues retry).
    pub(super) fn reopen(&self) -> Result<(), QueueError> {
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
        let mut recovered: HashMap<BatchId, u64> = tail.into_iter().collect();
        // Applied by enqueues that had not returned: kept if their record is still there, whole.
        for (batch_id, seq) in std::mem::take(&mut st.unsynced) {
            let kept = chunks::get(&store.tree, &layout::pending_key(seq))
                .ok()
                .flatten()
                .and_then(|r| StoredBatch::decode_header(&r.value).ok())
                .is_some_and(|h| h.batch_id == batch_id);
            if kept {
                recovered.insert(batch_id, seq);
            }
        }
        st.recovered = recovered;
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
pub(super) struct Loaded {
    pub(super) counters: Counters,
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
        // A damaged record is counted here and quarantined when it is read.
        let header = StoredBatch::decode_header(&record.value).ok();
        let detections = header.as_ref().map_or(0, |h| u64::from(h.detections));
        c.apply(Change::Enqueued { seq, bytes: record.stored_size(), detections });
        if let Some(h) = header {
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
    c.apply(Change::Discarded { seq: layout::pending_key_seq(&record.prefix), bytes: record.stored_size() });
    tracing::warn!(
        seq = c.next_seq,
        "discarded the last batch of an enqueue interrupted by a crash (it was never reported stored)"
    );
    Ok(())
}

/// Counts every record (when the counters record is missing or damaged). What was produced and
/// dropped before can't be known: produced counts what is still stored.
pub(super) fn recount(
    tree: &sled::Tree,
    stored_position: Option<Vec<u8>>,
    repair: bool,
) -> Result<Loaded, sled::Error> {
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
        let (held, bytes) = match key.first() {
            Some(&layout::PENDING) if marked => (Held::Acked, record.stored_size() + layout::ACK_MARKER_BYTES),
            Some(&layout::PENDING) => (Held::Pending, record.stored_size()),
            Some(&layout::ACKED) => (Held::Acked, record.stored_size()),
            Some(&layout::DEAD) => (Held::Dead, record.stored_size()),
            Some(&layout::QUARANTINE) => {
                c.apply(Change::CountedQuarantined);
                continue;
            }
            _ => continue,
        };
        let header = StoredBatch::decode_header(&record.value).ok();
        let detections = header.as_ref().map_or(0, |h| u64::from(h.detections));
        c.apply(Change::Counted { held, bytes, detections });
        if let Some(seq) = layout::pending_key_seq(key).filter(|_| key.first() == Some(&layout::PENDING)) {
            max_seq = max_seq.max(Some(seq));
        }
        if let Some(h) = header {
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
    c.apply(Change::NextSeqAtLeast { next_seq: max_seq.map_or(0, |seq| seq + 1) });
    if let Some(record) = last_pending.filter(|r| repair && is_torn(r)) {
        if layout::pending_key_seq(&record.prefix).map(|s| s + 1) == Some(c.next_seq) {
            discard_interrupted_enqueue(tree, &record, &mut c)?;
        }
    }
    let latest_position = newest_position.map(|(_, p)| p).or(stored_position);
    Ok(Loaded { counters: c, latest_position, tail })
}
