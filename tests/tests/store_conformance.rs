//! One conformance suite for the cloud's store (issue #15), run against SQLite (a temp file) and a
//! private PostgreSQL (initdb into a temp dir, a free loopback port): every case on a fresh
//! database of each backend, through the store's public API. What both backends must agree on:
//! outcomes and counters, devices and gaps, pages of detections (checked against a brute-force
//! order over batches with overlapping, tied, wide and empty time ranges, and rows from before
//! schema 4), stored payloads that no longer decode, `reprocess`, and one batch raced by many writers.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use backhaul_cloud::store::{DetectionQuery, DetectionRow, Lookup, Outcome, Reprocessed, Store};
use backhaul_shared::{Batch, BatchId, Detection, DeviceStatus, Limits, Presence, Sensor, Timestamp, Zone};
use backhaul_tests::postgres::Postgres;
use sqlx::Executor;

type Case = fn(String) -> Pin<Box<dyn Future<Output = ()>>>;

/// Every case, by name.
const CASES: &[(&str, Case)] = &[
    ("outcomes_and_counters", |u| Box::pin(outcomes_and_counters(u))),
    ("devices_gaps_and_status", |u| Box::pin(devices_gaps_and_status(u))),
    ("pages_match_a_brute_force_order", |u| Box::pin(pages_match_a_brute_force_order(u))),
    ("rows_from_before_schema_4_are_merged_in", |u| Box::pin(rows_from_before_schema_4_are_merged_in(u))),
    ("an_undecodable_payload_is_skipped_and_counted", |u| Box::pin(an_undecodable_payload_is_skipped_and_counted(u))),
    ("reprocess_repairs_the_time_index_without_duplicates", |u| {
        Box::pin(reprocess_repairs_the_time_index_without_duplicates(u))
    }),
    ("one_batch_raced_by_many_writers_is_stored_once", |u| Box::pin(one_batch_raced_by_many_writers_is_stored_once(u))),
    ("groups_across_devices_add_up_on_each_device", |u| Box::pin(groups_across_devices_add_up_on_each_device(u))),
    ("one_batch_id_raced_with_two_payloads_is_stored_once", |u| {
        Box::pin(one_batch_id_raced_with_two_payloads_is_stored_once(u))
    }),
    ("batches_with_identical_times_page_by_batch_id", |u| Box::pin(batches_with_identical_times_page_by_batch_id(u))),
    ("a_newer_schema_is_refused", |u| Box::pin(a_newer_schema_is_refused(u))),
    ("replicas_started_together_migrate_once", |u| Box::pin(replicas_started_together_migrate_once(u))),
    ("commands_are_queued_published_answered_once_and_expire", |u| {
        Box::pin(commands_are_queued_published_answered_once_and_expire(u))
    }),
    ("gap_ranges_dead_letters_and_the_ledger", |u| Box::pin(gap_ranges_dead_letters_and_the_ledger(u))),
    ("seed_senders_heartbeats_uuids_and_telemetry", |u| Box::pin(seed_senders_heartbeats_uuids_and_telemetry(u))),
];

fn run_all(mut database: impl FnMut(&str) -> String) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for (name, case) in CASES {
        let url = database(name);
        eprintln!("case {name} on {url}");
        rt.block_on(case(url));
    }
}

#[test]
fn conformance_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    run_all(|name| format!("sqlite:{}", dir.path().join(format!("{name}.db")).display()));
}

#[test]
fn conformance_on_postgresql() {
    let pg = Postgres::start().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    run_all(|name| {
        rt.block_on(async {
            sqlx::any::install_default_drivers();
            let pool = sqlx::AnyPool::connect(&pg.url()).await.unwrap();
            pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.unwrap();
            pool.close().await;
        });
        pg.url().replace("/postgres", &format!("/{name}"))
    });
}

/// A raw connection to the same database, for what the API cannot do (old rows, damage).
async fn raw(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(url).await.unwrap()
}

/// 2026-11-30T00:00:00Z in UTC µs.
const BASE: i64 = 1_795_996_800_000_000;

fn ts(us: i64) -> Timestamp {
    Timestamp::from_unix_micros(us).unwrap()
}

fn batch(device: &str, seq: u64, times: &[i64]) -> Batch {
    Batch {
        schema: 1,
        batch_id: BatchId::new(),
        device_id: device.into(),
        seq,
        name: None,
        location: None,
        timestamp: ts(BASE),
        detections: times
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if i % 5 == 4 {
                    Detection::Sensor(Sensor {
                        node: format!("thingy-{i}"),
                        rssi: Some(-70),
                        temp: Some(21.5),
                        humidity: Some(40),
                        co2_ppm: None,
                        window_open: Some(i % 2 == 0),
                        battery: Some(90),
                        timestamp: ts(t),
                    })
                } else {
                    Detection::Presence(Presence {
                        device_hash: format!("{:016x}", seq * 1000 + i as u64),
                        rssi: -60,
                        zone: Zone::Near,
                        timestamp: ts(t),
                    })
                }
            })
            .collect(),
        clock: Default::default(),
    }
}

async fn store(s: &Store, b: &Batch) -> Outcome {
    let raw = b.to_json();
    let hash = format!("{:x}", fastrand::u128(..));
    s.store_batch(b, &raw, &hash, "test", Lookup::First).await.unwrap()
}

/// Stores `b` with a hash derived from its bytes (so a resend is a duplicate).
async fn store_same(s: &Store, b: &Batch) -> Outcome {
    let raw = b.to_json();
    let hash = format!("{}-{}", b.batch_id, raw.len());
    s.store_batch(b, &raw, &hash, "test", Lookup::First).await.unwrap()
}

async fn outcomes_and_counters(url: String) {
    let s = Store::connect(&url).await.unwrap();
    let b = batch("pi-a", 0, &[BASE, BASE + 1]);
    assert_eq!(store_same(&s, &b).await, Outcome::Stored);
    assert_eq!(store_same(&s, &b).await, Outcome::Duplicate);
    assert_eq!(store(&s, &b).await, Outcome::Conflict, "same batch_id, another payload hash");
    s.dead_letter("mqtt", Some("backhaul/x/batches"), None, 12, "not JSON", false).await.unwrap();
    s.flush_counts().await.unwrap();
    let st = s.stats().await.unwrap();
    assert_eq!((st.batches, st.detections, st.duplicates, st.dead_letters), (1, 2, 1, 1), "{st:?}");
    assert_eq!(st.rejected, 2, "the conflict and the dead letter: {st:?}");
    // Counters survive a reconnect (they are in the database).
    drop(s);
    let s = Store::connect(&url).await.unwrap();
    assert_eq!(s.stats().await.unwrap(), st);
    assert!(s.ping().await);
}

async fn devices_gaps_and_status(url: String) {
    let s = Store::connect(&url).await.unwrap();
    for seq in [0, 1, 3, 6] {
        store(&s, &batch("pi-a", seq, &[BASE + seq as i64])).await;
    }
    let mut unsynced = batch("pi-b", 0, &[]);
    unsynced.clock = backhaul_shared::Clock::Unsynced;
    store(&s, &unsynced).await;
    s.device_status("pi-a", &DeviceStatus { online: true, queue_depth: Some(7), ..Default::default() }, false)
        .await
        .unwrap();
    s.device_status("pi-c", &DeviceStatus::default(), false).await.unwrap();
    let devices: BTreeMap<_, _> = s.devices().await.unwrap().into_iter().map(|d| (d.device_id.clone(), d)).collect();
    assert_eq!(devices.keys().cloned().collect::<Vec<_>>(), ["pi-a", "pi-b", "pi-c"]);
    let a = &devices["pi-a"];
    assert_eq!((a.batches, a.detections, a.last_seq, a.gaps, a.online), (4, 4, 6, 3, true), "{a:?}");
    assert_eq!(a.status.as_ref().and_then(|v| v["queue_depth"].as_u64()), Some(7));
    let b = &devices["pi-b"];
    assert_eq!((b.batches, b.detections, b.gaps, b.clock_unsynced_batches), (1, 0, 0, 1), "{b:?}");
    assert!(!devices["pi-c"].online);
}

/// The rows a store must return for `q`, from the batches as they were acked (parsed back from
/// their bytes, as the store reads them): sorted by (ts, batch_id, idx) descending.
fn expected(batches: &[Batch], q: &DetectionQuery) -> Vec<String> {
    let mut keys: Vec<(i64, String, i64)> = Vec::new();
    for b in batches {
        let parsed = Batch::from_json(&b.to_json(), &Limits::default()).unwrap();
        if q.device_id.as_ref().is_some_and(|d| *d != parsed.device_id) {
            continue;
        }
        for (i, d) in parsed.detections.iter().enumerate() {
            let t = d.timestamp().unix_micros();
            if q.since_us.is_some_and(|s| t < s) || q.until_us.is_some_and(|u| t >= u) {
                continue;
            }
            keys.push((t, parsed.batch_id.to_string(), i as i64));
        }
    }
    keys.sort_by(|a, b| b.cmp(a));
    keys.into_iter().map(|(t, b, i)| format!("{t}.{b}.{i}")).collect()
}

/// Every page of `q`, following the cursor as `GET /api/v1/detections` does.
async fn all_pages(s: &Store, q: &DetectionQuery) -> Vec<DetectionRow> {
    let mut q = q.clone();
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let page = s.detections(&q).await.unwrap();
        assert!(page.len() as i64 <= q.limit);
        let full = page.len() as i64 == q.limit;
        let last = page.last().map(|r| r.cursor.clone());
        out.extend(page);
        match (full, last) {
            (true, Some(c)) => {
                let mut parts = c.splitn(3, '.');
                let t = parts.next().unwrap().parse().unwrap();
                let b = parts.next().unwrap().to_owned();
                let i = parts.next().unwrap().parse().unwrap();
                q.after = Some((t, b, i));
            }
            _ => return out,
        }
    }
    panic!("paging did not end");
}

/// Batches from three devices: overlapping ranges, times shared across batches, out of order
/// within a batch, empty batches, and wide ones (a clock set mid-batch); then queries of every
/// shape, paged with several limits, against the brute-force order.
async fn pages_match_a_brute_force_order(url: String) {
    let s = Store::connect(&url).await.unwrap();
    let mut rng = fastrand::Rng::with_seed(15);
    let mut batches = Vec::new();
    for i in 0..120u64 {
        let device = ["pi-a", "pi-b", "pi-c"][i as usize % 3];
        let start = BASE + rng.i64(0..600_000_000);
        let n = if i % 17 == 0 { 0 } else { rng.usize(1..40) };
        let mut times: Vec<i64> = (0..n)
            .map(|_| if rng.bool() { start + rng.i64(0..30_000_000) } else { (start / 1_000_000) * 1_000_000 })
            .collect();
        if i % 29 == 5 && n > 1 {
            // A clock stepped mid-batch: 1970 first, then now.
            times[0] = 1_000_000;
        }
        if i % 31 == 7 && n > 1 {
            times[n - 1] = start + 3 * 3_600_000_000;
        }
        batches.push(batch(device, i, &times));
    }
    // Stored 8 at a time, so that on SQLite group commits carry several devices' batches.
    let s = std::sync::Arc::new(s);
    for group in batches.chunks(8) {
        let tasks: Vec<_> = group
            .iter()
            .map(|b| {
                let (s, b) = (s.clone(), b.clone());
                tokio::spawn(async move { store(&s, &b).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Outcome::Stored);
        }
    }
    let devices = s.devices().await.unwrap();
    for d in &devices {
        let mine: Vec<&Batch> = batches.iter().filter(|b| b.device_id == d.device_id).collect();
        let detections: usize = mine.iter().map(|b| b.detections.len()).sum();
        assert_eq!((d.batches, d.detections), (mine.len() as i64, detections as i64), "{d:?}");
    }
    let mid = BASE + 300_000_000;
    let queries = [
        (None, None, None),
        (Some("pi-a"), None, None),
        (Some("pi-c"), Some(mid), None),
        (None, None, Some(mid)),
        (Some("pi-b"), Some(BASE + 100_000_000), Some(BASE + 200_000_000)),
        (None, Some(mid), Some(mid)),
        (Some("nobody"), None, None),
        (None, Some(0), Some(2_000_000)),
    ];
    for (device, since, until) in queries {
        for limit in [1, 7, 100, 1000] {
            if limit == 1 && device.is_none() && since.is_none() && until.is_none() {
                continue; // one row per page over everything: thousands of pages, covered by 7
            }
            let q = DetectionQuery {
                device_id: device.map(str::to_owned),
                since_us: since,
                until_us: until,
                limit,
                after: None,
            };
            let got: Vec<String> = all_pages(&s, &q).await.into_iter().map(|r| r.cursor).collect();
            let want = expected(&batches, &q);
            assert_eq!(got.len(), want.len(), "{q:?}");
            assert!(got == want, "{q:?}: pages differ from the brute-force order");
        }
    }
    // The rows carry the detection's fields.
    let q = DetectionQuery { device_id: Some("pi-a".into()), limit: 1000, ..Default::default() };
    let rows = s.detections(&q).await.unwrap();
    let sensor = rows.iter().find(|r| r.kind == "sensor").expect("a sensor row");
    assert_eq!((sensor.temp, sensor.humidity, sensor.battery, sensor.co2_ppm), (Some(21.5), Some(40), Some(90), None));
    assert!(sensor.node.as_deref().is_some_and(|n| n.starts_with("thingy-")) && sensor.device_hash.is_none());
    let presence = rows.iter().find(|r| r.kind == "presence").expect("a presence row");
    assert_eq!((presence.rssi, presence.zone.as_deref()), (Some(-60), Some("near")));
}

/// A batch stored before schema 4 has no payload: its `detections` rows are its only copy, and
/// pages merge them with the rows read from payloads.
async fn rows_from_before_schema_4_are_merged_in(url: String) {
    let s = Store::connect(&url).await.unwrap();
    let new = batch("pi-a", 1, &[BASE + 10, BASE + 30]);
    store(&s, &new).await;
    let pool = raw(&url).await;
    let old_id = BatchId::new().to_string();
    sqlx::query(
        "INSERT INTO batches (batch_id, device_id, seq, payload_sha256, received_at, detections, via)
         VALUES ($1, 'pi-a', 0, 'h', 0, 2, 'http')",
    )
    .bind(old_id.clone())
    .execute(&pool)
    .await
    .unwrap();
    for (idx, t) in [(0i32, BASE + 20), (1, BASE + 40)] {
        sqlx::query(
            "INSERT INTO detections (batch_id, idx, device_id, ts, kind, rssi, device_hash, zone)
             VALUES ($1, $2, 'pi-a', $3, 'presence', -50, 'aaaaaaaaaaaaaaaa', 'far')",
        )
        .bind(old_id.clone())
        .bind(idx)
        .bind(t)
        .execute(&pool)
        .await
        .unwrap();
    }
    // A build before migration 5 on the same database still projects payload batches into rows:
    // those rows are not read twice.
    for (idx, t) in [(0i32, BASE + 10), (1, BASE + 30)] {
        sqlx::query(
            "INSERT INTO detections (batch_id, idx, device_id, ts, kind, rssi, device_hash, zone)
             VALUES ($1, $2, 'pi-a', $3, 'presence', -60, 'bbbbbbbbbbbbbbbb', 'near')",
        )
        .bind(new.batch_id.to_string())
        .bind(idx)
        .bind(t)
        .execute(&pool)
        .await
        .unwrap();
    }
    let q = DetectionQuery { device_id: Some("pi-a".into()), limit: 1, ..Default::default() };
    let rows = all_pages(&s, &q).await;
    let got: Vec<_> = rows.iter().map(|r| (r.timestamp.clone(), r.batch_id.clone())).collect();
    let new_id = new.batch_id.to_string();
    let want: Vec<_> = [(BASE + 40, &old_id), (BASE + 30, &new_id), (BASE + 20, &old_id), (BASE + 10, &new_id)]
        .into_iter()
        .map(|(t, b)| (ts(t).to_string(), b.clone()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(rows[0].zone.as_deref(), Some("far"));
    assert_eq!(s.reprocess(None, None).await.unwrap(), Reprocessed { reindexed: 1, undecodable: 0, skipped: 1 });
}

async fn an_undecodable_payload_is_skipped_and_counted(url: String) {
    let s = Store::connect(&url).await.unwrap();
    let good = batch("pi-a", 0, &[BASE + 1, BASE + 2]);
    let bad = batch("pi-a", 1, &[BASE + 3]);
    store(&s, &good).await;
    store(&s, &bad).await;
    let pool = raw(&url).await;
    sqlx::query("UPDATE batches SET payload = $1 WHERE batch_id = $2")
        .bind(vec![9u8, 0, 0, 0, 1, 2, 3])
        .bind(bad.batch_id.to_string())
        .execute(&pool)
        .await
        .unwrap();
    let q = DetectionQuery { limit: 100, ..Default::default() };
    let rows = s.detections(&q).await.unwrap();
    assert_eq!(rows.len(), 2, "the damaged batch is left out, the others are read");
    assert!(rows.iter().all(|r| r.batch_id == good.batch_id.to_string()));
    assert_eq!(s.reprocess(None, None).await.unwrap(), Reprocessed { reindexed: 1, undecodable: 1, skipped: 0 });
    assert_eq!(s.stats().await.unwrap().batches, 2, "nothing is removed");
}

/// An index written wrong (as an older decoder would have): rows go missing from pages until
/// `reprocess` re-derives it; twice changes nothing and stores nothing twice.
async fn reprocess_repairs_the_time_index_without_duplicates(url: String) {
    let s = Store::connect(&url).await.unwrap();
    let batches: Vec<Batch> = (0..6)
        .map(|i| batch(if i % 2 == 0 { "pi-a" } else { "pi-b" }, i, &[BASE + i as i64 * 1000, BASE + 5]))
        .collect();
    for b in &batches {
        store(&s, b).await;
    }
    let pool = raw(&url).await;
    sqlx::query("UPDATE batches SET first_ts = 0, last_ts = 1").execute(&pool).await.unwrap();
    sqlx::query("UPDATE devices SET max_span_us = 0").execute(&pool).await.unwrap();
    let q = DetectionQuery { limit: 3, ..Default::default() };
    assert!(all_pages(&s, &q).await.len() < 12, "the wrong index hides rows");
    let done = s.reprocess(None, Some("pi-a")).await.unwrap();
    assert_eq!(done.reindexed, 3);
    let done = s.reprocess(None, None).await.unwrap();
    assert_eq!(done, Reprocessed { reindexed: 6, undecodable: 0, skipped: 0 });
    let got: Vec<String> = all_pages(&s, &q).await.into_iter().map(|r| r.cursor).collect();
    assert_eq!(got, expected(&batches, &q));
    s.reprocess(None, None).await.unwrap();
    let again: Vec<String> = all_pages(&s, &q).await.into_iter().map(|r| r.cursor).collect();
    assert_eq!(again, got);
    assert_eq!(s.stats().await.unwrap().detections, 12);
}

/// The same batch from 16 writers at once (replicas, resends), among 16 other new batches: each
/// stored once, every other answer a duplicate, never an error.
async fn one_batch_raced_by_many_writers_is_stored_once(url: String) {
    let s = std::sync::Arc::new(Store::connect(&url).await.unwrap());
    let raced = batch("pi-a", 0, &[BASE, BASE + 1]);
    let others: Vec<Batch> = (1..=16).map(|i| batch("pi-a", i, &[BASE + i as i64])).collect();
    let mut tasks = Vec::new();
    for other in others {
        let (s, raced) = (s.clone(), raced.clone());
        tasks.push(tokio::spawn(async move { (store_same(&s, &raced).await, store_same(&s, &other).await) }));
    }
    let mut stored = 0;
    for t in tasks {
        let (r, o) = t.await.unwrap();
        assert_eq!(o, Outcome::Stored);
        match r {
            Outcome::Stored => stored += 1,
            Outcome::Duplicate => {}
            Outcome::Conflict => panic!("the same bytes are never a conflict"),
        }
    }
    assert_eq!(stored, 1);
    s.flush_counts().await.unwrap();
    let st = s.stats().await.unwrap();
    assert_eq!((st.batches, st.detections, st.duplicates), (17, 18, 15), "{st:?}");
    // Batches written in one group transaction add up on their device's row.
    let device = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-a").unwrap();
    assert_eq!((device.batches, device.detections, device.last_seq, device.gaps), (17, 18, 16, 0), "{device:?}");
    let q = DetectionQuery { limit: 1000, ..Default::default() };
    assert_eq!(s.detections(&q).await.unwrap().len(), 18);
}

/// Many new batches of several devices at once, straight to the write path (as MQTT stores
/// them), so that on SQLite they share group transactions: the devices' rows are written by one
/// multi-row upsert per group (a device with rows already, and new ones) and the counters by one
/// statement; each device's row must add up. Then the same batches again: a group of only
/// duplicates writes nothing, and its counts reach the counters through `flush_counts`.
async fn groups_across_devices_add_up_on_each_device(url: String) {
    let s = std::sync::Arc::new(Store::connect(&url).await.unwrap());
    store(&s, &batch("pi-old", 0, &[BASE])).await;
    let devices = ["pi-old", "pi-new-1", "pi-new-2", "pi-new-3"];
    let mut batches = Vec::new();
    for round in 1..=6u64 {
        for (d, device) in devices.iter().enumerate() {
            let times: Vec<i64> = (0..=d as i64).map(|i| BASE + round as i64 * 10 + i).collect();
            let mut b = batch(device, round, &times);
            b.name = Some(format!("{device} r{round}"));
            if *device == "pi-new-2" && round % 2 == 0 {
                b.clock = backhaul_shared::Clock::Unsynced;
            }
            batches.push(b);
        }
    }
    let write_all = |expect: Outcome| {
        let tasks: Vec<_> = batches
            .iter()
            .cloned()
            .map(|b| {
                let s = s.clone();
                tokio::spawn(async move {
                    let raw = b.to_json();
                    let hash = format!("{}-{}", b.batch_id, raw.len());
                    s.store_batch(&b, &raw, &hash, "test", Lookup::Done).await.unwrap()
                })
            })
            .collect();
        async move {
            for t in tasks {
                assert_eq!(t.await.unwrap(), expect);
            }
        }
    };
    write_all(Outcome::Stored).await;
    let st = s.stats().await.unwrap();
    assert_eq!((st.batches, st.detections, st.duplicates), (25, 1 + 6 * (1 + 2 + 3 + 4), 0), "{st:?}");
    let rows: BTreeMap<_, _> = s.devices().await.unwrap().into_iter().map(|d| (d.device_id.clone(), d)).collect();
    for (d, device) in devices.iter().enumerate() {
        let row = &rows[*device];
        let (batches, detections) = if *device == "pi-old" { (7, 7) } else { (6, 6 * (d as i64 + 1)) };
        assert_eq!((row.batches, row.detections, row.last_seq), (batches, detections, 6), "{row:?}");
        let first_seq = if *device == "pi-old" { 0 } else { 1 };
        assert_eq!(row.gaps, first_seq, "{row:?}");
        assert_eq!(row.clock_unsynced_batches, if *device == "pi-new-2" { 3 } else { 0 }, "{row:?}");
        assert!(row.name.as_deref().is_some_and(|n| n.starts_with(device)), "{row:?}");
    }
    write_all(Outcome::Duplicate).await;
    assert_eq!(s.stats().await.unwrap().duplicates, 24, "counted in memory meanwhile");
    s.flush_counts().await.unwrap();
    drop(s);
    let s = Store::connect(&url).await.unwrap();
    let again = s.stats().await.unwrap();
    assert_eq!((again.batches, again.detections, again.duplicates), (25, st.detections, 24), "{again:?}");
}

/// One batch_id sent by 12 writers at once with two different payloads, straight to the write path
/// (as the HTTP route does after its own lookup), so that on SQLite several land in one group
/// insert: one is stored, the writers with its payload get `Duplicate`, the others `Conflict`, and
/// the stored row is the one whose writer was told `Stored`.
async fn one_batch_id_raced_with_two_payloads_is_stored_once(url: String) {
    let s = std::sync::Arc::new(Store::connect(&url).await.unwrap());
    let b = batch("pi-a", 0, &[BASE]);
    let raw = b.to_json();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (s, b, raw) = (s.clone(), b.clone(), raw.clone());
        let hash = format!("payload-{}", i % 2);
        tasks.push(tokio::spawn(async move {
            let outcome = s.store_batch(&b, &raw, &hash, "test", Lookup::Done).await.unwrap();
            (hash, outcome)
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let winners: Vec<&String> = outcomes.iter().filter(|(_, o)| *o == Outcome::Stored).map(|(h, _)| h).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    for (hash, outcome) in &outcomes {
        let want = if hash == winners[0] { [Outcome::Stored, Outcome::Duplicate] } else { [Outcome::Conflict; 2] };
        assert!(want.contains(outcome), "{hash}: {outcome:?} ({outcomes:?})");
    }
    // The stored row is the winner's: a resend with its hash is a duplicate, the other's a conflict.
    assert_eq!(s.store_batch(&b, &raw, winners[0], "test", Lookup::First).await.unwrap(), Outcome::Duplicate);
    let other = if winners[0] == "payload-0" { "payload-1" } else { "payload-0" };
    assert_eq!(s.store_batch(&b, &raw, other, "test", Lookup::First).await.unwrap(), Outcome::Conflict);
    s.flush_counts().await.unwrap();
    let st = s.stats().await.unwrap();
    assert_eq!((st.batches, st.detections, st.duplicates + st.rejected), (1, 1, 13), "{st:?}");
}

/// Twelve batches whose detections all carry the same time: pages order them by batch_id (and
/// index), whatever the limit, across chunk boundaries of the scan.
async fn batches_with_identical_times_page_by_batch_id(url: String) {
    let s = Store::connect(&url).await.unwrap();
    let batches: Vec<Batch> = (0..12).map(|i| batch(["pi-a", "pi-b"][i % 2], i as u64, &[BASE; 3])).collect();
    for b in &batches {
        store(&s, b).await;
    }
    for (device, limit) in [(None, 1), (None, 3), (Some("pi-a"), 1), (Some("pi-b"), 4), (None, 1000)] {
        let q = DetectionQuery { device_id: device.map(str::to_owned), limit, ..Default::default() };
        let got: Vec<String> = all_pages(&s, &q).await.into_iter().map(|r| r.cursor).collect();
        assert_eq!(got, expected(&batches, &q), "{q:?}");
    }
}

/// A database migrated by a newer build is refused with a clear error, not used.
async fn a_newer_schema_is_refused(url: String) {
    drop(Store::connect(&url).await.unwrap());
    let pool = raw(&url).await;
    sqlx::query("INSERT INTO schema_version (version) VALUES (999)").execute(&pool).await.unwrap();
    let e = Store::connect(&url).await.unwrap_err().to_string();
    assert!(e.contains("999") && e.contains("newer"), "{e}");
}

/// Issue #15: replicas started together on a new database (a fleet's cloud after a deploy, or a
/// systemd restart of all of them) all start, and each migration is applied once. Without the
/// migration lock they read the same version and race: PostgreSQL fails one on the catalog
/// (a duplicate `pg_type` row for `schema_version`, both creating it), and SQLite one with
/// "database is locked" (a deferred transaction that read first cannot take the write lock).
async fn replicas_started_together_migrate_once(url: String) {
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let url = url.clone();
        starts.spawn(async move { Store::connect(&url).await.map(drop) });
    }
    while let Some(started) = starts.join_next().await {
        started.unwrap().expect("every replica starts");
    }
    let pool = raw(&url).await;
    let row = sqlx::query("SELECT COUNT(*), COUNT(DISTINCT version), MAX(version) FROM schema_version")
        .fetch_one(&pool)
        .await
        .unwrap();
    use sqlx::Row;
    let (rows, distinct, max): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((rows, distinct), (max, max), "each migration recorded once");
    // And the store works: a batch and its resend.
    let s = Store::connect(&url).await.unwrap();
    let b = batch("pi-a", 0, &[BASE]);
    assert_eq!(store_same(&s, &b).await, Outcome::Stored);
    assert_eq!(store_same(&s, &b).await, Outcome::Duplicate);
}

async fn commands_are_queued_published_answered_once_and_expire(url: String) {
    use backhaul_cloud::store::{republish_delay, CommandFilter, Finished};
    use backhaul_shared::command::{CommandKind, CommandResult, CommandStatus};
    let s = Store::connect(&url).await.unwrap();
    let c = s.commands();
    store(&s, &batch("pi-a", 0, &[BASE])).await;
    assert!(c.device_known("pi-a").await.unwrap());
    assert!(!c.device_known("pi-z").await.unwrap());
    let ping = c.create("pi-a", &CommandKind::Ping).await.unwrap();
    let rate = c.create("pi-a", &CommandKind::SetRate { rate_per_sec: 5, burst: 6 }).await.unwrap();
    assert_eq!((ping.status.as_str(), ping.kind.as_str()), ("queued", "ping"));
    assert_eq!(rate.command, serde_json::json!({"kind": "set_rate", "rate_per_sec": 5, "burst": 6}));
    // Both are due; the device is offline, and that does not hold back a first publish.
    let due = c.to_publish(100).await.unwrap();
    assert_eq!(
        due.iter().map(|d| d.1.command_id.to_string()).collect::<Vec<_>>(),
        [ping.command_id.clone(), rate.command_id.clone()]
    );
    c.delivered("pi-a", &ping.command_id, Some(1)).await.unwrap();
    c.delivered("pi-a", &rate.command_id, None).await.unwrap(); // fetched over HTTP
    assert!(c.to_publish(100).await.unwrap().is_empty(), "published: due again only after the backoff");
    // Once the backoff is over, a delivered command unanswered is published again, only while its
    // device is online (one copy waits in an offline device's session).
    raw(&url).await.execute("UPDATE commands SET next_publish_at = 0").await.unwrap();
    assert!(c.to_publish(100).await.unwrap().is_empty(), "the device is offline");
    s.device_status("pi-a", &DeviceStatus { online: true, ..Default::default() }, false).await.unwrap();
    let again = c.to_publish(100).await.unwrap();
    assert_eq!(
        again.iter().map(|d| (d.1.command_id.to_string(), d.2)).collect::<Vec<_>>(),
        [(ping.command_id.clone(), 1), (rate.command_id.clone(), 0)]
    );
    c.delivered("pi-a", &ping.command_id, Some(2)).await.unwrap();
    c.delivered("pi-a", &rate.command_id, Some(1)).await.unwrap();
    assert!(c.to_publish(100).await.unwrap().is_empty(), "backed off again");
    assert_eq!(republish_delay(1), std::time::Duration::from_secs(120));
    assert_eq!(republish_delay(40), std::time::Duration::from_secs(3600));
    // Listings: a device's open work oldest first; everything newest first.
    let open = c.list("pi-a", CommandFilter::Open, 10).await.unwrap();
    assert_eq!(open.iter().map(|r| r.command_id.as_str()).collect::<Vec<_>>(), [&ping.command_id, &rate.command_id]);
    assert!(open.iter().all(|r| r.status == "delivered" && r.delivered_at.is_some()));
    let all = c.list("pi-a", CommandFilter::All, 1).await.unwrap();
    assert_eq!(all[0].command_id, rate.command_id, "newest first");
    // The first answer stands; an answer for another device's command is unknown.
    let answer = |id: &str, status| CommandResult {
        command_id: id.parse().unwrap(),
        status,
        result: serde_json::json!({"ok": true}),
        finished_at: Timestamp::now(),
    };
    assert_eq!(c.finish("pi-a", &answer(&ping.command_id, CommandStatus::Done)).await.unwrap(), Finished::Recorded);
    assert_eq!(
        c.finish("pi-a", &answer(&ping.command_id, CommandStatus::Failed)).await.unwrap(),
        Finished::AlreadyFinal
    );
    assert_eq!(c.finish("pi-b", &answer(&rate.command_id, CommandStatus::Done)).await.unwrap(), Finished::Unknown);
    let done = c.get("pi-a", &ping.command_id).await.unwrap().unwrap();
    assert_eq!((done.status.as_str(), &done.result), ("done", &Some(serde_json::json!({"ok": true}))));
    assert!(c.get("pi-b", &ping.command_id).await.unwrap().is_none(), "another device's command is not found");
    // A big result is replaced by an error saying so.
    let big = c.create("pi-a", &CommandKind::Flush).await.unwrap();
    let mut huge = answer(&big.command_id, CommandStatus::Done);
    huge.result = serde_json::json!({"x": "y".repeat(100_000)});
    c.finish("pi-a", &huge).await.unwrap();
    let big = c.get("pi-a", &big.command_id).await.unwrap().unwrap();
    assert!(big.result.unwrap()["error"].as_str().unwrap().contains("over the"));
    // Expiry fails what is still open, once.
    assert_eq!(c.expire(Timestamp::now().unix_micros() + 1).await.unwrap(), 1);
    let expired = c.get("pi-a", &rate.command_id).await.unwrap().unwrap();
    assert_eq!(expired.status, "failed");
    assert!(expired.result.unwrap()["error"].as_str().unwrap().contains("expired"));
    assert_eq!(c.expire(Timestamp::now().unix_micros() + 1).await.unwrap(), 0);
    assert_eq!(c.list("pi-a", CommandFilter::Status(CommandStatus::Failed), 10).await.unwrap().len(), 1);
}

async fn gap_ranges_dead_letters_and_the_ledger(url: String) {
    let s = Store::connect(&url).await.unwrap();
    for seq in [2, 3, 6, 7, 10] {
        store(&s, &batch("pi-a", seq, &[BASE + seq as i64])).await;
    }
    let gaps: Vec<(i64, i64)> = s.gaps("pi-a", 100).await.unwrap().iter().map(|g| (g.first, g.last)).collect();
    assert_eq!(gaps, [(0, 1), (4, 5), (8, 9)]);
    assert_eq!(s.gaps("pi-a", 2).await.unwrap().len(), 2);
    assert!(s.gaps("pi-none", 10).await.unwrap().is_empty());
    for i in 0..3 {
        s.dead_letter("http", None, Some("pi-a"), i, &format!("bad {i}"), false).await.unwrap();
    }
    let dead = s.dead_letters(2).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].error, "bad 2", "newest first");
    // The ledger: 5 stored + 2 queued + 4 dropped + 1 dead-lettered = 12 produced. A last will
    // keeps the counters.
    let status = DeviceStatus {
        online: true,
        queue_depth: Some(2),
        in_flight: Some(1),
        dropped_batches: Some(4),
        produced_batches: Some(12),
        quarantined: Some(0),
        lost_batches: Some(0),
        dead_lettered: Some(1),
        drain_rate: Some(2.5),
        eta_s: Some(1),
        ..Default::default()
    };
    s.device_status("pi-a", &status, false).await.unwrap();
    s.device_status("pi-a", &DeviceStatus { online: false, ..Default::default() }, false).await.unwrap();
    let a = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-a").unwrap();
    assert!(!a.online);
    let l = a.ledger.unwrap();
    assert_eq!((l.produced, l.stored, l.queued, l.in_flight, l.dropped, l.dead_lettered), (12, 5, 2, 1, 4, 1));
    assert!(l.balanced && l.difference == 0, "{l:?}");
    let b = a.backlog.unwrap();
    assert_eq!((b.batches, b.eta_s, b.drain_rate), (2, Some(1), Some(2.5)));
    let store_ref = &s;
    let ledger = |st: DeviceStatus| async move {
        let s = store_ref;
        s.device_status("pi-a", &st, false).await.unwrap();
        let l = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-a").unwrap().ledger.unwrap();
        (l.balanced, l.difference, l.stored)
    };
    // One batch the cloud never got: off by one, and says so.
    assert_eq!(ledger(DeviceStatus { produced_batches: Some(13), ..status.clone() }).await, (false, 1, 5));
    // Queued batches may be stored already (in flight, an ack lost in a crash, a replay): up to
    // `queued` counted on both sides is balanced; more is not.
    assert_eq!(ledger(DeviceStatus { produced_batches: Some(10), ..status.clone() }).await, (true, -2, 5));
    assert_eq!(ledger(DeviceStatus { produced_batches: Some(9), ..status.clone() }).await, (false, -3, 5));
    // Batches stored after the status was recorded are not in its ledger while the device runs
    // (a live device compares like with like), and are after a clean stop.
    store(&s, &batch("pi-a", 11, &[BASE])).await;
    let live = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-a").unwrap().ledger.unwrap();
    assert_eq!(live.stored, 5);
    let stopped = DeviceStatus { online: false, produced_batches: Some(12), queue_depth: Some(0), ..status.clone() };
    s.device_status("pi-a", &stopped, false).await.unwrap();
    store(&s, &batch("pi-a", 12, &[BASE])).await; // acked by the broker before the stop
    let l = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-a").unwrap().ledger.unwrap();
    assert_eq!(
        (l.stored, l.balanced, l.difference),
        (7, true, 0),
        "12 = 7 stored + 4 dropped + 1 dead-lettered: {l:?}"
    );
    // A retained status delivered again at a subscribe does not replace a fresher one.
    let old = DeviceStatus { produced_batches: Some(1), ..status.clone() };
    s.device_status("pi-a", &old, true).await.unwrap();
    let a = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-a").unwrap();
    assert_eq!(a.ledger.unwrap().produced, 12);
    s.device_status("pi-new", &old, true).await.unwrap();
    let n = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-new").unwrap();
    assert_eq!(n.ledger.unwrap().produced, 1, "recorded for a device without one");
    // Absurd counters do not break the listing.
    let absurd = DeviceStatus { produced_batches: Some(u64::MAX), queue_depth: Some(u64::MAX), ..status };
    s.device_status("pi-a", &absurd, false).await.unwrap();
    let l = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-a").unwrap().ledger.unwrap();
    assert_eq!((l.produced, l.queued), (i64::MAX, i64::MAX), "capped, and the sums do not overflow: {l:?}");
}

/// Issue #20: a heartbeat makes a device online and seen, without a batch, until it is older than
/// the timeout; a batch with a UUID id and a telemetry detection is stored once and read back.
async fn seed_senders_heartbeats_uuids_and_telemetry(url: String) {
    use backhaul_cloud::store::HEARTBEAT_TIMEOUT;
    let s = Store::connect(&url).await.unwrap();
    let now = Timestamp::now().unix_micros();
    s.heartbeat("robot-1", now).await.unwrap();
    s.heartbeat("robot-1", now - 1_000).await.unwrap();
    let d = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "robot-1").unwrap();
    assert!(d.online);
    assert_eq!((d.batches, d.detections), (0, 0));
    assert_eq!(
        d.last_seen,
        Timestamp::from_unix_micros(now).unwrap().to_string(),
        "an older heartbeat does not move it back"
    );
    let stale = now - HEARTBEAT_TIMEOUT.as_micros() as i64 - 1_000_000;
    s.heartbeat("robot-2", stale).await.unwrap();
    let d = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "robot-2").unwrap();
    assert!(!d.online, "silent for longer than {HEARTBEAT_TIMEOUT:?}: offline");
    assert_eq!(d.liveness, "heartbeat");
    // A Pi that runs backhaul-edge says itself whether it is online: a heartbeat in its name (a
    // fleet client on the same host, or anyone on the topic) does not bring a stopped edge back.
    s.device_status("pi-edge", &DeviceStatus { online: true, queue_depth: Some(0), ..Default::default() }, false)
        .await
        .unwrap();
    s.device_status("pi-edge", &DeviceStatus { online: false, ..Default::default() }, false).await.unwrap();
    s.heartbeat("pi-edge", now).await.unwrap();
    let d = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-edge").unwrap();
    assert_eq!((d.online, d.liveness.as_str()), (false, "status"));
    assert!(s.runs_edge("pi-edge").await.unwrap());
    assert!(!s.runs_edge("robot-1").await.unwrap());

    // A Pi migrating under its seed agent's device id: the cloud holds the agent's batches, which
    // its backhaul-edge never produced; the ledger leaves them out.
    for seq in 0..2 {
        let b = backhaul_tests::wire_batch("pi-migrating", 0, 1 + seq);
        let raw = b.to_json();
        let hash = format!("seed-{}", b.batch_id);
        assert_eq!(s.store_batch(&b, &raw, &hash, "mqtt-seed", Lookup::First).await.unwrap(), Outcome::Stored);
    }
    for seq in 1..=3 {
        assert_eq!(store(&s, &backhaul_tests::wire_batch("pi-migrating", seq, 2)).await, Outcome::Stored);
    }
    let status = DeviceStatus { online: true, produced_batches: Some(3), queue_depth: Some(0), ..Default::default() };
    s.device_status("pi-migrating", &status, false).await.unwrap();
    let d = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-migrating").unwrap();
    assert_eq!(d.batches, 5);
    let l = d.ledger.unwrap();
    assert_eq!((l.stored, l.difference, l.balanced), (3, 0, true), "{l:?}");
    let stopped = DeviceStatus { online: false, ..status };
    s.device_status("pi-migrating", &stopped, false).await.unwrap();
    let l = s.devices().await.unwrap().into_iter().find(|d| d.device_id == "pi-migrating").unwrap().ledger.unwrap();
    assert_eq!((l.stored, l.balanced), (3, true), "after a clean stop too: {l:?}");

    let at: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
    let batch = Batch {
        schema: 1,
        batch_id: "6F9619FF-8B86-D011-B42D-00C04FC964FF".parse().unwrap(),
        device_id: "robot-1".into(),
        seq: 0,
        name: None,
        location: None,
        timestamp: at,
        detections: vec![Detection::Telemetry(backhaul_shared::Telemetry {
            entity_id: 7,
            fields: BTreeMap::from([("pose.x".to_owned(), -3.0), ("velocity.vx".to_owned(), 2.5)]),
            timestamp: at,
        })],
        clock: Default::default(),
    };
    assert_eq!(batch.batch_id.to_string(), "6f9619ff-8b86-d011-b42d-00c04fc964ff");
    assert_eq!(store_same(&s, &batch).await, Outcome::Stored);
    assert_eq!(store_same(&s, &batch).await, Outcome::Duplicate);
    let q =
        DetectionQuery { device_id: Some("robot-1".into()), since_us: None, until_us: None, limit: 10, after: None };
    let rows = s.detections(&q).await.unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(
        (r.kind.as_str(), r.batch_id.as_str(), r.entity_id, r.rssi),
        ("telemetry", "6f9619ff-8b86-d011-b42d-00c04fc964ff", Some(7), None)
    );
    assert_eq!(r.fields.as_ref().unwrap()["velocity.vx"], 2.5);
}
