//! The ack path writes the batch; detections are read from the stored batches (issue #15):
//! readable as soon as a batch is acked, and `backhaul-cloud reprocess` re-derives the batches' time
//! index without duplicates, also while `serve` runs on the same database. Real processes on a
//! real SQLite file. (The same on PostgreSQL: `store_conformance.rs`.)

use backhaul_tests::chaos::cloud_ledger;
use backhaul_tests::cloud::{get_json, http, post_batch, Cloud, CloudOptions, DEVICE, DEVICE_KEY};
use backhaul_tests::{run, wire_batch};

#[test]
fn reprocess_reindexes_without_duplicates_while_serving_and_stopped() {
    let mut cloud = Cloud::start(CloudOptions::default()).unwrap();
    let agent = http();
    for seq in 0..10 {
        let b = wire_batch(DEVICE, seq, 7);
        let (status, body, _) =
            post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(&b.batch_id.to_string()), &b.to_json());
        assert_eq!(status, 201, "{body}");
        // Acked means readable.
        let page = get_json(&agent, &cloud, &format!("/api/v1/detections?device_id={DEVICE}&limit=1000")).1;
        assert_eq!(page["detections"].as_array().unwrap().len() as u64, (seq + 1) * 7, "after batch {seq}");
    }
    let before = cloud_ledger(&cloud, DEVICE);
    assert_eq!(before.values().sum::<u64>(), 70);
    let config = cloud.config_path().to_str().unwrap().to_owned();

    // While serving.
    let (code, out, err) = run("backhaul-cloud", &["reprocess", "--config", &config], &[]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("reprocessed 10 batches"), "{out}");
    assert_eq!(cloud_ledger(&cloud, DEVICE), before, "the same rows, none twice");

    // Filters.
    let (code, out, _) = run("backhaul-cloud", &["reprocess", "--config", &config, "--device", "nobody"], &[]).unwrap();
    assert_eq!((code, out.contains("reprocessed 0 batches")), (0, true), "{out}");
    let (code, out, _) =
        run("backhaul-cloud", &["reprocess", "--config", &config, "--since", "2999-01-01T00:00:00Z"], &[]).unwrap();
    assert_eq!((code, out.contains("reprocessed 0 batches")), (0, true), "{out}");
    let (code, _, err) =
        run("backhaul-cloud", &["reprocess", "--config", &config, "--since", "yesterday"], &[]).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("--since") && err.contains("RFC 3339"), "{err}");

    // Stopped, then served again.
    cloud.process.kill9().unwrap();
    let (code, out, err) = run("backhaul-cloud", &["reprocess", "--config", &config], &[]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    cloud.kill9_and_restart().unwrap();
    backhaul_tests::wait_until("the cloud to answer", std::time::Duration::from_secs(30), || {
        get_json(&agent, &cloud, "/health").0 == 200
    })
    .unwrap();
    assert_eq!(cloud_ledger(&cloud, DEVICE), before);
    let stats = get_json(&agent, &cloud, "/api/v1/stats").1;
    assert_eq!((stats["batches"].as_i64(), stats["detections"].as_i64()), (Some(10), Some(70)), "{stats}");
}

/// Found by trying it as an operator (issue #15): while `reprocess` and `serve` both wrote to one
/// SQLite file, 40% of posts were answered 503 at once and `reprocess` failed with "database is
/// locked" (a deferred transaction that reads first cannot take the write lock once another
/// connection wrote). Now each write transaction takes the lock first and waits for it.
#[test]
fn reprocess_while_batches_arrive_answers_no_503_and_does_not_fail() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let cloud = Cloud::start(CloudOptions { extra: "device_rate_per_sec = 0".into(), ..Default::default() }).unwrap();
    backhaul_tests::wait_until("the cloud to answer", std::time::Duration::from_secs(30), || {
        get_json(&http(), &cloud, "/health").0 == 200
    })
    .unwrap();
    let agent = http();
    for seq in 0..300 {
        let b = wire_batch(DEVICE, seq, 20);
        assert_eq!(post_batch(&agent, &cloud, Some(DEVICE_KEY), Some(&b.batch_id.to_string()), &b.to_json()).0, 201);
    }
    let config = cloud.config_path().to_str().unwrap().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let url = cloud.url("/api/v1/detections/bulk");
    let posters: Vec<_> = (0..2u64)
        .map(|t| {
            let (stop, url, answered) = (stop.clone(), url.clone(), answered.clone());
            std::thread::spawn(move || {
                let agent = http();
                let mut answers = Vec::new();
                let mut seq = 1_000 + t * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    let b = wire_batch(DEVICE, seq, 20);
                    let answer = agent
                        .post(&url)
                        .header("X-API-Key", DEVICE_KEY)
                        .header("Idempotency-Key", b.batch_id.to_string())
                        .send(&b.to_json()[..]);
                    answers.push(match answer {
                        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()),
                        Err(e) => (0, e.to_string()),
                    });
                    answered.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                }
                answers
            })
        })
        .collect();
    backhaul_tests::wait_until("the posters to start", std::time::Duration::from_secs(30), || {
        answered.load(Ordering::Relaxed) > 0
    })
    .unwrap();
    let before = answered.load(Ordering::Relaxed);
    for _ in 0..3 {
        let (code, out, err) = run("backhaul-cloud", &["reprocess", "--config", &config], &[]).unwrap();
        assert_eq!(code, 0, "{out}{err}");
    }
    let during = answered.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    assert!(during >= 10, "only {during} posts were answered while reprocess ran: the test proves little");
    let answers: Vec<(u16, String)> = posters.into_iter().flat_map(|p| p.join().unwrap()).collect();
    assert!(!answers.is_empty());
    let refused = answers.iter().filter(|(s, _)| *s != 201).count();
    let examples: Vec<_> = answers.iter().filter(|(s, _)| *s != 201).take(3).collect();
    assert_eq!(refused, 0, "{refused} of {} posts not stored, e.g. {examples:?}", answers.len());
}
