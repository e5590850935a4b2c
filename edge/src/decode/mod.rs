//! From raw BLE advertisements to detections. The btleplug layer (issue #6, still to come) only
//! fills in [`Advertisement`]s; everything here is plain code, tested without a radio.
//!
//! Profiles (config `decode.profiles`): [`presence`] (every advertiser, keyed-hashed) and
//! [`thingy52`] (the seed's sensor nodes). Each profile has a deduplication window per advertiser
//! (default 10 s: a node advertises 3-4 times per frame on channels 37-39): within it, repeats of
//! the same advertiser make no new detection. All of it runs on the advertisement's own clock
//! (`t`), so a replayed capture gives the same detections at any speed.
//!
//! A reading whose RSSI the wire contract refuses (`backhaul_shared::batch::RSSI_RANGE`; +127 is
//! HCI's "not available") still makes its detections, which the pipeline drops and counts, but it
//! takes no dedup slot and stays out of the smoothing median: the advertiser's next real reading
//! is not swallowed by a window that a refused reading opened.

pub mod presence;
pub mod thingy52;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use backhaul_shared::batch::RSSI_RANGE;
use backhaul_shared::{Detection, Presence, Sensor, Timestamp};
use serde::{Deserialize, Serialize};

/// One advertisement as heard, in the capture format of `scan --record` (one JSON object a line):
/// `{"t": RFC 3339, "address": "AA:BB:..", "rssi": -70, "tx_power": null,
/// "manufacturer_data": {"65535": "hex"}, "service_data": {"uuid": "hex"}, "services": ["uuid"],
/// "name": "..."}`: company ids in decimal, the hex the bytes after the company id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advertisement {
    pub t: Timestamp,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_type: Option<String>,
    pub rssi: i16,
    #[serde(default)]
    pub tx_power: Option<i16>,
    #[serde(default, with = "hex_values")]
    pub manufacturer_data: BTreeMap<u16, Vec<u8>>,
    #[serde(default, with = "hex_values")]
    pub service_data: BTreeMap<String, Vec<u8>>,
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// Maps whose values are bytes written as hex strings.
mod hex_values {
    use std::collections::BTreeMap;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize + Ord, S: Serializer>(m: &BTreeMap<K, Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        let as_hex: BTreeMap<&K, String> = m.iter().map(|(k, v)| (k, hex::encode(v))).collect();
        as_hex.serialize(s)
    }

    pub fn deserialize<'de, K, D>(d: D) -> Result<BTreeMap<K, Vec<u8>>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        D: Deserializer<'de>,
    {
        let as_hex = BTreeMap::<K, String>::deserialize(d)?;
        as_hex
            .into_iter()
            .map(|(k, v)| {
                hex::decode(&v).map(|b| (k, b)).map_err(|e| D::Error::custom(format!("`{v}` is not hex: {e}")))
            })
            .collect()
    }
}

/// Which profile made a detection (deduplication is per profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    Presence,
    Thingy52,
}

/// The presence profile's settings.
#[derive(Debug, Clone)]
pub struct PresenceSettings {
    pub hasher: presence::AddressHasher,
    pub zones: presence::Zones,
    /// Median RSSI over this window (zero: none).
    pub smoothing: Duration,
}

/// The thingy52 profile's settings.
#[derive(Debug, Clone, Copy)]
pub struct Thingy52Settings {
    pub company_id: u16,
    pub payload_len: usize,
}

impl Default for Thingy52Settings {
    fn default() -> Self {
        Self { company_id: 0xFFFF, payload_len: 14 }
    }
}

/// Whether `address` may make a detection for `profile` at `t_ms` (not inside its dedup window);
/// records it if so.
fn fresh(
    last: &mut HashMap<(Profile, String), i64>,
    window_ms: i64,
    profile: Profile,
    address: &str,
    t_ms: i64,
) -> bool {
    let key = (profile, address.to_owned());
    match last.get(&key) {
        Some(&seen) if t_ms >= seen && t_ms - seen < window_ms => false,
        _ => {
            last.insert(key, t_ms);
            true
        }
    }
}

/// Turns advertisements into detections, with per-advertiser deduplication.
#[derive(Debug)]
pub struct Decoder {
    presence: Option<(PresenceSettings, presence::Smoother)>,
    thingy52: Option<Thingy52Settings>,
    dedup_window_ms: i64,
    /// (profile, address) → when it last made a detection (ms, the capture's clock).
    last: HashMap<(Profile, String), i64>,
    /// When `last` was last pruned.
    pruned_at_ms: i64,
}

impl Decoder {
    pub fn new(presence: Option<PresenceSettings>, thingy52: Option<Thingy52Settings>, dedup_window: Duration) -> Self {
        Self {
            presence: presence.map(|p| {
                let smoother = presence::Smoother::new(p.smoothing);
                (p, smoother)
            }),
            thingy52,
            dedup_window_ms: i64::try_from(dedup_window.as_millis()).unwrap_or(i64::MAX),
            last: HashMap::new(),
            pruned_at_ms: i64::MIN,
        }
    }

    /// The detections `adv` makes (none while its advertiser is inside a dedup window).
    pub fn decode(&mut self, adv: &Advertisement) -> Vec<Detection> {
        let t_ms = adv.t.unix_millis();
        self.prune(t_ms);
        let address = adv.address.to_ascii_uppercase();
        // See the module docs: a refused RSSI neither opens a dedup window nor enters the median.
        let rssi_valid = RSSI_RANGE.contains(&i32::from(adv.rssi));
        let mut out = Vec::new();
        if let Some(settings) = self.thingy52 {
            let reading = adv
                .manufacturer_data
                .get(&settings.company_id)
                .filter(|p| p.len() == settings.payload_len)
                .map(|p| thingy52::decode(p))
                .filter(|r| r.is_node_layout() && !r.is_empty());
            if let Some(r) = reading {
                if !rssi_valid || fresh(&mut self.last, self.dedup_window_ms, Profile::Thingy52, &address, t_ms) {
                    out.push(Detection::Sensor(Sensor {
                        node: address.to_ascii_lowercase(),
                        rssi: Some(adv.rssi),
                        temp: r.temp,
                        humidity: r.humidity,
                        co2_ppm: r.co2_ppm,
                        window_open: r.window_open,
                        battery: r.battery,
                        timestamp: adv.t,
                    }));
                }
            }
        }
        if let Some((settings, smoother)) = &mut self.presence {
            // Every reading feeds the median, also those the dedup window swallows.
            let rssi = if rssi_valid { smoother.push(&address, t_ms, adv.rssi) } else { adv.rssi };
            if !rssi_valid || fresh(&mut self.last, self.dedup_window_ms, Profile::Presence, &address, t_ms) {
                out.push(Detection::Presence(Presence {
                    device_hash: settings.hasher.hash(&address, t_ms.div_euclid(1000)),
                    rssi,
                    zone: settings.zones.zone(rssi),
                    timestamp: adv.t,
                }));
            }
        }
        out
    }

    /// Forgets advertisers outside the window, at most once a window (bounded memory).
    fn prune(&mut self, now_ms: i64) {
        let window = self.dedup_window_ms.max(1000);
        // (Also when the clock stepped back: a Pi without a real-time clock sets it late.)
        if now_ms >= self.pruned_at_ms && now_ms.saturating_sub(self.pruned_at_ms) < window {
            return;
        }
        self.pruned_at_ms = now_ms;
        self.last.retain(|_, t| *t <= now_ms && now_ms - *t < window);
        if let Some((_, smoother)) = &mut self.presence {
            smoother.prune(now_ms);
        }
    }
}

#[cfg(test)]
mod tests;
