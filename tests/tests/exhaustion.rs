//! Exhaustion (issue #14, kind 5), against the real `backhaul-edge`: idle clients of its loopback
//! status port can never take the file descriptors its queue needs.

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use backhaul_tests::cloud::{Cloud, CloudOptions, DEVICE};
use backhaul_tests::edge::{num, Edge, EdgeOptions};
use backhaul_tests::{wait_until, Mosquitto};

const T: Duration = Duration::from_secs(90);

#[test]
fn idle_connections_to_the_status_port_never_starve_the_queue_of_file_descriptors() {
    let broker = Mosquitto::start().unwrap();
    let mut cloud = Cloud::start(CloudOptions { mqtt_url: Some(broker.url()), ..Default::default() }).unwrap();
    cloud.process.wait_for_any_line(T, |l| l.contains("subscribed to batches and status")).unwrap();
    // 4,000 detections over about 10 s, in batches of 10: the queue syncs all along.
    let mut edge = Edge::start(EdgeOptions {
        mqtt_url: broker.url(),
        count: 4000,
        rate: 400.0,
        max_detections: 10,
        ..Default::default()
    })
    .unwrap();
    // The field report's limit, scaled down: 128 open files (systemd's default is 1,024); the
    // edge uses about 40 of them itself.
    let pid = edge.process.pid().unwrap().to_string();
    let status = Command::new("prlimit").args(["--pid", &pid, "--nofile=128:128"]).status().unwrap();
    assert!(status.success(), "prlimit");
    // More idle connections than the edge may have files: as many as the kernel completes (the
    // capped listener accepts 32, the rest wait in its accept queue).
    let addr = format!("127.0.0.1:{}", edge.status_port).parse().unwrap();
    let idle: Vec<TcpStream> =
        (0..400).map_while(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()).collect();
    assert!(idle.len() > 128, "only {} connections", idle.len());
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    assert!(fds < 128, "the edge holds {fds} files");
    // The edge goes on enqueueing and delivering while they are open.
    cloud.wait_detections(DEVICE, 4000, T).unwrap();
    assert!(edge.process.wait_exit(Duration::from_millis(10)).is_err(), "the edge is still running");
    drop(idle);
    // And the status endpoint answers again once they are gone.
    wait_until("the status endpoint to answer", T, || edge.status().is_ok()).unwrap();
    let status = edge.wait_drained(4000, T).unwrap();
    assert_eq!(num(&status, "/queue/dropped"), 0, "{status}");
    let out = edge.process.output().join("\n");
    assert!(!out.contains("Too many open files"), "{out}");
}
