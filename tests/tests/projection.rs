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
