//! The cloud on PostgreSQL (issue #15, in part), against a private PostgreSQL per test (initdb into
//! a temp dir, a free loopback port; SIGKILLed by the tests): the HTTP contract, two replicas on one
//! database storing each batch exactly once (the loser of a race answers `duplicate`, never 503),
//! and PostgreSQL SIGKILLed and restarted under ingest.

use std::time::Duration;

use backhaul_tests::chaos::{cloud_ledger, compare, edge_ledger};
use backhaul_tests::cloud::{get_json, http, post_batch, Cloud, CloudOptions, DEVICE, DEVICE_KEY};
use backhaul_tests::edge::{Edge, EdgeOptions};
use backhaul_tests::postgres::Postgres;
use backhaul_tests::{wait_for, wire_batch, Mosquitto};

const T: Duration = Duration::from_secs(60);

fn cloud_on(pg: &Postgres) -> Cloud {
    // Room for all 160 posts of the race at once (beyond max_concurrent_ingest they would be 429s).
    let cloud = Cloud::start(CloudOptions {
        database_url: Some(pg.url()),
        extra: "max_concurrent_ingest = 256".into(),
        ..Default::default()
    })
    .unwrap();
    wait_for("the cloud to answer /health", T, || (get_json(&http(), &cloud, "/health").0 == 200).then_some(()))
        .unwrap();
    cloud
}

/// The cloud's warnings and errors, for a failure message.
fn errors(cloud: &mut Cloud) -> String {
    cloud
        .process
        .output()
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(20)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

/// A bulk post to `url` (threads cannot share a `Cloud`).
fn post_to(url: &str, batch: &backhaul_shared::Batch) -> u16 {
    let r = http()
        .post(url)
        .header("X-API-Key", DEVICE_KEY)
        .header("Idempotency-Key", &batch.batch_id.to_string())
        .send(&batch.to_json()[..]);
    r.map(|r| r.status().as_u16()).unwrap_or(0)
}

fn post(cloud: &Cloud, batch: &backhaul_shared::Batch) -> (u16, String) {
    let (status, body, _) =
        post_batch(&http(), cloud, Some(DEVICE_KEY), Some(&batch.batch_id.to_string()), &batch.to_json());
    (status, body)
}

#[test]
fn the_http_contract_holds_on_postgresql() {
    let pg = Postgres::start().unwrap();
    let cloud = cloud_on(&pg);
    let first = wire_batch(DEVICE, 0, 3);
    assert_eq!(post(&cloud, &first).0, 201);
    assert_eq!(post(&cloud, &first).0, 200, "a resend is a duplicate");
    let mut other = wire_batch(DEVICE, 1, 2);
    other.batch_id = first.batch_id;
    assert_eq!(post(&cloud, &other).0, 422, "same batch_id, other payload: a conflict");
    for seq in [1, 3] {
        assert_eq!(post(&cloud, &wire_batch(DEVICE, seq, 2)).0, 201);
    }
    let agent = http();
    let stats = get_json(&agent, &cloud, "/api/v1/stats").1;
    assert_eq!((stats["batches"].as_i64(), stats["detections"].as_i64()), (Some(3), Some(7)), "{stats}");
    let device = cloud.device(DEVICE);
    assert_eq!(
        (device["batches"].as_i64(), device["last_seq"].as_i64(), device["gaps"].as_i64()),
        (Some(3), Some(3), Some(1)),
        "{device}"
    );
    let page = get_json(&agent, &cloud, &format!("/api/v1/detections?device_id={DEVICE}&limit=5")).1;
    assert_eq!(page["detections"].as_array().unwrap().len(), 5, "{page}");
    let cursor = page["next_cursor"].as_str().unwrap();
    let rest = get_json(&agent, &cloud, &format!("/api/v1/detections?device_id={DEVICE}&limit=5&cursor={cursor}")).1;
    assert_eq!(rest["detections"].as_array().unwrap().len(), 2, "{rest}");
}

/// The field report: the same 40 batches posted to two replicas at once got 503 for 56 of 160
/// requests. Now each batch is stored once, its every answer a 201 (the one that stored it) or a
/// 200 duplicate.
#[test]
fn two_replicas_on_one_postgresql_store_each_batch_once_and_never_answer_503() {
    let pg = Postgres::start().unwrap();
    let (a, b) = (cloud_on(&pg), cloud_on(&pg));
    let (url_a, url_b) = (a.url("/api/v1/detections/bulk"), b.url("/api/v1/detections/bulk"));
    let batches: Vec<_> = (0..40).map(|seq| wire_batch(DEVICE, seq, 5)).collect();
    let answers: Vec<(u16, u16, u16, u16)> = std::thread::scope(|s| {
        let handles: Vec<_> = batches
            .iter()
            .map(|batch| {
                let (a, b) = (url_a.as_str(), url_b.as_str());
                s.spawn(move || {
                    let (x, y, z, w) = std::thread::scope(|s| {
                        let x = s.spawn(|| post_to(a, batch));
                        let y = s.spawn(|| post_to(b, batch));
                        let z = s.spawn(|| post_to(a, batch));
                        let w = s.spawn(|| post_to(b, batch));
                        (x.join().unwrap(), y.join().unwrap(), z.join().unwrap(), w.join().unwrap())
                    });
                    (x, y, z, w)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (x, y, z, w)) in answers.iter().enumerate() {
        let all = [*x, *y, *z, *w];
        assert!(all.iter().all(|s| *s == 201 || *s == 200), "batch {i}: {all:?}");
        assert_eq!(all.iter().filter(|s| **s == 201).count(), 1, "batch {i} stored once: {all:?}");
    }
    let stats = get_json(&http(), &a, "/api/v1/stats").1;
    assert_eq!((stats["batches"].as_i64(), stats["detections"].as_i64()), (Some(40), Some(200)), "{stats}");
}

/// PostgreSQL SIGKILLed under ingest: posts answer 503 with Retry-After while it is down (nothing
/// acked that is not committed), and ingest resumes once it is back, every batch stored once.
#[test]
fn postgresql_killed_and_restarted_is_503_then_resumes_with_nothing_lost() {
    let mut pg = Postgres::start().unwrap();
    let cloud = cloud_on(&pg);
    let batches: Vec<_> = (0..20).map(|seq| wire_batch(DEVICE, seq, 4)).collect();
    for batch in &batches[..10] {
        assert_eq!(post(&cloud, batch).0, 201);
    }
    pg.kill9().unwrap();
    let (status, body) = post(&cloud, &batches[10]);
    assert_eq!(status, 503, "{body}");
    assert_eq!(get_json(&http(), &cloud, "/health").0, 503);
    pg.restart().unwrap();
    // The edge's way: resend until an answer that is not a 503.
    for batch in &batches[10..] {
        let status = wait_for("a stored answer", T, || {
            let (s, _) = post(&cloud, batch);
            (s != 503).then_some(s)
        })
        .unwrap();
        assert!(status == 201 || status == 200, "{status}");
    }
    for batch in &batches[..10] {
        assert_eq!(post(&cloud, batch).0, 200, "committed before the kill: still there");
    }
    let stats = get_json(&http(), &cloud, "/api/v1/stats").1;
    assert_eq!((stats["batches"].as_i64(), stats["detections"].as_i64()), (Some(20), Some(80)), "{stats}");
}

/// The field report: with one of two replicas SIGKILLed during an edge's drain over the shared
/// subscription, the other had stored 20,800 of 32,000 detections 60 s later (Mosquitto keeps
/// routing the dead member's share to its persistent session; without `session_expiry` this test
/// times out with 504 of 600 batches acked after 120 s). With `mqtt.session_expiry = "5s"` the dead
/// session expires, the broker routes everything to the live replica, and what the dead one held
/// is resent by the edge (end-to-end acks): batch by batch, 0 lost, 0 stored twice.
#[test]
fn an_mqtt_replica_sigkilled_mid_drain_is_taken_over_and_nothing_is_lost_or_stored_twice() {
    let pg = Postgres::start().unwrap();
    let broker = Mosquitto::start().unwrap();
    let replica = || {
        let mut cloud = Cloud::start(CloudOptions {
            database_url: Some(pg.url()),
            mqtt_url: Some(broker.url()),
            mqtt_extra: "session_expiry = \"5s\"".into(),
            ..Default::default()
        })
        .unwrap();
        cloud.process.wait_for_any_line(T, |l| l.contains("subscribed to batches and status")).unwrap();
        cloud
    };
    let (mut a, mut b) = (replica(), replica());
    let mut edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 30_000,
        rate: 3000.0,
        max_detections: 50,
        ..Default::default()
    })
    .unwrap();
    let stored = |c: &Cloud| get_json(&http(), c, "/api/v1/stats").1["batches"].as_u64().unwrap_or(0);
    wait_for("100 batches stored", T, || (stored(&b) >= 100).then_some(())).unwrap();
    a.process.kill9().unwrap();
    let killed = std::time::Instant::now();
    edge.wait_drained(30_000, Duration::from_secs(120)).unwrap();
    let took = killed.elapsed();
    b.wait_detections(DEVICE, 30_000, T).unwrap();
    edge.process.kill9().unwrap();
    let (produced, dropped) = edge_ledger(&edge.data_dir()).unwrap();
    let (tally, problems) = compare(&produced, &cloud_ledger(&b, DEVICE));
    assert!(
        problems.is_empty() && dropped == 0,
        "{tally:?}: {:?}\n{}",
        &problems[..problems.len().min(3)],
        errors(&mut b)
    );
    assert!(tally.produced >= 600, "{tally:?}");
    // The bound: the session expiry (5 s), then the edge's ack timeout (5 s in the tests) and its
    // resend backoff for what the dead replica held.
    assert!(took < Duration::from_secs(60), "the live replica took over after {took:?}");
    eprintln!("drained {took:?} after the SIGKILL of a replica");
}

/// PostgreSQL SIGKILLed while an edge drains over MQTT: the cloud holds its PUBACKs and acks
/// nothing while the database is gone (the worker retries the message in hand), and resumes once it
/// is back: batch by batch, 0 lost, 0 stored twice.
#[test]
fn postgresql_killed_under_mqtt_ingest_holds_the_acks_then_resumes_with_nothing_lost() {
    let mut pg = Postgres::start().unwrap();
    let broker = Mosquitto::start().unwrap();
    let mut cloud =
        Cloud::start(CloudOptions { database_url: Some(pg.url()), mqtt_url: Some(broker.url()), ..Default::default() })
            .unwrap();
    cloud.process.wait_for_any_line(T, |l| l.contains("subscribed to batches and status")).unwrap();
    let mut edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 20_000,
        rate: 2000.0,
        max_detections: 50,
        ..Default::default()
    })
    .unwrap();
    let stored = |c: &Cloud| get_json(&http(), c, "/api/v1/stats").1["batches"].as_u64().unwrap_or(0);
    wait_for("50 batches stored", T, || (stored(&cloud) >= 50).then_some(())).unwrap();
    pg.kill9().unwrap();
    // While it is gone, nothing more is acked to the edge. (Acks committed before the kill may
    // still arrive while the edge produces its next 20 batches; after that, none.)
    let num = backhaul_tests::edge::num;
    let acked = |e: &Edge| e.status().map(|s| num(&s, "/sent/acked_batches")).unwrap_or(0);
    let produced = |e: &Edge| e.status().map(|s| num(&s, "/produced/batches")).unwrap_or(0);
    let grows = |e: &Edge, by: u64| {
        let from = produced(e);
        wait_for("the edge to keep producing", T, || (produced(e) > from + by).then_some(())).unwrap();
    };
    grows(&edge, 20);
    let before = acked(&edge);
    grows(&edge, 40);
    assert_eq!(acked(&edge), before, "acked while the database was down");
    pg.restart().unwrap();
    edge.wait_drained(20_000, Duration::from_secs(120)).unwrap();
    cloud.wait_detections(DEVICE, 20_000, T).unwrap();
    edge.process.kill9().unwrap();
    let (produced, dropped) = edge_ledger(&edge.data_dir()).unwrap();
    let (tally, problems) = compare(&produced, &cloud_ledger(&cloud, DEVICE));
    assert!(
        problems.is_empty() && dropped == 0,
        "{tally:?}: {:?}\n{}",
        &problems[..problems.len().min(3)],
        errors(&mut cloud)
    );
}
