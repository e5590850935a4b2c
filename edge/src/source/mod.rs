//! Where detections come from: `simulated`, `replay` (a capture through the decoders) and `ble`
//! (issue #6, to come). A source hands
//! out detections, each with the position after it, so a resumable source continues after the
//! last durable batch (the position is stored in the same write as the batch).

#[cfg(feature = "ble")]
pub mod ble;
pub mod replay;
pub mod simulated;

use std::time::{Duration, Instant};

use backhaul_shared::Detection;

/// What a source has now.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// A detection and the source's position after it (`None`: not resumable).
    Detection(Detection, Option<Vec<u8>>),
    /// Nothing before this long from now.
    Wait(Duration),
    /// Nothing ever again (a `count` reached, a capture's end).
    Done,
}

/// A source of detections, polled by the pipeline's thread.
pub trait Source: Send {
    fn next(&mut self, now: Instant) -> Next;
}
