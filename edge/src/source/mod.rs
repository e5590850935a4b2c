//! Where detections come from: `simulated` (here), `ble` and `replay` (issue #6). Every source
//! hands out detections with a position after each, so a resumable source continues after the
//! last durable batch.

pub mod simulated;
