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

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends a bulk post's head declaring `length` bytes and a first kilobyte of body, and reads the
/// status line the cloud answers within 5 s (without the rest of the body).
fn declare_body(addr: &str, key: Option<&str>, length: u64) -> (TcpStream, String) {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let key = key.map(|k| format!("X-API-Key: {k}\r\n")).unwrap_or_default();
    let head = format!(
        "POST /api/v1/detections/bulk HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Idempotency-Key: 01JD3Q8Z9X6K1V2B3N4M5P6Q7R\r\n{key}Content-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&[b' '; 1024]).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(stream.try_clone().unwrap()).read_line(&mut line);
    (stream, line)
}

#[test]
fn unauthenticated_requests_declaring_big_bodies_are_answered_before_any_body_is_read() {
    // Issue #14: 400 unauthenticated requests declaring a 1,040,000-byte body took the cloud from
    // 10 to 409 MiB: it read every body before it looked at the key.
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let pid = cloud.process.pid().unwrap();
    let addr = cloud.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    let before = rss_kib(pid);
    let mut open = Vec::new();
    for _ in 0..400 {
        let (stream, status) = declare_body(&addr, None, 1_040_000);
        assert!(status.starts_with("HTTP/1.1 401"), "answered at once, without the body: {status:?}");
        open.push(stream);
    }
    let grown_mib = rss_kib(pid).saturating_sub(before) / 1024;
    assert!(grown_mib < 64, "the cloud grew by {grown_mib} MiB");
    // A declared length over the limit is a 413 at once, even with a valid key.
    let (_, status) = declare_body(&addr, Some(backhaul_tests::cloud::DEVICE_KEY), 1 << 40);
    assert!(status.starts_with("HTTP/1.1 413"), "{status:?}");
    drop(open);
    wait_until("the cloud to answer /health", T, || {
        backhaul_tests::cloud::http().get(cloud.url("/health")).call().is_ok_and(|r| r.status() == 200)
    })
    .unwrap();
}
