//! The on-disk layout of the queue: keys, record values and the persisted counters.
//!
//! Never reorder or repurpose these fields or key prefixes: data written by an older build must be
//! readable by a newer one. Add a new `RECORD_VERSION` instead.

use backhaul_shared::record::{self, RecordError};
use backhaul_shared::BatchId;

/// Key prefixes: the queue's logical trees, inside one sled tree so that a state change (a record
/// moving from pending to acked together with the counters) can be one atomic `apply_batch`.
pub(crate) const PENDING: u8 = b'p';
/// `a` + seq: the ack marker of the batch under `p` + seq (see [`ack_marker_key`]).
pub(crate) const ACK_MARKER: u8 = b'a';
/// Layout 1 (before issue #17): an acked batch moved here under `h` + acked_at + seq. Read only
/// to migrate it at open (see `Queue::open`); nothing writes it any more.
pub(crate) const ACKED: u8 = b'h';
pub(crate) const QUARANTINE: u8 = b'q';
/// Batches the cloud refused for good (a `rejected` ack, HTTP 400/413/422), kept for inspection.
pub(crate) const DEAD: u8 = b'd';
/// `r` + seq: why the dead-lettered batch with that seq was refused (UTF-8 text, not chunked).
pub(crate) const DEAD_REASON: u8 = b'r';

pub(crate) const META_COUNTERS: &[u8] = b"mcounters";
pub(crate) const META_SOURCE_POSITION: &[u8] = b"msource_position";

/// `p` + seq (u64 big-endian): byte order is seq order, so iteration is oldest first.
pub(crate) fn pending_key(seq: u64) -> [u8; 9] {
    let mut k = [PENDING; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Layout 1 only (migrated at open): `h` + acked_at (ms since the epoch, u64 BE) + seq (u64 BE).
#[cfg(test)]
pub(crate) fn acked_key(acked_at_ms: u64, seq: u64) -> [u8; 17] {
    let mut k = [ACKED; 17];
    k[1..9].copy_from_slice(&acked_at_ms.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `d` + seq (u64 BE): a dead-lettered batch, oldest first.
pub(crate) fn dead_key(seq: u64) -> [u8; 9] {
    let mut k = [DEAD; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `r` + seq (u64 BE): the reason stored beside the dead-lettered batch `seq`.
pub(crate) fn dead_reason_key(seq: u64) -> [u8; 9] {
    let mut k = [DEAD_REASON; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `a` + seq (u64 BE): the ack marker. Its value is the ack time, ms since the epoch, u64 BE (see
/// [`encode_ack_marker`]). A batch under `p` + seq with a marker is acked and retained for replay;
/// without one it is pending. An ack writes only this (17 bytes) instead of moving the record
/// (issue #17: the move wrote every batch twice). Ordered by seq: pruning walks the markers oldest
/// first and deletes marker and record in one atomic write.
pub(crate) fn ack_marker_key(seq: u64) -> [u8; 9] {
    let mut k = [ACK_MARKER; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Bytes an ack marker counts against the budget (key + value).
pub(crate) const ACK_MARKER_BYTES: u64 = 9 + 8;

pub(crate) fn encode_ack_marker(acked_at_ms: u64) -> [u8; 8] {
    acked_at_ms.to_be_bytes()
}

/// The ack time of a marker's value; a damaged (wrong-sized) value reads as 0, the oldest, so it
/// is pruned first and never blocks pruning.
pub(crate) fn decode_ack_marker(value: &[u8]) -> u64 {
    value.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

pub(crate) fn acked_key_time(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(1..9)?.try_into().ok()?))
}

pub(crate) fn pending_key_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(1..9)?.try_into().ok()?))
}

pub(crate) fn quarantine_key(original: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(original.len() + 1);
    k.push(QUARANTINE);
    k.extend_from_slice(original);
    k
}

/// The version of [`StoredBatch`]'s layout inside the frame.
const RECORD_VERSION: u8 = 1;
const RECORD_HEADER: usize = 1 + 1 + 16 + 8 + 8 + 4 + 4 + 4;
/// Flag: the JSON tail is LZ4-compressed (block format, uncompressed size prepended).
const FLAG_TAIL_LZ4: u8 = 1;

/// One batch as stored, before framing:
///
/// ```text
/// 0   1   record version (1)
/// 1   1   flags: bit 0 = the tail is LZ4-compressed
/// 2   16  batch_id (ULID bytes)
/// 18  8   seq, u64 LE
/// 26  8   enqueued_at, ms since the epoch, u64 LE
/// 34  4   detections, u32 LE
/// 38  4   source position length P, u32 LE (0 = none)
/// 42  4   head length H, u32 LE
/// 46  P   source position (opaque: where a resumable source stood after this batch)
/// ..  H   head: the wire JSON before the seq: `{"schema":1,"batch_id":"…","device_id":"…"`
/// ..  ..  tail: the wire JSON after the seq: `"name":…,"detections":[…]}` (LZ4 if flagged)
/// ```
///
/// The wire JSON is `head + ,"seq":N, + tail`, byte-identical on every send. The source position
/// lives in the record so that batch and position are one atomic write. The tail is compressed
/// because it is nearly all of the bytes (detections compress about 4x), which cuts both the
/// bytes written to the SD card and sled's memory, which grows with record size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredBatch {
    pub batch_id: BatchId,
    pub seq: u64,
    pub enqueued_at_ms: u64,
    pub detections: u32,
    pub source_position: Option<Vec<u8>>,
    pub head: Vec<u8>,
    /// Uncompressed.
    pub tail: Vec<u8>,
}

/// A record's fixed fields, read without decompressing its JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub batch_id: BatchId,
    pub seq: u64,
    pub enqueued_at_ms: u64,
    pub detections: u32,
    pub source_position: Option<Vec<u8>>,
}

/// Why a stored value is not a readable batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StoredError {
    #[error(transparent)]
    Frame(#[from] RecordError),
    #[error("record layout version {0} is unknown to this build")]
    UnknownLayout(u8),
    #[error("record is {0} bytes, shorter than its header says")]
    Short(usize),
    #[error("record's compressed JSON does not decompress: {0}")]
    Decompress(String),
}

/// Compresses a JSON tail for [`StoredBatch::encode_compressed`] (done outside the queue's lock).
pub(crate) fn compress_tail(tail: &[u8]) -> Vec<u8> {
    lz4_flex::compress_prepend_size(tail)
}

impl StoredBatch {
    /// The wire JSON.
    pub fn json(&self) -> Vec<u8> {
        let seq = self.seq.to_string();
        let mut out = Vec::with_capacity(self.head.len() + self.tail.len() + seq.len() + 8);
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b",\"seq\":");
        out.extend_from_slice(seq.as_bytes());
        out.push(b',');
        out.extend_from_slice(&self.tail);
        out
    }

    /// The framed value to store, compressing the tail.
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        self.encode_compressed(&compress_tail(&self.tail))
    }

    /// The framed value to store, with the tail already compressed by [`compress_tail`]
    /// (`self.tail` is not used).
    pub fn encode_compressed(&self, tail_lz4: &[u8]) -> Vec<u8> {
        let position = self.source_position.as_deref().unwrap_or_default();
        let mut payload = Vec::with_capacity(RECORD_HEADER + position.len() + self.head.len() + tail_lz4.len());
        payload.push(RECORD_VERSION);
        payload.push(FLAG_TAIL_LZ4);
        payload.extend_from_slice(&self.batch_id.to_bytes());
        payload.extend_from_slice(&self.seq.to_le_bytes());
        payload.extend_from_slice(&self.enqueued_at_ms.to_le_bytes());
        payload.extend_from_slice(&self.detections.to_le_bytes());
        payload.extend_from_slice(&(position.len() as u32).to_le_bytes());
        payload.extend_from_slice(&(self.head.len() as u32).to_le_bytes());
        payload.extend_from_slice(position);
        payload.extend_from_slice(&self.head);
        payload.extend_from_slice(tail_lz4);
        record::encode(&payload)
    }

    /// Checks the frame's CRC and reads the record back.
    pub fn decode(value: &[u8]) -> Result<Self, StoredError> {
        let p = record::decode(value)?;
        let (header, head_at) = parse_header(p)?;
        let head_len = u32::from_le_bytes(p[42..46].try_into().expect("4 bytes")) as usize;
        let tail_at = head_at.checked_add(head_len).filter(|&end| end <= p.len()).ok_or(StoredError::Short(p.len()))?;
        let tail = &p[tail_at..];
        let tail = if p[1] & FLAG_TAIL_LZ4 != 0 {
            lz4_flex::decompress_size_prepended(tail).map_err(|e| StoredError::Decompress(e.to_string()))?
        } else {
            tail.to_vec()
        };
        Ok(Self {
            batch_id: header.batch_id,
            seq: header.seq,
            enqueued_at_ms: header.enqueued_at_ms,
            detections: header.detections,
            source_position: header.source_position,
            head: p[head_at..tail_at].to_vec(),
            tail,
        })
    }

    /// Reads only the header fields (checks the CRC, no decompression): for counting.
    pub fn decode_header(value: &[u8]) -> Result<RecordHeader, StoredError> {
        parse_header(record::decode(value)?).map(|(header, _)| header)
    }
}

/// The fixed fields of a checked payload, and where the head starts.
fn parse_header(p: &[u8]) -> Result<(RecordHeader, usize), StoredError> {
    if p.len() < RECORD_HEADER {
        return Err(StoredError::Short(p.len()));
    }
    if p[0] != RECORD_VERSION {
        return Err(StoredError::UnknownLayout(p[0]));
    }
    let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
    let position_len = u32::from_le_bytes(p[38..42].try_into().expect("4 bytes")) as usize;
    let head_at =
        RECORD_HEADER.checked_add(position_len).filter(|&end| end <= p.len()).ok_or(StoredError::Short(p.len()))?;
    let header = RecordHeader {
        batch_id: BatchId::from_bytes(p[2..18].try_into().expect("16 bytes")),
        seq: u64_at(18),
        enqueued_at_ms: u64_at(26),
        detections: u32::from_le_bytes(p[34..38].try_into().expect("4 bytes")),
        source_position: (position_len > 0).then(|| p[RECORD_HEADER..head_at].to_vec()),
    };
    Ok((header, head_at))
}

/// The queue's counters, persisted under [`META_COUNTERS`] in the same atomic write as every change
/// but an enqueue (which writes only its record); at open, the records past `next_seq` are counted
/// in, so after a crash the counters agree with the records on disk.
///
/// Stored as a framed list of u64 LE in this order. Never reorder; append new fields at the end (an
/// older record simply has fewer, and the missing ones read as 0).
///
/// The queue changes them only through `Counters::apply` (see the `ledger` module), one `Change`
/// at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// The seq the next enqueued batch gets.
    pub next_seq: u64,
    /// Batches in the pending tree (waiting or in flight).
    pub pending_batches: u64,
    /// Bytes of keys + values in the pending tree.
    pub pending_bytes: u64,
    /// Acked batches retained for replay.
    pub acked_batches: u64,
    pub acked_bytes: u64,
    /// Batches and detections ever enqueued (since the queue was created).
    pub produced_batches: u64,
    pub produced_detections: u64,
    /// Batches and detections dropped by the `drop_oldest` budget.
    pub dropped_batches: u64,
    pub dropped_detections: u64,
    /// Records that failed their checksum and were moved to quarantine.
    pub quarantined: u64,
    /// Batches acked by the cloud (or broker), ever.
    pub acked_total: u64,
    /// Dead-lettered batches kept (refused by the cloud for good), and their bytes (with reasons).
    pub dead_batches: u64,
    pub dead_bytes: u64,
    /// Batches dead-lettered, ever.
    pub dead_total: u64,
    /// Batches that were durable but that sled did not give back after a restart (damaged files),
    /// found by the [`Watermark`]: counted, and their seqs left as gaps the cloud reports.
    pub lost_batches: u64,
    /// Not a count: every batch under `p` with a seq below this has an ack marker, so the pending
    /// scan starts here after a restart instead of walking the retained acked batches. A lower
    /// bound (0 in layout 1 records, which is always true).
    pub ack_floor: u64,
}

impl Counters {
    fn fields(&self) -> [u64; 16] {
        [
            self.next_seq,
            self.pending_batches,
            self.pending_bytes,
            self.acked_batches,
            self.acked_bytes,
            self.produced_batches,
            self.produced_detections,
            self.dropped_batches,
            self.dropped_detections,
            self.quarantined,
            self.acked_total,
            self.dead_batches,
            self.dead_bytes,
            self.dead_total,
            self.lost_batches,
            self.ack_floor,
        ]
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let payload: Vec<u8> = self.fields().iter().flat_map(|f| f.to_le_bytes()).collect();
        record::encode(&payload)
    }

    pub(crate) fn decode(value: &[u8]) -> Result<Self, StoredError> {
        let p = record::decode(value)?;
        let mut f = [0u64; 16];
        for (slot, chunk) in f.iter_mut().zip(p.chunks_exact(8)) {
            *slot = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        Ok(Self {
            next_seq: f[0],
            pending_batches: f[1],
            pending_bytes: f[2],
            acked_batches: f[3],
            acked_bytes: f[4],
            produced_batches: f[5],
            produced_detections: f[6],
            dropped_batches: f[7],
            dropped_detections: f[8],
            quarantined: f[9],
            acked_total: f[10],
            dead_batches: f[11],
            dead_bytes: f[12],
            dead_total: f[13],
            lost_batches: f[14],
            ack_floor: f[15],
        })
    }
}

/// What the queue had made durable, kept **outside** sled in `data_dir/queue.watermark`, so that
/// a sled that comes back with less than it had (damaged files: sled's recovery stops at the
/// first bad log entry and drops everything after it without an error) is noticed: the batches
/// between what sled returned and the watermark are counted as lost, their seqs are not reused
/// (the cloud shows them as gaps), and a resumable source continues after the watermark's
/// position rather than producing again what was already delivered.
///
/// Rewritten and synced (`fdatasync`) after every sync with `Durability::Fsync` (only then is
/// sled's state durable before the watermark's write): it never claims more than sled had synced.
/// Its own sync was added when the power-cut suite (issue #17, `tests/tests/power_cut.rs`) found
/// that one unsynced write of sled's reaching the disk before a cut (background writeback) can
/// make sled come back without batches it had made durable: unsynced, the watermark was then
/// lost too, and so was the loss. The lost count is bounded by the batches pending at that sync: missing batches that had
/// been acked are in the cloud already. Framed with a CRC; a damaged watermark is ignored. Never
/// reorder these fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Watermark {
    pub next_seq: u64,
    /// Batches pending (not acked) at that sync: at most this many of the missing seqs can have
    /// been undelivered (the others were acked, so the cloud has them).
    pub pending_batches: u64,
    pub produced_batches: u64,
    pub produced_detections: u64,
    pub source_position: Option<Vec<u8>>,
}

const WATERMARK_VERSION: u8 = 1;

impl Watermark {
    pub fn encode(&self) -> Vec<u8> {
        let position = self.source_position.as_deref().unwrap_or_default();
        let mut p = Vec::with_capacity(1 + 32 + 4 + position.len());
        p.push(WATERMARK_VERSION);
        p.extend_from_slice(&self.next_seq.to_le_bytes());
        p.extend_from_slice(&self.pending_batches.to_le_bytes());
        p.extend_from_slice(&self.produced_batches.to_le_bytes());
        p.extend_from_slice(&self.produced_detections.to_le_bytes());
        p.extend_from_slice(&(position.len() as u32).to_le_bytes());
        p.extend_from_slice(position);
        record::encode(&p)
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        let p = record::decode(value).ok()?;
        if p.len() < 37 || p[0] != WATERMARK_VERSION {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(p[33..37].try_into().expect("4 bytes")) as usize;
        let position = p.get(37..37usize.checked_add(len)?)?;
        Some(Self {
            next_seq: u64_at(1),
            pending_batches: u64_at(9),
            produced_batches: u64_at(17),
            produced_detections: u64_at(25),
            source_position: (len > 0).then(|| position.to_vec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_batch_round_trips() {
        let b = StoredBatch {
            batch_id: BatchId::new(),
            seq: 42,
            enqueued_at_ms: 1_700_000_000_000,
            detections: 7,
            source_position: None,
            head: b"{\"schema\":1".to_vec(),
            tail: b"\"detections\":[]}".to_vec(),
        };
        assert_eq!(b.json(), b"{\"schema\":1,\"seq\":42,\"detections\":[]}".to_vec());
        assert_eq!(StoredBatch::decode(&b.encode()).unwrap(), b);
        let with_position = StoredBatch { source_position: Some(b"pos".to_vec()), ..b };
        assert_eq!(StoredBatch::decode(&with_position.encode()).unwrap(), with_position);
    }

    #[test]
    fn counters_round_trip_and_old_records_read_as_zero() {
        let c = Counters { next_seq: 9, dropped_detections: 3, acked_total: 2, ..Counters::default() };
        assert_eq!(Counters::decode(&c.encode()).unwrap(), c);
        let short = record::encode(&5u64.to_le_bytes());
        assert_eq!(Counters::decode(&short).unwrap(), Counters { next_seq: 5, ..Counters::default() });
    }

    #[test]
    fn watermarks_round_trip_and_damage_reads_as_none() {
        let w = Watermark {
            next_seq: 7,
            pending_batches: 3,
            produced_batches: 7,
            produced_detections: 350,
            source_position: Some(vec![1, 2]),
        };
        let bytes = w.encode();
        assert_eq!(Watermark::decode(&bytes), Some(w));
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x10;
            assert_eq!(Watermark::decode(&damaged), None, "byte {i}");
        }
        assert_eq!(Watermark::decode(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn keys_sort_as_their_numbers() {
        assert!(pending_key(255) < pending_key(256));
        assert!(acked_key(1, 9) < acked_key(2, 0));
        assert_eq!(pending_key_seq(&pending_key(77)), Some(77));
        assert_eq!(acked_key_time(&acked_key(123, 4)), Some(123));
        assert!(ack_marker_key(255) < ack_marker_key(256));
        assert!(ack_marker_key(u64::MAX) < pending_key(0), "markers sort before every record");
        assert_eq!(pending_key_seq(&ack_marker_key(9)), Some(9));
        assert_eq!(decode_ack_marker(&encode_ack_marker(1_700_000_000_123)), 1_700_000_000_123);
        assert_eq!(decode_ack_marker(b"short"), 0);
    }
}
