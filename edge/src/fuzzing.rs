//! Entry points of the edge's fuzz targets (`fuzz/`, cargo-fuzz): each takes arbitrary bytes and
//! must return without panicking. The default tests also run them over the seed corpus and
//! mutations of it (`tests/tests/fuzz_smoke.rs`).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::EdgeConfig;
use crate::decode::presence::{AddressHasher, Zones};
use crate::decode::{Advertisement, Decoder, PresenceSettings, Thingy52Settings};

/// One line of a capture (`scan --record`, the replay source's input) through both decoders.
pub fn capture_line(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else { return };
    let Ok(adv) = serde_json::from_str::<Advertisement>(line) else { return };
    let presence = PresenceSettings {
        hasher: AddressHasher::new(b"fuzz", Some(Duration::from_secs(86_400))).expect("a non-empty secret"),
        zones: Zones { near_dbm: -60, medium_dbm: -75 },
        smoothing: Duration::from_secs(5),
    };
    let thingy52 = Thingy52Settings { company_id: 0xFFFF, payload_len: 14 };
    let mut decoder = Decoder::new(Some(presence), Some(thingy52), Duration::from_secs(10));
    let _ = decoder.decode(&adv);
}

/// An edge configuration file, as `check-config` and `run` load it (the environment applies:
/// run the fuzzer without `BACKHAUL_` variables).
pub fn config(data: &[u8]) {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    let file =
        FILE.get_or_init(|| std::env::temp_dir().join(format!("backhaul-fuzz-config-{}.toml", std::process::id())));
    if std::fs::write(file, data).is_ok() {
        let _ = EdgeConfig::load(file);
    }
}
