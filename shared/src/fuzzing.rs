//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz): each takes arbitrary bytes and must
//! return without panicking, whatever they are. The default tests also run them over the seed
//! corpus and mutations of it (`tests/tests/fuzz_smoke.rs`), so a crash found once stays fixed.

use crate::batch::{Batch, Limits};
use crate::wire::AckMessage;

/// A batch as the cloud parses it (SPEC.md, "The batch"): parse and validate. A batch that
/// passes must serialize, and parse back to itself.
pub fn batch(data: &[u8]) {
    let limits = Limits::default();
    if let Ok(b) = Batch::from_json(data, &limits) {
        let again = Batch::from_json(&b.to_json(), &limits);
        assert_eq!(again.as_ref(), Ok(&b), "a valid batch must parse back from its own JSON");
    }
}

/// An ack message as the edge parses it (SPEC.md, "MQTT topics").
pub fn ack(data: &[u8]) {
    let _ = serde_json::from_slice::<AckMessage>(data);
}
