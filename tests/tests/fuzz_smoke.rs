//! The fuzz targets' short smoke run in the default tests (issue #14): every target over its seed
//! corpus (`fuzz/corpus/TARGET/`, crashes found by long runs are added there) and over
//! deterministic mutations of it, on stable Rust. The long runs use cargo-fuzz on nightly (the
//! README's "Fuzzing"); this keeps a crash found once from coming back.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// Mutated inputs per corpus file.
const MUTATIONS: usize = 3000;

/// Tokens that broke parsers before or sit at the edge of a range.
const TOKENS: &[&str] = &[
    "9999-12-31T23:59:59-01:00",
    "-9999-01-01T00:00:00+01:00",
    "0000-01-01T00:00:00Z",
    "18446744073709551616",
    "-9223372036854775809",
    "1e999",
    "-0",
    "NaN",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "null",
    "[]",
    "{}",
    "\"",
    "\\",
    "\n",
    "=",
    "[[",
    "\"5ms\"",
    "\"0B\"",
    "\"16EiB\"",
];

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!inputs.is_empty(), "no seed corpus in {}", dir.display());
    inputs
}

/// One deterministic mutation of `seed`.
fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.usize(1..4) {
        let at = if v.is_empty() { 0 } else { rng.usize(0..=v.len()) };
        match rng.u8(0..6) {
            0 if !v.is_empty() => {
                let i = rng.usize(0..v.len());
                v[i] ^= 1 << rng.u8(0..8);
            }
            1 => v.truncate(at),
            2 => {
                let token = TOKENS[rng.usize(0..TOKENS.len())].as_bytes();
                v.splice(at..at, token.iter().copied());
            }
            3 if !v.is_empty() => {
                // Replace a run of digits (a number, a date field) with a token.
                let i = rng.usize(0..v.len());
                let end = (i..v.len()).find(|&j| !v[j].is_ascii_digit()).unwrap_or(v.len());
                let token = TOKENS[rng.usize(0..TOKENS.len())].as_bytes();
                v.splice(i..end, token.iter().copied());
            }
            4 if !v.is_empty() => {
                let i = rng.usize(0..v.len());
                let len = rng.usize(0..=(v.len() - i).min(64));
                let chunk = v[i..i + len].to_vec();
                v.splice(at..at, chunk);
            }
            _ => v.insert(at.min(v.len()), rng.u8(..)),
        }
    }
    v
}

fn smoke(target: &str, run: fn(&[u8])) {
    let seeds = corpus(target);
    let mut rng = fastrand::Rng::with_seed(0x00ba_c4a0);
    let mut inputs = seeds.clone();
    for seed in &seeds {
        inputs.extend((0..MUTATIONS).map(|_| mutate(&mut rng, seed)));
    }
    for input in &inputs {
        if catch_unwind(AssertUnwindSafe(|| run(input))).is_err() {
            panic!(
                "fuzz target `{target}` panicked on this input (add it to fuzz/corpus/{target}/ once fixed):\n{}",
                String::from_utf8_lossy(input)
            );
        }
    }
}

#[test]
fn batch_parser_and_validation() {
    smoke("batch", backhaul_shared::fuzzing::batch);
}

#[test]
fn ack_parser() {
    smoke("ack", backhaul_shared::fuzzing::ack);
}

#[test]
fn capture_line_parser_and_decoders() {
    smoke("capture_line", backhaul_edge::fuzzing::capture_line);
}

#[test]
fn config_loader() {
    smoke("config", backhaul_edge::fuzzing::config);
}
