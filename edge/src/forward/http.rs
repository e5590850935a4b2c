//! The HTTP transport (ureq, blocking, on worker threads of its own): `POST
//! /api/v1/detections/bulk` with `Idempotency-Key: <batch_id>` and the API key.
//!
//! What an answer means ([`classify`], SPEC.md "HTTP ingest"):
//! - 2xx with the cloud's answer for that batch (`{"status": "stored" | "duplicate", "batch_id":
//!   …}`; the `batch_id`, when present, must be the one posted): acked (`duplicate`: the cloud had
//!   it). Only that deletes a batch. Any other 2xx (an HTML page, an empty body, JSON for another
//!   id: a captive portal, a proxy, a wrong `transport.http.url`) counts as a 5xx: the batch stays
//!   queued and the link backs off.
//! - 3xx: never followed (a redirected POST becomes a GET that a web server answers 200, and the
//!   API key would go to the redirect's target): a configuration error, treated as a link failure
//!   whose error names the `Location`. The `/health` probe does not follow redirects either.
//! - 400, 413, 422: refused for good: the batch goes to the dead-letter tree.
//! - 401, 403: the key is wrong or not allowed for this device. SPEC.md calls these final, but
//!   that is a configuration mistake, not a bad batch: dead-lettering would empty the whole queue
//!   in seconds. So they count as a link failure: batches stay queued, the error says to fix the
//!   key, and sending resumes by itself once it is fixed.
//! - 408, 429, 5xx, any other status, a network error: the batch goes back to the queue and the
//!   link is down: nothing more is sent until, after a backoff (full jitter, capped, never below
//!   `Retry-After`), `GET /health` answers 200. The backoff only resets on a delivered batch, so a
//!   cloud whose `/health` is fine but which keeps failing posts is not hammered.

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backhaul_shared::{BatchId, DeviceStatus};

use super::{Event, Outcome, Transport};
use crate::queue::QueuedBatch;
use backhaul_shared::link::Backoff;

/// Where and how to post.
#[derive(Clone)]
pub struct HttpSettings {
    /// `http://host:port` (no trailing slash needed).
    pub base_url: String,
    /// Never logged.
    pub api_key: Option<String>,
    /// Concurrent requests.
    pub workers: usize,
    /// Whole-request timeout.
    pub timeout: Duration,
    pub backoff_max: Duration,
    /// TLS for `https://` (`[transport.tls]`, loaded and checked by `backhaul_shared::tls`).
    pub tls: Option<backhaul_shared::tls::ClientMaterial>,
    /// The device whose status is posted every `transport.mqtt.status_interval` (issue #18);
    /// `None`: no status is posted.
    pub device_id: Option<String>,
}

impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// ureq's TLS settings from ours: the roots we loaded (or Mozilla's), and the client
/// certificate for mTLS. ureq's `rustls` feature uses ring, our only provider. Errors (a key
/// ureq cannot read) name `transport.tls.key_file`; the config check calls this at start.
pub fn tls_config(tls: Option<&backhaul_shared::tls::ClientMaterial>) -> Result<ureq::tls::TlsConfig, String> {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};
    let mut b = TlsConfig::builder().provider(TlsProvider::Rustls);
    let Some(tls) = tls else { return Ok(b.build()) };
    b = b.root_certs(if tls.webpki && tls.roots.is_empty() {
        RootCerts::WebPki
    } else {
        RootCerts::new_with_certs(
            &tls.roots.iter().map(|c| Certificate::from_der(c.as_ref()).to_owned()).collect::<Vec<_>>(),
        )
    });
    // ureq takes the key as PEM (its DER constructor needs a type it does not export).
    if let Some(id) = &tls.identity {
        let (chain, pem) = (&id.certs, &id.key_pem);
        let key = PrivateKey::from_pem(pem).map_err(|e| {
            format!("transport.tls.key_file: the HTTPS client cannot read the key ({e}); use a PKCS#8 PEM key")
        })?;
        let chain: Vec<Certificate<'static>> =
            chain.iter().map(|c| Certificate::from_der(c.as_ref()).to_owned()).collect();
        b = b.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(b.build())
}

/// The HTTP client every request to the cloud goes through: statuses as answers, no redirect
/// followed (a 3xx comes back as the answer, see the module docs), the whole-request timeout, our
/// TLS. Errors: the TLS settings cannot be used ([`tls_config`]).
fn agent(settings: &HttpSettings) -> Result<ureq::Agent, String> {
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(settings.timeout))
        .user_agent(concat!("backhaul-edge/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls_config(settings.tls.as_ref())?)
        .build()
        .into())
}

/// What a worker reports.
#[derive(Debug)]
pub enum HttpEvent {
    Answer { batch_id: BatchId, answer: Answer },
    Health { ok: bool, detail: String },
}

/// The cloud's answer to a post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `location`: the `Location` header of a 3xx.
    Status {
        code: u16,
        retry_after: Option<Duration>,
        location: Option<String>,
        body: String,
    },
    Network(String),
}

/// What an answer means for the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    Acked {
        duplicate: bool,
    },
    /// Refused for good.
    Final(String),
    /// Not delivered; the link backs off. The text says what happened and what to do.
    Retry {
        retry_after: Option<Duration>,
        error: String,
    },
}

/// Whether a 2xx body is the cloud's answer for `batch_id` (a JSON object, as `backhaul-cloud`'s
/// `bulk` handler writes it: `{"status": "stored" | "duplicate", "batch_id": …}`): `Some(duplicate)`
/// if so.
fn cloud_ack(body: &str, batch_id: BatchId) -> Option<bool> {
    let answer: serde_json::Map<String, serde_json::Value> = serde_json::from_str(body).ok()?;
    // The answer must name the batch (issue #13: "the cloud's answer for that batch_id"): a body
    // that only says `stored` could be anyone's.
    if answer.get("batch_id")?.as_str()?.parse::<BatchId>().ok()? != batch_id {
        return None;
    }
    match answer.get("status")?.as_str()? {
        "stored" => Some(false),
        "duplicate" => Some(true),
        _ => None,
    }
}

/// Sorts the answer to the post of `batch_id` (see the module docs).
pub fn classify(answer: &Answer, batch_id: BatchId) -> Class {
    let (code, retry_after, location, full_body) = match answer {
        Answer::Network(e) => {
            let error = backhaul_shared::tls::explain_handshake_error(&format!("cannot reach the cloud: {e}"));
            return Class::Retry { retry_after: None, error };
        }
        Answer::Status { code, retry_after, location, body } => (*code, *retry_after, location, body),
    };
    let body: String = full_body.chars().take(300).collect();
    match code {
        200..=299 => match cloud_ack(full_body, batch_id) {
            Some(duplicate) => Class::Acked { duplicate },
            None => Class::Retry {
                retry_after,
                error: format!(
                    "HTTP {code} whose body is not the cloud's answer for batch {batch_id} (body: {body:?}): is \
                     transport.http.url a backhaul-cloud, not a proxy or portal? The batch stays queued"
                ),
            },
        },
        300..=399 => Class::Retry {
            retry_after,
            error: format!(
                "the cloud's URL redirects (HTTP {code}, Location: {}); redirects are never followed (the API key \
                 must not leave transport.http.url's origin): set transport.http.url to the address that \
                 answers; batches stay queued",
                location.as_deref().unwrap_or("(none)")
            ),
        },
        400 | 413 | 422 => Class::Final(format!("HTTP {code}: {body}")),
        401 | 403 => Class::Retry {
            retry_after,
            error: format!(
                "the cloud refused the API key (HTTP {code}: {body}): check BACKHAUL_API_KEY or \
                 transport.http.api_key_file; batches stay queued"
            ),
        },
        408 | 429 | 500..=599 => Class::Retry { retry_after, error: format!("the cloud answered HTTP {code}: {body}") },
        _ => Class::Retry {
            retry_after,
            error: format!("unexpected HTTP {code} from the cloud: check transport.http.url; batches stay queued"),
        },
    }
}

enum Job {
    Post(QueuedBatch),
    Health,
    /// `POST /api/v1/devices/{device_id}/status` (issue #18: the ledger's counters); answered by
    /// nobody: a status that does not arrive is replaced by the next. The sender, if any, hears
    /// when it was posted (the last one, at a stop).
    Status(Box<(String, DeviceStatus)>, Option<mpsc::Sender<()>>),
}

/// The forwarder's side of the HTTP workers.
pub struct HttpTransport {
    jobs: Sender<Job>,
    /// Whose status is posted (`None`: none is).
    device_id: Option<String>,
    workers: usize,
    busy: usize,
    up: bool,
    probing: bool,
    probe_at: Option<Instant>,
    backoff: Backoff,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport").field("up", &self.up).field("busy", &self.busy).finish_non_exhaustive()
    }
}

impl HttpTransport {
    /// Starts the workers; the link starts down and comes up after the first `/health` answer.
    pub fn start(settings: HttpSettings, events: Sender<Event<HttpEvent>>) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let agent = agent(&settings).map_err(std::io::Error::other)?;
        let workers = settings.workers.max(1);
        for i in 0..workers {
            let (rx, events, agent, settings) = (rx.clone(), events.clone(), agent.clone(), settings.clone());
            std::thread::Builder::new().name(format!("http-{i}")).spawn(move || loop {
                // A std Mutex around the receiver: workers take turns waiting for the next job.
                let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(j) => j,
                    Err(_) => return, // the transport is closed
                };
                let event = match job {
                    Job::Post(batch) => {
                        HttpEvent::Answer { batch_id: batch.batch_id, answer: post(&agent, &settings, &batch) }
                    }
                    Job::Health => health(&agent, &settings),
                    Job::Status(status, done) => {
                        post_status(&agent, &settings, &status.0, &status.1);
                        if let Some(done) = done {
                            let _ = done.send(());
                        }
                        continue;
                    }
                };
                if events.send(Event::Link(event)).is_err() {
                    return;
                }
            })?;
        }
        Ok(Self {
            jobs,
            device_id: settings.device_id.clone(),
            workers,
            busy: 0,
            up: false,
            probing: false,
            probe_at: Some(Instant::now()),
            backoff: Backoff::new(Duration::from_millis(500), settings.backoff_max),
        })
    }

    fn link_failed(&mut self, retry_after: Option<Duration>, error: String, out: &mut Vec<Outcome>) {
        if self.up || self.probe_at.is_none() {
            let delay = self.backoff.next_random(retry_after);
            tracing::warn!(%error, retry_in = ?delay, "HTTP link down; batches stay queued on disk");
            self.probe_at = Some(Instant::now() + delay);
        }
        self.up = false;
        out.push(Outcome::LinkDown { error, resend_in_flight: false });
    }
}

impl Transport for HttpTransport {
    type Event = HttpEvent;

    fn ready(&self) -> bool {
        self.up && self.busy < self.workers
    }

    fn send(&mut self, batch: &QueuedBatch) -> bool {
        if self.jobs.send(Job::Post(batch.clone())).is_err() {
            return false;
        }
        self.busy += 1;
        true
    }

    fn handle(&mut self, event: HttpEvent, out: &mut Vec<Outcome>) {
        match event {
            HttpEvent::Answer { batch_id, answer } => {
                self.busy = self.busy.saturating_sub(1);
                match classify(&answer, batch_id) {
                    Class::Acked { duplicate } => {
                        self.backoff.reset();
                        out.push(Outcome::Acked { batch_id, duplicate });
                    }
                    Class::Final(reason) => out.push(Outcome::Rejected { batch_id, reason }),
                    Class::Retry { retry_after, error } => {
                        out.push(Outcome::Retry { batch_id });
                        self.link_failed(retry_after, error, out);
                    }
                }
            }
            HttpEvent::Health { ok, detail } => {
                self.probing = false;
                if ok {
                    tracing::info!("the cloud's /health answers; sending");
                    self.up = true;
                    self.probe_at = None;
                    out.push(Outcome::LinkUp);
                } else {
                    let delay = self.backoff.next_random(None);
                    self.probe_at = Some(Instant::now() + delay);
                    tracing::warn!(error = %detail, retry_in = ?delay, "the cloud is not healthy yet");
                    out.push(Outcome::LinkDown { error: detail, resend_in_flight: false });
                }
            }
        }
    }

    fn tick(&mut self, now: Instant) -> Option<Instant> {
        if self.up || self.probing {
            return None;
        }
        let at = self.probe_at?;
        if now >= at && self.jobs.send(Job::Health).is_ok() {
            self.probing = true;
            return None;
        }
        Some(at)
    }

    fn ack_timeout(&self) -> Option<Duration> {
        None // every request is answered or times out on its own
    }

    fn publish_status(&mut self, status: &DeviceStatus) {
        // Only while the cloud answers: a status must not wait in front of batches for a link
        // that is down.
        if let (true, Some(device_id)) = (self.up, &self.device_id) {
            let _ = self.jobs.send(Job::Status(Box::new((device_id.clone(), status.clone())), None));
        }
    }

    fn close(&mut self, status: &DeviceStatus) {
        // The last status (it says the device stopped, for the ledger and `online`), waited for
        // briefly; then dropping the job sender ends the workers once their jobs are done.
        if let (true, Some(device_id)) = (self.up, &self.device_id) {
            let (done, posted) = mpsc::channel();
            if self.jobs.send(Job::Status(Box::new((device_id.clone(), status.clone())), Some(done))).is_ok()
                && posted.recv_timeout(Duration::from_secs(3)).is_err()
            {
                tracing::info!("the last status did not reach the cloud within 3 s");
            }
        }
    }
}

/// The command stage's HTTP client (issue #18): fetches this device's unanswered commands and
/// posts its results, with the transport's URL, key and TLS, on its own connection.
pub struct CommandClient {
    agent: ureq::Agent,
    settings: HttpSettings,
    device_id: String,
}

impl std::fmt::Debug for CommandClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandClient").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl CommandClient {
    /// Errors: the TLS settings cannot be used (as for the transport).
    pub fn new(settings: HttpSettings, device_id: &str) -> Result<Self, String> {
        Ok(Self { agent: agent(&settings)?, settings, device_id: device_id.to_owned() })
    }

    fn commands_url(&self) -> String {
        let device = backhaul_shared::command::path_segment(&self.device_id);
        url(&self.settings, &format!("/api/v1/devices/{device}/commands"))
    }

    fn keyed<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.settings.api_key {
            Some(k) => r.header("X-API-Key", k),
            None => r,
        }
    }

    /// `GET .../commands?status=queued`: the commands this device has not answered.
    /// Errors: network, or any answer but 200 with a command list (the text says which).
    pub fn fetch(&self) -> Result<Vec<backhaul_shared::command::CommandMessage>, String> {
        #[derive(serde::Deserialize)]
        struct Listed {
            command_id: backhaul_shared::command::CommandId,
            command: serde_json::Value,
        }
        #[derive(serde::Deserialize)]
        struct List {
            commands: Vec<Listed>,
        }
        // `fetch=1`: this is the device fetching its work, also when it holds a fleet key.
        let target = format!("{}?status=queued&fetch=1", self.commands_url());
        let mut r = self.keyed(self.agent.get(&target)).call().map_err(|e| format!("GET {target}: {e}"))?;
        let code = r.status().as_u16();
        let body = r.body_mut().with_config().limit(4 << 20).read_to_string().map_err(|e| e.to_string())?;
        if code != 200 {
            return Err(format!("GET {target}: HTTP {code}: {}", body.chars().take(300).collect::<String>()));
        }
        let list: List = serde_json::from_str(&body).map_err(|e| format!("GET {target}: not a command list: {e}"))?;
        Ok(list
            .commands
            .into_iter()
            .map(|c| backhaul_shared::command::CommandMessage { command_id: c.command_id, command: c.command })
            .collect())
    }

    /// `POST .../commands/{id}/result`. Errors: network, or an answer but 200.
    pub fn answer(&self, result: &backhaul_shared::command::CommandResult) -> Result<(), String> {
        let target = format!("{}/{}/result", self.commands_url(), result.command_id);
        let body = serde_json::to_vec(result).expect("a result serializes");
        let mut r = self
            .keyed(self.agent.post(&target))
            .header("Content-Type", "application/json")
            .send(&body[..])
            .map_err(|e| format!("POST {target}: {e}"))?;
        match r.status().as_u16() {
            200 => Ok(()),
            code => Err(format!(
                "POST {target}: HTTP {code}: {}",
                r.body_mut().read_to_string().unwrap_or_default().chars().take(300).collect::<String>()
            )),
        }
    }
}

/// Posts the device's status; failures are only logged (the next status replaces it).
fn post_status(agent: &ureq::Agent, settings: &HttpSettings, device_id: &str, status: &DeviceStatus) {
    let device = backhaul_shared::command::path_segment(device_id);
    let target = url(settings, &format!("/api/v1/devices/{device}/status"));
    let mut request = agent.post(&target).header("Content-Type", "application/json");
    if let Some(key) = &settings.api_key {
        request = request.header("X-API-Key", key);
    }
    let body = serde_json::to_vec(status).expect("a status serializes");
    match request.send(&body[..]) {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::debug!(code = r.status().as_u16(), "the cloud did not take the status (an older cloud?)"),
        Err(e) => tracing::debug!(error = %e, "posting the status failed; the next one replaces it"),
    }
}

fn url(settings: &HttpSettings, path: &str) -> String {
    format!("{}{path}", settings.base_url.trim_end_matches('/'))
}

fn post(agent: &ureq::Agent, settings: &HttpSettings, batch: &QueuedBatch) -> Answer {
    let mut request = agent
        .post(url(settings, "/api/v1/detections/bulk"))
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", batch.batch_id.to_string());
    if let Some(key) = &settings.api_key {
        request = request.header("X-API-Key", key);
    }
    match request.send(&batch.payload[..]) {
        Ok(mut response) => {
            let code = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let location =
                response.headers().get("location").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let body = response.body_mut().with_config().limit(64 * 1024).read_to_string().unwrap_or_default();
            Answer::Status { code, retry_after, location, body }
        }
        Err(e) => Answer::Network(e.to_string()),
    }
}

/// `GET /health`: up only on the cloud's own answer, 200 `{"status":"ok"}` (a redirect is not
/// followed; a web page that answers 200 is not the cloud).
fn health(agent: &ureq::Agent, settings: &HttpSettings) -> HttpEvent {
    let target = url(settings, "/health");
    let mut response = match agent.get(&target).call() {
        Ok(r) => r,
        Err(e) => {
            let detail = backhaul_shared::tls::explain_handshake_error(&format!("GET {target}: {e}"));
            return HttpEvent::Health { ok: false, detail };
        }
    };
    let code = response.status().as_u16();
    let location = response.headers().get("location").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let body = response.body_mut().with_config().limit(64 * 1024).read_to_string().unwrap_or_default();
    match health_problem(&target, code, location.as_deref(), &body) {
        None => HttpEvent::Health { ok: true, detail: String::new() },
        Some(detail) => HttpEvent::Health { ok: false, detail },
    }
}

/// What is wrong with an answer to `GET /health`, or `None` when it is the cloud's "ok".
fn health_problem(target: &str, code: u16, location: Option<&str>, body: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Health {
        status: String,
    }
    match code {
        200 if serde_json::from_str::<Health>(body).is_ok_and(|h| h.status == "ok") => None,
        200..=299 => Some(format!(
            "GET {target} answered HTTP {code} but not with the cloud's {{\"status\":\"ok\"}} (body: {:?}): is \
             transport.http.url a backhaul-cloud?",
            body.chars().take(200).collect::<String>()
        )),
        300..=399 => Some(format!(
            "GET {target} redirects (HTTP {code}, Location: {}); redirects are never followed: set \
             transport.http.url to the address that answers",
            location.unwrap_or("(none)")
        )),
        _ => Some(format!("GET {target} answered HTTP {code}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, body: &str) -> Answer {
        Answer::Status { code, retry_after: None, location: None, body: body.into() }
    }

    fn stored(id: BatchId) -> String {
        format!(r#"{{"status":"stored","batch_id":"{id}"}}"#)
    }

    #[test]
    fn answers_are_classified_as_spec_md_says() {
        let id = BatchId::new();
        assert_eq!(classify(&status(201, &stored(id)), id), Class::Acked { duplicate: false });
        let dup = format!(r#"{{"status":"duplicate","batch_id":"{id}"}}"#);
        assert_eq!(classify(&status(200, &dup), id), Class::Acked { duplicate: true });
        // An answer that does not name the batch could be anyone's: not an ack.
        assert!(matches!(classify(&status(200, r#"{"status":"duplicate"}"#), id), Class::Retry { .. }));
        for code in [400, 413, 422] {
            assert!(matches!(classify(&status(code, "bad"), id), Class::Final(r) if r.contains(&code.to_string())));
        }
        for code in [408, 429, 500, 502, 503, 504, 404, 301, 302, 307, 308] {
            assert!(matches!(classify(&status(code, ""), id), Class::Retry { .. }), "{code}");
        }
        assert!(matches!(classify(&Answer::Network("refused".into()), id), Class::Retry { .. }));
    }

    #[test]
    fn a_2xx_that_is_not_the_clouds_answer_for_that_batch_is_not_an_ack() {
        // Issue #13: a redirect followed as a GET got a web page's 200, and the batch was deleted.
        let id = BatchId::new();
        let others = [
            "<!doctype html><html><body>Welcome</body></html>".to_owned(),
            String::new(),
            "{}".to_owned(),
            r#"{"status":"ok"}"#.to_owned(),
            r#"{"status":"rejected","batch_id":"ID"}"#.replace("ID", &id.to_string()),
            stored(BatchId::new()),
            r#"{"status":"stored","batch_id":"not-an-id"}"#.to_owned(),
            r#"["stored"]"#.to_owned(),
        ];
        for body in others {
            for code in [200, 201, 204] {
                match classify(&status(code, &body), id) {
                    Class::Retry { error, .. } => {
                        assert!(error.contains("transport.http.url") && error.contains(&id.to_string()), "{error}")
                    }
                    other => panic!("{code} {body:?}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_redirect_is_a_configuration_error_that_names_the_location() {
        let id = BatchId::new();
        let a = Answer::Status { code: 301, retry_after: None, location: Some("/".into()), body: String::new() };
        match classify(&a, id) {
            Class::Retry { error, .. } => {
                assert!(error.contains("Location: /") && error.contains("transport.http.url"), "{error}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn health_is_up_only_on_the_clouds_own_ok() {
        let t = "http://x/health";
        assert_eq!(health_problem(t, 200, None, r#"{"status":"ok"}"#), None);
        assert!(health_problem(t, 200, None, "<html>ok</html>").is_some_and(|p| p.contains("not with the cloud's")));
        assert!(health_problem(t, 302, Some("https://portal/"), "").is_some_and(|p| p.contains("https://portal/")));
        assert!(health_problem(t, 503, None, "").is_some());
    }

    #[test]
    fn a_wrong_api_key_keeps_the_batches_and_says_what_to_fix() {
        for code in [401, 403] {
            match classify(&status(code, "no"), BatchId::new()) {
                Class::Retry { error, .. } => assert!(error.contains("BACKHAUL_API_KEY"), "{error}"),
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn retry_after_is_passed_on() {
        let a = Answer::Status {
            code: 429,
            retry_after: Some(Duration::from_secs(3)),
            location: None,
            body: String::new(),
        };
        assert!(
            matches!(classify(&a, BatchId::new()), Class::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(3))
        );
    }
}
