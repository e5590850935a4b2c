//! Exponential backoff with full jitter, capped, that honours a server's `Retry-After`: a plain
//! state machine (the random source and the clock are the caller's), used for the edge's and the
//! cloud's MQTT reconnects, HTTP retries and BLE adapter recovery alike.

use std::time::Duration;

/// Delays grow `base · 2^failures`, capped at `max`; each delay is drawn uniformly from
/// `[0, that]` ("full jitter", so a fleet that lost its link at the same moment does not come back
/// in lockstep), but never below a server's `Retry-After`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max: max.max(base), failures: 0 }
    }

    /// A success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The delay before the next attempt after a failure. `unit` is a uniform random number in
    /// `[0, 1)`; `retry_after` is the server's own wish, honoured up to one hour.
    pub fn next_delay(&mut self, unit: f64, retry_after: Option<Duration>) -> Duration {
        let ceiling =
            self.base.saturating_mul(1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX)).min(self.max);
        self.failures = self.failures.saturating_add(1);
        let jittered = ceiling.mul_f64(unit.clamp(0.0, 1.0));
        match retry_after {
            Some(wish) => jittered.max(wish.min(Duration::from_secs(3600))),
            None => jittered,
        }
    }

    /// [`Backoff::next_delay`] with a fresh random number.
    pub fn next_random(&mut self, retry_after: Option<Duration>) -> Duration {
        self.next_delay(fastrand::f64(), retry_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let ceilings: Vec<_> = (0..8).map(|_| b.next_delay(0.999_999, None).as_millis()).collect();
        assert_eq!(ceilings, vec![99, 199, 399, 799, 1599, 1999, 1999, 1999]);
        assert_eq!(b.failures(), 8);
        b.reset();
        assert_eq!(b.next_delay(0.999_999, None).as_millis(), 99);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(b.next_delay(0.0, None), Duration::ZERO);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(b.next_delay(0.5, None), Duration::from_millis(50));
    }

    #[test]
    fn retry_after_is_a_floor_capped_at_an_hour() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(b.next_delay(0.1, Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(b.next_delay(0.1, Some(Duration::from_secs(86_400))), Duration::from_secs(3600));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        for _ in 0..10_000 {
            assert!(b.next_delay(0.999, None) <= Duration::from_secs(60));
        }
    }
}
