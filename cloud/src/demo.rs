//! `backhaul-cloud demo`: a newcomer's first command. Starts the cloud on a temp SQLite file, a
//! private Mosquitto when one is installed (otherwise the Pis use HTTP), and three simulated Pis
//! as `backhaul-edge run` processes; shows live progress; kills one Pi with SIGKILL and the broker
//! mid-run to show that nothing is lost; ends with a summary that compares what each Pi produced
//! with what the cloud stored. Glue around real processes, nothing simulated but the radios.
//!
//! `--tls` (issue #16): a private CA and certificates made in the temp dir with the scripts of
//! `deploy/pki/` (openssl), every link over TLS with client certificates: Mosquitto's TLS
//! listener naming each client by its certificate with the shipped ACL (`deploy/mosquitto/acl`),
//! or, with `--http`, the cloud's HTTPS listener with mTLS.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub seconds: u64,
    pub devices: usize,
    /// Detections per second per Pi.
    pub rate: u64,
    /// Force HTTP even when Mosquitto is installed.
    pub http: bool,
    /// Skip the kill -9 of a Pi and of the broker.
    pub no_chaos: bool,
    /// Every link over TLS with client certificates (see the module docs).
    pub tls: bool,
}

/// The scripts and broker files of `deploy/`, built in so the demo runs outside the repository.
const MAKE_CA: &str = include_str!("../../deploy/pki/make-ca.sh");
const ISSUE: &str = include_str!("../../deploy/pki/issue.sh");
const ACL: &str = include_str!("../../deploy/mosquitto/acl");

/// Makes the demo's CA and a certificate for each name (`(cn, sans)`) in `dir/pki` with the
/// `deploy/pki/` scripts; returns the pki directory.
fn make_pki(dir: &Path, names: &[(String, String)]) -> Result<PathBuf> {
    if find_program("openssl").is_none() {
        bail!("--tls makes its certificates with openssl, which is not installed: apt-get install openssl");
    }
    let pki = dir.join("pki");
    let (make_ca, issue) = (dir.join("make-ca.sh"), dir.join("issue.sh"));
    std::fs::write(&make_ca, MAKE_CA)?;
    std::fs::write(&issue, ISSUE)?;
    let run = |script: &Path, args: &[&str]| -> Result<()> {
        let out = Command::new("sh").arg(script).args(args).output().context("running sh")?;
        if !out.status.success() {
            bail!("{} {args:?} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let p = pki.to_str().context("a UTF-8 temp dir")?;
    run(&make_ca, &[p])?;
    for (cn, san) in names {
        run(&issue, &[p, cn.as_str(), san.as_str()])?;
    }
    Ok(pki)
}

/// `tls = { ca_file, cert_file, key_file }` for `who`'s certificate in `pki`.
fn tls_inline(pki: &Path, who: &str) -> String {
    format!(
        "tls = {{ ca_file = \"{}\", cert_file = \"{}\", key_file = \"{}\" }}",
        pki.join("ca.pem").display(),
        pki.join(format!("{who}.pem")).display(),
        pki.join(format!("{who}.key")).display()
    )
}

const FLEET_KEY: &str = "demo-fleet-key-0123456789abcdef";

struct Demo {
    dir: tempfile::TempDir,
    cloud: Child,
    /// `http://127.0.0.1:PORT` or `https://...`.
    cloud_base: String,
    broker: Option<Broker>,
    pis: Vec<Pi>,
    agent: ureq::Agent,
}

struct Broker {
    program: PathBuf,
    config: PathBuf,
    port: u16,
    child: Option<Child>,
}

struct Pi {
    id: String,
    config: PathBuf,
    data_dir: PathBuf,
    status_port: u16,
    child: Option<Child>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for pi in &mut self.pis {
            kill(&mut pi.child);
        }
        if let Some(b) = &mut self.broker {
            kill(&mut b.child);
        }
        let _ = self.cloud.kill();
        let _ = self.cloud.wait();
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `backhaul-edge` next to this binary (a cargo build puts both in target/<profile>/), else on PATH.
fn edge_binary() -> Result<PathBuf> {
    let beside = std::env::current_exe()?.with_file_name("backhaul-edge");
    if beside.is_file() {
        return Ok(beside);
    }
    find_program("backhaul-edge").context(
        "backhaul-edge was not found next to backhaul-cloud or on PATH: build both first with \
         `cargo build --release --workspace`",
    )
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

impl Broker {
    fn start(&mut self) -> Result<()> {
        let child = Command::new(&self.program)
            .arg("-c")
            .arg(&self.config)
            // Its own process group: a Ctrl-C in the terminal is for the demo, which stops the rest.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        self.child = Some(child);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until("mosquitto to accept connections", Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }
}

impl Pi {
    fn start(&mut self, edge: &Path) -> Result<()> {
        let log = std::fs::File::create(self.data_dir.with_extension("log"))?;
        let child = Command::new(edge)
            .args(["run", "--config"])
            .arg(&self.config)
            .process_group(0)
            .env("BACKHAUL_API_KEY", FLEET_KEY)
            .env("BACKHAUL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting backhaul-edge")?;
        self.child = Some(child);
        Ok(())
    }

    fn status(&self, agent: &ureq::Agent) -> Option<Value> {
        let mut r = agent.get(format!("http://127.0.0.1:{}/status", self.status_port)).call().ok()?;
        serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()
    }
}

fn num(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

/// Runs the demo; returns whether every Pi's detections were all stored exactly once.
pub fn run(o: DemoOptions) -> Result<bool> {
    let edge = edge_binary()?;
    let dir = tempfile::Builder::new().prefix("backhaul-demo-").tempdir()?;
    let mosquitto = if o.http { None } else { find_program("mosquitto") };
    let pki = if o.tls {
        let mut names: Vec<(String, String)> = [
            ("broker", "IP:127.0.0.1"),
            ("backhaul-cloud", "DNS:backhaul-cloud"),
            ("cloud", "IP:127.0.0.1"),
            ("demo-operator", "DNS:demo-operator"),
        ]
        .map(|(n, s)| (n.to_owned(), s.to_owned()))
        .into();
        names.extend((1..=o.devices).map(|i| (format!("demo-pi-{i}"), format!("DNS:demo-pi-{i}"))));
        Some(make_pki(dir.path(), &names)?)
    } else {
        None
    };
    let broker = match mosquitto {
        Some(program) => {
            let port = free_port()?;
            let config = dir.path().join("mosquitto.conf");
            let user = if is_root() { "user root\n" } else { "" };
            let mut text = format!("{user}listener {port} 127.0.0.1\npersistence false\nmax_queued_messages 0\n");
            match &pki {
                None => text.push_str("allow_anonymous true\n"),
                Some(pki) => {
                    let acl = dir.path().join("acl");
                    std::fs::write(&acl, ACL)?;
                    write!(
                        text,
                        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n\
                         allow_anonymous false\nacl_file {}\n",
                        pki.join("ca.pem").display(),
                        pki.join("broker.pem").display(),
                        pki.join("broker.key").display(),
                        acl.display()
                    )?;
                }
            }
            std::fs::write(&config, text)?;
            let mut b = Broker { program, config, port, child: None };
            b.start()?;
            Some(b)
        }
        None => None,
    };
    let mode = if broker.is_some() { "mqtt" } else { "http" };

    let cloud_port = free_port()?;
    let keys = dir.path().join("api-keys.toml");
    std::fs::write(&keys, format!("\"*\" = \"{FLEET_KEY}\"\n"))?;
    let mut cloud_config = format!(
        "listen = \"127.0.0.1:{cloud_port}\"\ndatabase = \"sqlite:{}\"\n\n[auth]\nkeys_file = \"{}\"\n",
        dir.path().join("ingest.db").display(),
        keys.display()
    );
    let scheme = if pki.is_some() { ("mqtts", "https") } else { ("mqtt", "http") };
    match (&broker, &pki) {
        (Some(b), _) => {
            write!(
                cloud_config,
                "\n[mqtt]\nurl = \"{}://127.0.0.1:{}\"\nclient_id = \"backhaul-cloud-demo\"\n{}\n",
                scheme.0,
                b.port,
                pki.as_ref().map(|p| tls_inline(p, "backhaul-cloud")).unwrap_or_default()
            )?;
        }
        // HTTP over TLS: the cloud's listener with mTLS.
        (None, Some(p)) => write!(
            cloud_config,
            "\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
            p.join("cloud.pem").display(),
            p.join("cloud.key").display(),
            p.join("ca.pem").display()
        )?,
        (None, None) => {}
    }
    let cloud_config_path = dir.path().join("cloud.toml");
    std::fs::write(&cloud_config_path, cloud_config)?;
    let cloud_log = std::fs::File::create(dir.path().join("cloud.log"))?;
    let cloud = Command::new(std::env::current_exe()?)
        .args(["serve", "--config"])
        .arg(&cloud_config_path)
        .process_group(0)
        .env("BACKHAUL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(cloud_log.try_clone()?)
        .stderr(cloud_log)
        .spawn()
        .context("starting backhaul-cloud serve")?;
    let mut agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(5)));
    let over_https = pki.is_some() && broker.is_none();
    if let (true, Some(p)) = (over_https, &pki) {
        agent = agent.tls_config(operator_tls(p)?);
    }
    let cloud_base = format!("{}://127.0.0.1:{cloud_port}", if over_https { "https" } else { "http" });
    let mut demo = Demo { dir, cloud, cloud_base, broker, pis: Vec::new(), agent: agent.build().into() };
    let health = format!("{}/health", demo.cloud_base);
    wait_until("the cloud to answer /health", Duration::from_secs(30), || {
        demo.agent.get(&health).call().is_ok_and(|r| r.status().as_u16() == 200)
    })?;

    let count = o.rate * o.seconds;
    for i in 1..=o.devices {
        let id = format!("demo-pi-{i}");
        let data_dir = demo.dir.path().join(&id);
        let status_port = free_port()?;
        let config = demo.dir.path().join(format!("{id}.toml"));
        let mqtt_url = demo.broker.as_ref().map_or(String::new(), |b| format!("{}://127.0.0.1:{}", scheme.0, b.port));
        let tls = pki.as_ref().map(|p| tls_inline(p, &id)).unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "device_id = \"{id}\"\nname = \"Demo Pi {i}\"\nlocation = \"Demo room {i}\"\ndata_dir = \"{}\"\n\
                 status_listen = \"127.0.0.1:{status_port}\"\n\n\
                 [source]\nkind = \"simulated\"\nrate = {}.0\ncount = {count}\ndevices = 40\nseed = {i}\n\n\
                 [batch]\nmax_detections = 100\nmax_age_ms = 1000\n\n\
                 [transport]\nmode = \"{mode}\"\nrate_per_sec = 50\nburst = 20\nack_timeout = \"5s\"\nbackoff_max = \"2s\"\n{tls}\n\n\
                 [transport.mqtt]\nurl = \"{mqtt_url}\"\n\n\
                 [transport.http]\nurl = \"{}://127.0.0.1:{cloud_port}\"\n",
                data_dir.display(),
                o.rate,
                scheme.1,
            ),
        )?;
        let mut pi = Pi { id, config, data_dir, status_port, child: None };
        pi.start(&edge)?;
        demo.pis.push(pi);
    }

    println!(
        "backhaul demo: the cloud on 127.0.0.1:{cloud_port} (SQLite in {}), {}, {} simulated Pis at {} detections/s each for {} s",
        demo.dir.path().display(),
        match &demo.broker {
            Some(b) if o.tls => format!(
                "a private Mosquitto with a TLS listener on 127.0.0.1:{} (Pis use MQTT QoS 1 over TLS with client \
                 certificates and the shipped ACL; the CA is in pki/)",
                b.port
            ),
            Some(b) => format!("a private Mosquitto on 127.0.0.1:{} (Pis use MQTT QoS 1)", b.port),
            None if o.tls => "no broker (Pis use HTTPS with client certificates; the CA is in pki/)".to_owned(),
            None if o.http => "no broker (--http: Pis use HTTP)".to_owned(),
            None => "no Mosquitto installed (Pis use HTTP; `apt-get install mosquitto` for MQTT)".to_owned(),
        },
        o.devices,
        o.rate,
        o.seconds
    );
    println!("(Ctrl-C stops early; logs and data are in the directory above while it runs)\n");

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        let _ = ctrlc_flag(flag);
    }
    let started = Instant::now();
    let mut killed_pi = false;
    let mut broker_killed_at: Option<Instant> = None;
    let mut broker_done = false;
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let drain_deadline = Duration::from_secs(o.seconds + 90);
    loop {
        let t = started.elapsed();
        if interrupted.load(Ordering::Relaxed) {
            println!("\ninterrupted: stopping the Pis (what they hold stays in their queues)");
            break;
        }
        // Chaos, announced.
        if !o.no_chaos && !killed_pi && t >= Duration::from_secs(o.seconds / 3) && demo.pis.len() > 1 {
            let pi = &mut demo.pis[1];
            println!("-- {:>3}s: kill -9 {} (its queue is on disk) and start it again", t.as_secs(), pi.id);
            kill(&mut pi.child);
            pi.start(&edge)?;
            killed_pi = true;
        }
        if !o.no_chaos && !broker_done && t >= Duration::from_secs(o.seconds / 2) {
            if let Some(b) = &mut demo.broker {
                match broker_killed_at {
                    None => {
                        println!(
                            "-- {:>3}s: kill -9 the broker (no persistence: it forgets everything it held)",
                            t.as_secs()
                        );
                        kill(&mut b.child);
                        broker_killed_at = Some(Instant::now());
                    }
                    Some(at) if at.elapsed() >= Duration::from_secs(3) => {
                        println!("-- {:>3}s: the broker is back", t.as_secs());
                        b.start()?;
                        broker_done = true;
                    }
                    Some(_) => {}
                }
            }
        }
        let statuses: Vec<Option<Value>> = demo.pis.iter().map(|p| p.status(&demo.agent)).collect();
        let cloud_devices = devices(&demo.agent, &demo.cloud_base);
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            print_progress(t, &demo.pis, &statuses, &cloud_devices);
        }
        let all_done = demo.pis.iter().zip(&statuses).all(|(pi, s)| match s {
            Some(s) => {
                let stored = cloud_devices
                    .iter()
                    .find(|d| d["device_id"] == pi.id.as_str())
                    .map_or(0, |d| num(d, "/detections"));
                num(s, "/produced/detections") == count
                    && num(s, "/queue/pending") == 0
                    && num(s, "/queue/in_flight") == 0
                    && stored == count
            }
            None => false,
        });
        if all_done && (o.no_chaos || demo.broker.is_none() || broker_done) {
            print_progress(t, &demo.pis, &statuses, &cloud_devices);
            break;
        }
        if t > drain_deadline {
            println!("\nthe Pis did not finish within {drain_deadline:?}; stopping");
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    // Stop the Pis gracefully (SIGTERM via `kill`: the batch in hand is enqueued), then read what
    // each produced from its queue on disk (`backhaul-edge queue stats`).
    let mut produced = Vec::new();
    for pi in &mut demo.pis {
        if let Some(child) = &pi.child {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
        if let Some(mut child) = pi.child.take() {
            let _ = wait_child(&mut child, Duration::from_secs(15));
        }
        let stats = Command::new(&edge)
            .args(["queue", "stats", "--data-dir"])
            .arg(&pi.data_dir)
            .env("BACKHAUL_LOG", "error")
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok());
        produced.push(stats);
    }
    let cloud_devices = devices(&demo.agent, &demo.cloud_base);
    let stats = get(&demo.agent, &demo.cloud_base, "/api/v1/stats").unwrap_or(Value::Null);
    println!("\nsummary");
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "device", "produced", "stored", "batches", "stored", "queued", "dropped"
    );
    let mut ok = true;
    let (mut total_produced, mut total_stored) = (0, 0);
    for (pi, status) in demo.pis.iter().zip(&produced) {
        let Some(s) = status else {
            println!("{:<12} (its queue could not be read: see {}.log)", pi.id, pi.data_dir.display());
            ok = false;
            continue;
        };
        let d = cloud_devices.iter().find(|d| d["device_id"] == pi.id.as_str()).cloned().unwrap_or(Value::Null);
        let queued = num(s, "/pending") + num(s, "/in_flight");
        let (p, st) = (num(s, "/produced_detections"), num(&d, "/detections"));
        let (pb, sb) = (num(s, "/produced_batches"), num(&d, "/batches"));
        total_produced += p;
        total_stored += st;
        println!("{:<12} {p:>10} {st:>10} {pb:>10} {sb:>10} {queued:>8} {:>8}", pi.id, num(s, "/dropped_batches"));
        // Every batch produced is stored once, or still queued on the Pi (after a Ctrl-C).
        if sb + queued < pb || sb > pb || (queued == 0 && (st != p || sb != pb)) {
            ok = false;
        }
    }
    println!(
        "total        {total_produced:>10} {total_stored:>10}   duplicates absorbed by the cloud: {}",
        num(&stats, "/duplicates")
    );
    if ok {
        println!("\nRESULT: nothing lost, nothing stored twice: every batch each Pi produced is stored exactly once (or still queued on its Pi).");
    } else {
        println!("\nRESULT: MISMATCH between produced and stored: see the logs in {}", demo.dir.path().display());
        // Keep the evidence.
        let kept = demo.dir.path().to_owned();
        std::mem::forget(std::mem::replace(&mut demo.dir, tempfile::tempdir()?));
        println!("kept {}", kept.display());
    }
    Ok(ok)
}

fn wait_child(child: &mut Child, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The demo's own client certificate and the demo CA, for the cloud's HTTPS listener.
fn operator_tls(pki: &Path) -> Result<ureq::tls::TlsConfig> {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};
    let ca = Certificate::from_pem(&std::fs::read(pki.join("ca.pem"))?)?;
    let cert = Certificate::from_pem(&std::fs::read(pki.join("demo-operator.pem"))?)?;
    let key = PrivateKey::from_pem(&std::fs::read(pki.join("demo-operator.key"))?)?;
    Ok(TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::new_with_certs(&[ca]))
        .client_cert(Some(ClientCert::new_with_certs(&[cert], key)))
        .build())
}

fn get(agent: &ureq::Agent, base: &str, path: &str) -> Option<Value> {
    let mut r = agent.get(format!("{base}{path}")).header("X-API-Key", FLEET_KEY).call().ok()?;
    serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()
}

fn devices(agent: &ureq::Agent, base: &str) -> Vec<Value> {
    get(agent, base, "/api/v1/devices").and_then(|v| v["devices"].as_array().cloned()).unwrap_or_default()
}

fn print_progress(t: Duration, pis: &[Pi], statuses: &[Option<Value>], cloud: &[Value]) {
    println!("{:>4}  {:<12} {:>9} {:>8} {:>9} {:>9}  link", "t", "device", "produced", "queued", "in flight", "stored");
    for (pi, s) in pis.iter().zip(statuses) {
        let stored = cloud.iter().find(|d| d["device_id"] == pi.id.as_str()).map_or(0, |d| num(d, "/detections"));
        match s {
            Some(s) => println!(
                "{:>3}s  {:<12} {:>9} {:>8} {:>9} {:>9}  {}",
                t.as_secs(),
                pi.id,
                num(s, "/produced/detections"),
                num(s, "/queue/pending"),
                num(s, "/queue/in_flight"),
                stored,
                if s["link"]["connected"] == true { "up" } else { "DOWN" }
            ),
            None => println!("{:>3}s  {:<12} (starting)                              {stored:>9}", t.as_secs(), pi.id),
        }
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// Sets `flag` on Ctrl-C (a thread with its own small runtime waits for the signal).
fn ctrlc_flag(flag: Arc<AtomicBool>) -> Result<()> {
    std::thread::Builder::new().name("ctrl-c".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
            flag.store(true, Ordering::Relaxed);
        });
    })?;
    Ok(())
}
