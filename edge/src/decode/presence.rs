//! Presence: every advertiser becomes a detection with a keyed hash of its address, its RSSI and a
//! zone. Raw MAC addresses of passers-by never leave the Pi.
//!
//! - `device_hash` = HMAC-SHA256(key, canonical address), the first 8 bytes as 16 hex digits. The
//!   key is the deployment's secret; an unkeyed hash of a 48-bit MAC is reversible by brute force,
//!   so there is no mode without one. With `hash_rotation`, the key of each period is
//!   HMAC-SHA256(secret, "backhaul-rotation:" + period number): hashes cannot be linked across
//!   periods (e.g. days).
//! - Zones by RSSI thresholds: `near` at or above `near_dbm`, `medium` at or above `medium_dbm`,
//!   `far` below.
//! - Optional smoothing: the median RSSI of the advertiser over the last `smoothing` window
//!   (robust to the spikes BLE RSSI is full of).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use backhaul_shared::Zone;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// RSSI thresholds, dBm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zones {
    pub near_dbm: i16,
    pub medium_dbm: i16,
}

impl Default for Zones {
    fn default() -> Self {
        Self { near_dbm: -60, medium_dbm: -75 }
    }
}

impl Zones {
    pub fn zone(&self, rssi: i16) -> Zone {
        if rssi >= self.near_dbm {
            Zone::Near
        } else if rssi >= self.medium_dbm {
            Zone::Medium
        } else {
            Zone::Far
        }
    }
}

/// Hashes addresses with the deployment's secret. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct AddressHasher {
    secret: Vec<u8>,
    rotation: Option<Duration>,
}

impl std::fmt::Debug for AddressHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressHasher").field("rotation", &self.rotation).finish_non_exhaustive()
    }
}

impl AddressHasher {
    /// `None` for an empty secret: there is no unkeyed mode.
    pub fn new(secret: &[u8], rotation: Option<Duration>) -> Option<Self> {
        (!secret.is_empty()).then(|| Self { secret: secret.to_vec(), rotation: rotation.filter(|r| !r.is_zero()) })
    }

    /// The hash of `address` ("AA:BB:CC:DD:EE:FF", any case) seen at `unix_secs`.
    pub fn hash(&self, address: &str, unix_secs: i64) -> String {
        let key = match self.rotation {
            None => self.secret.clone(),
            Some(period) => {
                let n = unix_secs.div_euclid(i64::try_from(period.as_secs().max(1)).unwrap_or(i64::MAX));
                let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
                mac.update(b"backhaul-rotation:");
                mac.update(n.to_string().as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
        };
        let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes any key length");
        mac.update(address.to_ascii_uppercase().as_bytes());
        let digest = mac.finalize().into_bytes();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The median RSSI of each advertiser over a sliding window (of the capture's clock).
#[derive(Debug, Default)]
pub struct Smoother {
    window: Duration,
    seen: HashMap<String, VecDeque<(i64, i16)>>,
}

impl Smoother {
    pub fn new(window: Duration) -> Self {
        Self { window, seen: HashMap::new() }
    }

    /// Adds a reading at `t_ms`; returns the median over the window (itself included).
    pub fn push(&mut self, address: &str, t_ms: i64, rssi: i16) -> i16 {
        if self.window.is_zero() {
            return rssi;
        }
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        let q = self.seen.entry(address.to_owned()).or_default();
        q.push_back((t_ms, rssi));
        while q.front().is_some_and(|(t, _)| t_ms.saturating_sub(*t) > window_ms) {
            q.pop_front();
        }
        let mut values: Vec<i16> = q.iter().map(|(_, r)| *r).collect();
        values.sort_unstable();
        values[values.len() / 2]
    }

    /// Forgets advertisers not heard within the window (bounds memory on a busy street).
    pub fn prune(&mut self, now_ms: i64) {
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        self.seen.retain(|_, q| q.back().is_some_and(|(t, _)| now_ms.saturating_sub(*t) <= window_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_address_hashes_the_same_under_one_secret_and_differently_under_another() {
        let a = AddressHasher::new(b"secret-one", None).unwrap();
        let b = AddressHasher::new(b"secret-two", None).unwrap();
        let h = a.hash("C1:0E:5A:33:9F:02", 0);
        assert_eq!(h.len(), 16);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(h, a.hash("c1:0e:5a:33:9f:02", 1_000_000), "case and time do not matter without rotation");
        assert_ne!(h, b.hash("C1:0E:5A:33:9F:02", 0));
        assert_ne!(h, a.hash("C1:0E:5A:33:9F:03", 0));
        assert!(AddressHasher::new(b"", None).is_none(), "no unkeyed mode");
        assert!(!format!("{a:?}").contains("secret-one"));
    }

    #[test]
    fn known_vector() {
        // HMAC-SHA256(key = "key", "AA:BB:CC:DD:EE:FF"), first 8 bytes (computed with Python's hmac module).
        let h = AddressHasher::new(b"key", None).unwrap();
        assert_eq!(h.hash("aa:bb:cc:dd:ee:ff", 0), KNOWN);
    }
    const KNOWN: &str = include_str!("testdata/hmac_vector.txt");

    #[test]
    fn with_rotation_hashes_change_with_the_period_only() {
        let h = AddressHasher::new(b"s", Some(Duration::from_secs(86_400))).unwrap();
        let day = 86_400;
        assert_eq!(h.hash("AA:BB:CC:DD:EE:FF", 10), h.hash("AA:BB:CC:DD:EE:FF", day - 1));
        assert_ne!(h.hash("AA:BB:CC:DD:EE:FF", day - 1), h.hash("AA:BB:CC:DD:EE:FF", day));
        assert_ne!(
            h.hash("AA:BB:CC:DD:EE:FF", 10),
            AddressHasher::new(b"s", None).unwrap().hash("AA:BB:CC:DD:EE:FF", 10)
        );
    }

    #[test]
    fn zones_at_the_thresholds_edges() {
        let z = Zones::default();
        assert_eq!(z.zone(-60), Zone::Near);
        assert_eq!(z.zone(-61), Zone::Medium);
        assert_eq!(z.zone(-75), Zone::Medium);
        assert_eq!(z.zone(-76), Zone::Far);
        assert_eq!(z.zone(10), Zone::Near);
        assert_eq!(z.zone(-127), Zone::Far);
    }

    #[test]
    fn smoothing_takes_the_median_over_the_window() {
        let mut s = Smoother::new(Duration::from_secs(5));
        assert_eq!(s.push("a", 0, -70), -70);
        assert_eq!(s.push("a", 1000, -30), -30, "median of two is the upper one");
        assert_eq!(s.push("a", 2000, -72), -70, "a spike does not move the median");
        // 6 s later the first readings left the window.
        assert_eq!(s.push("a", 7500, -80), -80);
        s.prune(20_000);
        assert!(s.seen.is_empty());
        assert_eq!(Smoother::new(Duration::ZERO).push("a", 0, -50), -50, "no smoothing");
    }
}
