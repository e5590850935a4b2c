//! Records the build time for the clock floor (`src/clock.rs`): a binary cannot run before it was
//! built, so its build time is a lower bound for the wall clock. `SOURCE_DATE_EPOCH` (reproducible
//! builds) wins when set; otherwise the time of the build. Cargo reruns this only when this file
//! or that variable changes, so in a long-lived target dir the recorded time may be older than
//! the binary: still a valid floor, only a lower one. (Not named `BACKHAUL_*`: cargo also sets it
//! for the package's tests, and the config refuses unknown `BACKHAUL_` variables.)

use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
    println!("cargo:rustc-env=EDGE_BUILD_UNIX_S={secs}");
}
