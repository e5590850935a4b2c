//! On a Pi in minutes (issue #21): `backhaul-edge init` writes a config the edge runs with, once;
//! the README's first command in a bare Debian root; the aarch64 edge under qemu; the .deb files
//! installed into a bare Debian root.
//!
//! The last three take minutes each (a debootstrap, release builds): `#[ignore]`d, run by
//! `./scripts/test --full` or one by one:
//! `cargo test -p backhaul-tests --test packaging -- --ignored --nocapture`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use backhaul_tests::cloud::{Cloud, CloudOptions, DEVICE, DEVICE_KEY};
use backhaul_tests::debian::{Bind, DebianRoot};
use backhaul_tests::edge::{Edge, EdgeOptions};
use backhaul_tests::{free_port, run, wait_for, Process};

const T: Duration = Duration::from_secs(120);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

#[test]
fn init_writes_a_config_the_edge_runs_with_and_a_rerun_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("etc/backhaul/edge.toml");
    let creds = dir.path().join("etc/backhaul/credentials");
    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let args = |url: &str| {
        vec![
            "init".to_owned(),
            "--device-id".into(),
            DEVICE.into(),
            "--url".into(),
            url.to_owned(),
            "--config".into(),
            config.to_str().unwrap().into(),
            "--credentials-dir".into(),
            creds.to_str().unwrap().into(),
            "--data-dir".into(),
            dir.path().join("data").to_str().unwrap().into(),
        ]
    };
    let first = args(&cloud.url(""));
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let (code, out, err) = run("backhaul-edge", &first, &[("BACKHAUL_API_KEY", DEVICE_KEY)]).unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("wrote") && out.contains("sudo systemctl enable --now backhaul-edge"), "{out}");
    assert!(!out.contains(DEVICE_KEY) && !err.contains(DEVICE_KEY), "the key is never printed:\n{out}\n{err}");
    assert_eq!(mode(&creds), 0o700);
    assert_eq!(mode(&creds.join("hash_secret")), 0o600);
    assert_eq!(mode(&creds.join("api_key")), 0o600);
    assert_eq!(std::fs::read_to_string(creds.join("api_key")).unwrap(), DEVICE_KEY);
    let written = std::fs::read(&config).unwrap();
    let secret = std::fs::read(creds.join("hash_secret")).unwrap();

    // Again, with other flags and no key: nothing changes, and it says so.
    let again = args("mqtt://elsewhere.example.org");
    let again: Vec<&str> = again.iter().map(String::as_str).collect();
    let (code, out, err) = run("backhaul-edge", &again, &[]).unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with("kept ")).count(), 3, "{out}");
    assert!(out.contains("warning: the kept config sends to http://127.0.0.1"), "the other --url is said: {out}");
    assert_eq!(std::fs::read(&config).unwrap(), written);
    assert_eq!(std::fs::read(creds.join("hash_secret")).unwrap(), secret);

    // The config is valid as written (BLE source, the hash secret and key from their files)...
    let (code, out, err) = run("backhaul-edge", &["check-config", "--config", config.to_str().unwrap()], &[]).unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("valid") && !out.contains(DEVICE_KEY), "{out}");

    // ... and the edge runs with it: the BLE source swapped for a simulated one (no radio here)
    // and the status port moved to a free one, through the environment, as an operator would.
    let status_port = free_port().unwrap().to_string();
    let status_listen = format!("127.0.0.1:{status_port}");
    let mut edge = Process::spawn(
        "backhaul-edge",
        &["run", "--config", config.to_str().unwrap()],
        &[
            ("BACKHAUL_SOURCE__KIND", "simulated"),
            ("BACKHAUL_SOURCE__COUNT", "300"),
            ("BACKHAUL_SOURCE__RATE", "100000"),
            ("BACKHAUL_BATCH__MAX_AGE_MS", "100"),
            ("BACKHAUL_STATUS_LISTEN", &status_listen),
        ],
    )
    .unwrap();
    let stored = cloud.wait_detections(DEVICE, 300, T);
    if let Err(e) = stored {
        panic!("{e:#}\nedge output:\n{}", edge.output().join("\n"));
    }
}

#[test]
fn the_packaged_placeholder_config_says_to_run_init_and_init_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::copy(workspace().join("deploy/debian/edge.toml"), &config).unwrap();
    for command in ["check-config", "run"] {
        let (code, out, err) = run("backhaul-edge", &[command, "--config", config.to_str().unwrap()], &[]).unwrap();
        assert_eq!(code, 1, "{command}: {out}\n{err}");
        assert!(
            err.contains("is the placeholder the package installed") && err.contains("sudo backhaul-edge init --url"),
            "{command}: {err}"
        );
    }
    let creds = dir.path().join("credentials");
    let (code, out, err) = run(
        "backhaul-edge",
        &[
            "init",
            "--device-id",
            "pi-1",
            "--url",
            "https://cloud.example.org",
            "--config",
            config.to_str().unwrap(),
            "--credentials-dir",
            creds.to_str().unwrap(),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("No API key yet") && out.contains("check-config"), "{out}");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("mode = \"http\"") && text.contains("url = \"https://cloud.example.org\""), "{text}");
    // Without the key the config names the missing file.
    let (code, _, err) = run("backhaul-edge", &["check-config", "--config", config.to_str().unwrap()], &[]).unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("transport.http.api_key_file") && err.contains("api_key"), "{err}");
}

#[test]
fn init_refuses_what_the_edge_would_refuse_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    let creds = dir.path().join("credentials");
    let base = ["--config", config.to_str().unwrap(), "--credentials-dir", creds.to_str().unwrap()];
    for (extra, env, want) in [
        (vec!["--device-id", "hall/2", "--url", "mqtt://b:1883"], None, "--device-id \"hall/2\""),
        (vec!["--device-id", "pi-1", "--url", "ftp://b"], None, "scheme must be"),
        (vec!["--device-id", "pi-1", "--url", "mqtt://b:99999"], None, "--url \"mqtt://b:99999\""),
        (vec!["--device-id", "pi-1", "--mode", "http", "--url", "mqtts://b"], None, "contradicts"),
        (vec!["--device-id", "pi-1", "--url", "mqtts://b"], Some("too-short"), "shorter than 16"),
    ] {
        let args: Vec<&str> = ["init"].into_iter().chain(extra.iter().copied()).chain(base).collect();
        let env: Vec<(&str, &str)> = env.map(|k| ("BACKHAUL_API_KEY", k)).into_iter().collect();
        let (code, out, err) = run("backhaul-edge", &args, &env).unwrap();
        assert_eq!(code, 1, "{args:?}: {out}\n{err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!config.exists() && !creds.exists(), "{args:?} wrote something");
    }
}

/// The README's first command, as a newcomer runs it on a bare Debian machine with only Rust
/// (rustup, and the C compiler its linker needs) installed: no libdbus-1-dev, no pkg-config, no
/// Mosquitto (the demo then uses HTTP).
#[test]
#[ignore = "minutes: debootstrap and a release build; ./scripts/test --full"]
fn the_readmes_first_command_builds_and_runs_the_demo_in_a_bare_debian_root() {
    let Some(root) = DebianRoot::create("bare-root demo", &["gcc", "libc6-dev", "ca-certificates"]).unwrap() else {
        return;
    };
    // The work tree without its build output, as a clone would have it.
    let src = root.host_path("/src");
    std::fs::create_dir_all(&src).unwrap();
    let copy = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' --exclude=./target --exclude=./fuzz/target -cf - . | tar -C '{}' -xf -",
            workspace().display(),
            src.display()
        ))
        .status()
        .unwrap();
    assert!(copy.success());
    let home = std::env::var("HOME").unwrap();
    let rustup = std::env::var("RUSTUP_HOME").unwrap_or(format!("{home}/.rustup"));
    let cargo = std::env::var("CARGO_HOME").unwrap_or(format!("{home}/.cargo"));
    let binds = [
        Bind { host: rustup.into(), inside: "/root/.rustup".into(), read_only: true },
        Bind { host: cargo.into(), inside: "/root/.cargo".into(), read_only: false },
    ];
    let none = root.run("dpkg-query -W libdbus-1-dev pkg-config mosquitto", &[], &[]).unwrap();
    assert!(!none.status.success(), "the root must be bare: {}", String::from_utf8_lossy(&none.stdout));
    let out = root
        .ok(
            "cd /src && cargo build --release --workspace && target/release/backhaul-cloud demo --seconds 6 --devices 2 \
             && ldd target/release/backhaul-edge",
            &binds,
            &[("PATH", "/root/.cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin")],
        )
        .unwrap();
    assert!(out.contains("RESULT: nothing lost, nothing stored twice"), "{out}");
    assert!(out.contains("no Mosquitto installed (Pis use HTTP"), "{out}");
    // ldd's lines ("libc.so.6 => /lib/..."): no libdbus among them.
    let linked: Vec<&str> = out.lines().filter(|l| l.contains(" => ")).collect();
    assert!(linked.iter().any(|l| l.contains("libc.so")), "ldd printed nothing:\n{out}");
    assert!(
        !linked.iter().any(|l| l.contains("libdbus")),
        "libdbus is built in, not a run-time dependency: {linked:?}"
    );
}

fn program(name: &str) -> Option<PathBuf> {
    let p = backhaul_tests::find_program(name);
    if p.is_none() {
        backhaul_tests::skip(
            "the aarch64 smoke test",
            &format!("`{name}` is not installed (./scripts/test --full installs it)"),
        );
    }
    p
}

/// The edge cross-built for aarch64 (README, "Building for a Pi") runs under qemu's user-mode
/// emulation and replays a capture into an x86 cloud on loopback: every detection stored.
#[test]
#[ignore = "minutes: an aarch64 release build; ./scripts/test --full"]
fn the_aarch64_edge_under_qemu_replays_a_capture_into_the_cloud() {
    let (Some(qemu), Some(_)) = (program("qemu-aarch64-static"), program("aarch64-linux-gnu-gcc")) else { return };
    let build = Command::new("cargo")
        .current_dir(workspace())
        .args(["build", "--release", "--locked", "--target", "aarch64-unknown-linux-gnu", "-p", "backhaul-edge"])
        .status()
        .unwrap();
    assert!(build.success(), "the aarch64 build failed");
    let binary = workspace().join("target/aarch64-unknown-linux-gnu/release/backhaul-edge");
    let elf = std::fs::read(&binary).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 0xB7, "e_machine is EM_AARCH64");
    eprintln!("measured: aarch64 backhaul-edge is {} bytes (release, unstripped)", elf.len());

    // 1,000 passers-by heard once (a presence detection each) and 100 Thingy:52s (presence and a
    // sensor reading each): 1,200 detections.
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("capture.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&capture).unwrap());
    for i in 0..1100u32 {
        let manufacturer = if i >= 1000 { r#"{"65535":"010102280300fd04000002640557"}"# } else { "{}" };
        writeln!(
            f,
            r#"{{"t":"2026-11-21T10:{:02}:{:02}Z","address":"C0:00:00:00:{:02X}:{:02X}","rssi":-{},"tx_power":null,"manufacturer_data":{manufacturer},"service_data":{{}},"services":[],"name":null}}"#,
            i / 60 % 60,
            i % 60,
            i >> 8,
            i & 0xFF,
            40 + i % 50
        )
        .unwrap();
    }
    drop(f);

    let cloud = Cloud::start(CloudOptions::default()).unwrap();
    let mut edge = Edge::start(EdgeOptions {
        mode: "http",
        http_url: cloud.url(""),
        source: Some(format!("kind = \"replay\"\npath = \"{}\"", capture.display())),
        max_detections: 100,
        env: vec![("BACKHAUL_HASH_SECRET".into(), "aarch64-smoke-secret-0123456789".into())],
        launcher: Some(vec![
            qemu.to_str().unwrap().into(),
            "-L".into(),
            "/usr/aarch64-linux-gnu".into(),
            binary.to_str().unwrap().into(),
        ]),
        ..Default::default()
    })
    .unwrap();
    if let Err(e) = cloud.wait_detections(DEVICE, 1200, T) {
        panic!("{e:#}\nedge output:\n{}", edge.process.output().join("\n"));
    }
    edge.wait_drained(1200, T).unwrap();
    let pid = edge.process.pid().unwrap();
    let hwm = wait_for("the edge's peak RSS", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_owned()))
    })
    .unwrap();
    eprintln!("measured: peak RSS of the aarch64 edge under qemu-aarch64 (qemu included): {hwm}");
}

/// `./scripts/package --arch amd64`, then the packages installed into a bare Debian root with
/// dpkg: their files, modes, conffiles, users and units; `init` on the packaged placeholder; a
/// reinstall that keeps the config; a purge that keeps the queue.
#[test]
#[ignore = "minutes: a release build and a debootstrap; ./scripts/test --full"]
fn the_amd64_packages_install_into_a_bare_debian_root() {
    let Some(root) = DebianRoot::create("package install", &["systemd"]).unwrap() else { return };
    let package = Command::new(workspace().join("scripts/package")).args(["--arch", "amd64"]).status().unwrap();
    assert!(package.success(), "scripts/package failed");
    let debs: Vec<PathBuf> = std::fs::read_dir(workspace().join("target/debian"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb") && p.to_string_lossy().contains("_amd64"))
        .collect();
    for name in ["backhaul-edge_", "backhaul-cloud_"] {
        assert!(debs.iter().any(|p| p.file_name().unwrap().to_string_lossy().starts_with(name)), "{debs:?}");
    }
    let debs_dir = root.host_path("/debs");
    std::fs::create_dir_all(&debs_dir).unwrap();
    for d in &debs {
        std::fs::copy(d, debs_dir.join(d.file_name().unwrap())).unwrap();
    }
    let sh = |script: &str| root.ok(script, &[], &[]).unwrap();
    // As the README says: apt installs a local .deb with its dependencies.
    sh("apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        /debs/backhaul-edge_*_amd64.deb /debs/backhaul-cloud_*_amd64.deb");

    let stat = sh("stat -c '%n %a %U %G' /usr/bin/backhaul-edge /usr/bin/backhaul-cloud \
                   /usr/lib/systemd/system/backhaul-edge.service /usr/lib/systemd/system/backhaul-cloud.service \
                   /etc/backhaul/edge.toml /etc/backhaul/cloud.toml /etc/backhaul/credentials \
                   /usr/share/backhaul-cloud/pki/issue.sh /usr/share/backhaul-cloud/mosquitto/acl");
    for want in [
        "/usr/bin/backhaul-edge 755 root root",
        "/usr/bin/backhaul-cloud 755 root root",
        "/usr/lib/systemd/system/backhaul-edge.service 644 root root",
        "/usr/lib/systemd/system/backhaul-cloud.service 644 root root",
        "/etc/backhaul/edge.toml 644 root root",
        "/etc/backhaul/cloud.toml 644 root root",
        "/etc/backhaul/credentials 700 root root",
        "/usr/share/backhaul-cloud/pki/issue.sh 755 root root",
        "/usr/share/backhaul-cloud/mosquitto/acl 644 root root",
    ] {
        assert!(stat.lines().any(|l| l == want), "want `{want}` in:\n{stat}");
    }
    let conffiles = sh("dpkg-query -W -f='${Conffiles}\\n' backhaul-edge backhaul-cloud");
    assert!(
        conffiles.contains("/etc/backhaul/edge.toml") && conffiles.contains("/etc/backhaul/cloud.toml"),
        "{conffiles}"
    );
    let users = sh("getent passwd backhaul backhaul-cloud; getent group bluetooth");
    assert!(users.contains("backhaul:x:") && users.contains(":/var/lib/backhaul:/usr/sbin/nologin"), "{users}");
    assert!(users.contains("backhaul-cloud:x:") && users.contains("bluetooth:x:"), "{users}");
    // Nothing enabled by the install: the Pi is configured first.
    let enabled = root.run("systemctl is-enabled backhaul-edge backhaul-cloud", &[], &[]).unwrap();
    let states: Vec<String> = String::from_utf8_lossy(&enabled.stdout).lines().map(str::to_owned).collect();
    assert_eq!(states, ["disabled", "disabled"], "{enabled:?}");
    let verify = sh("systemd-analyze verify /usr/lib/systemd/system/backhaul-edge.service \
                     /usr/lib/systemd/system/backhaul-cloud.service 2>&1");
    let findings: Vec<&str> = verify.lines().filter(|l| l.contains("backhaul")).collect();
    assert!(findings.is_empty(), "systemd-analyze verify:\n{verify}");

    // The README's "Running on a Pi", in the root (systemctl does not run in a chroot).
    let placeholder = root.run("backhaul-edge check-config --config /etc/backhaul/edge.toml", &[], &[]).unwrap();
    assert_eq!(placeholder.status.code(), Some(1), "{placeholder:?}");
    assert!(String::from_utf8_lossy(&placeholder.stderr).contains("backhaul-edge init"), "{placeholder:?}");
    // The README's second command, the key on standard input.
    let init =
        "printf '%s' key-of-this-pi-0123456789 | backhaul-edge init --url mqtts://broker.example.org --api-key-file -";
    let out = root.ok(init, &[], &[]).unwrap();
    assert!(out.contains("wrote /etc/backhaul/edge.toml") && out.contains("systemctl enable --now"), "{out}");
    let config_text = std::fs::read_to_string(root.host_path("/etc/backhaul/edge.toml")).unwrap();
    let want = format!("device_id = \"{}\"", backhaul_tests::debian::HOSTNAME);
    assert!(config_text.contains(&want), "the device id is the host name:\n{config_text}");
    sh("backhaul-edge check-config --config /etc/backhaul/edge.toml");
    let modes = sh("stat -c '%n %a %U' /etc/backhaul/credentials/hash_secret /etc/backhaul/credentials/api_key");
    assert!(modes.contains("hash_secret 600 root") && modes.contains("api_key 600 root"), "{modes}");
    let config = std::fs::read(root.host_path("/etc/backhaul/edge.toml")).unwrap();
    let out = root.ok(init, &[], &[]).unwrap();
    assert_eq!(out.lines().filter(|l| l.starts_with("kept ")).count(), 3, "{out}");

    // The cloud's package: its config checks once the keys file the README names is written.
    sh("umask 077; printf '\"rpi-debian-root-01\" = \"key-of-this-pi-0123456789\"\\n' > /etc/backhaul/credentials/api-keys.toml");
    let cloud = sh("backhaul-cloud check-config --config /etc/backhaul/cloud.toml");
    assert!(!cloud.contains("key-of-this-pi"), "no key printed: {cloud}");
    let state = sh("stat -c '%n %a %U' /var/lib/backhaul /var/lib/backhaul-cloud");
    assert!(
        state.contains("/var/lib/backhaul 750 backhaul")
            && state.contains("/var/lib/backhaul-cloud 750 backhaul-cloud"),
        "{state}"
    );

    // A reinstall (an upgrade runs the same scripts) keeps the config init wrote.
    sh("dpkg -i --force-confold /debs/backhaul-edge_*_amd64.deb");
    assert_eq!(std::fs::read(root.host_path("/etc/backhaul/edge.toml")).unwrap(), config);

    // Purge: the binary, conffile and credentials go; the queue stays (batches may be unsent).
    sh("echo queued > /var/lib/backhaul/db");
    sh("dpkg --purge backhaul-edge");
    assert!(!root.host_path("/usr/bin/backhaul-edge").exists());
    assert!(!root.host_path("/etc/backhaul/edge.toml").exists());
    assert!(!root.host_path("/etc/backhaul/credentials/hash_secret").exists());
    assert!(root.host_path("/var/lib/backhaul/db").exists(), "the queue is never purged");
    assert!(root.host_path("/etc/backhaul/cloud.toml").exists(), "the cloud's files are the cloud's");
    sh("dpkg --purge backhaul-cloud");
    assert!(!root.host_path("/etc/backhaul/cloud.toml").exists());
}
