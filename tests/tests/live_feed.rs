//! `GET /api/v1/live` (issue #19) against the real cloud, read as a client reads it (raw HTTP over
//! TCP): a fleet key's stream carries every device's batches, a device key's only its own; the
//! `max_live_clients`-th stream is a JSON 503 with Retry-After; a stream that closes is no longer
//! counted; and a stop (SIGTERM) with a stream open ends it and exits at once, not at the HTTP
//! drain's 10 s deadline.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use backhaul_tests::cloud::{http, post_batch, Cloud, CloudOptions, DEVICE, DEVICE_KEY, FLEET_KEY};
use backhaul_tests::{sigterm, wait_for, wire_batch};

const T: Duration = Duration::from_secs(30);

struct Stream {
    tcp: TcpStream,
    seen: String,
}

impl Stream {
    fn open(cloud: &Cloud, key: &str) -> Self {
        let mut tcp = TcpStream::connect(("127.0.0.1", cloud.port)).unwrap();
        write!(tcp, "GET /api/v1/live HTTP/1.1\r\nHost: test\r\nX-API-Key: {key}\r\n\r\n").unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut s = Self { tcp, seen: String::new() };
        s.read_until("the stream's first bytes", |seen| seen.contains(": connected"));
        assert!(s.seen.starts_with("HTTP/1.1 200"), "{}", s.seen);
        assert!(s.seen.to_ascii_lowercase().contains("content-type: text/event-stream"), "{}", s.seen);
        s
    }

    /// Reads until `done(everything read)` or the end of the stream (true if it ended).
    fn read_until(&mut self, what: &str, done: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + T;
        let mut buf = [0u8; 65536];
        while !done(&self.seen) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; read:\n{}", self.seen);
            match self.tcp.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }

    fn batches_of(&self, device: &str) -> usize {
        self.seen.matches(&format!("\"device_id\":\"{device}\"")).count()
    }
}

fn live_clients(cloud: &Cloud) -> u64 {
    let mut r = http().get(cloud.url("/metrics")).header("X-API-Key", FLEET_KEY).call().unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("backhaul_cloud_live_clients ").and_then(|v| v.trim().parse().ok()))
        .expect("backhaul_cloud_live_clients in /metrics")
}

fn post(cloud: &Cloud, key: &str, device: &str, seq: u64) {
    let b = wire_batch(device, seq, 3);
    let (code, body, _) = post_batch(&http(), cloud, Some(key), Some(&b.batch_id.to_string()), &b.to_json());
    assert_eq!(code, 201, "{body}");
}

#[test]
fn a_device_keys_stream_carries_its_own_batches_only_and_the_limit_and_the_stop_hold() {
    let mut cloud = Cloud::start(CloudOptions { extra: "max_live_clients = 2".into(), ..Default::default() }).unwrap();
    let mut fleet = Stream::open(&cloud, FLEET_KEY);
    let mut own = Stream::open(&cloud, DEVICE_KEY);
    assert_eq!(live_clients(&cloud), 2);

    // The third: refused, in JSON, with when to come back.
    let mut r = http().get(cloud.url("/api/v1/live")).header("X-API-Key", FLEET_KEY).call().unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers().get("retry-after").unwrap(), "30");
    let body = r.body_mut().read_to_string().unwrap();
    assert!(body.contains("max_live_clients"), "{body}");

    // Another device's batches first, then the device's own.
    for seq in 1..=3 {
        post(&cloud, FLEET_KEY, "rpi-other", seq);
    }
    for seq in 1..=3 {
        post(&cloud, DEVICE_KEY, DEVICE, seq);
    }
    fleet.read_until("6 batches on the fleet stream", |s| s.matches("event: batch\n").count() >= 6);
    assert_eq!((fleet.batches_of(DEVICE), fleet.batches_of("rpi-other")), (3, 3));
    own.read_until("3 batches on the device's stream", |s| s.matches("event: batch\n").count() >= 3);
    assert_eq!((own.batches_of(DEVICE), own.batches_of("rpi-other")), (3, 0), "{}", own.seen);
    assert!(own.seen.contains("\"sample\":[{"), "a new batch carries its first detections: {}", own.seen);

    // Closed streams are no longer counted: a new one is let in.
    drop(fleet);
    drop(own);
    wait_for("the closed streams uncounted", T, || (live_clients(&cloud) == 0).then_some(())).unwrap();
    let mut last = Stream::open(&cloud, FLEET_KEY);

    // A stop ends the open stream and the process at once.
    let started = Instant::now();
    sigterm(cloud.process.child().unwrap()).unwrap();
    assert!(last.read_until("the stream to end at the stop", |_| false), "the stream ended");
    let code = cloud.process.wait_exit(T).unwrap();
    assert_eq!(code, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the stop took {:?} (the HTTP drain waits 10 s)",
        started.elapsed()
    );
}
