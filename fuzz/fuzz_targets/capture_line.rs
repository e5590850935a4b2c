#![no_main]
//! Fuzz target: see `backhaul_edge::fuzzing::capture_line`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| backhaul_edge::fuzzing::capture_line(data));
