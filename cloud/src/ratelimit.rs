//! Per-device rate limits (issue #16, item 6), so that one device (or one key) that floods the
//! cloud cannot starve the others: a token bucket per `device_id` (governor's GCRA) of
//! `device_rate_per_sec` batches per second with `device_burst` batches of burst.
//!
//! - HTTP: a bulk post over its device's rate is answered 429 with `Retry-After` (whole seconds,
//!   at least 1), before its body is parsed when the key is a device key. The edge honours it.
//! - MQTT: a valid batch of its topic's device over that device's rate (junk does not use up a
//!   device's allowance) is PUBACKed and neither stored nor acked: the edge's
//!   own resend after `ack_timeout` brings it again later, so nothing is lost with
//!   `ack = "cloud"` (the default). MQTT has no per-publisher flow control a subscriber can use
//!   (PUBACKs must go in order, MQTT 5.0 section 4.6, and the receive window is the whole cloud
//!   session's): holding a flooder's PUBACKs would hold everyone's. An edge with
//!   `ack = "broker"` would lose such a batch: run those with `device_rate_per_sec = 0` (off),
//!   or over HTTP.
//!
//! Counted in `/metrics` (`backhaul_cloud_rate_limited_total`). Memory: one entry per device
//! seen (HTTP: authenticated; MQTT: a valid batch whose device_id matches its topic), a few dozen
//! bytes each; entries idle long enough to be full again (`device_burst / device_rate_per_sec`
//! seconds) are dropped every 10,000 checks. On a broker without the ACL anyone can publish valid
//! batches under any device id, and so use up a device's allowance: the limit assumes
//! `deploy/mosquitto/acl`.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// The per-device limiter; `None` inside when `device_rate_per_sec = 0`.
#[derive(Debug)]
pub struct DeviceLimits {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    checks: AtomicU64,
    /// Batches turned away since start.
    pub limited: AtomicU64,
}

impl DeviceLimits {
    /// `per_sec` batches per second per device (0: no limit), `burst` at once.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        let limiter = NonZeroU32::new(per_sec).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self { limiter, checks: AtomicU64::new(0), limited: AtomicU64::new(0) }
    }

    /// Takes one batch of `device_id`'s allowance; `Err(wait)` if it has none now.
    pub fn check(&self, device_id: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        if self.checks.fetch_add(1, Ordering::Relaxed) % 10_000 == 9_999 {
            limiter.retain_recent();
        }
        match limiter.check_key(&device_id.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                self.limited.fetch_add(1, Ordering::Relaxed);
                Err(not_until.wait_time_from(DefaultClock::default().now()))
            }
        }
    }
}

/// A `Retry-After` value for `wait`: whole seconds, rounded up, at least 1 (RFC 9110 section
/// 10.2.3).
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.as_secs() == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_device_has_its_own_bucket() {
        let limits = DeviceLimits::new(1, 3);
        for _ in 0..3 {
            limits.check("a").unwrap();
        }
        let wait = limits.check("a").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        limits.check("b").expect("another device is not held back by a");
        assert_eq!(limits.limited.load(Ordering::Relaxed), 1);
        let off = DeviceLimits::new(0, 0);
        for _ in 0..10_000 {
            off.check("a").unwrap();
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
    }
}
