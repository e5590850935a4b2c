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

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Reads from `stream` until the cloud closes it (end of file or a reset) or `within` passes;
/// returns what it sent, or `None` if the connection was still open.
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    use std::io::Read;
    let deadline = std::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return None,
            Err(_) => return Some(String::from_utf8_lossy(&got).into_owned()),
        }
    }
}

fn limited_cloud() -> (Cloud, String) {
    let cloud = Cloud::start(CloudOptions {
        extra: "max_connections = 16\nheader_read_timeout = \"2s\"\nbody_read_timeout = \"2s\"".into(),
        ..Default::default()
    })
    .unwrap();
    wait_until("the cloud to answer /health", T, || {
        backhaul_tests::cloud::http().get(cloud.url("/health")).call().is_ok_and(|r| r.status() == 200)
    })
    .unwrap();
    let addr = cloud.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    (cloud, addr)
}

/// Kind 5, the cloud's HTTP side: idle clients hold a connection only for `header_read_timeout`,
/// and never more than `max_connections` at once; the rest wait in the kernel's accept queue, and
/// a real request behind them is answered once they are gone.
#[test]
fn idle_http_connections_are_capped_and_closed_after_the_header_timeout() {
    let (cloud, addr) = limited_cloud();
    let pid = cloud.process.pid().unwrap();
    let base = open_fds(pid);
    let mut idle: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    // (`base` may still count the health check's connection, which the cloud closes shortly.)
    wait_until("the first 16 to be accepted", T, || open_fds(pid) >= base + 15).unwrap();
    let mut most = 0;
    let watch_until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < watch_until {
        most = most.max(open_fds(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(most <= base + 16 + 2, "{most} descriptors open, {base} before 64 idle clients and a cap of 16");
    // Behind 64 idle clients (4 rounds of 16, 2 s each), a request is answered.
    let started = std::time::Instant::now();
    let r = backhaul_tests::cloud::http().get(cloud.url("/health")).call().unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(25), "answered after {:?}", started.elapsed());
    // Every idle client was cut off by the cloud.
    for (i, stream) in idle.iter_mut().enumerate() {
        assert!(read_until_closed(stream, Duration::from_secs(10)).is_some(), "idle client {i} still open");
    }
    // A keep-alive connection that went idle after a request is closed too.
    use std::io::Write;
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(10)).expect("closed once idle");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// Kind 5, slow clients: headers trickled a line at a time are cut off at `header_read_timeout`;
/// a body trickled after complete headers is answered 408 at `body_read_timeout`.
#[test]
fn trickled_headers_and_bodies_are_cut_off_at_their_timeouts() {
    use std::io::Write;
    let (_cloud, addr) = limited_cloud();
    let trickle = |stream: &mut TcpStream, piece: &[u8], until_closed: Duration| -> Option<String> {
        let deadline = std::time::Instant::now() + until_closed;
        while std::time::Instant::now() < deadline {
            if stream.write_all(piece).is_err() {
                return read_until_closed(stream, Duration::from_secs(1)).or(Some(String::new()));
            }
            if let Some(answer) = read_until_closed(stream, Duration::from_millis(300)) {
                return Some(answer);
            }
        }
        None
    };
    // Headers, one short line every 300 ms, forever.
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
    let answer = trickle(&mut stream, b"X-Slow: 1\r\n", Duration::from_secs(15));
    assert!(answer.is_some(), "trickled headers held the connection for 15 s");
    let took = started.elapsed();
    assert!((Duration::from_millis(1500)..Duration::from_secs(8)).contains(&took), "cut off after {took:?}");

    // A bulk post with a valid key whose body trickles 10 bytes every 300 ms.
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(&addr).unwrap();
    let head = format!(
        "POST /api/v1/detections/bulk HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Idempotency-Key: 01JD3Q8Z9X6K1V2B3N4M5P6Q7R\r\nX-API-Key: {}\r\nContent-Length: 100000\r\n\r\n",
        backhaul_tests::cloud::DEVICE_KEY
    );
    stream.write_all(head.as_bytes()).unwrap();
    let answer = trickle(&mut stream, &[b' '; 10], Duration::from_secs(15)).expect("answered within 15 s");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("body_read_timeout"), "{answer:?}");
    let took = started.elapsed();
    assert!((Duration::from_millis(1500)..Duration::from_secs(8)).contains(&took), "answered after {took:?}");
}
