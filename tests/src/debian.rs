//! A bare Debian root for the packaging tests (issue #21): `debootstrap --variant=minbase` of this
//! machine's release into a temp dir, and commands run in it with `chroot` inside a private mount
//! namespace (`unshare --mount`), so the `/proc`, `/dev` and bind mounts it needs vanish with the
//! command, whatever happens to the test.
//!
//! It needs root, `debootstrap`, `unshare` and `chroot`, and Debian's package mirror. Where any of
//! them is missing, [`DebianRoot::create`] says `SKIPPED` with the reason on stderr and returns
//! `None`: the tests that use it are `#[ignore]`d and run by `./scripts/test --full`, which
//! installs debootstrap first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// The host name commands in the root see.
pub const HOSTNAME: &str = "rpi-debian-root-01";

/// A directory bind-mounted into the root for one command.
#[derive(Debug, Clone)]
pub struct Bind {
    pub host: PathBuf,
    /// An absolute path inside the root.
    pub inside: String,
    pub read_only: bool,
}

#[derive(Debug)]
pub struct DebianRoot {
    dir: tempfile::TempDir,
}

impl DebianRoot {
    /// Makes a minimal root of this machine's Debian release with the packages `include` (e.g.
    /// `gcc`, `systemd`) added, or `None` with a loud `SKIPPED` line where it cannot be made here.
    ///
    /// # Errors
    /// debootstrap failing for another reason than a missing tool (its log's tail is in the error).
    pub fn create(test: &str, include: &[&str]) -> Result<Option<Self>> {
        let skip = |why: &str| {
            crate::skip(test, why);
            Ok(None)
        };
        if !crate::is_root() {
            return skip("debootstrap and chroot need root");
        }
        for tool in ["debootstrap", "unshare", "chroot"] {
            if crate::find_program(tool).is_none() {
                return skip(&format!("`{tool}` is not installed (./scripts/test --full installs debootstrap)"));
            }
        }
        let codename = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(|v| v.trim_matches('"').to_owned()))
            })
            .filter(|c| !c.is_empty());
        let Some(codename) = codename else { return skip("this machine is not Debian (no VERSION_CODENAME)") };
        // Big enough for a release build: not a tmpfs /tmp.
        let dir = tempfile::Builder::new().prefix("backhaul-debian-root-").tempdir_in("/var/tmp")?;
        let mut cmd = Command::new("debootstrap");
        cmd.arg("--variant=minbase");
        if !include.is_empty() {
            cmd.arg(format!("--include={}", include.join(",")));
        }
        cmd.arg(&codename).arg(dir.path());
        // This machine's own mirror, as apt is set up here; debootstrap's default otherwise.
        if let Some(mirror) = apt_mirror() {
            cmd.arg(mirror);
        }
        let log = dir.path().with_extension("log");
        let out = cmd.stdin(Stdio::null()).output().context("running debootstrap")?;
        if !out.status.success() {
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            let _ = std::fs::write(&log, &text);
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            bail!(
                "debootstrap {codename} failed (is Debian's mirror reachable?):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(Some(Self { dir }))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside the root, as seen from this machine.
    pub fn host_path(&self, inside: &str) -> PathBuf {
        self.dir.path().join(inside.trim_start_matches('/'))
    }

    /// Runs `script` with `/bin/sh -c` in the root (as root, with `/proc`, `/dev`, `/dev/pts`
    /// and `binds` mounted, this machine's network and environment `env`), to completion.
    pub fn run(&self, script: &str, binds: &[Bind], env: &[(&str, &str)]) -> Result<Output> {
        let root = self.dir.path().to_str().context("utf-8 root path")?;
        // Its own host name (a UTS namespace), as a Pi has: `init` takes the device id from it.
        let mut setup = format!(
            "set -e; hostname {HOSTNAME}; mount -t proc proc {root}/proc; mount --rbind /dev {root}/dev; \
             cp /etc/resolv.conf {root}/etc/resolv.conf 2>/dev/null || true; "
        );
        for b in binds {
            let host = b.host.to_str().context("utf-8 bind path")?;
            let target = format!("{root}/{}", b.inside.trim_start_matches('/'));
            setup.push_str(&format!("mkdir -p '{target}'; mount --bind '{host}' '{target}'; "));
            if b.read_only {
                setup.push_str(&format!("mount -o remount,bind,ro '{target}'; "));
            }
        }
        setup.push_str(&format!("exec chroot {root} /bin/sh -c \"$0\""));
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--uts", "--propagation", "private", "--fork", "/bin/sh", "-c", &setup, script])
            .stdin(Stdio::null())
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().context("running unshare/chroot")
    }

    /// [`DebianRoot::run`], failing unless the script exits 0; returns its stdout and stderr.
    pub fn ok(&self, script: &str, binds: &[Bind], env: &[(&str, &str)]) -> Result<String> {
        let out = self.run(script, binds, env)?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("in the Debian root, `{script}` failed ({}):\n{text}", out.status);
        }
        Ok(text)
    }
}

/// The first Debian mirror of this machine's apt sources (deb822 `URIs:` or a `deb` line).
fn apt_mirror() -> Option<String> {
    let mut files: Vec<PathBuf> = vec!["/etc/apt/sources.list".into()];
    if let Ok(d) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = d.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        for line in text.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else {
                None
            };
            if let Some(uri) = uri.filter(|u| !u.contains("security") && u.starts_with("http")) {
                return Some(uri.to_owned());
            }
        }
    }
    None
}
