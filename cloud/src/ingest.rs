//! The one path every batch takes, whichever adapter (HTTP, MQTT) received it: validate with the
//! shared rules, then store it exactly once by its `batch_id` in one transaction. No SQL here, and
//! no HTTP or MQTT either. The adapters reach storage only through [`Ingest`]: the store is
//! private to it (the CLI's `reprocess` opens its own).

use backhaul_shared::{Batch, BatchError, DeviceStatus, Limits};
use sha2::{Digest, Sha256};

pub use crate::store::Lookup;
use crate::store::{DetectionQuery, DetectionRow, DeviceRow, Outcome, Stats, Store, StoreError};

/// What became of a batch.
#[derive(Debug)]
pub enum Accepted {
    /// Newly stored.
    Stored(Batch),
    /// Stored before with the same payload.
    Duplicate(Batch),
    /// The batch_id is stored with a different payload: refused, for good.
    Conflict(Batch),
}

impl Accepted {
    pub fn batch(&self) -> &Batch {
        match self {
            Accepted::Stored(b) | Accepted::Duplicate(b) | Accepted::Conflict(b) => b,
        }
    }
}

#[derive(Debug)]
pub struct Ingest {
    store: Store,
    pub limits: Limits,
    /// Per-device rate limits, across both adapters ([`crate::ratelimit`]).
    pub rates: crate::ratelimit::DeviceLimits,
    /// What the dashboard shows live: every batch taken in, and the ingest rate (issue #19).
    pub live: std::sync::Arc<crate::live::Live>,
}

/// The payload's SHA-256, hex: a resend must be byte-identical to count as a duplicate.
pub fn payload_hash(raw: &[u8]) -> String {
    use std::fmt::Write;
    let mut hex = String::with_capacity(64);
    for b in Sha256::digest(raw) {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

impl Ingest {
    pub fn new(store: Store, limits: Limits, rates: crate::ratelimit::DeviceLimits) -> Self {
        Self { store, limits, rates, live: Default::default() }
    }

    /// Parses and validates wire bytes (the same rules for every adapter).
    pub fn parse(&self, raw: &[u8]) -> Result<Batch, BatchError> {
        Batch::from_json(raw, &self.limits)
    }

    /// Stores a parsed batch exactly once. `raw` are the bytes it was parsed from; `lookup`:
    /// whether the batch_id is read before the write path ([`Lookup::First`], for senders that
    /// resend in floods, e.g. a seed agent after a reconnect), or the write finds a batch stored
    /// before in its transaction ([`Lookup::Done`]: a backhaul-edge's batch over MQTT is most
    /// often new, and that read was one more hand-off per batch).
    pub async fn accept(
        &self,
        batch: Batch,
        raw: &[u8],
        via: &'static str,
        lookup: Lookup,
    ) -> Result<Accepted, StoreError> {
        let hash = payload_hash(raw);
        self.accept_hashed(batch, raw, hash, via, lookup).await
    }

    /// [`Self::accept`] with `hash` = [`payload_hash`]`(raw)` already computed, and `lookup`
    /// saying whether [`Self::duplicate_of`] has already looked this batch_id up with it.
    pub async fn accept_hashed(
        &self,
        batch: Batch,
        raw: &[u8],
        hash: String,
        via: &'static str,
        lookup: Lookup,
    ) -> Result<Accepted, StoreError> {
        Ok(match self.store.store_batch(&batch, raw, &hash, via, lookup).await? {
            Outcome::Stored => {
                self.live.batch(&batch, false, via);
                Accepted::Stored(batch)
            }
            Outcome::Duplicate => {
                self.live.batch(&batch, true, via);
                Accepted::Duplicate(batch)
            }
            Outcome::Conflict => {
                tracing::warn!(
                    batch_id = %batch.batch_id,
                    device_id = %batch.device_id,
                    via,
                    "batch_id already stored with a different payload: rejected (is a device reusing batch ids?)"
                );
                Accepted::Conflict(batch)
            }
        })
    }

    /// The commands to devices (issue #18): their own room of the store.
    pub fn commands(&self) -> crate::store::Commands<'_> {
        self.store.commands()
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        self.store.ping().await
    }

    /// The stored batch if `batch_id` is stored with this payload hash (a resend); see
    /// [`Store::duplicate_of`].
    pub async fn duplicate_of(
        &self,
        batch_id: &str,
        payload_sha256: &str,
    ) -> Result<Option<crate::store::StoredBatch>, StoreError> {
        self.store.duplicate_of(batch_id, payload_sha256).await
    }

    /// Counts a resend answered from [`Self::duplicate_of`].
    pub fn count_duplicate(&self, batch_id: &str, stored: &crate::store::StoredBatch, via: &'static str) {
        self.store.count_duplicate();
        self.live.resend(&stored.device_id, batch_id, stored.seq, stored.detections, via);
    }

    /// A device's latest batches, newest first; see [`Store::recent_batches`].
    pub async fn recent_batches(&self, device_id: &str, limit: i64) -> Result<Vec<crate::store::BatchRow>, StoreError> {
        self.store.recent_batches(device_id, limit).await
    }

    /// Counts a batch refused before storage (a key, topic or certificate mismatch).
    pub async fn count_rejected(&self) -> Result<(), StoreError> {
        self.store.count_rejected().await
    }

    /// Keeps an unusable message for inspection (where it came from, its size, why);
    /// `panicked`: its handling panicked (also counted in `panics`).
    pub async fn dead_letter(
        &self,
        via: &str,
        topic: Option<&str>,
        device_id: Option<&str>,
        size: usize,
        error: &str,
        panicked: bool,
    ) -> Result<(), StoreError> {
        self.store.dead_letter(via, topic, device_id, size, error, panicked).await
    }

    /// Records a device's status; `retained`: an MQTT retained one (see [`Store::device_status`]).
    pub async fn device_status(
        &self,
        device_id: &str,
        status: &DeviceStatus,
        retained: bool,
    ) -> Result<(), StoreError> {
        self.store.device_status(device_id, status, retained).await
    }

    /// See [`Store::runs_edge`].
    pub async fn runs_edge(&self, device_id: &str) -> Result<bool, StoreError> {
        self.store.runs_edge(device_id).await
    }

    /// A seed fleet client's heartbeat (issue #20); see [`Store::heartbeat`].
    pub async fn heartbeat(&self, device_id: &str, at_us: i64) -> Result<(), StoreError> {
        self.store.heartbeat(device_id, at_us).await
    }

    /// Writes the duplicate and conflict counts held in memory (every 5 s and at shutdown).
    pub async fn flush_counts(&self) -> Result<(), StoreError> {
        self.store.flush_counts().await
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        self.store.stats().await
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        self.store.devices().await
    }

    /// See [`Store::gaps`].
    pub async fn gaps(&self, device_id: &str, limit: i64) -> Result<Vec<crate::store::SeqGap>, StoreError> {
        self.store.gaps(device_id, limit).await
    }

    /// See [`Store::dead_letters`].
    pub async fn dead_letters(&self, limit: i64) -> Result<Vec<crate::store::DeadLetterRow>, StoreError> {
        self.store.dead_letters(limit).await
    }

    /// A page of detections; see [`Store::detections`].
    pub async fn detections(&self, q: &DetectionQuery) -> Result<Vec<DetectionRow>, StoreError> {
        self.store.detections(q).await
    }
}
