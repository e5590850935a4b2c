//! Test harness: a private Mosquitto per test, the project's own binaries as child processes, and
//! waits that are conditions with deadlines (never a fixed sleep that hopes).
//!
//! Everything listens on 127.0.0.1 on ports picked free at start, and lives in a temp dir removed on
//! drop, so tests run in parallel and never depend on what a previous run left behind.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod chaos;
pub mod cloud;
pub mod debian;
pub mod edge;
pub mod http_stub;
pub mod mqtt;
pub mod pki;
pub mod postgres;
pub mod powercut;

/// Whether a test that cannot run here must fail instead of printing SKIPPED and passing:
/// `BACKHAUL_TEST_NO_SKIP=1`, which `./scripts/test --full` sets (so a long run that skipped its
/// packaging or power-cut tests does not look green).
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("BACKHAUL_TEST_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("{test} cannot run here ({why}) and BACKHAUL_TEST_NO_SKIP=1 (./scripts/test --full) forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Polls `check` until it returns `Some`, or fails after `timeout` naming `what` was awaited.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Polls `check` until it is true, or fails after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    wait_for(what, timeout, || check().then_some(()))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

fn accepts_connections(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Finds a program on PATH or in the sbin directories Debian installs daemons to.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Sends SIGKILL to a child and reaps it.
pub fn kill9(child: &mut Child) -> Result<()> {
    // `Child::kill` is SIGKILL on Unix.
    match child.kill() {
        Ok(()) => {}
        // Already exited: nothing to kill, but still reap it below.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
        Err(e) => return Err(e).context("sending SIGKILL"),
    }
    child.wait().context("reaping the killed process")?;
    Ok(())
}

/// Sends SIGTERM (a graceful stop request).
pub fn sigterm(child: &Child) -> Result<()> {
    // `unsafe_code` is denied workspace-wide, so no libc::kill: the `kill` command does the same.
    let pid = child.id();
    let status = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().context("running kill")?;
    if !status.success() {
        bail!("kill -TERM {pid} failed");
    }
    Ok(())
}

/// Options for a test broker. The default: no persistence, unlimited queues and in-flight windows.
#[derive(Debug, Clone, Default)]
pub struct MosquittoOptions {
    /// Keep messages in a persistence file (snapshotted at `autosave_interval` and on a clean exit,
    /// not on SIGKILL).
    pub persistence: bool,
    /// Per-client queue limit; 0 = unlimited (Mosquitto's default is 1000, which silently drops).
    pub max_queued_messages: u32,
    /// Per-client in-flight limit.
    pub max_inflight_messages: u32,
    /// `allow_anonymous false`: every client needs a login (a `password_file` in `extra`).
    pub require_login: bool,
    /// Extra configuration lines (e.g. a bridge).
    pub extra: String,
}

/// A private Mosquitto on a free loopback port, in its own temp dir. Killed when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker with default options (no persistence, unlimited queues).
    pub fn start() -> Result<Self> {
        Self::start_with(MosquittoOptions::default())
    }

    pub fn start_with(options: MosquittoOptions) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("backhaul-mosquitto-").tempdir()?;
        let port = free_port()?;
        // Run as whoever we are: as root Mosquitto would otherwise drop to the `mosquitto` user and
        // then could not write its persistence file into our root-owned temp dir.
        let user = if is_root() { "user root\n" } else { "" };
        let config = format!(
            "{user}listener {port} 127.0.0.1\n\
             allow_anonymous {anonymous}\n\
             persistence {persistence}\n\
             persistence_location {dir}/\n\
             autosave_interval 1800\n\
             max_queued_messages {mq}\n\
             max_inflight_messages {mi}\n\
             log_dest file {dir}/mosquitto.log\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             connection_messages true\n{extra}\n",
            persistence = options.persistence,
            anonymous = !options.require_login,
            dir = dir.path().display(),
            mq = options.max_queued_messages,
            mi = options.max_inflight_messages,
            extra = options.extra,
        );
        std::fs::write(dir.path().join("mosquitto.conf"), config)?;
        let mut broker = Self { dir, port, child: None };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> Result<()> {
        let program = find_program("mosquitto").context(
            "mosquitto is not installed: run the README's test command (it installs it), \
             or `apt-get install mosquitto`",
        )?;
        let child = Command::new(program)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        self.child = Some(child);
        let addr = self.addr();
        let started = wait_until("mosquitto to accept connections", Duration::from_secs(10), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                // Exited already (e.g. the port was taken): retrying won't help.
                let _ = status;
                return true;
            }
            accepts_connections(addr)
        });
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            bail!("mosquitto exited with {status} at start; its log:\n{}", self.log());
        }
        started.with_context(|| format!("mosquitto log:\n{}", self.log()))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker process's id while it runs (for a benchmark's CPU accounting).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// SIGKILL: no clean shutdown, no persistence snapshot.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            kill9(&mut child)?;
        }
        Ok(())
    }

    /// Starts the broker again on the same port (after [`Mosquitto::kill9`]).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        // The port is free as soon as the process is gone (Mosquitto sets SO_REUSEADDR).
        self.spawn()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Subscribes `filter` with QoS 1 as a persistent session `client_id` and disconnects
    /// (`mosquitto_sub -c -E`): the broker then keeps matching messages for it, as for a
    /// backhaul-cloud that is away, and PUBACKs them with MQTT 5 reason code 0x00, not 0x10 (no
    /// matching subscribers).
    pub fn persistent_subscriber(&self, client_id: &str, filter: &str) -> Result<()> {
        let program = find_program("mosquitto_sub").context("mosquitto_sub is not installed (mosquitto-clients)")?;
        let status = Command::new(program)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-c",
                "-i",
                client_id,
                "-q",
                "1",
                "-E",
                "-t",
                filter,
            ])
            .stdin(Stdio::null())
            .status()
            .context("running mosquitto_sub")?;
        if !status.success() {
            bail!("mosquitto_sub -E failed: {status}");
        }
        Ok(())
    }

    /// SIGHUP: Mosquitto reloads its configuration, ACL file included, keeping its connections.
    pub fn reload(&self) -> Result<()> {
        let pid = self.child.as_ref().context("mosquitto is not running")?.id();
        let status = Command::new("kill").arg("-HUP").arg(pid.to_string()).status().context("running kill")?;
        if !status.success() {
            bail!("kill -HUP {pid} failed");
        }
        Ok(())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// Whether this process runs as root (uid 0).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// Path of one of the workspace's binaries (`backhaul-edge`, `backhaul-cloud`), built by
/// `cargo test --workspace` (each binary's crate has an integration test, so cargo builds it first).
pub fn binary(name: &str) -> Result<PathBuf> {
    let var = format!("CARGO_BIN_EXE_{name}");
    if let Some(p) = std::env::var_os(&var) {
        return Ok(PathBuf::from(p));
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/<name>
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("test binary is not under target/<profile>/deps")?;
    let path = profile_dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first with `cargo build --workspace` (the README's test command does)",
            path.display()
        );
    }
    Ok(path)
}

/// One of the project's binaries running as a child process, its stdout and stderr collected line
/// by line. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Lines before this index were passed over by `wait_for_line`.
    consumed: usize,
}

impl Process {
    /// Runs `name` (a workspace binary) with `args` and extra environment.
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::spawn_program(name, &binary(name)?, args, env)
    }

    /// Runs `program` (e.g. `qemu-aarch64-static` in front of a cross-built binary), named `name`
    /// in errors, with `args` and extra environment.
    pub fn spawn_program(name: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().context("stdout piped")?;
        let stderr = child.stderr.take().context("stderr piped")?;
        for (stream, prefix) in
            [(Box::new(stdout) as Box<dyn std::io::Read + Send>, ""), (Box::new(stderr), "stderr: ")]
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(format!("{prefix}{line}")).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self { name: name.to_owned(), child: Some(child), lines, seen: Vec::new(), consumed: 0 })
    }

    /// Every line printed so far (stdout as is, stderr prefixed `stderr: `).
    pub fn output(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// Every line the process printed, once it has exited (killed or not): waits, up to `timeout`,
    /// until both of its output pipes are closed and read to the end, so no line still in a pipe
    /// is missed.
    pub fn output_to_end(&mut self, timeout: Duration) -> Result<&[String]> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(&self.seen),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{}'s output did not end within {timeout:?} (is it still running?)", self.name)
                }
            }
        }
    }

    /// Waits for the next line matching `pred` after the last line this returned, and returns it.
    pub fn wait_for_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        self.output();
        if let Some(i) = self.seen[self.consumed..].iter().position(|l| pred(l)) {
            self.consumed += i + 1;
            return Ok(self.seen[self.consumed - 1].clone());
        }
        self.consumed = self.seen.len();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    self.consumed = self.seen.len();
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "{} printed no matching line within {timeout:?}; output:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for a line matching `pred` among everything printed so far or later (unlike
    /// [`Process::wait_for_line`], lines already passed over count: stdout and stderr interleave
    /// in no fixed order).
    pub fn wait_for_any_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        self.output();
        if let Some(line) = self.seen.iter().find(|l| pred(l)) {
            return Ok(line.clone());
        }
        self.wait_for_line(timeout, pred)
    }

    /// Waits for the process to exit; returns its exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let child = self.child.as_mut().context("process already reaped")?;
        let status = wait_for(&format!("{} to exit", self.name), timeout, || child.try_wait().ok().flatten())?;
        // Drain the rest of the output: the reader threads end when the pipes close.
        let drain_deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(line) = self.lines.recv_timeout(drain_deadline.saturating_duration_since(Instant::now())) {
            self.seen.push(line);
        }
        self.child = None;
        Ok(status.code())
    }

    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            kill9(&mut child)?;
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn child(&self) -> Option<&Child> {
        self.child.as_ref()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// Runs a workspace binary to completion and returns (exit code, stdout, stderr).
pub fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<(i32, String, String)> {
    let mut cmd = Command::new(binary(name)?);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().with_context(|| format!("running {name}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Batch number `n` of a queue test child (`queue-crash-child`, `queue-power-cut-child`):
/// `detections` presence detections whose hashes are `n * 1000 + i` (so a checker can tell which
/// batch it holds), and `n` as its source position (little-endian), as a resumable source stores it.
pub fn numbered_batch(device_id: &str, n: u64, detections: u64) -> backhaul_edge::queue::NewBatch {
    let hashes = (0..detections).map(|i| n * 1000 + i);
    presence_batch_of(device_id, hashes, -70, backhaul_shared::Zone::Medium, Some(n.to_le_bytes().to_vec()))
}

/// A batch of `detections` presence detections for `device_id`, to enqueue in tests.
pub fn presence_batch(device_id: &str, detections: usize) -> backhaul_edge::queue::NewBatch {
    presence_batch_of(device_id, 0..detections as u64, -60, backhaul_shared::Zone::Near, None)
}

/// Presence detections with the hashes `hashes` (as 16 hex digits), all at `rssi` in `zone`.
fn presence_batch_of(
    device_id: &str,
    hashes: impl Iterator<Item = u64>,
    rssi: i16,
    zone: backhaul_shared::Zone,
    source_position: Option<Vec<u8>>,
) -> backhaul_edge::queue::NewBatch {
    use backhaul_shared::{Detection, Presence, Timestamp};
    backhaul_edge::queue::NewBatch {
        device_id: device_id.into(),
        name: None,
        location: None,
        timestamp: Timestamp::now(),
        detections: hashes
            .map(|h| {
                Detection::Presence(Presence {
                    device_hash: format!("{h:016x}"),
                    rssi,
                    zone,
                    timestamp: Timestamp::now(),
                })
            })
            .collect(),
        source_position,
        batch_id: None,
        clock: Default::default(),
    }
}

/// A schema-1 batch as a device would send it.
pub fn wire_batch(device_id: &str, seq: u64, detections: usize) -> backhaul_shared::Batch {
    use backhaul_shared::{Batch, BatchId, Detection, Presence, Timestamp, Zone};
    Batch {
        clock: Default::default(),
        schema: 1,
        batch_id: BatchId::new(),
        device_id: device_id.into(),
        seq,
        name: Some("Test Pi".into()),
        location: Some("Lab".into()),
        timestamp: Timestamp::now(),
        detections: (0..detections)
            .map(|i| {
                Detection::Presence(Presence {
                    device_hash: format!("{:016x}", seq * 10_000 + i as u64),
                    rssi: -60,
                    zone: Zone::Near,
                    timestamp: Timestamp::now(),
                })
            })
            .collect(),
    }
}

/// A small tmpfs the test mounts (root only), unmounted on drop: a real full disk.
#[derive(Debug)]
pub struct Tmpfs(PathBuf, tempfile::TempDir);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "3m"); `None`, with a loud message, where mounting is not
    /// permitted (the calling test then skips).
    pub fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("\n*** SKIPPED: cannot mount a tmpfs here (needs root); the disk-full test did not run ***\n");
            return None;
        }
        Some(Self(dir.path().to_owned(), dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = self.1.path();
    }
}
