//! How fast, and in which order, batches leave the queue.
//!
//! - Rate: a governor token bucket of `rate_per_sec` batches per second with `burst` tokens, so a
//!   backlog built during a long outage drains at a configured pace instead of flooding the link
//!   and the cloud the moment it comes back.
//! - Order ("live share"): while a backlog drains, every other send slot goes to the **newest**
//!   pending batch and the others to the oldest. A batch cut now therefore waits at most about two
//!   send slots, however large the backlog, and the backlog still drains oldest first at half the
//!   pace (the whole pace once nothing new arrives: both ends meet). The cloud does not care about
//!   order (`batch_id` is the key; `seq` gaps close as the backlog arrives).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Which end of the queue the next send slot takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Oldest,
    Newest,
}

/// The rate limit and the live-share order.
pub struct Pacer<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    next_end: End,
}

impl<C: Clock> std::fmt::Debug for Pacer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer").field("next_end", &self.next_end).finish_non_exhaustive()
    }
}

impl Pacer<DefaultClock> {
    /// `rate_per_sec` batches per second with `burst` (both at least 1; the config checks).
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        Self::with_clock(rate_per_sec, burst, DefaultClock::default())
    }
}

impl<C: Clock> Pacer<C> {
    pub fn with_clock(rate_per_sec: u32, burst: u32, clock: C) -> Self {
        let rate = NonZeroU32::new(rate_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let limiter = RateLimiter::direct_with_clock(Quota::per_second(rate).allow_burst(burst), clock);
        Self { limiter, next_end: End::Oldest }
    }

    /// Takes a send slot now, or says how long until one is free.
    pub fn take(&mut self) -> Result<(), Duration> {
        self.limiter.check().map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// The end of the queue the slot just taken should use; alternates.
    pub fn next_end(&mut self) -> End {
        let end = self.next_end;
        self.next_end = match end {
            End::Oldest => End::Newest,
            End::Newest => End::Oldest,
        };
        end
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    /// Drains `batches` through a pacer on a virtual clock; returns the virtual time it took.
    fn drain(batches: u32, rate: u32, burst: u32) -> Duration {
        let clock = FakeRelativeClock::default();
        let mut pacer = Pacer::with_clock(rate, burst, clock.clone());
        let mut sent = 0;
        let mut elapsed = Duration::ZERO;
        while sent < batches {
            match pacer.take() {
                Ok(()) => sent += 1,
                Err(wait) => {
                    assert!(wait > Duration::ZERO);
                    clock.advance(wait);
                    elapsed += wait;
                }
            }
        }
        elapsed
    }

    #[test]
    fn a_10000_batch_backlog_at_100_per_second_takes_100_seconds_of_virtual_time() {
        // The burst goes at once, the rest at the configured pace: (10,000 - 100) / 100 = 99 s.
        let took = drain(10_000, 100, 100);
        assert!(took >= Duration::from_secs(98) && took <= Duration::from_secs(100), "{took:?}");
    }

    #[test]
    fn the_burst_is_available_at_once_and_no_more() {
        let clock = FakeRelativeClock::default();
        let mut pacer = Pacer::with_clock(10, 5, clock.clone());
        for _ in 0..5 {
            assert_eq!(pacer.take(), Ok(()));
        }
        let wait = pacer.take().unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        clock.advance(wait);
        assert_eq!(pacer.take(), Ok(()));
    }

    #[test]
    fn send_slots_alternate_between_the_oldest_and_the_newest() {
        let mut pacer = Pacer::new(1, 1);
        let ends: Vec<End> = (0..4).map(|_| pacer.next_end()).collect();
        assert_eq!(ends, vec![End::Oldest, End::Newest, End::Oldest, End::Newest]);
    }
}
