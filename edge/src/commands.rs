//! The command stage (issue #18): runs the typed commands an operator sends through the cloud
//! (`backhaul_shared::command`), each exactly once in effect, and answers each.
//!
//! # Shape
//! One thread runs [`Stage::run`]. The link feeds it: over MQTT the link thread hands it every
//! message on `{prefix}/{device_id}/commands` ([`Incoming::Signed`]); over HTTP the stage fetches
//! `GET /api/v1/devices/{device_id}/commands?status=queued` itself every
//! `transport.http.command_poll`. Answers go back the same way: over MQTT through the forwarder's
//! thread (the one thread that publishes, so rumqttc's packet ids stay paired with batches), on
//! `{prefix}/{device_id}/command-results`; over HTTP with `POST .../commands/{id}/result`.
//!
//! # Exactly once in effect
//! - A command's id is written to the [`Journal`] (`data_dir/commands/{id}.json`, written to a
//!   temporary file, fsynced and renamed) **before** it runs, and its result after. A command whose
//!   id is in the journal is never run again: a redelivery (the broker's, or the cloud publishing
//!   again a command it has no answer for) gets the recorded result sent again. So a result lost
//!   in transit is resent, and a duplicated command runs once.
//! - A command found begun but without a result at start (the process died while running it) is
//!   answered `failed`, "interrupted", and not run again: the operator decides.
//! - An MQTT command is applied only if its envelope's MAC verifies with this device's API key
//!   (the key acks are verified with): whoever can publish on the topic but lacks the key cannot
//!   command the device. Unverified messages are counted and logged, never run.
//!
//! # Kinds
//! `replay` requeues retained acked batches online ([`Queue::requeue_acked`], then wakes the
//! forwarder); `set_rate` is persisted in `data_dir/rate-override.json` ([`RateOverride`]) and
//! applied to the forwarder's pace at once, and at every start from then on; `flush` asks the
//! pipeline to cut its open batch and waits up to [`FLUSH_WAIT`] for it; `ping` answers with the
//! status report; `rescan` asks the BLE scanner to reopen its adapter. A kind this edge does not
//! know is answered `failed`, naming it.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backhaul_shared::command::{
    CommandId, CommandKind, CommandMessage, CommandResult, CommandStatus, Purpose, Signed, COMMAND_TTL,
};
use backhaul_shared::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::queue::Queue;
use crate::status::StatusSource;
use crate::telemetry::Telemetry;

/// The largest sealed result published over MQTT, bytes (the cloud keeps at most 64 KiB of a
/// result; a ping's status report is a few KiB).
pub const MAX_RESULT_BYTES: usize = 60 << 10;

/// How long `flush` waits for the pipeline to cut the open batch.
pub const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// The journal is pruned (entries older than [`COMMAND_TTL`] removed) at open and after this
/// many writes.
const PRUNE_EVERY: u64 = 100;

/// What reaches the stage.
#[derive(Debug)]
pub enum Incoming {
    /// A message from the MQTT commands topic: a [`Signed`] [`CommandMessage`].
    Signed(Vec<u8>),
    /// Stop.
    Shutdown,
}

/// One command's record in the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub command_id: CommandId,
    pub command: serde_json::Value,
    pub started_at: Timestamp,
    /// `None`: begun and not finished (a crash while it ran).
    pub result: Option<CommandResult>,
}

/// The durable record of the commands this device has begun (see the module docs).
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    writes: std::sync::atomic::AtomicU64,
}

impl Journal {
    /// Opens `data_dir/commands` (created 0700), answering `failed` for commands a crash
    /// interrupted, and removing entries older than [`COMMAND_TTL`] (commands that old are
    /// refused anyway; never a younger one, whose command could be delivered again).
    ///
    /// Errors: the directory cannot be made or read (the message names it).
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = data_dir.join("commands");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let journal = Self { dir, writes: Default::default() };
        journal.prune()?;
        for id in journal.ids()? {
            if let Ok(Some(mut entry)) = journal.get(id) {
                if entry.result.is_none() {
                    tracing::warn!(command_id = %id, "a command was interrupted by a restart while it ran: answered failed, not run again");
                    entry.result = Some(failed(
                        id,
                        "interrupted: backhaul-edge stopped while this command ran; it is not run again (send it again if \
                         it is still wanted)",
                    ));
                    journal.write(&entry)?;
                }
            }
        }
        Ok(journal)
    }

    /// Removes the entries of commands older than [`COMMAND_TTL`].
    fn prune(&self) -> std::io::Result<()> {
        for id in self.ids()? {
            if too_old(id) {
                let _ = std::fs::remove_file(self.path(id));
            }
        }
        Ok(())
    }

    fn path(&self, id: CommandId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn ids(&self) -> std::io::Result<Vec<CommandId>> {
        let mut ids = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse().ok()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// The entry for `id`, if it was begun (`Ok(None)`: never). A damaged entry counts as begun
    /// and interrupted. Errors: the entry exists but cannot be read (the caller must not run the
    /// command: it may have run).
    pub fn get(&self, id: CommandId) -> std::io::Result<Option<Entry>> {
        let bytes = match std::fs::read(self.path(id)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(serde_json::from_slice(&bytes).unwrap_or_else(|_| Entry {
            command_id: id,
            command: serde_json::Value::Null,
            started_at: Timestamp::now(),
            result: Some(failed(id, "the journal entry of this command is damaged; it is not run again")),
        })))
    }

    /// Writes `entry` durably ([`replace_file`]); prunes every [`PRUNE_EVERY`] writes.
    pub fn write(&self, entry: &Entry) -> std::io::Result<()> {
        replace_file(&self.path(entry.command_id), &serde_json::to_vec(entry).expect("an entry serializes"))?;
        if self.writes.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune()?;
        }
        Ok(())
    }
}

/// Whether a command is older than [`COMMAND_TTL`] by its id's time against this device's clock
/// (`crate::clock`, never below its floor).
fn too_old(id: CommandId) -> bool {
    let now_ms = crate::clock::now().unix_millis().max(0) as u64;
    now_ms.saturating_sub(id.timestamp_ms()) > COMMAND_TTL.as_millis() as u64
}

/// Replaces `path` with `bytes`, private (0600), through `init`'s atomic write (a temporary
/// file, fsync, rename, fsync of the directory): a crash or power cut leaves the old file or the
/// new one, never a mix. Errors: any of those steps', with the path.
fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::init::write_atomically(path, bytes, 0o600, true)
        .map(|_| ())
        .map_err(|e| std::io::Error::other(format!("{e:#}")))
}

fn failed(id: CommandId, error: &str) -> CommandResult {
    CommandResult {
        command_id: id,
        status: CommandStatus::Failed,
        result: json!({ "error": error }),
        finished_at: Timestamp::now(),
    }
}

/// The send pace an operator set with `set_rate`, kept in `data_dir/rate-override.json`; it wins
/// over `transport.rate_per_sec`/`burst` until the next `set_rate` (or until the file is
/// removed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateOverride {
    pub rate_per_sec: u32,
    pub burst: u32,
    pub command_id: CommandId,
    pub set_at: Timestamp,
}

impl RateOverride {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("rate-override.json")
    }

    /// The override in `data_dir`, if any. Errors: the file exists but cannot be read, or is not
    /// a valid override (the message names the file and what to do).
    pub fn load(data_dir: &Path) -> Result<Option<Self>, String> {
        let path = Self::path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let o: Self = serde_json::from_slice(&bytes).map_err(|e| {
            format!("{} is not a rate override ({e}): remove it to use the config's rate", path.display())
        })?;
        CommandKind::SetRate { rate_per_sec: o.rate_per_sec, burst: o.burst }
            .validate()
            .map_err(|(_, m)| format!("{}: {m}; remove it to use the config's rate", path.display()))?;
        Ok(Some(o))
    }

    /// Writes it durably ([`replace_file`]).
    pub fn store(&self, data_dir: &Path) -> std::io::Result<()> {
        replace_file(&Self::path(data_dir), &serde_json::to_vec_pretty(self).expect("an override serializes"))
    }
}

/// What a command acts on: the running service's handles.
pub struct Effects {
    pub queue: Queue,
    pub telemetry: Arc<Telemetry>,
    pub status: StatusSource,
    pub data_dir: PathBuf,
    /// `source.kind`: only `ble` can rescan.
    pub source_kind: &'static str,
    /// Wakes the forwarder: there is something to send (after a replay).
    pub wake_forwarder: Box<dyn Fn() + Send>,
    /// Applies a new pace to the forwarder.
    pub set_rate: Box<dyn Fn(u32, u32) + Send>,
}

impl std::fmt::Debug for Effects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Effects")
            .field("data_dir", &self.data_dir)
            .field("source_kind", &self.source_kind)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Answers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mqtt { .. } => f.write_str("Answers::Mqtt"),
            Self::Http { client, poll } => {
                f.debug_struct("Answers::Http").field("client", client).field("poll", poll).finish()
            }
        }
    }
}

/// Where answers go.
pub enum Answers {
    /// Sealed and handed to the forwarder, which publishes them on the command-results topic.
    Mqtt { publish: Box<dyn Fn(Vec<u8>) + Send> },
    /// Posted to the cloud; commands are fetched from it every `poll`.
    Http { client: Box<crate::forward::http::CommandClient>, poll: Duration },
}

/// The command stage. See the module docs.
pub struct Stage {
    pub journal: Journal,
    pub effects: Effects,
    pub answers: Answers,
    pub device_id: String,
    /// The device's API key: MQTT envelopes are verified and sealed with it. `None`: MQTT
    /// commands cannot be verified and are ignored. Never logged.
    pub key: Option<Vec<u8>>,
    /// The last kind of command-fetch failure said (HTTP), so it is said once.
    pub fetch_error: Option<String>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("device_id", &self.device_id)
            .field("answers", &self.answers)
            .field("key", &self.key.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl Stage {
    /// Runs until [`Incoming::Shutdown`] or every sender is gone.
    pub fn run(mut self, rx: Receiver<Incoming>) {
        let mut next_poll = Instant::now();
        loop {
            let wait = match &self.answers {
                Answers::Http { .. } => next_poll.saturating_duration_since(Instant::now()),
                Answers::Mqtt { .. } => Duration::from_secs(3600),
            };
            match rx.recv_timeout(wait) {
                Ok(Incoming::Signed(bytes)) => self.signed(&bytes),
                Ok(Incoming::Shutdown) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if let Answers::Http { poll, .. } = &self.answers {
                if Instant::now() >= next_poll {
                    next_poll = Instant::now() + *poll;
                    self.fetch();
                }
            }
        }
    }

    fn signed(&mut self, bytes: &[u8]) {
        let key = self.key.clone();
        let message = serde_json::from_slice::<Signed>(bytes).ok().and_then(|s| {
            let body = s.open(Purpose::Command, &self.device_id, key.as_deref()?)?;
            serde_json::from_str::<CommandMessage>(body).ok()
        });
        match message {
            Some(m) => {
                let result = self.handle(m);
                self.answer(&result);
            }
            None => {
                let n = self.effects.telemetry.commands_unverified.fetch_add(1, Ordering::Relaxed) + 1;
                if self.key.is_none() && (n == 1 || n.is_multiple_of(100)) {
                    tracing::warn!(
                        ignored_so_far = n,
                        "ignored a command from the cloud: no API key is set (BACKHAUL_API_KEY or transport.http.api_key_file) \
                         to verify it with"
                    );
                } else if n == 1 || n.is_multiple_of(100) {
                    tracing::warn!(
                        ignored_so_far = n,
                        "ignored a message on the commands topic that is not a command signed with this device's key \
                         (BACKHAUL_API_KEY is not the key the cloud has for this device, or something other than the \
                         cloud publishes there: check the broker's ACL)"
                    );
                }
            }
        }
    }

    fn fetch(&mut self) {
        let Answers::Http { client, .. } = &self.answers else { return };
        let messages = match client.fetch() {
            Ok(m) => {
                self.fetch_error = None;
                m
            }
            Err(e) => {
                // Said once per kind of failure (a wrong key or URL would otherwise stop commands
                // silently), then at debug level while it lasts.
                let kind: String = e.chars().take_while(|c| *c != ':').collect();
                if self.fetch_error.as_deref() != Some(kind.as_str()) {
                    tracing::warn!(error = %e, "fetching commands from the cloud failed; trying again every poll (check transport.http.url and BACKHAUL_API_KEY if it lasts)");
                    self.fetch_error = Some(kind);
                } else {
                    tracing::debug!(error = %e, "fetching commands failed again");
                }
                return;
            }
        };
        for m in messages {
            let result = self.handle(m);
            self.answer(&result);
        }
    }

    fn answer(&self, result: &CommandResult) {
        match &self.answers {
            Answers::Mqtt { publish } => match &self.key {
                Some(key) => {
                    let seal = |r: &CommandResult| {
                        serde_json::to_vec(&Signed::seal(r, Purpose::Result, &self.device_id, key))
                            .expect("an envelope serializes")
                    };
                    let mut payload = seal(result);
                    if payload.len() > MAX_RESULT_BYTES {
                        let error = format!("the result is {} bytes, over the {MAX_RESULT_BYTES} sent", payload.len());
                        tracing::warn!(command_id = %result.command_id, "{error}");
                        payload = seal(&CommandResult {
                            status: CommandStatus::Failed,
                            result: json!({ "error": error }),
                            ..result.clone()
                        });
                    }
                    publish(payload)
                }
                None => tracing::warn!("no API key: a command result cannot be signed and is not sent"),
            },
            Answers::Http { client, .. } => {
                if let Err(e) = client.answer(result) {
                    tracing::warn!(error = %e, command_id = %result.command_id, "sending a command result failed; it is sent again when the cloud asks again");
                }
            }
        }
    }

    /// Runs a command once (see the module docs) and returns its result, or the one recorded.
    pub fn handle(&mut self, m: CommandMessage) -> CommandResult {
        match self.journal.get(m.command_id) {
            Ok(None) => {}
            Ok(Some(entry)) => {
                tracing::info!(command_id = %m.command_id, "a command delivered again: not run again, its result is sent again");
                self.effects.telemetry.commands_redelivered.fetch_add(1, Ordering::Relaxed);
                return entry.result.unwrap_or_else(|| failed(m.command_id, "interrupted"));
            }
            Err(e) => {
                tracing::error!(error = %e, command_id = %m.command_id, "the command journal cannot be read: the command is not run");
                return failed(
                    m.command_id,
                    &format!("not run: its entry in data_dir/commands cannot be read ({e}); it may have run already"),
                );
            }
        }
        if too_old(m.command_id) {
            tracing::warn!(command_id = %m.command_id, "refused a command older than its time to live");
            return failed(
                m.command_id,
                &format!(
                    "not run: the command is older than {} days (the cloud has given up on it; send it again)",
                    COMMAND_TTL.as_secs() / 86_400
                ),
            );
        }
        let mut entry =
            Entry { command_id: m.command_id, command: m.command.clone(), started_at: Timestamp::now(), result: None };
        let begun = self.journal.write(&entry);
        // Test-only fault injection: the process dies between the journal's record and the run.
        if begun.is_ok() && std::env::var("BACKHAUL_FAILPOINT").as_deref() == Ok("abort_after_journal") {
            eprintln!("FAILPOINT abort_after_journal: the process dies with the command recorded, not run");
            std::process::abort();
        }
        if let Err(e) = begun {
            tracing::error!(error = %e, command_id = %m.command_id, "cannot record a command before running it: not run");
            return failed(
                m.command_id,
                &format!("not run: the command could not be recorded in data_dir/commands first ({e})"),
            );
        }
        let result = match serde_json::from_value::<CommandKind>(m.command.clone()) {
            Ok(kind) => {
                tracing::info!(command_id = %m.command_id, kind = kind.name(), "running a command from the cloud");
                match self.execute(m.command_id, &kind) {
                    Ok(result) => CommandResult {
                        command_id: m.command_id,
                        status: CommandStatus::Done,
                        result,
                        finished_at: Timestamp::now(),
                    },
                    Err(error) => failed(m.command_id, &error),
                }
            }
            Err(e) => failed(
                m.command_id,
                &format!(
                    "this backhaul-edge ({}) cannot run this command ({e}); upgrade it for newer kinds",
                    env!("CARGO_PKG_VERSION")
                ),
            ),
        };
        self.effects.telemetry.commands_run.fetch_add(1, Ordering::Relaxed);
        entry.result = Some(result.clone());
        if let Err(e) = self.journal.write(&entry) {
            tracing::warn!(error = %e, command_id = %m.command_id, "recording a command's result failed; a redelivery is answered \"interrupted\"");
        }
        result
    }

    fn execute(&mut self, id: CommandId, kind: &CommandKind) -> Result<serde_json::Value, String> {
        let e = &self.effects;
        match kind {
            CommandKind::Replay { since, until } => {
                let to_system = |t: &Timestamp| std::time::SystemTime::from(t.as_offset_date_time());
                if e.queue.config().retain_acked.is_zero() {
                    return Err("nothing to replay: queue.retain_acked is 0, so acked batches are not kept".into());
                }
                let n = e
                    .queue
                    .requeue_acked(to_system(since), until.as_ref().map(to_system))
                    .map_err(|err| format!("requeueing acked batches failed: {err}"))?;
                (e.wake_forwarder)();
                Ok(json!({ "requeued_batches": n }))
            }
            CommandKind::SetRate { rate_per_sec, burst } => {
                // A set_rate delivered late (a redelivery after a restart) must not undo a newer
                // one: ids are ULIDs, ordered by the time the cloud made them.
                if let Ok(Some(current)) = RateOverride::load(&e.data_dir) {
                    if current.command_id > id {
                        return Ok(json!({ "superseded_by": current.command_id, "rate_per_sec": current.rate_per_sec,
                                          "burst": current.burst, "persisted": false }));
                    }
                }
                let o = RateOverride {
                    rate_per_sec: *rate_per_sec,
                    burst: *burst,
                    command_id: id,
                    set_at: Timestamp::now(),
                };
                o.store(&e.data_dir).map_err(|err| {
                    format!("not applied: {} could not be written ({err})", RateOverride::path(&e.data_dir).display())
                })?;
                (e.set_rate)(*rate_per_sec, *burst);
                e.telemetry.set_rate(*rate_per_sec, *burst, Some(&o));
                tracing::info!(rate_per_sec, burst, command_id = %id, "send rate set by an operator's command (kept across restarts)");
                Ok(json!({ "rate_per_sec": rate_per_sec, "burst": burst, "persisted": true }))
            }
            CommandKind::Flush => {
                let mine = e.telemetry.flush_requests.fetch_add(1, Ordering::SeqCst) + 1;
                let deadline = Instant::now() + FLUSH_WAIT;
                while e.telemetry.flushes_done.load(Ordering::SeqCst) < mine {
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "the pipeline did not cut its batch within {FLUSH_WAIT:?} (is it waiting for room in a full \
                             queue?); it cuts it when it gets to it"
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(json!({ "cut_detections": e.telemetry.last_flush_detections.load(Ordering::SeqCst) }))
            }
            CommandKind::Ping => {
                let report = e.status.report().map_err(|err| format!("the queue cannot be read: {err}"))?;
                Ok(serde_json::to_value(report).unwrap_or_default())
            }
            CommandKind::Rescan => {
                if e.source_kind != "ble" {
                    return Err(format!("source.kind is `{}`: only the BLE scanner can rescan", e.source_kind));
                }
                e.telemetry.rescan.notify_one();
                Ok(json!({ "rescan": "requested: the scanner reopens its adapter" }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_command_is_answered_failed_at_open_and_old_entries_go() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let id = CommandId::new();
        j.write(&Entry {
            command_id: id,
            command: json!({"kind": "ping"}),
            started_at: Timestamp::now(),
            result: None,
        })
        .unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let r = j.get(id).unwrap().unwrap().result.unwrap();
        assert_eq!(r.status, CommandStatus::Failed);
        assert!(r.result["error"].as_str().unwrap().contains("interrupted"), "{r:?}");
        let damaged = CommandId::new();
        std::fs::write(j.path(damaged), b"not json").unwrap();
        assert_eq!(j.get(damaged).unwrap().unwrap().result.unwrap().status, CommandStatus::Failed);
        // An entry older than the time to live goes at the next open; a recent one stays.
        let old = old_id();
        j.write(&Entry { command_id: old, command: json!(null), started_at: Timestamp::now(), result: None }).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.get(old).unwrap().is_none(), "the old entry went");
        assert!(j.get(id).unwrap().is_some());
    }

    /// An id made eight days ago.
    fn old_id() -> CommandId {
        id_made_ago(8 * 86_400_000)
    }

    /// An id made `ms_ago` milliseconds ago.
    fn id_made_ago(ms_ago: u64) -> CommandId {
        let ms = Timestamp::now().unix_millis() as u64 - ms_ago;
        let mut bytes = [7u8; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        serde_json::from_value(json!(ulid::Ulid::from_bytes(bytes).to_string())).unwrap()
    }

    fn stage(dir: &Path) -> Stage {
        let queue = Queue::open(
            &dir.join("data"),
            crate::queue::QueueConfig { durability: crate::queue::Durability::Flush, ..Default::default() },
        )
        .unwrap();
        let telemetry = Arc::new(Telemetry::new("pi", "test"));
        Stage {
            journal: Journal::open(&dir.join("data")).unwrap(),
            effects: Effects {
                status: StatusSource::new(queue.clone(), telemetry.clone()),
                queue,
                telemetry,
                data_dir: dir.join("data"),
                source_kind: "simulated",
                wake_forwarder: Box::new(|| {}),
                set_rate: Box::new(|_, _| {}),
            },
            answers: Answers::Mqtt { publish: Box::new(|_| {}) },
            device_id: "pi".into(),
            key: None,
            fetch_error: None,
        }
    }

    #[test]
    fn unknown_kinds_fail_old_commands_are_refused_and_an_older_set_rate_never_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut stage = stage(dir.path());
        let run = |s: &mut Stage, id: CommandId, command: serde_json::Value| {
            s.handle(CommandMessage { command_id: id, command })
        };
        let r = run(&mut stage, CommandId::new(), json!({"kind": "reboot", "now": true}));
        assert_eq!(r.status, CommandStatus::Failed);
        assert!(r.result["error"].as_str().unwrap().contains("cannot run this command"), "{r:?}");
        let r = run(&mut stage, old_id(), json!({"kind": "ping"}));
        assert!(r.result["error"].as_str().unwrap().contains("older than 7 days"), "{r:?}");
        assert_eq!(stage.effects.telemetry.commands_run.load(Ordering::Relaxed), 1, "the old one did not run");
        // Two set_rates; the older one arrives last (a redelivery) and does not undo the newer.
        let (older, newer) = (id_made_ago(2000), id_made_ago(1000));
        assert!(older < newer);
        let set = |rate: u32| json!({"kind": "set_rate", "rate_per_sec": rate, "burst": rate});
        assert_eq!(run(&mut stage, newer, set(20)).status, CommandStatus::Done);
        let r = run(&mut stage, older, set(10));
        assert_eq!((r.status, &r.result["superseded_by"]), (CommandStatus::Done, &json!(newer.to_string())), "{r:?}");
        let o = RateOverride::load(&dir.path().join("data")).unwrap().unwrap();
        assert_eq!((o.rate_per_sec, o.command_id), (20, newer));
        // Run once: the same id again is answered from the journal.
        let again = run(&mut stage, newer, set(20));
        assert_eq!(again.result["rate_per_sec"], 20);
        assert_eq!(stage.effects.telemetry.commands_redelivered.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_rate_override_round_trips_and_a_bad_one_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RateOverride::load(dir.path()).unwrap(), None);
        let o = RateOverride { rate_per_sec: 7, burst: 9, command_id: CommandId::new(), set_at: Timestamp::now() };
        o.store(dir.path()).unwrap();
        assert_eq!(RateOverride::load(dir.path()).unwrap(), Some(o));
        std::fs::write(RateOverride::path(dir.path()), br#"{"rate_per_sec":0,"burst":1,"command_id":"01JD3Q8Z9X6K1V2B3N4M5P6Q7R","set_at":"2026-11-30T00:00:00Z"}"#).unwrap();
        assert!(RateOverride::load(dir.path()).unwrap_err().contains("rate-override.json"));
    }
}
