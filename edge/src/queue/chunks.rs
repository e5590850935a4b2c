//! Records stored as chunks of at most [`CHUNK_SIZE`] bytes, under `prefix + index (u16 BE)`.
//!
//! Why: sled 0.34's page cache is split into 256 LRU shards, each of which keeps at least one
//! page resident and only evicts after 64 accesses to it, and a leaf page holds 16 keys. With
//! 20-80 KB records (a 500-detection batch) that is hundreds of MiB resident for a large backlog,
//! whatever `cache_capacity` says (measured: RSS grew with the backlog, 130 MiB for 1,000,000
//! detections). With values of at most 4 KiB the resident set is bounded by the page size instead.
//!
//! A record's chunks are the pieces of one framed value (`backhaul_shared::record`), so its CRC
//! covers the whole record: a missing, extra or damaged chunk fails the check on read.

use sled::IVec;

/// Largest chunk value.
pub(crate) const CHUNK_SIZE: usize = 4096;

/// A record read back: its chunk keys and the concatenated value.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// The key without the chunk index.
    pub prefix: Vec<u8>,
    pub keys: Vec<IVec>,
    pub value: Vec<u8>,
}

impl Record {
    /// Bytes of keys and values, as the budget counts them.
    pub fn stored_size(&self) -> u64 {
        (self.keys.iter().map(|k| k.len()).sum::<usize>() + self.value.len()) as u64
    }
}

/// Bytes of keys and values a record of `value_len` bytes takes under a prefix of `prefix_len`.
pub(crate) fn stored_size(prefix_len: usize, value_len: usize) -> u64 {
    let chunks = value_len.div_ceil(CHUNK_SIZE).max(1);
    (chunks * (prefix_len + 2) + value_len) as u64
}

fn chunk_key(prefix: &[u8], index: usize) -> Vec<u8> {
    let index = u16::try_from(index).expect("records are far below 256 MiB");
    let mut k = Vec::with_capacity(prefix.len() + 2);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn pieces(value: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    // An empty value still gets one (empty) chunk, so the record exists.
    let n = value.len().div_ceil(CHUNK_SIZE).max(1);
    (0..n).map(move |i| (i, &value[(i * CHUNK_SIZE).min(value.len())..((i + 1) * CHUNK_SIZE).min(value.len())]))
}

/// Writes a record with plain inserts, in chunk order.
pub(crate) fn insert(tree: &sled::Tree, prefix: &[u8], value: &[u8]) -> sled::Result<()> {
    for (i, piece) in pieces(value) {
        tree.insert(chunk_key(prefix, i), piece)?;
    }
    Ok(())
}

/// Adds the inserts of a record to an atomic batch.
pub(crate) fn insert_into(batch: &mut sled::Batch, prefix: &[u8], value: &[u8]) {
    for (i, piece) in pieces(value) {
        batch.insert(chunk_key(prefix, i), piece);
    }
}

/// Adds the removal of a record's chunks to an atomic batch.
pub(crate) fn remove_into(batch: &mut sled::Batch, record: &Record) {
    for k in &record.keys {
        batch.remove(k.clone());
    }
}

/// Adds a move of a record to another prefix to an atomic batch.
pub(crate) fn move_into(batch: &mut sled::Batch, record: &Record, to_prefix: &[u8]) {
    remove_into(batch, record);
    insert_into(batch, to_prefix, &record.value);
}

/// Reads the record under `prefix`.
pub(crate) fn get(tree: &sled::Tree, prefix: &[u8]) -> sled::Result<Option<Record>> {
    let mut record: Option<Record> = None;
    for item in tree.scan_prefix(prefix) {
        let (k, v) = item?;
        if k.len() != prefix.len() + 2 {
            continue;
        }
        let r = record.get_or_insert_with(|| Record { prefix: prefix.to_vec(), keys: Vec::new(), value: Vec::new() });
        r.value.extend_from_slice(&v);
        r.keys.push(k);
    }
    Ok(record)
}

/// Length of a record key's prefix (without the chunk index), from its first byte: `p` + seq,
/// `h` + time + seq, `d` + seq, `q` + a quarantined key's prefix. `None` for other keys (metadata).
pub(crate) fn prefix_len(key: &[u8]) -> Option<usize> {
    match *key.first()? {
        super::layout::PENDING => Some(9),
        super::layout::ACKED => Some(17),
        super::layout::DEAD => Some(9),
        super::layout::QUARANTINE => Some(1 + prefix_len(&key[1..])?),
        _ => None,
    }
}

/// Groups an ordered key-value stream into records; keys that are not records are skipped.
pub(crate) fn records<I>(iter: I) -> Records<I>
where
    I: Iterator<Item = sled::Result<(IVec, IVec)>>,
{
    Records { inner: iter.peekable() }
}

/// See [`records`].
pub(crate) struct Records<I: Iterator> {
    inner: std::iter::Peekable<I>,
}

impl<I: Iterator> std::fmt::Debug for Records<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Records")
    }
}

impl<I> Iterator for Records<I>
where
    I: Iterator<Item = sled::Result<(IVec, IVec)>>,
{
    type Item = sled::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        let (prefix, mut record) = loop {
            let (k, v) = match self.inner.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e)),
            };
            if let Some(len) = prefix_len(&k).filter(|&l| k.len() == l + 2) {
                let prefix = k[..len].to_vec();
                let record = Record { prefix: prefix.clone(), keys: vec![k], value: v.to_vec() };
                break (prefix, record);
            }
        };
        while let Some(Ok((k, _))) = self.inner.peek() {
            if k.len() != prefix.len() + 2 || !k.starts_with(&prefix) {
                break;
            }
            let Some(Ok((k, v))) = self.inner.next() else { break };
            record.value.extend_from_slice(&v);
            record.keys.push(k);
        }
        Some(Ok(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::layout;

    #[test]
    fn records_of_any_size_round_trip_and_group() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let sizes = [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 5 * CHUNK_SIZE + 17];
        for (seq, &size) in sizes.iter().enumerate() {
            let value: Vec<u8> = (0..size).map(|i| (i * 7 + seq) as u8).collect();
            insert(&db, &layout::pending_key(seq as u64), &value).unwrap();
            let r = get(&db, &layout::pending_key(seq as u64)).unwrap().unwrap();
            assert_eq!(r.value, value);
            assert_eq!(r.stored_size(), stored_size(9, size));
        }
        db.insert(layout::META_COUNTERS, &b"meta"[..]).unwrap();
        let all: Vec<Record> = records(db.iter()).map(Result::unwrap).collect();
        assert_eq!(all.len(), sizes.len());
        for (seq, (r, &size)) in all.iter().zip(&sizes).enumerate() {
            assert_eq!(r.prefix, layout::pending_key(seq as u64));
            assert_eq!(r.value.len(), size);
        }
    }

    #[test]
    fn a_move_is_one_batch() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let value = vec![9u8; 3 * CHUNK_SIZE];
        insert(&db, &layout::pending_key(7), &value).unwrap();
        let r = get(&db, &layout::pending_key(7)).unwrap().unwrap();
        let mut b = sled::Batch::default();
        move_into(&mut b, &r, &layout::acked_key(5, 7));
        db.apply_batch(b).unwrap();
        assert!(get(&db, &layout::pending_key(7)).unwrap().is_none());
        assert_eq!(get(&db, &layout::acked_key(5, 7)).unwrap().unwrap().value, value);
    }
}
