//! The `replay` source: plays a capture written by `scan --record` (JSON lines of
//! [`Advertisement`]s) through the decoders, as fast as the pipeline takes it or at the recorded
//! pace. It runs on the capture's clock: dedup windows, zones and detection times see the recorded
//! `t`, so a replay gives the same detections at any speed.
//!
//! Resumable: the position after each detection is (line, index of the detection among that
//! line's), 12 bytes. After a kill -9 it re-decodes the capture up to the stored line silently
//! (which rebuilds the decoder's dedup and smoothing state exactly) and continues with the
//! detection after the stored one: nothing produced twice, nothing skipped. A line that is not a
//! valid advertisement (not JSON, not UTF-8 at all) is logged, counted (`/status`
//! `source.bad_lines`, with the last one as `source.last_error`) and skipped; only a failing read
//! of the file ends the replay early.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backhaul_shared::Detection;

use super::{Next, Source};
use crate::decode::{Advertisement, Decoder};
use crate::telemetry::Telemetry;

/// Where the replay stands: after detection `sub` of line `line` (0-based).
fn encode_position(line: u64, sub: u32) -> Vec<u8> {
    let mut p = line.to_le_bytes().to_vec();
    p.extend_from_slice(&sub.to_le_bytes());
    p
}

fn decode_position(p: &[u8]) -> Result<(u64, u32), String> {
    if p.len() != 12 {
        return Err(format!("stored source position is {} bytes, not 12: not from the replay source", p.len()));
    }
    Ok((u64::from_le_bytes(p[..8].try_into().expect("8")), u32::from_le_bytes(p[8..].try_into().expect("4"))))
}

/// See the module docs.
pub struct Replay {
    path: PathBuf,
    reader: BufReader<File>,
    /// The line being read, as bytes: a line that is not UTF-8 is one bad line, not the end.
    buf: Vec<u8>,
    decoder: Decoder,
    /// Index of the next line to read.
    next_line: u64,
    /// Decoded, not yet handed out: detection, position, when it is due (recorded pace).
    ready: VecDeque<(Detection, Vec<u8>, Option<Instant>)>,
    recorded_pace: bool,
    /// (wall clock, capture ms) of the first advertisement played, for the recorded pace.
    paced_from: Option<(Instant, i64)>,
    bad_lines: u64,
    /// Where bad lines played (not those re-read silently at a resume) are reported.
    telemetry: Option<Arc<Telemetry>>,
    /// Re-reading the lines before the stored position (at a resume).
    catching_up: bool,
    done: bool,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay").field("path", &self.path).field("next_line", &self.next_line).finish_non_exhaustive()
    }
}

/// Lines read in one call before giving the pipeline a turn.
const LINES_PER_TURN: usize = 1000;

impl Replay {
    /// Opens `path` and continues after `position` (the one stored with the last durable batch).
    pub fn resume(path: &Path, decoder: Decoder, position: Option<&[u8]>, recorded_pace: bool) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("cannot open the capture {}: {e}", path.display()))?;
        let mut r = Self {
            path: path.to_owned(),
            reader: BufReader::new(file),
            buf: Vec::new(),
            decoder,
            next_line: 0,
            ready: VecDeque::new(),
            recorded_pace,
            paced_from: None,
            bad_lines: 0,
            telemetry: None,
            catching_up: true,
            done: false,
        };
        if let Some(p) = position {
            let (line, sub) = decode_position(p)?;
            // Replay what came before silently, so the decoder's state is what it was.
            while r.next_line < line {
                if r.read_line().is_none() {
                    return Err(format!(
                        "the capture {} has fewer lines than the stored position (line {line}): was it replaced?",
                        path.display()
                    ));
                }
            }
            if let Some(detections) = r.read_line() {
                for (i, d) in detections.into_iter().enumerate().skip(sub as usize + 1) {
                    r.ready.push_back((d, encode_position(line, i as u32), None));
                }
            }
        }
        r.catching_up = false;
        Ok(r)
    }

    /// Reports the bad lines it plays in `telemetry` (`/status` `source`).
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// Lines that were not valid advertisements, so far.
    pub fn bad_lines(&self) -> u64 {
        self.bad_lines
    }

    /// Reads and decodes the next line; `None` at the end of the capture.
    fn read_line(&mut self) -> Option<Vec<Detection>> {
        self.buf.clear();
        match self.reader.read_until(b'\n', &mut self.buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "reading the capture failed; the replay ends here");
                return None;
            }
        }
        let index = self.next_line;
        self.next_line += 1;
        let bytes = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let parsed = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}")).and_then(|line| {
            if line.trim().is_empty() {
                return Ok(None);
            }
            serde_json::from_str::<Advertisement>(line).map(Some).map_err(|e| e.to_string())
        });
        match parsed {
            Ok(None) => Some(Vec::new()),
            Ok(Some(adv)) => Some(self.decoder.decode(&adv)),
            Err(error) => {
                self.bad_lines += 1;
                if !self.catching_up {
                    tracing::warn!(path = %self.path.display(), line = index + 1, %error, "skipping a line that is not an advertisement");
                    if let Some(t) = &self.telemetry {
                        t.source_bad_lines.fetch_add(1, Ordering::Relaxed);
                        t.set_source_error(format!(
                            "capture {} line {}: not an advertisement, skipped: {error}",
                            self.path.display(),
                            index + 1
                        ));
                    }
                }
                Some(Vec::new())
            }
        }
    }
}

impl Source for Replay {
    fn next(&mut self, now: Instant) -> Next {
        for _ in 0..LINES_PER_TURN {
            if let Some((_, _, due)) = self.ready.front() {
                if let Some(due) = *due {
                    if now < due {
                        return Next::Wait(due - now);
                    }
                }
                let (d, position, _) = self.ready.pop_front().expect("checked");
                return Next::Detection(d, Some(position));
            }
            if self.done {
                return Next::Done;
            }
            let line = self.next_line;
            let Some(detections) = self.read_line() else {
                self.done = true;
                tracing::info!(path = %self.path.display(), lines = self.next_line, bad_lines = self.bad_lines, "the capture has been replayed");
                continue;
            };
            let due = if self.recorded_pace {
                detections.first().map(|d| {
                    let t = d.timestamp().unix_millis();
                    let (start, t0) = *self.paced_from.get_or_insert((now, t));
                    start + Duration::from_millis(u64::try_from(t - t0).unwrap_or(0))
                })
            } else {
                None
            };
            for (i, d) in detections.into_iter().enumerate() {
                self.ready.push_back((d, encode_position(line, i as u32), due));
            }
        }
        Next::Wait(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::decode::presence::{AddressHasher, Zones};
    use crate::decode::{PresenceSettings, Thingy52Settings};

    fn decoder() -> Decoder {
        Decoder::new(
            Some(PresenceSettings {
                hasher: AddressHasher::new(b"s", None).unwrap(),
                zones: Zones::default(),
                smoothing: Duration::ZERO,
            }),
            Some(Thingy52Settings::default()),
            Duration::from_secs(10),
        )
    }

    /// 30 lines: 3 advertisers heard every 2 s of capture time, one a Thingy:52, and a bad line.
    fn capture() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for i in 0..30 {
            if i == 7 {
                writeln!(f, "not json").unwrap();
                continue;
            }
            let (address, data) = match i % 3 {
                0 => ("C1:0E:5A:33:9F:02", r#"{"65535":"010102280300fd04000002640557"}"#),
                1 => ("11:22:33:44:55:01", "{}"),
                _ => ("11:22:33:44:55:02", r#"{"76":"1005031c7a8e39"}"#),
            };
            let t = 1_763_720_000 + i * 2;
            let t = time::OffsetDateTime::from_unix_timestamp(t)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            writeln!(f, r#"{{"t":"{t}","address":"{address}","rssi":-{},"tx_power":null,"manufacturer_data":{data},"service_data":{{}},"services":[],"name":null}}"#, 50 + i).unwrap();
        }
        f
    }

    fn drain(r: &mut Replay) -> Vec<(Detection, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            match r.next(Instant::now()) {
                Next::Detection(d, p) => out.push((d, p.unwrap())),
                Next::Wait(_) => {}
                Next::Done => return out,
            }
        }
    }

    #[test]
    fn a_replay_resumed_after_any_detection_gives_exactly_the_rest() {
        let file = capture();
        let all = drain(&mut Replay::resume(file.path(), decoder(), None, false).unwrap());
        assert!(all.len() > 10, "{}", all.len());
        for k in 0..all.len() {
            let mut resumed = Replay::resume(file.path(), decoder(), Some(&all[k].1), false).unwrap();
            let rest = drain(&mut resumed);
            assert_eq!(rest, all[k + 1..].to_vec(), "resumed after detection {k}");
        }
        assert_eq!(
            Replay::resume(file.path(), decoder(), None, false).map(|mut r| {
                drain(&mut r);
                r.bad_lines()
            }),
            Ok(1)
        );
    }

    #[test]
    fn a_replay_is_the_same_at_any_pace_and_runs_on_the_capture_clock() {
        let file = capture();
        let fast: Vec<Detection> =
            drain(&mut Replay::resume(file.path(), decoder(), None, false).unwrap()).into_iter().map(|d| d.0).collect();
        // Each advertiser is heard every 6 s with a 10 s window: every other hearing is a repeat.
        let sensors = fast.iter().filter(|d| matches!(d, Detection::Sensor(_))).count();
        assert_eq!(sensors, 5, "10 hearings of the Thingy, 5 windows");
        assert_eq!(fast[0].timestamp(), "2025-11-21T10:13:20Z".parse().unwrap(), "the capture's own time");
        // At the recorded pace the first detection waits for nothing, the next line for 2 s.
        let mut paced = Replay::resume(file.path(), decoder(), None, true).unwrap();
        let t0 = Instant::now();
        assert!(matches!(paced.next(t0), Next::Detection(..)));
        assert!(matches!(paced.next(t0), Next::Detection(..)), "the same line's presence detection");
        match paced.next(t0) {
            Next::Wait(w) => assert_eq!(w, Duration::from_secs(2)),
            other => panic!("{other:?}"),
        }
    }

    /// Regression (issue #14): a line that is not UTF-8 ended the replay (the line iterator's
    /// error was taken for a failing read): everything after it was never produced.
    #[test]
    fn a_line_that_is_not_utf8_is_skipped_and_counted_and_the_replay_goes_on() {
        let file = capture();
        let lines: Vec<Vec<u8>> =
            std::fs::read(file.path()).unwrap().split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
        let mut damaged = tempfile::NamedTempFile::new().unwrap();
        for (i, line) in lines.iter().enumerate() {
            if i == 15 {
                damaged.write_all(b"{\"t\":\"2025-11-21T10:13:50Z\",\"address\":\"\xff\xfe\"}\n").unwrap();
            }
            damaged.write_all(line).unwrap();
            if i + 1 < lines.len() {
                damaged.write_all(b"\n").unwrap();
            }
        }
        let telemetry = Arc::new(Telemetry::new("t", "http"));
        let all: Vec<Detection> =
            drain(&mut Replay::resume(file.path(), decoder(), None, false).unwrap()).into_iter().map(|d| d.0).collect();
        let mut replay =
            Replay::resume(damaged.path(), decoder(), None, false).unwrap().with_telemetry(telemetry.clone());
        let played = drain(&mut replay);
        assert_eq!(played.iter().map(|d| d.0.clone()).collect::<Vec<_>>(), all, "every detection, in order");
        assert_eq!(replay.bad_lines(), 2, "the line that is not JSON and the one that is not UTF-8");
        assert_eq!(telemetry.source_bad_lines.load(Ordering::Relaxed), 2);
        assert!(telemetry.source_error().unwrap_or_default().contains("line 16"), "{:?}", telemetry.source_error());
        // Resumed past them, it does not count them again.
        let k = played.len() - 3;
        let resumed = Replay::resume(damaged.path(), decoder(), Some(&played[k].1), false).unwrap();
        let telemetry = Arc::new(Telemetry::new("t", "http"));
        let mut resumed = resumed.with_telemetry(telemetry.clone());
        assert_eq!(drain(&mut resumed).len(), 2);
        assert_eq!(telemetry.source_bad_lines.load(Ordering::Relaxed), 0);
    }

    /// A time whose UTC form is past year 9999 panicked the pipeline's thread while parsing the
    /// line (and again after every restart, at the same line); it is one more bad line.
    #[test]
    fn a_line_with_a_time_past_year_9999_in_utc_is_a_bad_line_not_a_panic() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, r#"{{"t":"9999-12-31T23:59:59-01:00","address":"11:22:33:44:55:01","rssi":-60}}"#).unwrap();
        writeln!(f, r#"{{"t":"2026-11-21T10:00:00Z","address":"11:22:33:44:55:02","rssi":-60}}"#).unwrap();
        let mut replay = Replay::resume(f.path(), decoder(), None, false).unwrap();
        assert_eq!(drain(&mut replay).len(), 1);
        assert_eq!(replay.bad_lines(), 1);
    }

    #[test]
    fn a_position_from_another_source_or_past_the_end_is_refused() {
        let file = capture();
        assert!(Replay::resume(file.path(), decoder(), Some(&[1, 2, 3]), false).unwrap_err().contains("12"));
        let far = encode_position(10_000, 0);
        assert!(Replay::resume(file.path(), decoder(), Some(&far), false).unwrap_err().contains("fewer lines"));
        assert!(Replay::resume(Path::new("/nonexistent"), decoder(), None, false).unwrap_err().contains("cannot open"));
    }
}
