#![no_main]
//! Fuzz target: see `backhaul_shared::fuzzing::batch`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| backhaul_shared::fuzzing::batch(data));
