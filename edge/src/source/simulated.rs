//! A deterministic simulated source: detection `i` is a pure function of the seed and `i`, so a
//! run is reproducible, and resuming after a kill -9 means continuing at the index after the
//! position stored with the last durable batch (`count = N` means exactly N detections over the
//! device's life, whatever is killed).
//!
//! Most detections are presence detections of `devices` distinct simulated advertisers; one in ten
//! is a Thingy:52 reading. The simulated advertisers' hashes are not derived from any address.

use std::time::{Duration, Instant};

use backhaul_shared::{Detection, Presence, Sensor, Timestamp, Zone};

use super::{Next, Source};

#[derive(Debug, Clone)]
pub struct Simulated {
    seed: u64,
    devices: u32,
    /// Detections over the device's life; 0 = forever.
    count: u64,
    /// The next detection's index.
    next: u64,
    /// Detections per second, when used as a [`Source`].
    rate: f64,
    /// When pacing started, and the index then: detection `i` is due `(i - first) / rate` later.
    paced_from: Option<(Instant, u64)>,
}

/// splitmix64: a cheap, well-mixed function of its input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Simulated {
    /// Starts after `position` (the one stored with the last durable batch), or at the beginning.
    pub fn resume(seed: u64, devices: u32, count: u64, position: Option<&[u8]>) -> Result<Self, String> {
        let next = match position {
            None => 0,
            Some(p) => {
                let bytes: [u8; 8] = p
                    .try_into()
                    .map_err(|_| format!("stored source position is {} bytes, not 8: not from this source", p.len()))?;
                u64::from_le_bytes(bytes) + 1
            }
        };
        Ok(Self { seed, devices: devices.max(1), count, next, rate: f64::INFINITY, paced_from: None })
    }

    /// Paces the source at `rate` detections per second (as a [`Source`]).
    pub fn with_rate(mut self, rate: f64) -> Self {
        self.rate = rate;
        self
    }

    /// Whether `count` detections have been produced.
    pub fn exhausted(&self) -> bool {
        self.count != 0 && self.next >= self.count
    }

    /// Index of the next detection.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// The next detection, stamped `at`, and the position to store with it; `None` once exhausted.
    pub fn next_detection(&mut self, at: Timestamp) -> Option<(Detection, Vec<u8>)> {
        if self.exhausted() {
            return None;
        }
        let i = self.next;
        self.next += 1;
        Some((self.detection(i, at), i.to_le_bytes().to_vec()))
    }

    /// Detection `i`: the same for the same seed, whenever it is made.
    pub fn detection(&self, i: u64, at: Timestamp) -> Detection {
        let r = mix(self.seed ^ mix(i));
        let device = mix(self.seed.wrapping_add(r % u64::from(self.devices)));
        if i % 10 == 9 {
            Detection::Sensor(Sensor {
                node: format!("sim:{:02x}:{:02x}", (device >> 8) & 0xff, device & 0xff),
                rssi: Some(-50 - (r % 40) as i16),
                temp: Some(f64::from((r % 300) as u32) / 10.0),
                humidity: Some((r % 100) as u8),
                co2_ppm: Some(400 + (r % 1000) as u32),
                window_open: Some(r & 1 == 1),
                battery: Some((r % 101) as u8),
                timestamp: at,
            })
        } else {
            let rssi = -30 - (r % 70) as i16;
            Detection::Presence(Presence {
                device_hash: format!("{device:016x}"),
                rssi,
                zone: if rssi >= -60 {
                    Zone::Near
                } else if rssi >= -75 {
                    Zone::Medium
                } else {
                    Zone::Far
                },
                timestamp: at,
            })
        }
    }
}

impl Source for Simulated {
    fn next(&mut self, now: Instant) -> Next {
        if self.exhausted() {
            return Next::Done;
        }
        let (start, first) = *self.paced_from.get_or_insert((now, self.next));
        let due = start + Duration::from_secs_f64((self.next - first) as f64 / self.rate);
        if now < due {
            return Next::Wait(due - now);
        }
        match self.next_detection(crate::clock::now()) {
            Some((d, position)) => Next::Detection(d, Some(position)),
            None => Next::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use backhaul_shared::{Batch, BatchId, Limits};

    use super::*;

    fn at() -> Timestamp {
        Timestamp::from_unix_millis(1_700_000_000_000).unwrap()
    }

    #[test]
    fn deterministic_for_a_seed_and_different_across_seeds() {
        let a = Simulated::resume(7, 50, 0, None).unwrap();
        let b = Simulated::resume(7, 50, 0, None).unwrap();
        let c = Simulated::resume(8, 50, 0, None).unwrap();
        for i in 0..100 {
            assert_eq!(a.detection(i, at()), b.detection(i, at()));
        }
        assert!((0..100).any(|i| a.detection(i, at()) != c.detection(i, at())));
    }

    #[test]
    fn uses_the_configured_number_of_advertisers_and_valid_values() {
        let s = Simulated::resume(1, 20, 0, None).unwrap();
        let detections: Vec<_> = (0..2000).map(|i| s.detection(i, at())).collect();
        let hashes: HashSet<_> = detections
            .iter()
            .filter_map(|d| match d {
                Detection::Presence(p) => Some(p.device_hash.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(hashes.len(), 20);
        let batch = Batch {
            clock: Default::default(),
            schema: 1,
            batch_id: BatchId::new(),
            device_id: "sim".into(),
            seq: 0,
            name: None,
            location: None,
            timestamp: at(),
            detections,
        };
        batch.validate(&Limits::default()).expect("every simulated detection passes validation");
    }

    #[test]
    fn resumes_after_the_stored_position_and_stops_at_count() {
        let mut s = Simulated::resume(3, 5, 10, None).unwrap();
        let mut positions = Vec::new();
        for _ in 0..4 {
            positions.push(s.next_detection(at()).unwrap());
        }
        // A kill -9 after the batch holding detection 3 was durable:
        let (_, pos) = &positions[3];
        let mut resumed = Simulated::resume(3, 5, 10, Some(pos)).unwrap();
        assert_eq!(resumed.next_index(), 4);
        let (d4, _) = resumed.next_detection(at()).unwrap();
        assert_eq!(d4, s.detection(4, at()));
        let rest = std::iter::from_fn(|| resumed.next_detection(at())).count();
        assert_eq!(rest, 5, "exactly count = 10 over the device's life");
        assert!(resumed.exhausted());
        assert!(Simulated::resume(3, 5, 10, Some(&[1, 2, 3])).is_err());
    }

    #[test]
    fn as_a_source_it_keeps_its_pace_and_ends() {
        let mut s = Simulated::resume(1, 5, 3, None).unwrap().with_rate(10.0);
        let t0 = Instant::now();
        assert!(matches!(s.next(t0), Next::Detection(..)));
        assert_eq!(s.next(t0), Next::Wait(Duration::from_millis(100)));
        assert!(matches!(s.next(t0 + Duration::from_millis(100)), Next::Detection(..)));
        // Late: everything due comes at once.
        assert!(matches!(s.next(t0 + Duration::from_secs(5)), Next::Detection(..)));
        assert_eq!(s.next(t0 + Duration::from_secs(5)), Next::Done);
    }
}
