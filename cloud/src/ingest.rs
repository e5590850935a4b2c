//! The one path every batch takes, whichever adapter (HTTP, MQTT) received it: validate with the
//! shared rules, then store it exactly once by its `batch_id` in one transaction. No SQL here, and
//! no HTTP or MQTT either.

use backhaul_shared::{Batch, BatchError, Limits};
use sha2::{Digest, Sha256};

use crate::store::{Outcome, Store, StoreError};

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
    pub store: Store,
    pub limits: Limits,
    /// Per-device rate limits, across both adapters ([`crate::ratelimit`]).
    pub rates: crate::ratelimit::DeviceLimits,
}

/// The payload's SHA-256, hex: a resend must be byte-identical to count as a duplicate.
pub fn payload_hash(raw: &[u8]) -> String {
    Sha256::digest(raw).iter().map(|b| format!("{b:02x}")).collect()
}

impl Ingest {
    pub fn new(store: Store, limits: Limits, rates: crate::ratelimit::DeviceLimits) -> Self {
        Self { store, limits, rates }
    }

    /// Parses and validates wire bytes (the same rules for every adapter).
    pub fn parse(&self, raw: &[u8]) -> Result<Batch, BatchError> {
        Batch::from_json(raw, &self.limits)
    }

    /// Stores a parsed batch exactly once. `raw` are the bytes it was parsed from.
    pub async fn accept(&self, batch: Batch, raw: &[u8], via: &str) -> Result<Accepted, StoreError> {
        let hash = payload_hash(raw);
        self.accept_hashed(batch, raw, hash, via).await
    }

    /// [`Self::accept`] with `hash` = [`payload_hash`]`(raw)` already computed.
    pub async fn accept_hashed(
        &self,
        batch: Batch,
        raw: &[u8],
        hash: String,
        via: &str,
    ) -> Result<Accepted, StoreError> {
        Ok(match self.store.store_batch(&batch, raw, &hash, via).await? {
            Outcome::Stored => Accepted::Stored(batch),
            Outcome::Duplicate => Accepted::Duplicate(batch),
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
}
