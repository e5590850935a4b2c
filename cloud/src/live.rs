//! What the dashboard shows live (issue #19): every batch this replica takes in, as an event on
//! `GET /api/v1/live` (server-sent events), and the ingest rate of the last minutes, per second.
//!
//! Back-pressure: an event is encoded once, as its server-sent-events frame, and goes through a
//! bounded broadcast channel ([`CAPACITY`] events). Ingest never waits for a listener. Each
//! listener wakes at most every [`FLUSH_EVERY`] and writes what arrived meanwhile in one chunk, at
//! most [`MAX_PER_FLUSH`] events; a listener that fell more than [`CAPACITY`] events behind (a slow
//! browser), or got more than that per flush, loses the rest, is told how many (`event: dropped`),
//! and they are counted in `backhaul_cloud_live_dropped_total`. With no listener an event is not
//! even built.
//!
//! Both are per replica: a fleet behind several replicas shows each replica's share on its own page.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use backhaul_shared::{Batch, Detection};
use serde::Serialize;
use tokio::sync::broadcast;

/// Events a listener may fall behind before it loses the oldest.
pub const CAPACITY: usize = 1024;
/// The same for a device key's listener, on its device's own channel.
pub const DEVICE_CAPACITY: usize = 256;
/// Seconds of ingest rate kept (10 minutes).
pub const RATE_WINDOW_S: u64 = 600;
/// Detections of a new batch carried in its event, at most.
pub const SAMPLE: usize = 3;
/// A listener writes at most this often (so 500 listeners cost 1,000 wakeups/s at most).
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// Events one flush writes at most (50 events/s per listener: more than a person reads); the
/// rest are dropped, counted (the rate chart counts every batch).
pub const MAX_PER_FLUSH: usize = 25;
/// Events all listeners together write per flush, at most: with many listeners each gets its share
/// ([`per_flush`]), so 500 dashboards cost the cloud what 200 would (10,000 events/s in all).
pub const ALL_PER_FLUSH: usize = 5_000;
/// The least a listener gets per flush however many there are (10 events/s).
pub const MIN_PER_FLUSH: usize = 5;

/// Events one listener writes per flush when `listeners` are connected: its share of
/// [`ALL_PER_FLUSH`], within [`MIN_PER_FLUSH`]..=[`MAX_PER_FLUSH`].
pub fn per_flush(listeners: u64) -> usize {
    (ALL_PER_FLUSH / usize::try_from(listeners.max(1)).unwrap_or(usize::MAX)).clamp(MIN_PER_FLUSH, MAX_PER_FLUSH)
}

/// An event as it goes out: its device (a device key's listener gets its own only) and its
/// `event: batch` frame (text/event-stream, WHATWG HTML "Server-sent events").
#[derive(Debug)]
pub struct Frame {
    pub device_id: String,
    pub bytes: Bytes,
}

/// One batch taken in: `GET /api/v1/live`'s `event: batch`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LiveEvent {
    pub device_id: String,
    pub batch_id: String,
    pub seq: u64,
    /// Detections in the batch.
    pub detections: u64,
    /// Received before (answered as a duplicate, not stored again).
    pub duplicate: bool,
    /// `http` or `mqtt`.
    #[schema(value_type = String)]
    pub via: &'static str,
    /// When this replica took it in (RFC 3339, UTC).
    pub received_at: String,
    /// The first detections of a new batch (at most [`SAMPLE`]; none for a duplicate), as on the
    /// wire (SPEC.md, "Batch").
    #[schema(value_type = Vec<Object>)]
    pub sample: Vec<Detection>,
}

/// One second of ingest: detections newly stored and detections received again.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct RatePoint {
    /// Unix time of the second's start, s.
    pub t: u64,
    pub new: u64,
    pub duplicate: u64,
}

/// The live hub, one per process.
#[derive(Debug)]
pub struct Live {
    events: broadcast::Sender<Arc<Frame>>,
    /// Per-second counts: a std mutex, held for a few instructions and never across an await.
    rate: Mutex<VecDeque<RatePoint>>,
    /// Listeners connected now.
    pub clients: AtomicU64,
    /// Events listeners lost for falling behind, since start.
    pub dropped: AtomicU64,
    /// Turns true when the process stops: every listener's stream ends (an open stream would
    /// otherwise hold the HTTP drain for its whole grace).
    closing: tokio::sync::watch::Sender<bool>,
    /// Streams open per device key.
    per_device: Mutex<std::collections::HashMap<String, DeviceChannel>>,
    /// Device-key listeners connected (so ingest skips the map lock while there are none).
    device_listeners: AtomicU64,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            events: broadcast::channel(CAPACITY).0,
            rate: Mutex::new(VecDeque::new()),
            clients: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            closing: tokio::sync::watch::Sender::new(false),
            per_device: Mutex::default(),
            device_listeners: AtomicU64::new(0),
        }
    }
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A device's own channel: its key's listeners get that device's events only, and are woken by
/// nothing else.
#[derive(Debug)]
struct DeviceChannel {
    listeners: u64,
    events: broadcast::Sender<Arc<Frame>>,
}

impl Live {
    /// Whether an event of `device` would reach anyone.
    fn heard(&self, device: &str) -> bool {
        self.events.receiver_count() > 0
            || (self.device_listeners.load(Ordering::Relaxed) > 0
                && self.per_device.lock().unwrap_or_else(|p| p.into_inner()).contains_key(device))
    }

    /// Records a batch taken in: counts it in the rate and, if anyone listens, sends its event.
    pub fn batch(&self, batch: &Batch, duplicate: bool, via: &'static str) {
        let n = batch.detections.len() as u64;
        self.count(n, duplicate);
        if !self.heard(&batch.device_id) {
            return;
        }
        let sample = if duplicate { Vec::new() } else { batch.detections.iter().take(SAMPLE).cloned().collect() };
        self.send(LiveEvent {
            device_id: batch.device_id.clone(),
            batch_id: batch.batch_id.to_string(),
            seq: batch.seq,
            detections: n,
            duplicate,
            via,
            received_at: backhaul_shared::Timestamp::now().to_string(),
            sample,
        });
    }

    /// Records a resend answered without parsing it (its stored row gave its size).
    pub fn resend(&self, device_id: &str, batch_id: &str, seq: u64, detections: u64, via: &'static str) {
        self.count(detections, true);
        if !self.heard(device_id) {
            return;
        }
        self.send(LiveEvent {
            device_id: device_id.to_owned(),
            batch_id: batch_id.to_owned(),
            seq,
            detections,
            duplicate: true,
            via,
            received_at: backhaul_shared::Timestamp::now().to_string(),
            sample: Vec::new(),
        });
    }

    fn send(&self, event: LiveEvent) {
        let json = serde_json::to_string(&event).expect("a live event always serializes");
        let frame = Arc::new(Frame {
            device_id: event.device_id,
            bytes: Bytes::from(format!("event: batch\ndata: {json}\n\n")),
        });
        if self.device_listeners.load(Ordering::Relaxed) > 0 {
            if let Some(c) = self.per_device.lock().unwrap_or_else(|p| p.into_inner()).get(&frame.device_id) {
                let _ = c.events.send(frame.clone());
            }
        }
        // Err only when the last listener left meanwhile: nobody to tell.
        let _ = self.events.send(frame);
    }

    fn count(&self, detections: u64, duplicate: bool) {
        let t = now_s();
        let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if rate.back().is_none_or(|p| p.t < t) {
            rate.push_back(RatePoint { t, new: 0, duplicate: 0 });
        }
        while rate.front().is_some_and(|p| p.t + RATE_WINDOW_S <= t) {
            rate.pop_front();
        }
        // A clock stepped back lands in the newest second.
        let p = rate.back_mut().expect("pushed above");
        if duplicate {
            p.duplicate += detections;
        } else {
            p.new += detections;
        }
    }

    /// The ingest rate of the last `seconds` (at most [`RATE_WINDOW_S`]), one point per second,
    /// oldest first, seconds without ingest included as zeros, the current second last.
    pub fn rate(&self, seconds: u64) -> Vec<RatePoint> {
        let seconds = seconds.clamp(1, RATE_WINDOW_S);
        let now = now_s();
        let first = now + 1 - seconds;
        let rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<RatePoint> = (first..=now).map(|t| RatePoint { t, new: 0, duplicate: 0 }).collect();
        for p in rate.iter().filter(|p| p.t >= first && p.t <= now) {
            out[(p.t - first) as usize] = *p;
        }
        out
    }

    /// A new fleet listener, admitted whatever the count (tests; the routes use
    /// [`Self::try_listen`]).
    #[cfg(test)]
    fn listen(self: &Arc<Self>) -> Listener {
        self.clients.fetch_add(1, Ordering::Relaxed);
        self.listener(None)
    }

    /// A new listener if fewer than `max` are connected and, for a device's key (`device`), fewer
    /// than [`MAX_PER_DEVICE_KEY`] of that device's; else why not. Checked and counted in one step.
    pub fn try_listen(self: &Arc<Self>, max: u64, device: Option<&str>) -> Result<Listener, Refused> {
        self.clients
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .map_err(|_| Refused::Full)?;
        let Some(device) = device else { return Ok(self.listener(None)) };
        let mut per = self.per_device.lock().unwrap_or_else(|p| p.into_inner());
        let c = per
            .entry(device.to_owned())
            .or_insert_with(|| DeviceChannel { listeners: 0, events: broadcast::channel(DEVICE_CAPACITY).0 });
        if c.listeners >= MAX_PER_DEVICE_KEY {
            drop(per);
            self.clients.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::DeviceFull);
        }
        c.listeners += 1;
        let events = c.events.subscribe();
        self.device_listeners.fetch_add(1, Ordering::Relaxed);
        Ok(Listener { live: self.clone(), events, closing: self.closing.subscribe(), device: Some(device.to_owned()) })
    }

    fn listener(self: &Arc<Self>, device: Option<String>) -> Listener {
        Listener { live: self.clone(), events: self.events.subscribe(), closing: self.closing.subscribe(), device }
    }

    /// Ends every listener's stream, now and from now on (the process is stopping).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }
}

/// One listener's end of the channel.
#[derive(Debug)]
pub struct Listener {
    live: Arc<Live>,
    events: broadcast::Receiver<Arc<Frame>>,
    closing: tokio::sync::watch::Receiver<bool>,
    /// The device whose key opened it (counted per device).
    device: Option<String>,
}

/// Why [`Live::try_listen`] refused a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_live_clients` are connected.
    Full,
    /// This device's key holds [`MAX_PER_DEVICE_KEY`] streams already.
    DeviceFull,
}

/// Streams one device's key may hold at once: a key taken from a Pi cannot fill `max_live_clients`
/// and shut the operators out.
pub const MAX_PER_DEVICE_KEY: u64 = 4;

/// What a listener gets next.
#[derive(Debug)]
pub enum Next {
    Event(Arc<Frame>),
    /// This many events were lost (the listener fell behind); counted in [`Live::dropped`].
    Dropped(u64),
    /// The process is stopping.
    Closed,
}

impl Listener {
    pub async fn next(&mut self) -> Next {
        if *self.closing.borrow() {
            return Next::Closed;
        }
        let event = tokio::select! {
            e = self.events.recv() => e,
            _ = self.closing.wait_for(|c| *c) => return Next::Closed,
        };
        match event {
            Ok(e) => Next::Event(e),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                self.live.dropped.fetch_add(n, Ordering::Relaxed);
                Next::Dropped(n)
            }
            Err(broadcast::error::RecvError::Closed) => Next::Closed,
        }
    }
}

impl Listener {
    /// The next chunk to write for a listener limited to `device` (`None`: every device).
    ///
    /// Waits for any event (or `keepalive`: then a comment, `: keepalive`), then until
    /// [`FLUSH_EVERY`] has passed since `last`, and returns the frames that arrived, at most
    /// [`per_flush`] of the listeners connected, then an `event: dropped` frame
    /// (`{"dropped": n}`) if any were lost. A device key's listener reads its device's own channel:
    /// it is woken by, and told of, nothing else. `None` when the process stops.
    pub async fn chunk(&mut self, last: &mut tokio::time::Instant, keepalive: std::time::Duration) -> Option<Bytes> {
        let deadline = tokio::time::Instant::now() + keepalive;
        let mut out = Vec::new();
        let mut sent = 0;
        let mut dropped = 0;
        loop {
            // Any event wakes us; nothing is taken from the channel when the keep-alive is due.
            let first = tokio::select! {
                next = self.next() => next,
                _ = tokio::time::sleep_until(deadline) => return Some(Bytes::from_static(b": keepalive\n\n")),
            };
            match first {
                Next::Event(f) => {
                    out.extend_from_slice(&f.bytes);
                    sent += 1;
                }
                Next::Dropped(n) => dropped += n,
                Next::Closed => return None,
            }
            tokio::time::sleep_until(*last + FLUSH_EVERY).await;
            let cap = per_flush(self.live.clients.load(Ordering::Relaxed));
            loop {
                match self.events.try_recv() {
                    Ok(f) => {
                        if sent < cap {
                            out.extend_from_slice(&f.bytes);
                            sent += 1;
                        } else {
                            dropped += 1;
                            self.live.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        dropped += n;
                        self.live.dropped.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
            *last = tokio::time::Instant::now();
            if sent > 0 || dropped > 0 {
                break;
            }
        }
        if dropped > 0 {
            out.extend_from_slice(format!("event: dropped\ndata: {{\"dropped\":{dropped}}}\n\n").as_bytes());
        }
        Some(Bytes::from(out))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.live.clients.fetch_sub(1, Ordering::Relaxed);
        if let Some(d) = &self.device {
            self.live.device_listeners.fetch_sub(1, Ordering::Relaxed);
            let mut per = self.live.per_device.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = per.get_mut(d) {
                c.listeners -= 1;
                if c.listeners == 0 {
                    per.remove(d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize) -> Batch {
        let timestamp = backhaul_shared::Timestamp::now();
        Batch {
            schema: backhaul_shared::batch::SCHEMA_VERSION,
            batch_id: backhaul_shared::BatchId::new(),
            device_id: "pi-1".into(),
            seq: 1,
            name: None,
            location: None,
            timestamp,
            detections: (0..n)
                .map(|i| {
                    Detection::Presence(backhaul_shared::Presence {
                        device_hash: format!("{i:016x}"),
                        rssi: -60,
                        zone: backhaul_shared::Zone::Near,
                        timestamp,
                    })
                })
                .collect(),
            clock: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_listener_that_falls_behind_loses_the_oldest_and_is_told_how_many() {
        let live = Arc::new(Live::default());
        let mut slow = live.listen();
        assert_eq!(live.clients.load(Ordering::Relaxed), 1);
        let b = batch(8);
        for _ in 0..CAPACITY + 10 {
            live.batch(&b, false, "http");
        }
        match slow.next().await {
            Next::Dropped(n) => assert_eq!(n, 10),
            other => panic!("{other:?}"),
        }
        assert_eq!(live.dropped.load(Ordering::Relaxed), 10);
        match slow.next().await {
            Next::Event(f) => {
                let text = std::str::from_utf8(&f.bytes).unwrap();
                let json: serde_json::Value =
                    serde_json::from_str(text.strip_prefix("event: batch\ndata: ").unwrap().trim_end()).unwrap();
                assert_eq!(json["detections"], 8);
                assert_eq!(json["sample"].as_array().unwrap().len(), SAMPLE);
            }
            other => panic!("{other:?}"),
        }
        drop(slow);
        assert_eq!(live.clients.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn each_listener_gets_its_share_of_the_events_all_may_write() {
        assert_eq!(per_flush(0), MAX_PER_FLUSH);
        assert_eq!(per_flush(1), MAX_PER_FLUSH);
        assert_eq!(per_flush(200), MAX_PER_FLUSH);
        assert_eq!(per_flush(500), 10);
        assert_eq!(per_flush(100_000), MIN_PER_FLUSH);
    }

    #[test]
    fn listeners_are_admitted_up_to_the_limit_and_a_device_key_up_to_its_share() {
        let live = Arc::new(Live::default());
        let fleet = live.try_listen(6, None).unwrap();
        let own: Vec<_> = (0..MAX_PER_DEVICE_KEY).map(|_| live.try_listen(6, Some("pi-1")).unwrap()).collect();
        assert_eq!(live.try_listen(6, Some("pi-1")).unwrap_err(), Refused::DeviceFull);
        let other = live.try_listen(6, Some("pi-2")).unwrap();
        assert_eq!(live.try_listen(6, None).unwrap_err(), Refused::Full);
        assert_eq!(live.clients.load(Ordering::Relaxed), 6);
        drop(own);
        drop(other);
        drop(fleet);
        assert_eq!(live.clients.load(Ordering::Relaxed), 0);
        assert!(live.per_device.lock().unwrap().is_empty());
        assert_eq!(live.try_listen(0, None).unwrap_err(), Refused::Full);
    }

    const LONG: std::time::Duration = std::time::Duration::from_secs(3600);

    #[tokio::test]
    async fn a_device_listener_is_not_woken_by_other_devices_and_counts_only_its_own_losses() {
        let live = Arc::new(Live::default());
        let mut own = live.try_listen(10, Some("pi-2")).unwrap();
        let mut last = tokio::time::Instant::now();
        for _ in 0..CAPACITY + 5 {
            live.batch(&batch(1), false, "http");
        }
        // Nothing of its own: a keep-alive comment when it is due.
        let chunk = own.chunk(&mut last, std::time::Duration::from_millis(300)).await.unwrap();
        assert_eq!(&chunk[..], b": keepalive\n\n");
        let mut mine = batch(1);
        mine.device_id = "pi-2".into();
        for _ in 0..DEVICE_CAPACITY + 3 {
            live.batch(&mine, false, "http");
        }
        let chunk = own.chunk(&mut last, LONG).await.unwrap();
        let text = std::str::from_utf8(&chunk).unwrap();
        assert_eq!(text.matches("event: batch\n").count(), MAX_PER_FLUSH);
        let lost = DEVICE_CAPACITY + 3 - MAX_PER_FLUSH;
        assert!(text.ends_with(&format!("event: dropped\ndata: {{\"dropped\":{lost}}}\n\n")), "{text}");
        assert!(!text.contains("\"device_id\":\"pi-1\""));
        drop(own);
        assert!(live.per_device.lock().unwrap().is_empty(), "the device's channel goes with its last listener");
        assert_eq!(live.device_listeners.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_chunk_carries_at_most_max_per_flush_events_and_counts_the_rest_and_a_device_gets_its_own() {
        let live = Arc::new(Live::default());
        let mut all = live.listen();
        let mut own = live.try_listen(10, Some("pi-2")).unwrap();
        let (mut last_all, mut last_own) = (tokio::time::Instant::now(), tokio::time::Instant::now());
        let mut other = batch(1);
        other.device_id = "pi-2".into();
        for _ in 0..MAX_PER_FLUSH + 7 {
            live.batch(&batch(1), false, "http");
        }
        live.batch(&other, false, "http");
        let chunk = all.chunk(&mut last_all, LONG).await.unwrap();
        let text = std::str::from_utf8(&chunk).unwrap();
        assert_eq!(text.matches("event: batch\n").count(), MAX_PER_FLUSH);
        assert!(text.ends_with("event: dropped\ndata: {\"dropped\":8}\n\n"), "{text}");
        let chunk = own.chunk(&mut last_own, LONG).await.unwrap();
        let text = std::str::from_utf8(&chunk).unwrap();
        assert_eq!(text.matches("event: batch\n").count(), 1);
        assert!(text.contains("\"device_id\":\"pi-2\""));
        assert!(!text.contains("dropped"));
        assert_eq!(live.dropped.load(Ordering::Relaxed), 8);
        live.close();
        assert!(all.chunk(&mut last_all, LONG).await.is_none());
    }

    #[test]
    fn the_rate_counts_new_and_duplicate_detections_per_second_with_empty_seconds_as_zeros() {
        let live = Live::default();
        live.batch(&batch(3), false, "mqtt");
        live.batch(&batch(4), true, "mqtt");
        live.resend("pi-1", "x", 1, 5, "http");
        let rate = live.rate(60);
        assert_eq!(rate.len(), 60);
        let last = rate.last().unwrap();
        // The second may have turned between the calls: sum the last two.
        let (new, dup) = rate.iter().rev().take(2).fold((0, 0), |(n, d), p| (n + p.new, d + p.duplicate));
        assert_eq!((new, dup), (3, 9), "{rate:?}");
        assert!(rate.windows(2).all(|w| w[1].t == w[0].t + 1));
        assert!(last.t >= now_s() - 1);
        assert_eq!(live.rate(100_000).len() as u64, RATE_WINDOW_S);
    }
}
