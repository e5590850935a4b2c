//! Each ingress's progress, so that a stalled one is seen (issue #14, kind 4): `/health` answers
//! 503 and names it, the systemd watchdog stops (systemd restarts the service), and `/metrics`
//! shows how much waits and how long since the last message or request was finished.
//!
//! An ingress *stalls* when it has work waiting (MQTT: messages received and not yet PUBACKed;
//! HTTP: bulk posts whose body is read and whose answer is not yet given) and finishes none of it
//! for `ingest_stall_after`. An idle ingress never stalls, and neither does a busy one that keeps
//! finishing work, however slowly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One ingress's counters. Lock-free: touched once per message or request.
#[derive(Debug)]
pub struct Progress {
    /// `mqtt` or `http`, as in `/metrics` labels and `/health`.
    pub name: &'static str,
    epoch: Instant,
    waiting: AtomicU64,
    finished: AtomicU64,
    /// Milliseconds after `epoch` of the last finish, or of work arriving at an idle ingress.
    last_progress_ms: AtomicU64,
}

/// What [`Progress::snapshot`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Messages or requests taken in and not finished.
    pub waiting: u64,
    /// Finished since the start (stored, duplicate, refused or dead-lettered alike).
    pub finished: u64,
    /// Since the last finish (or since work arrived at an idle ingress).
    pub since_progress: Duration,
}

impl Snapshot {
    /// Stalled: work waits and none was finished for `after`.
    pub fn stalled(&self, after: Duration) -> bool {
        self.waiting > 0 && self.since_progress >= after
    }
}

impl Progress {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            epoch: Instant::now(),
            waiting: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A message or request was taken in. Work arriving at an idle ingress starts its clock.
    pub fn begin(&self) {
        // The clock first: a snapshot between the two never sees work waiting since a long idle
        // spell. (Two racing begins may both restart it: harmless.)
        if self.waiting.load(Ordering::SeqCst) == 0 {
            self.last_progress_ms.store(self.now_ms(), Ordering::SeqCst);
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
    }

    /// A message or request taken in with [`Self::begin`] is finished (or abandoned: a stop).
    pub fn finish(&self) {
        // Never below zero, whatever a caller does.
        let _ = self.waiting.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        self.finished.fetch_add(1, Ordering::SeqCst);
        self.last_progress_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    /// A guard that calls [`Self::finish`] when dropped (a request handler that returns early, or
    /// whose client goes away, still finishes).
    pub fn guard(&self) -> Guard<'_> {
        self.begin();
        Guard(self)
    }

    pub fn snapshot(&self) -> Snapshot {
        let waiting = self.waiting.load(Ordering::SeqCst);
        let last = self.last_progress_ms.load(Ordering::SeqCst);
        Snapshot {
            waiting,
            finished: self.finished.load(Ordering::SeqCst),
            since_progress: Duration::from_millis(self.now_ms().saturating_sub(last)),
        }
    }
}

/// See [`Progress::guard`].
#[derive(Debug)]
pub struct Guard<'a>(&'a Progress);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// The service's ingresses and the stall threshold, shared by `/health`, `/metrics` and the
/// watchdog.
#[derive(Debug)]
pub struct Ingresses {
    pub mqtt: Progress,
    pub http: Progress,
    /// `ingest_stall_after`.
    pub stall_after: Duration,
    /// MQTT ingest is configured (`[mqtt]`).
    pub mqtt_configured: std::sync::atomic::AtomicBool,
    /// Its ingest connection is up (between a CONNACK and the next connection error).
    pub mqtt_connected: std::sync::atomic::AtomicBool,
}

impl Ingresses {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            mqtt: Progress::new("mqtt"),
            http: Progress::new("http"),
            stall_after,
            mqtt_configured: Default::default(),
            mqtt_connected: Default::default(),
        }
    }

    pub fn all(&self) -> [&Progress; 2] {
        [&self.mqtt, &self.http]
    }

    /// Why the service is unhealthy, for `/health` and the log: per stalled ingress, its name and
    /// a sentence that says what to do (from one snapshot each). Empty when none is stalled.
    pub fn stalls(&self) -> Vec<(&'static str, String)> {
        self.all()
            .into_iter()
            .filter_map(|p| {
                let s = p.snapshot();
                s.stalled(self.stall_after).then(|| {
                    let why = format!(
                        "{} ingest is stalled: {} waiting, none finished for {} s (ingest_stall_after = {} s); \
                         the watchdog stops so that systemd restarts the service: look for errors in the log",
                        p.name,
                        s.waiting,
                        s.since_progress.as_secs(),
                        self.stall_after.as_secs()
                    );
                    (p.name, why)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_never_stalls_and_waiting_without_progress_does() {
        let p = Progress::new("mqtt");
        assert!(!p.snapshot().stalled(Duration::ZERO), "idle");
        p.begin();
        assert!(p.snapshot().stalled(Duration::ZERO));
        assert!(!p.snapshot().stalled(Duration::from_secs(60)), "its clock started when work arrived");
        p.finish();
        let s = p.snapshot();
        assert_eq!((s.waiting, s.finished), (0, 1));
        assert!(!s.stalled(Duration::ZERO));
        p.finish();
        assert_eq!(p.snapshot().waiting, 0, "never below zero");
        {
            let _g = p.guard();
            assert_eq!(p.snapshot().waiting, 1);
        }
        assert_eq!(p.snapshot().waiting, 0);
    }
}
