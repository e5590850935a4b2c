use super::*;

fn secret() -> presence::AddressHasher {
    presence::AddressHasher::new(b"test-secret", None).unwrap()
}

fn decoder(presence: bool, thingy: bool, window_s: u64) -> Decoder {
    Decoder::new(
        presence.then(|| PresenceSettings {
            hasher: secret(),
            zones: presence::Zones::default(),
            smoothing: Duration::ZERO,
        }),
        thingy.then(Thingy52Settings::default),
        Duration::from_secs(window_s),
    )
}

fn adv(line: &str) -> Advertisement {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// Advertisements of other kinds of devices, in the capture format, byte-exact after their public
/// formats: Apple iBeacon and Continuity (company 0x004C), Eddystone UID and URL (service 0xFEAA),
/// Ruuvi RAWv2 (company 0x0499), Xiaomi MiBeacon (service 0xFE95), BTHome v2 (service 0xFCD2), a
/// Nordic Thingy:52 on its stock firmware (company 0x0059), and another vendor's 0xFFFF data.
const OTHERS: &[&str] = &[
    r#"{"t":"2026-11-21T10:00:00Z","address":"11:22:33:44:55:01","rssi":-60,"tx_power":null,"manufacturer_data":{"76":"0215e2c56db5dffb48d2b060d0f5a71096e000010002c5"},"service_data":{},"services":[],"name":null}"#,
    r#"{"t":"2026-11-21T10:00:00Z","address":"4A:12:9C:E0:77:02","rssi":-48,"tx_power":12,"manufacturer_data":{"76":"1005031c7a8e39"},"service_data":{},"services":[],"name":null}"#,
    r#"{"t":"2026-11-21T10:00:00Z","address":"11:22:33:44:55:03","rssi":-70,"tx_power":null,"manufacturer_data":{},"service_data":{"0000feaa-0000-1000-8000-00805f9b34fb":"00e8edd5b5b0fb24a4a0d8c80102030405060000"},"services":["0000feaa-0000-1000-8000-00805f9b34fb"],"name":null}"#,
    r#"{"t":"2026-11-21T10:00:00Z","address":"11:22:33:44:55:04","rssi":-71,"tx_power":null,"manufacturer_data":{},"service_data":{"0000feaa-0000-1000-8000-00805f9b34fb":"10f803676f6f676c6507"},"services":["0000feaa-0000-1000-8000-00805f9b34fb"],"name":null}"#,
    r#"{"t":"2026-11-21T10:00:00Z","address":"E8:6E:84:A1:22:05","rssi":-80,"tx_power":null,"manufacturer_data":{"1177":"0512fc5394c37c0004fffc040cac364200cdcbb8334c884f"},"service_data":{},"services":[],"name":"Ruuvi 2205"}"#,
    r#"{"t":"2026-11-21T10:00:00Z","address":"A4:C1:38:00:00:06","rssi":-66,"tx_power":null,"manufacturer_data":{},"service_data":{"0000fe95-0000-1000-8000-00805f9b34fb":"5020aa01c8060000c13ea40d1004d9000c02"},"services":[],"name":"LYWSD03MMC"}"#,
    r#"{"t":"2026-11-21T10:00:00Z","address":"11:22:33:44:55:07","rssi":-77,"tx_power":null,"manufacturer_data":{},"service_data":{"0000fcd2-0000-1000-8000-00805f9b34fb":"4002c40903bf13"},"services":[],"name":"DIY-sensor"}"#,
    r#"{"t":"2026-11-21T10:00:00Z","address":"C8:1F:00:00:00:08","rssi":-59,"tx_power":null,"manufacturer_data":{"89":"0102"},"service_data":{},"services":["ef680100-9b35-4933-9b10-52ffa9740042"],"name":"Thingy"}"#,
    r#"{"t":"2026-11-21T10:00:00Z","address":"11:22:33:44:55:09","rssi":-90,"tx_power":null,"manufacturer_data":{"65535":"09ffffffffffffffffffffffffff"},"service_data":{},"services":[],"name":null}"#,
];

#[test]
fn other_devices_make_one_presence_detection_each_and_no_sensor_reading() {
    let mut d = decoder(true, true, 10);
    for line in OTHERS {
        let a = adv(line);
        let out = d.decode(&a);
        assert_eq!(out.len(), 1, "{line}: {out:?}");
        match &out[0] {
            Detection::Presence(p) => {
                assert_eq!(p.rssi, a.rssi);
                assert!(!p.device_hash.contains(&a.address), "no raw address on the wire");
            }
            other => panic!("{line}: a {other:?}"),
        }
    }
}

/// The seed's Thingy:52 node: window open, 40 %, 25.3 °C, 612 ppm, 87 % battery.
const THINGY: &str = r#"{"t":"2026-11-21T10:29:58Z","address":"C1:0E:5A:33:9F:02","rssi":-71,"tx_power":null,"manufacturer_data":{"65535":"010102280300fd04000002640557"},"service_data":{},"services":[],"name":null}"#;

fn thingy() -> Advertisement {
    adv(THINGY)
}

#[test]
fn a_thingy52_advertisement_makes_a_sensor_reading_and_a_presence_detection() {
    let out = decoder(true, true, 10).decode(&thingy());
    assert_eq!(out.len(), 2, "{out:?}");
    let Detection::Sensor(s) = &out[0] else { panic!("{out:?}") };
    assert_eq!(s.node, "c1:0e:5a:33:9f:02");
    assert_eq!(
        (s.window_open, s.humidity, s.temp, s.co2_ppm, s.battery),
        (Some(true), Some(40), Some(25.3), Some(612), Some(87))
    );
    assert_eq!((s.rssi, s.timestamp), (Some(-71), "2026-11-21T10:29:58Z".parse().unwrap()));
    assert!(matches!(&out[1], Detection::Presence(p) if p.zone == backhaul_shared::Zone::Medium));
}

#[test]
fn another_vendors_data_under_0xffff_is_not_taken_for_a_node() {
    // 14 bytes whose first key decodes (humidity 55), then padding: not the nodes' layout, so no
    // sensor reading (which would put this advertiser's raw address on the wire as `node`).
    let mut a = thingy();
    a.manufacturer_data.insert(0xFFFF, [0x02, 0x37].into_iter().chain([0u8; 12]).collect());
    assert!(decoder(false, true, 10).decode(&a).is_empty());
    let mut twice = thingy();
    twice.manufacturer_data.insert(0xFFFF, hex::decode("0101010102280300fd0400000264").unwrap());
    assert!(decoder(false, true, 10).decode(&twice).is_empty(), "a key twice, one missing");
}

#[test]
fn thingy52_wants_its_company_id_and_exact_size() {
    let mut wrong_company = thingy();
    let payload = wrong_company.manufacturer_data.remove(&0xFFFF).unwrap();
    wrong_company.manufacturer_data.insert(0x0059, payload.clone());
    assert!(decoder(false, true, 10).decode(&wrong_company).is_empty());
    let mut short = thingy();
    short.manufacturer_data.insert(0xFFFF, payload[..13].to_vec());
    assert!(decoder(false, true, 10).decode(&short).is_empty());
    let mut other_id = decoder(false, false, 10);
    other_id.thingy52 = Some(Thingy52Settings { company_id: 0x0059, payload_len: 14 });
    assert_eq!(other_id.decode(&wrong_company).len(), 1, "the company id is configurable");
}

#[test]
fn the_dedup_window_is_per_advertiser_and_per_profile_on_the_capture_clock() {
    let mut d = decoder(true, true, 10);
    let at = |s: i64| {
        let mut a = thingy();
        a.t = Timestamp::from_unix_millis(1_763_720_998_000 + s * 1000).unwrap();
        a
    };
    assert_eq!(d.decode(&at(0)).len(), 2);
    assert_eq!(d.decode(&at(3)).len(), 0, "the same frame on another channel");
    assert_eq!(d.decode(&at(9)).len(), 0);
    assert_eq!(d.decode(&at(10)).len(), 2, "a new window");
    let mut other = at(11);
    other.address = "C1:0E:5A:33:9F:03".into();
    assert_eq!(d.decode(&other).len(), 2, "another advertiser has its own window");
    // Only the presence profile: the sensor window does not block presence.
    let mut p = decoder(true, false, 10);
    assert_eq!(p.decode(&at(0)).len(), 1);
    assert_eq!(p.decode(&at(5)).len(), 0);
}

#[test]
fn the_capture_format_round_trips() {
    let a = thingy();
    let json = serde_json::to_string(&a).unwrap();
    assert!(json.contains(r#""manufacturer_data":{"65535":"0101022803"#), "{json}");
    assert_eq!(adv(&json), a);
    assert!(serde_json::from_str::<Advertisement>(&json.replace("0101", "zz01")).is_err(), "bad hex is an error");
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn arbitrary_advertisements_never_panic(
            company in any::<u16>(),
            data in proptest::collection::vec(any::<u8>(), 0..40),
            rssi in any::<i16>(),
            address in "[0-9A-Fa-f:]{0,20}",
            t in any::<i32>(),
        ) {
            let a = Advertisement {
                t: Timestamp::from_unix_millis(i64::from(t) * 1000).unwrap(),
                address,
                address_type: None,
                rssi,
                tx_power: None,
                manufacturer_data: [(company, data.clone()), (0xFFFF, data)].into_iter().collect(),
                service_data: BTreeMap::new(),
                services: Vec::new(),
                name: None,
            };
            let mut d = decoder(true, true, 10);
            let out = d.decode(&a);
            prop_assert!(!out.is_empty(), "presence sees every advertiser");
        }
    }
}

/// Issue #13: a reading at +127 dBm (HCI's "not available") makes a detection the pipeline drops;
/// it must not open a dedup window that swallows the advertiser's real readings, nor enter the
/// smoothing median.
#[test]
fn a_refused_rssi_takes_no_dedup_slot_and_stays_out_of_the_median() {
    let at = |ms: u32, rssi: i16| {
        adv(&format!(
            r#"{{"t":"2026-11-21T10:00:0{}.{:03}Z","address":"C1:0E:5A:33:9F:02","rssi":{rssi},"manufacturer_data":{{"65535":"010102280300fd04000002640557"}}}}"#,
            ms / 1000,
            ms % 1000
        ))
    };
    let mut d = decoder(true, true, 10);
    let refused = d.decode(&at(0, 127));
    assert_eq!(refused.len(), 2, "a reading and a presence, both refused later: {refused:?}");
    assert!(refused.iter().all(|x| backhaul_shared::batch::validate_detection(x).is_err()));
    let real = d.decode(&at(100, -61));
    assert_eq!(
        real.iter().map(Detection::rssi).collect::<Vec<_>>(),
        vec![Some(-61), Some(-61)],
        "not swallowed: {real:?}"
    );
    assert!(d.decode(&at(200, -62)).is_empty(), "the real reading's window holds");

    let mut smoothed = Decoder::new(
        Some(PresenceSettings {
            hasher: secret(),
            zones: presence::Zones::default(),
            smoothing: Duration::from_secs(5),
        }),
        None,
        Duration::ZERO,
    );
    let rssi: Vec<i16> = [(0, -60), (100, 127), (200, 127), (300, -64)]
        .into_iter()
        .flat_map(|(ms, r)| smoothed.decode(&at(ms, r)))
        .filter_map(|x| x.rssi())
        .collect();
    assert_eq!(rssi[3], smoothed_median(&[-60, -64]), "the median of the real readings only: {rssi:?}");
}

/// What the smoother makes of these readings alone.
fn smoothed_median(readings: &[i16]) -> i16 {
    let mut s = presence::Smoother::new(Duration::from_secs(5));
    readings.iter().enumerate().map(|(i, r)| s.push("X", i as i64, *r)).last().unwrap()
}
