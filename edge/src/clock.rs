//! The edge's clock, for a Raspberry Pi without a real-time clock (issue #13, kind 8).
//!
//! Such a Pi boots with its wall clock in 1970 (or, with `fake-hwclock`, at the last time it saved)
//! until NTP syncs. Times taken then are wrong by decades, and nothing in a batch says so. So the
//! edge keeps a **clock floor**, a time it knows has passed:
//! - the build time of this binary (`EDGE_BUILD_UNIX_S`, set by `build.rs` from
//!   `SOURCE_DATE_EPOCH` when it is set, else from the time of the build), and
//! - the newest durable batch time in the queue (raised at start by the service), and
//! - every time stamped since (the floor follows the clock while it is trusted).
//!
//! While the wall clock is below the floor (by more than [`TOLERANCE`]) the time is **unsynced**:
//! stamps are the floor plus the monotonic time elapsed since the floor was taken (an estimate that
//! never goes backwards, and never runs ahead of the true time), a warning is logged once per
//! episode, `/status` shows `clock.synced = false`, and batches cut meanwhile carry
//! `"clock": "unsynced"`. Once the wall clock is back above the floor, stamps are the wall clock
//! again.
//!
//! Who stamps with this clock: the sources that read the wall clock (simulated, BLE; also what
//! `scan --record` writes into a capture) and the batch cutter. A replay uses the times recorded in
//! its capture, untouched: they are what happened at capture time (and were stamped by this clock
//! then); re-dating them would falsify the record. The floor is a lower bound only: a wall clock
//! that is set too far *ahead* is not detected.
//!
//! [`ClockState`] is the plain state machine (wall and monotonic time passed in, unit-tested); the
//! process-wide instance behind [`stamp`] wraps it with the real clocks. It is process-wide
//! because every stage that stamps a time must agree on one floor.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use backhaul_shared::{Clock, Timestamp};

/// How far below the floor the wall clock may be and still be trusted: NTP steps a clock that ran
/// fast back by a little, which is not worth an "unsynced" mark (stamps may go back by this much).
pub const TOLERANCE: Duration = Duration::from_secs(60);

/// The build time of this binary, seconds since the epoch (see `build.rs`).
pub fn build_time() -> Timestamp {
    let secs: i64 = env!("EDGE_BUILD_UNIX_S").parse().unwrap_or(0);
    Timestamp::from_unix_millis(secs.saturating_mul(1000))
        .unwrap_or_else(|| Timestamp::from_unix_millis(0).expect("epoch"))
}

/// One time taken from the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub time: Timestamp,
    /// The wall clock was trusted (at or above the floor).
    pub synced: bool,
}

/// What `/status` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockStatus {
    /// The last stamp came from the wall clock.
    pub synced: bool,
    /// The newest time known to have passed (while synced, the last stamp).
    pub floor: Timestamp,
}

/// The clock floor and the state of the wall clock against it. No I/O: the caller passes the wall
/// clock and a monotonic reading (time since any fixed origin). A trusted wall clock is handed
/// back as it is (full precision); estimates are in microseconds.
#[derive(Debug, Clone)]
pub struct ClockState {
    /// The newest time known to have passed, µs since the epoch.
    floor_us: i64,
    /// The monotonic reading when the floor was taken.
    floor_mono: Duration,
    /// The last stamp came from the wall clock.
    synced: bool,
    /// The newest stamp handed out, µs (stamps never go backwards while unsynced).
    last_us: i64,
}

/// What changed with a stamp, for the caller to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// The wall clock fell below the floor.
    LostSync,
    /// The wall clock is back at or above the floor.
    Synced,
}

impl ClockState {
    /// A clock whose floor is `floor`, taken at the monotonic reading `mono`.
    pub fn new(floor: Timestamp, mono: Duration) -> Self {
        let floor_us = floor.unix_micros();
        Self { floor_us, floor_mono: mono, synced: true, last_us: floor_us }
    }

    /// Raises the floor to `t` if it is newer (a time known to have passed, e.g. the queue's newest
    /// batch), taken at `mono`.
    pub fn raise_floor(&mut self, t: Timestamp, mono: Duration) {
        let us = t.unix_micros();
        if us > self.estimate_us(mono) {
            self.floor_us = us;
            self.floor_mono = mono;
        }
    }

    /// The floor plus the monotonic time elapsed since it was taken, µs.
    fn estimate_us(&self, mono: Duration) -> i64 {
        let elapsed = mono.saturating_sub(self.floor_mono).as_micros();
        self.floor_us.saturating_add(i64::try_from(elapsed).unwrap_or(i64::MAX))
    }

    /// Whether `wall` would be trusted now (nothing changes): at or above the floor less
    /// [`TOLERANCE`].
    pub fn trusts(&self, wall: Timestamp) -> bool {
        wall.unix_micros() >= self.floor_us.saturating_sub(TOLERANCE.as_micros() as i64)
    }

    /// Takes a time: `wall` itself if it is trusted, else the floor plus monotonic time.
    pub fn stamp(&mut self, wall: Timestamp, mono: Duration) -> (Stamp, Transition) {
        let trusted = self.trusts(wall);
        let transition = match (self.synced, trusted) {
            (true, false) => Transition::LostSync,
            (false, true) => Transition::Synced,
            _ => Transition::None,
        };
        self.synced = trusted;
        let time = if trusted {
            if wall.unix_micros() > self.floor_us {
                self.floor_us = wall.unix_micros();
                self.floor_mono = mono;
            }
            wall
        } else {
            Timestamp::from_unix_micros(self.estimate_us(mono).max(self.last_us)).unwrap_or(wall)
        };
        self.last_us = self.last_us.max(time.unix_micros());
        (Stamp { time, synced: trusted }, transition)
    }

    pub fn status(&self) -> ClockStatus {
        ClockStatus {
            synced: self.synced,
            floor: Timestamp::from_unix_micros(self.floor_us).unwrap_or_else(build_time),
        }
    }
}

struct Global {
    origin: Instant,
    state: Mutex<ClockState>,
}

fn global() -> &'static Global {
    static GLOBAL: OnceLock<Global> = OnceLock::new();
    GLOBAL.get_or_init(|| Global {
        origin: Instant::now(),
        state: Mutex::new(ClockState::new(build_time(), Duration::ZERO)),
    })
}

/// Stamps taken while unsynced, ever in this process.
static UNSYNCED_STAMPS: AtomicU64 = AtomicU64::new(0);
/// A stamp was unsynced since the last [`stamp_batch`] (one batch cutter per process).
static UNSYNCED_SINCE_CUT: AtomicBool = AtomicBool::new(false);

/// Takes a time from the process-wide clock (see the module docs).
pub fn stamp() -> Stamp {
    let g = global();
    let mono = g.origin.elapsed();
    let wall = Timestamp::now();
    // A std Mutex: held for a few arithmetic operations, never across I/O or an await.
    let mut state = g.state.lock().unwrap_or_else(|p| p.into_inner());
    let (stamp, transition) = state.stamp(wall, mono);
    let floor = state.status().floor;
    drop(state);
    if !stamp.synced {
        UNSYNCED_STAMPS.fetch_add(1, Ordering::Relaxed);
        UNSYNCED_SINCE_CUT.store(true, Ordering::Relaxed);
    }
    match transition {
        Transition::LostSync => tracing::warn!(
            wall_clock = %wall,
            floor = %floor,
            "THE WALL CLOCK IS BELOW THE CLOCK FLOOR (not synced yet? is NTP running?): times are the floor plus \
             monotonic time, and batches are marked \"clock\": \"unsynced\" until the clock is set"
        ),
        Transition::Synced => {
            tracing::info!(floor = %floor, "the wall clock is above the clock floor again: times come from it")
        }
        Transition::None => {}
    }
    stamp
}

/// Stamps a batch being cut: its time, and [`Clock::Unsynced`] if this stamp or any other since
/// the previous cut was unsynced (so a batch whose detections were stamped from the floor says
/// so). At the moment the clock is set, a detection stamped unsynced just before one cut may land
/// in the next batch, which is then marked synced: the mark is per batch, not per detection.
pub fn stamp_batch() -> (Timestamp, Clock) {
    let s = stamp();
    let unsynced = UNSYNCED_SINCE_CUT.swap(false, Ordering::Relaxed) || !s.synced;
    (s.time, if unsynced { Clock::Unsynced } else { Clock::Synced })
}

/// [`stamp`]'s time only.
pub fn now() -> Timestamp {
    stamp().time
}

/// Raises the process-wide floor to `t` (the queue's newest batch time, at start).
pub fn raise_floor(t: Timestamp) {
    let g = global();
    let mono = g.origin.elapsed();
    g.state.lock().unwrap_or_else(|p| p.into_inner()).raise_floor(t, mono);
}

/// Whether the wall clock is trusted now and the floor; checks the wall clock (without stamping
/// anything), so `/status` is right even while nothing is produced.
pub fn status() -> ClockStatus {
    let wall = Timestamp::now();
    let state = global().state.lock().unwrap_or_else(|p| p.into_inner());
    ClockStatus { synced: state.trusts(wall), floor: state.status().floor }
}

/// How many stamps were taken while unsynced, ever in this process.
pub fn unsynced_stamps() -> u64 {
    UNSYNCED_STAMPS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 86_400_000;
    /// 2026-11-21T00:00:00Z.
    const NOV_2026_MS: i64 = 1_795_219_200_000;

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms).unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_wall_clock_above_the_floor_is_used_and_carries_the_floor() {
        let mut c = ClockState::new(ts(NOV_2026_MS), secs(0));
        let (s, t) = c.stamp(ts(NOV_2026_MS + 5_000), secs(1));
        assert_eq!((s, t), (Stamp { time: ts(NOV_2026_MS + 5_000), synced: true }, Transition::None));
        assert_eq!(c.status(), ClockStatus { synced: true, floor: ts(NOV_2026_MS + 5_000) });
    }

    #[test]
    fn a_wall_clock_in_1970_gives_the_floor_plus_monotonic_time_until_it_is_set() {
        let mut c = ClockState::new(ts(NOV_2026_MS), secs(100));
        let (s, t) = c.stamp(ts(0), secs(100));
        assert_eq!((s, t), (Stamp { time: ts(NOV_2026_MS), synced: false }, Transition::LostSync));
        let (s, t) = c.stamp(ts(30_000), secs(130));
        assert_eq!((s, t), (Stamp { time: ts(NOV_2026_MS + 30_000), synced: false }, Transition::None));
        assert_eq!(c.status(), ClockStatus { synced: false, floor: ts(NOV_2026_MS) });
        // NTP sets the clock (a day later than the estimate: the Pi was off meanwhile).
        let (s, t) = c.stamp(ts(NOV_2026_MS + DAY_MS), secs(131));
        assert_eq!((s, t), (Stamp { time: ts(NOV_2026_MS + DAY_MS), synced: true }, Transition::Synced));
    }

    #[test]
    fn a_trusted_wall_clock_keeps_its_full_precision() {
        // Truncating it would change every detection's bytes (and how well batches compress).
        let wall: Timestamp = "2026-11-21T10:00:00.123456789Z".parse().unwrap();
        let mut c = ClockState::new(ts(NOV_2026_MS), secs(0));
        assert_eq!(c.stamp(wall, secs(0)).0.time, wall);
    }

    #[test]
    fn small_steps_back_are_tolerated_and_large_ones_are_not() {
        let mut c = ClockState::new(ts(NOV_2026_MS), secs(0));
        let within = NOV_2026_MS - TOLERANCE.as_millis() as i64;
        assert!(c.stamp(ts(within), secs(0)).0.synced);
        let (s, _) = c.stamp(ts(within - 1), secs(2));
        assert_eq!(s, Stamp { time: ts(NOV_2026_MS + 2_000), synced: false });
    }

    #[test]
    fn unsynced_stamps_never_go_backwards_and_the_floor_only_rises() {
        let mut c = ClockState::new(ts(NOV_2026_MS), secs(10));
        c.raise_floor(ts(NOV_2026_MS - DAY_MS), secs(10));
        assert_eq!(c.status().floor, ts(NOV_2026_MS), "an older time does not lower the floor");
        c.raise_floor(ts(NOV_2026_MS + DAY_MS), secs(10));
        assert_eq!(c.status().floor, ts(NOV_2026_MS + DAY_MS));
        let mut last = 0;
        for (wall, mono) in [(0, 10), (5, 10), (0, 12), (1_000_000, 11), (0, 20)] {
            let (s, _) = c.stamp(ts(wall), secs(mono));
            assert!(!s.synced);
            assert!(s.time.unix_millis() >= last, "{s:?} after {last}");
            last = s.time.unix_millis();
        }
        assert_eq!(last, NOV_2026_MS + DAY_MS + 10_000);
    }

    #[test]
    fn the_build_time_is_a_sane_floor() {
        let b = build_time().unix_millis();
        assert!(b > NOV_2026_MS - 365 * DAY_MS && b <= Timestamp::now().unix_millis() + DAY_MS, "{}", build_time());
    }
}
