//! Record framing for durable storage.
//!
//! Every value the edge writes to disk goes through this framing, so a record that was damaged at rest
//! (a flipped bit on an SD card, a torn write that the storage engine did not catch) is *detected* on
//! read and comes back as a value, [`RecordError`], never as a panic or as silently wrong data.
//!
//! ```text
//! offset  size  field
//! 0       1     version      (FRAME_VERSION = 1)
//! 1       4     length       payload length in bytes, u32 little-endian
//! 5       4     crc32        CRC-32 (IEEE, crc32fast) over version ++ length ++ payload, u32 little-endian
//! 9       len   payload
//! ```
//!
//! The CRC covers the header as well as the payload, so a flipped bit anywhere in the frame is detected
//! (CRC-32 detects every single-bit and every double-bit error at these lengths). The length must match
//! the frame exactly: trailing bytes are corruption too.
//!
//! Never reorder these fields or change their meaning under the same version byte: records written by
//! an older build must stay readable by a newer one.

use thiserror::Error;

/// The version byte written by this build.
pub const FRAME_VERSION: u8 = 1;
/// Bytes of framing before the payload.
pub const HEADER_LEN: usize = 9;

/// Why a stored frame could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    #[error("record is {len} bytes, shorter than the {HEADER_LEN}-byte frame header")]
    Truncated { len: usize },
    #[error("record has unknown frame version {0} (this build reads version {FRAME_VERSION})")]
    UnknownVersion(u8),
    #[error("record header says {declared} payload bytes but {actual} are present")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
}

/// Frames `payload` for storage.
///
/// # Panics
/// If the payload is 4 GiB or larger, which no batch can be (batches are bounded far below that).
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("record payload under 4 GiB");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.push(FRAME_VERSION);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
    let crc = checksum(&out);
    out[5..9].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a frame and returns its payload.
pub fn decode(frame: &[u8]) -> Result<&[u8], RecordError> {
    if frame.len() < HEADER_LEN {
        return Err(RecordError::Truncated { len: frame.len() });
    }
    let stored = u32::from_le_bytes([frame[5], frame[6], frame[7], frame[8]]);
    let computed = checksum(frame);
    // Check the CRC first: a flipped bit in the version or length byte is corruption, and should be
    // reported as such rather than as an "unknown version" from the future.
    if stored != computed {
        return Err(RecordError::ChecksumMismatch { stored, computed });
    }
    if frame[0] != FRAME_VERSION {
        return Err(RecordError::UnknownVersion(frame[0]));
    }
    let declared = u32::from_le_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
    let payload = &frame[HEADER_LEN..];
    if declared != payload.len() {
        return Err(RecordError::LengthMismatch { declared, actual: payload.len() });
    }
    Ok(payload)
}

/// Whether `frame` is a correct beginning of a longer frame: its header declares more payload than
/// is present. (A torn write looks like this; a damaged complete frame does not.)
pub fn is_incomplete(frame: &[u8]) -> bool {
    if frame.len() < HEADER_LEN {
        return true;
    }
    let declared = u32::from_le_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
    frame[0] == FRAME_VERSION && declared > frame.len() - HEADER_LEN
}

/// CRC over the header without its CRC field, then the payload.
fn checksum(frame: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&frame[..5]);
    hasher.update(&frame[HEADER_LEN..]);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_payload_round_trips() {
        assert_eq!(decode(&encode(b"")).unwrap(), b"");
    }

    #[test]
    fn short_frames_are_truncated_not_panics() {
        let frame = encode(b"hello");
        for len in 0..HEADER_LEN {
            assert_eq!(decode(&frame[..len]), Err(RecordError::Truncated { len }));
        }
        // Cutting the payload short is caught by the checksum (the length is covered by it).
        assert!(decode(&frame[..frame.len() - 1]).is_err());
    }

    #[test]
    fn a_torn_frame_is_incomplete_and_a_whole_one_is_not() {
        let frame = encode(&[7u8; 100]);
        assert!(!is_incomplete(&frame));
        for cut in 0..frame.len() {
            assert!(is_incomplete(&frame[..cut]), "cut at {cut}");
        }
    }

    #[test]
    fn trailing_bytes_are_detected() {
        let mut frame = encode(b"hello");
        frame.push(0);
        assert!(decode(&frame).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(payload in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let frame = encode(&payload);
            prop_assert_eq!(decode(&frame).unwrap(), &payload[..]);
        }

        #[test]
        fn any_single_flipped_bit_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
            bit in any::<proptest::sample::Index>(),
        ) {
            let mut frame = encode(&payload);
            let bit = bit.index(frame.len() * 8);
            frame[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&frame).is_err(), "flip of bit {} went undetected", bit);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }
}
