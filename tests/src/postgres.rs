//! A private PostgreSQL per test (issue #15): `initdb` into a temp dir, the server on a free
//! loopback port with its socket in that dir, started as a child process so a test can SIGKILL it
//! and start it again on the same data. Never the machine's own server.
//!
//! As root (CI), the server runs as the `postgres` user that Debian's `postgresql` package creates
//! (PostgreSQL refuses to run as root), through `setpriv`, which execs, so the child's pid is the
//! server's.

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
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        let ready = wait_until("PostgreSQL to accept connections", Duration::from_secs(60), || {
            Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "backhaul", "-q"])
                .status()
                .is_ok_and(|s| s.success())
        });
        ready.with_context(|| format!("PostgreSQL log:\n{}", self.log()))
    }

    /// `postgres://backhaul@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://backhaul@127.0.0.1:{}/postgres", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// SIGKILL (a crash: no shutdown checkpoint; the next start recovers from the WAL).
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            crate::kill9(&mut child)?;
        }
        // Its backends exit once the postmaster is gone; the next start waits for them.
        Ok(())
    }

    /// Starts it again on the same data and port.
    pub fn restart(&mut self) -> Result<()> {
        // A killed postmaster leaves postmaster.pid; PostgreSQL removes a stale one itself once the
        // old backends are gone (it checks the pid and the shared memory).
        let pid_file = self.data().join("postmaster.pid");
        wait_until("the killed server's backends to exit", Duration::from_secs(30), || {
            !shared_memory_in_use(&pid_file)
        })?;
        self.spawn()
    }
}

/// Whether a killed server's backends still run (their pids are children of the dead postmaster;
/// `pg_ctl status` cannot tell). Checked through /proc: any process whose command line names the
/// data dir.
fn shared_memory_in_use(pid_file: &Path) -> bool {
    let Some(data) = pid_file.parent().and_then(|d| d.to_str()) else { return false };
    let Ok(procs) = std::fs::read_dir("/proc") else { return false };
    procs.flatten().any(|p| {
        std::fs::read(p.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(data))
            || std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| cwd.to_str() == Some(data))
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
        let _ = self.kill9();
        // Let its backends go before the temp dir is removed.
        let pid_file = self.data().join("postmaster.pid");
        let _ = wait_until("the backends to exit", Duration::from_secs(10), || !shared_memory_in_use(&pid_file));
    }
}
