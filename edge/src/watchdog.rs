//! The systemd watchdog's judgement: `WATCHDOG=1` is sent only while every stage makes progress
//! or is legitimately idle, so a wedged stage stops the pings and systemd restarts the process.
//!
//! Each stage beats at every turn of its loop ([`crate::telemetry::Telemetry`]): the pipeline
//! (source and queue writer) at least every 200 ms, and also while it waits for room in the queue;
//! the forwarder at least every second, idle or not. A stage is stalled when its last beat is
//! older than its limit. The pipeline's limit covers the longest legitimate wait inside an
//! enqueue (`queue.block_timeout` under `on_full = "block"`). A plain function of the beats and
//! the clock, so every rule is unit-tested.

use std::time::Duration;

/// A stage the watchdog checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Source, batcher and the durable enqueue (one thread).
    Pipeline,
    /// Queue → transport.
    Forwarder,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Pipeline => "pipeline (source and queue writer)",
            Stage::Forwarder => "forwarder",
        }
    }
}

/// How long each stage may go without a beat.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub pipeline: Duration,
    pub forwarder: Duration,
}

impl Limits {
    /// The pipeline may sit in one enqueue for `block_timeout`, plus a margin for a slow SD card.
    /// The forwarder beats every second: it may be silent for the watchdog interval, between 3 and
    /// 15 s (a short interval in tests, `WatchdogSec=60` in the unit).
    pub fn new(block_timeout: Duration, watchdog: Option<Duration>) -> Self {
        let forwarder =
            watchdog.unwrap_or(Duration::from_secs(15)).clamp(Duration::from_secs(3), Duration::from_secs(15));
        Self { pipeline: block_timeout + Duration::from_secs(15), forwarder }
    }
}

/// `Ok` when every stage beat recently enough; otherwise the stalled stage and for how long.
/// Beats and `now` are milliseconds on one clock (since the process started).
pub fn check(
    limits: &Limits,
    now_ms: u64,
    pipeline_beat_ms: u64,
    forwarder_beat_ms: u64,
) -> Result<(), (Stage, Duration)> {
    for (stage, beat, limit) in
        [(Stage::Pipeline, pipeline_beat_ms, limits.pipeline), (Stage::Forwarder, forwarder_beat_ms, limits.forwarder)]
    {
        let silent = Duration::from_millis(now_ms.saturating_sub(beat));
        if silent > limit {
            return Err((stage, silent));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_while_every_stage_beats_within_its_limit() {
        let l = Limits { pipeline: Duration::from_secs(45), forwarder: Duration::from_secs(15) };
        assert_eq!(check(&l, 100_000, 99_800, 99_000), Ok(()));
        // The pipeline waiting 40 s inside an enqueue under on_full = "block" is legitimate.
        assert_eq!(check(&l, 100_000, 60_000, 99_000), Ok(()));
    }

    #[test]
    fn a_stage_silent_past_its_limit_is_named() {
        let l = Limits { pipeline: Duration::from_secs(45), forwarder: Duration::from_secs(15) };
        assert_eq!(check(&l, 100_000, 99_900, 80_000), Err((Stage::Forwarder, Duration::from_secs(20))));
        assert_eq!(check(&l, 100_000, 50_000, 99_900), Err((Stage::Pipeline, Duration::from_secs(50))));
    }

    #[test]
    fn limits_follow_the_block_timeout_and_the_watchdog_interval() {
        let l = Limits::new(Duration::from_secs(30), Some(Duration::from_secs(60)));
        assert_eq!((l.pipeline, l.forwarder), (Duration::from_secs(45), Duration::from_secs(15)));
        let l = Limits::new(Duration::from_secs(30), Some(Duration::from_secs(1)));
        assert_eq!(l.forwarder, Duration::from_secs(3), "never below three missed beats");
        assert_eq!(Limits::new(Duration::from_secs(30), None).forwarder, Duration::from_secs(15));
    }
}
