//! A private PostgreSQL per test (issue #15): `initdb` into a temp dir, the server on a free
//! loopback port with its socket in that dir, started as a child process so a test can SIGKILL it
//! and start it again on the same data. Never the machine's own server.
//!
//! As root (CI), the server runs as the `postgres` user that Debian's `postgresql` package creates
//! (PostgreSQL refuses to run as root), through `setpriv`, which execs, so the child's pid is the
//! server's.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{free_port, is_root, wait_until};

/// A private PostgreSQL server. Killed when dropped.
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// The directory of PostgreSQL's server programs (`initdb`, `postgres`, `pg_isready`): Debian
/// keeps them in `/usr/lib/postgresql/N/bin`, off the PATH.
fn bin_dir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).filter(|b| b.join("initdb").exists()).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop().context(
        "PostgreSQL is not installed (no /usr/lib/postgresql/N/bin/initdb): run the README's test command \
         (it installs it), or `apt-get install postgresql`",
    )
}

impl Postgres {
    /// initdb (trust authentication for the user `backhaul`, on loopback only) and start.
    pub fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("backhaul-postgres-").tempdir()?;
        if is_root() {
            let status = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path()).status()?;
            if !status.success() {
                bail!("chown of the PostgreSQL temp dir to the postgres user failed");
            }
        }
        let data = dir.path().join("data");
        let out = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "backhaul", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut pg = Self { port: free_port()?, dir, bin, child: None };
        pg.spawn()?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join("postgres.log"))?;
        let child = as_server_user(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=100"])
            // Its own process group: a SIGKILL of the group takes its backends too, at once.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        // Through our private socket dir, so another test's server on a reused port never answers.
        let ready = wait_until("PostgreSQL to accept connections", Duration::from_secs(60), || {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return true; // exited: reported below
            }
            Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(self.dir.path())
                .args(["-p", &self.port.to_string(), "-U", "backhaul", "-q"])
                .status()
                .is_ok_and(|s| s.success())
        });
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            bail!("postgres exited with {status} at start; its log:\n{}", self.log());
        }
        ready.with_context(|| format!("PostgreSQL log:\n{}", self.log()))
    }

    /// `postgres://backhaul@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://backhaul@127.0.0.1:{}/postgres", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// SIGKILL of the server and all its backends (a crash: no shutdown checkpoint; the next start
    /// recovers from the WAL), once they are all gone.
    pub fn kill9(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let group = child.id();
        // `kill` as a command (`unsafe_code` is denied workspace-wide): the whole process group.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{group}")]).status();
        let _ = child.wait();
        wait_until("the server's backends to exit", Duration::from_secs(30), || !group_alive(group))
    }

    /// Starts it again on the same data and port.
    pub fn restart(&mut self) -> Result<()> {
        self.spawn()
    }
}

/// Whether any process of process group `group` still runs (read from /proc/PID/stat, which
/// needs no privilege).
fn group_alive(group: u32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else { return false };
    procs.flatten().any(|p| {
        std::fs::read_to_string(p.path().join("stat")).is_ok_and(|stat| {
            // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(2).map(|g| g == group.to_string()))
                .unwrap_or(false)
                && !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    })
}

/// A command run as the `postgres` user when we are root (PostgreSQL refuses root), else as us.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Waits for its backends before the temp dir is removed.
        let _ = self.kill9();
    }
}
