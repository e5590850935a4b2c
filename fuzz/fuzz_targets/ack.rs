#![no_main]
//! Fuzz target: see `backhaul_shared::fuzzing::ack`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| backhaul_shared::fuzzing::ack(data));
