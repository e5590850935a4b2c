//! Issue #13: no thread of the edge dies silently. A stage killed by a panic (a failpoint) stops
//! the whole `backhaul-edge run` process promptly with a non-zero exit and a log line naming the
//! thread, so systemd restarts it; the restarted edge on the same data_dir delivers everything,
//! each detection stored once.

use std::time::{Duration, Instant};

use backhaul_tests::cloud::{Cloud, CloudOptions, DEVICE};
use backhaul_tests::edge::{num, Edge, EdgeOptions};

const T: Duration = Duration::from_secs(90);
/// `backhaul-edge`'s exit code after a panic (`service::PANIC_EXIT_CODE`, EX_SOFTWARE).
const PANIC_EXIT_CODE: i32 = 70;
const COUNT: u64 = 4000;

/// Starts an HTTP edge producing `COUNT` detections over 4 s with `failpoint`, waits for the panic
/// to stop it, checks how, restarts it without the failpoint and checks every detection arrives.
fn panics_then_restart_delivers_everything(failpoint: &str, thread: &str) {
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let started = Instant::now();
    let mut edge = Edge::start(EdgeOptions {
        mode: "http",
        http_url: cloud.url(""),
        count: COUNT,
        rate: 1000.0,
        env: vec![("BACKHAUL_FAILPOINT".into(), format!("{failpoint}:1500"))],
        ..Default::default()
    })
    .unwrap();
    let code = edge.process.wait_exit(Duration::from_secs(30)).unwrap();
    let took = started.elapsed();
    let output = edge.process.output().join("\n");
    assert_eq!(code, Some(PANIC_EXIT_CODE), "a panic must stop the process non-zero:\n{output}");
    assert!(took < Duration::from_secs(10), "the process exited {took:?} after its start, not promptly");
    assert!(
        output.contains(&format!("thread `{thread}` panicked")) && output.contains("FAILPOINT"),
        "the log names the thread:\n{output}"
    );
    let stored = num(&cloud.device(DEVICE), "/detections");
    assert!(stored < COUNT, "the failpoint fired mid-run ({stored} stored already)");

    // What systemd does: start it again, same config and data_dir.
    edge.env_mut().retain(|(k, _)| k != "BACKHAUL_FAILPOINT");
    edge.kill9_and_restart().unwrap();
    let status = edge.wait_drained(COUNT, T).unwrap();
    let device = cloud.wait_detections(DEVICE, COUNT, T).unwrap();
    assert_eq!(num(&device, "/batches"), num(&status, "/produced/batches"), "each batch once: {device}\n{status}");
    assert_eq!(num(&device, "/gaps"), 0, "{device}");
    assert_eq!(num(&status, "/queue/dropped"), 0, "{status}");
}

#[test]
fn a_panic_in_the_forwarder_stops_the_process_and_the_restarted_edge_delivers_everything() {
    panics_then_restart_delivers_everything("panic_forwarder_after", "forwarder");
}

#[test]
fn a_panic_in_the_pipeline_stops_the_process_and_the_restarted_edge_delivers_everything() {
    panics_then_restart_delivers_everything("panic_source_after", "pipeline");
}

/// A panic that the edge catches on purpose is not a dead thread: sled panics on some damaged
/// files, and the queue moves such a database aside and starts a fresh one. The exiting panic hook
/// (found by review) would end the process first, and systemd would restart it into the same panic
/// forever.
#[test]
fn a_sled_panic_at_open_is_caught_and_the_damaged_queue_moved_aside_not_an_exit() {
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let mut edge = Edge::start_with(
        EdgeOptions {
            mode: "http",
            http_url: cloud.url(""),
            count: 500,
            env: vec![("BACKHAUL_FAILPOINT".into(), "panic_at_sled_open".into())],
            ..Default::default()
        },
        // A queue on disk, for the "damaged" one to be moved aside.
        |data_dir| {
            backhaul_edge::queue::Queue::open(data_dir, Default::default())?;
            Ok(())
        },
    )
    .unwrap();
    edge.wait_drained(500, T).unwrap();
    cloud.wait_detections(DEVICE, 500, T).unwrap();
    let out = edge.process.output().join("\n");
    assert!(out.contains("sled panicked while opening the queue"), "{out}");
    assert!(out.contains("moved it aside"), "{out}");
    assert!(!out.contains("backhaul-edge exits"), "{out}");
    let aside = std::fs::read_dir(edge.data_dir()).unwrap().filter_map(Result::ok);
    assert!(aside.into_iter().any(|e| e.file_name().to_string_lossy().starts_with("corrupt-")));
}
