//! The Thingy:52 nodes' custom advertising payload (the stock firmware offers sensors only over
//! GATT): manufacturer data under company id 0xFFFF (configurable), exactly 14 bytes
//! (configurable) after the company id, a run of key + fixed-size value:
//!
//! | key | value | meaning |
//! | --- | --- | --- |
//! | 0x01 | 1 B | window open (0 or 1) |
//! | 0x02 | 1 B | humidity, % (0..=100) |
//! | 0x03 | 2 B, i16 BE, ÷10 | temperature, °C (-40..=85): 25.3 °C is `0x00FD` |
//! | 0x04 | 4 B, u32 BE | CO2, ppm; `0xFFFFFFFF` = sensor not ready (omitted) |
//! | 0x05 | 1 B | battery, % (0..=100) |
//!
//! An unknown key stops decoding of the rest of that payload (its size is unknown), keeping what
//! was decoded before it. A value out of its range is left out (never stored as read), and so is
//! one cut short by the payload's end. Never panics, whatever the bytes.

/// What one payload said. Absent fields were not in it (or were rejected).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    pub window_open: Option<bool>,
    pub humidity: Option<u8>,
    pub temp: Option<f64>,
    pub co2_ppm: Option<u32>,
    pub battery: Option<u8>,
    /// Why decoding stopped early or a value was left out, if it did (for logs and `scan`).
    pub problems: Vec<String>,
    /// Keys seen whole, as bits (1 << key).
    pub keys: u8,
}

impl Reading {
    /// Whether the payload had the nodes' whole layout: every key once, nothing unknown. Another
    /// vendor's data under the same company id almost never does; only then is the advertiser
    /// taken for one of the deployment's nodes (whose address goes on the wire as `node`).
    pub fn is_node_layout(&self) -> bool {
        self.keys == 0b11_1110 && !self.problems.iter().any(|p| p.starts_with("unknown key") || p.contains("cut short"))
    }

    /// Whether anything was read.
    pub fn is_empty(&self) -> bool {
        self.window_open.is_none()
            && self.humidity.is_none()
            && self.temp.is_none()
            && self.co2_ppm.is_none()
            && self.battery.is_none()
    }
}

/// CO2 ppm above this is not a reading (the CCS811 reports at most 8,192 eCO2).
pub const MAX_CO2_PPM: u32 = 100_000;
/// "Not ready yet".
pub const CO2_NOT_READY: u32 = 0xFFFF_FFFF;

/// Decodes the manufacturer data bytes after the company id.
pub fn decode(payload: &[u8]) -> Reading {
    let mut r = Reading::default();
    let mut rest = payload;
    while let Some((&key, tail)) = rest.split_first() {
        let size = match key {
            0x01 | 0x02 | 0x05 => 1,
            0x03 => 2,
            0x04 => 4,
            0x00 => break, // padding
            other => {
                r.problems.push(format!("unknown key 0x{other:02x}: the rest of the payload was not decoded"));
                break;
            }
        };
        let Some(value) = tail.get(..size) else {
            r.problems.push(format!("key 0x{key:02x} cut short: {} of {size} bytes", tail.len()));
            break;
        };
        rest = &tail[size..];
        if r.keys & (1 << key) != 0 {
            r.problems.push(format!("key 0x{key:02x} twice"));
        }
        r.keys |= 1 << key;
        match key {
            0x01 => match value[0] {
                0 => r.window_open = Some(false),
                1 => r.window_open = Some(true),
                v => r.problems.push(format!("window value {v} is not 0 or 1")),
            },
            0x02 => match value[0] {
                h @ 0..=100 => r.humidity = Some(h),
                h => r.problems.push(format!("humidity {h} % is over 100")),
            },
            0x03 => {
                let tenths = i16::from_be_bytes([value[0], value[1]]);
                let t = f64::from(tenths) / 10.0;
                if (-40.0..=85.0).contains(&t) {
                    r.temp = Some(t);
                } else {
                    r.problems.push(format!("temperature {t} °C is outside -40..=85"));
                }
            }
            0x04 => match u32::from_be_bytes([value[0], value[1], value[2], value[3]]) {
                CO2_NOT_READY => {}
                ppm if ppm <= MAX_CO2_PPM => r.co2_ppm = Some(ppm),
                ppm => r.problems.push(format!("CO2 {ppm} ppm is over {MAX_CO2_PPM}")),
            },
            0x05 => match value[0] {
                b @ 0..=100 => r.battery = Some(b),
                b => r.problems.push(format!("battery {b} % is over 100")),
            },
            _ => unreachable!("sizes are only known for these keys"),
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A full payload as the nodes send it: window open, 40 %, 25.3 °C, 612 ppm, 87 %.
    const FULL: [u8; 14] = [0x01, 0x01, 0x02, 40, 0x03, 0x00, 0xFD, 0x04, 0x00, 0x00, 0x02, 0x64, 0x05, 87];

    #[test]
    fn every_key_of_a_full_payload() {
        let r = decode(&FULL);
        assert_eq!(r.window_open, Some(true));
        assert_eq!(r.humidity, Some(40));
        assert_eq!(r.temp, Some(25.3), "25.3 °C is stored as 0x00FD");
        assert_eq!(r.co2_ppm, Some(612));
        assert_eq!(r.battery, Some(87));
        assert!(r.problems.is_empty());
    }

    #[test]
    fn negative_temperatures_are_signed() {
        assert_eq!(decode(&[0x03, 0xFF, 0x9C]).temp, Some(-10.0)); // -100 tenths
    }

    #[test]
    fn co2_not_ready_is_omitted_not_zero() {
        let r = decode(&[0x04, 0xFF, 0xFF, 0xFF, 0xFF, 0x05, 50]);
        assert_eq!(r.co2_ppm, None);
        assert_eq!(r.battery, Some(50));
        assert!(r.problems.is_empty(), "not ready is not a problem");
    }

    #[test]
    fn truncated_payloads_keep_every_whole_value_before_the_cut() {
        for len in 0..FULL.len() {
            let r = decode(&FULL[..len]);
            // Values whose bytes all fit are kept, in order.
            assert_eq!(r.window_open.is_some(), len >= 2, "len {len}");
            assert_eq!(r.humidity.is_some(), len >= 4, "len {len}");
            assert_eq!(r.temp.is_some(), len >= 7, "len {len}");
            assert_eq!(r.co2_ppm.is_some(), len >= 12, "len {len}");
            assert!(r.battery.is_none(), "len {len}");
            let cut_mid_value = ![0, 2, 4, 7, 12].contains(&len);
            assert_eq!(!r.problems.is_empty(), cut_mid_value, "len {len}: {:?}", r.problems);
        }
    }

    #[test]
    fn an_unknown_key_stops_decoding_without_losing_what_came_before() {
        let r = decode(&[0x02, 55, 0x09, 0x01, 0x05, 90]);
        assert_eq!(r.humidity, Some(55));
        assert_eq!(r.battery, None, "after the unknown key nothing is trusted");
        assert!(r.problems[0].contains("unknown key 0x09"));
    }

    #[test]
    fn out_of_range_values_are_rejected_not_stored() {
        let r = decode(&[0x01, 2, 0x02, 101, 0x03, 0x03, 0x84, 0x04, 0x00, 0x01, 0x86, 0xA1, 0x05, 101]);
        assert_eq!(r, Reading { problems: r.problems.clone(), keys: r.keys, ..Reading::default() });
        assert_eq!(r.problems.len(), 5, "{:?}", r.problems); // 90.0 °C and 100,001 ppm included
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_only_valid_values_come_out(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let r = decode(&bytes);
            if let Some(t) = r.temp { prop_assert!((-40.0..=85.0).contains(&t)); }
            if let Some(h) = r.humidity { prop_assert!(h <= 100); }
            if let Some(b) = r.battery { prop_assert!(b <= 100); }
            if let Some(c) = r.co2_ppm { prop_assert!(c <= MAX_CO2_PPM); }
        }
    }
}
