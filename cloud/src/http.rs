//! The HTTP ingress adapter (SPEC.md, "HTTP ingest"): authentication, status codes, and the read
//! API. Thin: every batch goes through [`crate::ingest::Ingest::accept`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::config::{ApiKeys, KeyScope};
use crate::ingest::{Accepted, Ingest};
use crate::store::DetectionQuery;

/// Shared by the handlers.
#[derive(Debug)]
pub struct App {
    pub ingest: Arc<Ingest>,
    pub keys: ApiKeys,
    /// Ingests in progress; when none is free the answer is 429 with Retry-After.
    pub permits: Semaphore,
    /// Test-only fault injection (`BACKHAUL_FAILPOINT=bulk_500:N`): the next N bulk posts answer
    /// 500 before doing anything, as a cloud with a passing fault would.
    pub fail_next_bulk: std::sync::atomic::AtomicU64,
    /// Each ingress's progress (`/health`, `/metrics`).
    pub ingresses: Arc<crate::progress::Ingresses>,
    /// Largest body (`max_body_bytes`).
    pub max_body_bytes: usize,
    /// How long a bulk post's body may take to arrive (`body_read_timeout`).
    pub body_read_timeout: std::time::Duration,
    /// mTLS is on (`tls.client_ca_file`): a device key's bulk post must come over a connection
    /// whose client certificate names its `device_id` (issue #16).
    pub client_certificates: bool,
}

/// Reads `BACKHAUL_FAILPOINT=bulk_500:N` (see [`App::fail_next_bulk`]); 0 without it.
pub fn failpoint_bulk_500() -> u64 {
    std::env::var("BACKHAUL_FAILPOINT")
        .ok()
        .and_then(|v| v.strip_prefix("bulk_500:").and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

pub fn router(app: Arc<App>) -> Router {
    let max_body_bytes = app.max_body_bytes;
    let gate = axum::middleware::from_fn_with_state(app.clone(), gate_body);
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/detections/bulk", post(bulk).layer(gate))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/detections", get(detections))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(app)
}

/// An error answer: a status and a JSON body that says what is wrong (and which field).
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
    retry_after: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        let mut r = (self.status, Json(body)).into_response();
        if let Some(after) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(after));
        }
        r
    }
}

fn error(status: StatusCode, message: impl Into<String>, field: Option<&str>) -> ApiError {
    ApiError { status, message: message.into(), field: field.map(str::to_owned), retry_after: None }
}

fn storage_down(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "storage failed during a request");
    ApiError {
        retry_after: Some("5"),
        ..error(StatusCode::SERVICE_UNAVAILABLE, "storage is unavailable; retry later", None)
    }
    .into_response()
}

/// The key from `X-API-Key` or `Authorization: Bearer`.
fn authenticate(app: &App, headers: &HeaderMap) -> Result<KeyScope, ApiError> {
    let presented = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
        })
        .map(str::trim);
    match presented.and_then(|k| app.keys.check(k)) {
        Some(scope) => Ok(scope),
        None => {
            Err(error(StatusCode::UNAUTHORIZED, "missing or wrong API key (X-API-Key or Authorization: Bearer)", None))
        }
    }
}

/// For fleet-wide routes (`/api/v1/stats`, `/metrics`): a device key is a 403 that says what to use.
fn fleet_only(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    match authenticate(app, headers)? {
        KeyScope::Fleet => Ok(()),
        KeyScope::Device(d) => Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "this route is fleet-wide and this API key is `{d}`'s: use a fleet key (\"*\" in the keys file); \
                 a device key reads its own device through /api/v1/devices and /api/v1/detections"
            ),
            None,
        )),
    }
}

/// Before a body is read (issue #14: 400 unauthenticated requests declaring 1 MB bodies took the
/// cloud from 10 to 409 MiB): a declared `Content-Length` over `max_body_bytes` is a 413 at once,
/// and a request without a valid key is a 401 at once; neither body is read. Then the body is read
/// whole, cut at `max_body_bytes` (413) and within `body_read_timeout` (408), so a client that
/// trickles its body holds a connection only that long.
async fn gate_body(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let max_body_bytes = app.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body_bytes as u64) {
        return closing(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body declares {} bytes; the limit is {max_body_bytes} (max_body_bytes)",
                declared.unwrap_or(0)
            ),
            None,
        ));
    }
    if let Err(e) = authenticate(&app, request.headers()) {
        return closing(e);
    }
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, max_body_bytes);
    let bytes = match tokio::time::timeout(app.body_read_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let over = std::error::Error::source(&e)
                .is_some_and(|s| s.downcast_ref::<http_body_util::LengthLimitError>().is_some());
            return closing(if over {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is over {max_body_bytes} bytes (max_body_bytes)"),
                    None,
                )
            } else {
                error(StatusCode::BAD_REQUEST, format!("reading the body failed: {e}"), None)
            });
        }
        Err(_) => {
            return closing(error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {} s (body_read_timeout); send it faster or in smaller batches",
                    app.body_read_timeout.as_secs()
                ),
                None,
            ))
        }
    };
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// An answer given before the request's body was read: `Connection: close`, because the server
/// closes the connection rather than read the rest (RFC 9112 §9.6). Without it a client that pools
/// connections (ureq) sends its next request on a connection the server is closing, and that
/// request fails with "peer disconnected" (seen in `tests/tests/cloud_http.rs` after a 413).
fn closing(answer: impl IntoResponse) -> Response {
    let mut response = answer.into_response();
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
}

/// 200 `{"status":"ok"}` while the database answers and no ingress is stalled; otherwise 503 with
/// `error` saying which and what to do, and `stalled` listing the stalled ingresses.
async fn health(State(app): State<Arc<App>>) -> Response {
    if !app.ingest.store.ping().await {
        return error(StatusCode::SERVICE_UNAVAILABLE, "database does not answer", None).into_response();
    }
    let stalls = app.ingresses.stalls();
    if stalls.is_empty() {
        return Json(json!({ "status": "ok" })).into_response();
    }
    let (stalled, why): (Vec<&str>, Vec<String>) = stalls.into_iter().unzip();
    let body = json!({ "status": "unhealthy", "error": why.join("; "), "stalled": stalled });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// Prometheus text format (version 0.0.4): each ingress's progress and the stored counts. Needs
/// a key, like `/api/v1/stats` (Prometheus sends one with `authorization: {credentials: …}`).
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = fleet_only(&app, &headers) {
        return r.into_response();
    }
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in samples {
            out.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    let ingresses = app.ingresses.all().map(|p| (p, p.snapshot()));
    let per = |f: &dyn Fn(&crate::progress::Snapshot) -> String| -> Vec<(String, String)> {
        ingresses.iter().map(|(p, s)| (format!("{{ingress=\"{}\"}}", p.name), f(s))).collect()
    };
    let stall_after = app.ingresses.stall_after;
    family(
        "backhaul_cloud_ingress_waiting",
        "gauge",
        "Messages (MQTT) or bulk posts (HTTP) taken in and not finished.",
        &per(&|s| s.waiting.to_string()),
    );
    family(
        "backhaul_cloud_ingress_finished_total",
        "counter",
        "Messages or bulk posts finished since the start (stored, duplicate, refused or dead-lettered).",
        &per(&|s| s.finished.to_string()),
    );
    family(
        "backhaul_cloud_ingress_seconds_since_progress",
        "gauge",
        "Seconds since the ingress last finished something (or since work arrived while idle).",
        &per(&|s| format!("{:.3}", s.since_progress.as_secs_f64())),
    );
    family(
        "backhaul_cloud_ingress_stalled",
        "gauge",
        "1 if work waits and none was finished for ingest_stall_after.",
        &per(&|s| u8::from(s.stalled(stall_after)).to_string()),
    );
    if app.ingresses.mqtt_configured.load(std::sync::atomic::Ordering::SeqCst) {
        let up = app.ingresses.mqtt_connected.load(std::sync::atomic::Ordering::SeqCst);
        family(
            "backhaul_cloud_mqtt_connected",
            "gauge",
            "1 while the MQTT ingest connection is up (MQTT ingest configured only).",
            &[(String::new(), u8::from(up).to_string())],
        );
    }
    match app.ingest.store.stats().await {
        Ok(s) => {
            for (name, help, value) in [
                ("batches", "Batches stored.", s.batches),
                ("detections", "Detections stored.", s.detections),
                ("duplicates", "Batches received again and answered as duplicates.", s.duplicates),
                ("rejected", "Batches refused (a device/topic or key mismatch, a conflict).", s.rejected),
                ("dead_letters", "Messages or bodies that could not be used, kept for inspection.", s.dead_letters),
                ("panics", "Messages whose handling panicked (a bug; each also a dead letter).", s.panics),
                (
                    "rate_limited",
                    "Batches turned away since start because their device was over device_rate_per_sec.",
                    i64::try_from(app.ingest.rates.limited.load(std::sync::atomic::Ordering::Relaxed))
                        .unwrap_or(i64::MAX),
                ),
            ] {
                family(&format!("backhaul_cloud_{name}_total"), "counter", help, &[(String::new(), value.to_string())]);
            }
        }
        Err(e) => return storage_down(e),
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn bulk(
    State(app): State<Arc<App>>,
    peer: Option<axum::Extension<crate::serve::PeerNames>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = match authenticate(&app, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let failing = app.fail_next_bulk.fetch_update(
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
        |n| n.checked_sub(1),
    );
    if failing.is_ok() {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "FAILPOINT bulk_500", None).into_response();
    }
    // A device key's device is known before the body is parsed: a flood of its posts costs no
    // parsing (issue #16). A fleet key's posts are limited by their batch's device below.
    if let KeyScope::Device(device) = &scope {
        if let Err(wait) = app.ingest.rates.check(device) {
            return rate_limited(device, wait);
        }
    }
    let Ok(_permit) = app.permits.try_acquire() else {
        return ApiError {
            retry_after: Some("1"),
            ..error(StatusCode::TOO_MANY_REQUESTS, "too many ingests in progress; retry after the delay", None)
        }
        .into_response();
    };
    let hash = crate::ingest::payload_hash(&body);
    if let Some(answer) = known_duplicate(&app, &scope, peer.as_ref(), &headers, &hash).await {
        return answer;
    }
    let batch = match app.ingest.parse(&body) {
        Ok(b) => b,
        Err(e) => {
            if let Err(se) = app.ingest.store.dead_letter("http", None, None, body.len(), &e.to_string()).await {
                return storage_down(se);
            }
            return error(StatusCode::BAD_REQUEST, e.to_string(), Some(e.field())).into_response();
        }
    };
    if !scope.allows(&batch.device_id) {
        if let Err(se) = app.ingest.store.count_rejected().await {
            return storage_down(se);
        }
        return error(
            StatusCode::FORBIDDEN,
            format!("this API key may not post for device `{}`", batch.device_id),
            Some("device_id"),
        )
        .into_response();
    }
    if scope == KeyScope::Fleet {
        if let Err(wait) = app.ingest.rates.check(&batch.device_id) {
            return rate_limited(&batch.device_id, wait);
        }
    }
    // mTLS: a device posts only for the device its certificate names (a fleet key, an operator's
    // replay, is not bound to one device).
    if app.client_certificates && scope != KeyScope::Fleet {
        let names = peer.map(|p| p.0 .0.to_vec()).unwrap_or_default();
        if !names.contains(&batch.device_id) {
            if let Err(se) = app.ingest.store.count_rejected().await {
                return storage_down(se);
            }
            return error(
                StatusCode::FORBIDDEN,
                format!(
                    "the client certificate names {names:?}, not device `{}`: each device needs a certificate whose \
                     CN or DNS subjectAltName is its device_id",
                    batch.device_id
                ),
                Some("device_id"),
            )
            .into_response();
        }
    }
    let idempotency = match headers.get("idempotency-key").map(|v| v.to_str()) {
        Some(Ok(key)) if key.parse::<backhaul_shared::BatchId>().is_ok_and(|k| k == batch.batch_id) => Ok(()),
        Some(_) => Err("the Idempotency-Key header must equal the body's batch_id"),
        None => Err("the Idempotency-Key header (the batch_id) is missing"),
    };
    if let Err(message) = idempotency {
        return error(StatusCode::BAD_REQUEST, message, Some("batch_id")).into_response();
    }
    // In its own task: if the client goes away, axum drops this handler, and the write (which may
    // carry other clients' batches in its group) must still finish.
    let (ingest, ingresses) = (app.ingest.clone(), app.ingresses.clone());
    let accepted = tokio::spawn(async move {
        // Waiting from here until stored: a client that gives up does not end the work (or count
        // as progress), so a wedged store is seen however short the clients' timeouts.
        let _busy = ingresses.http.guard();
        if crate::failpoint::value() == Some("stall_http") {
            eprintln!("FAILPOINT stall_http: the bulk post hangs before it is stored");
            std::future::pending::<()>().await;
        }
        ingest.accept_hashed(batch, &body, hash, "http").await
    })
    .await;
    let accepted = match accepted {
        Ok(result) => result,
        Err(e) => return storage_down(format!("ingest task failed: {e}")),
    };
    match accepted {
        Ok(Accepted::Stored(b)) => {
            (StatusCode::CREATED, Json(json!({ "status": "stored", "batch_id": b.batch_id }))).into_response()
        }
        Ok(Accepted::Duplicate(b)) => {
            (StatusCode::OK, Json(json!({ "status": "duplicate", "batch_id": b.batch_id }))).into_response()
        }
        Ok(Accepted::Conflict(_)) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this batch_id is already stored with a different payload",
            Some("batch_id"),
        )
        .into_response(),
        Err(e) => storage_down(e),
    }
}

/// The answer to a resend, found without parsing its body (issue #15: replays of a backlog are
/// mostly resends): the Idempotency-Key names a stored batch whose payload has this SHA-256, so the
/// body is byte for byte one that was validated when it was stored. Answered `200 duplicate` only
/// if every check of the full path would pass for the stored batch's device (key scope, fleet
/// rate limit, client certificate); otherwise `None`, and the full path answers.
async fn known_duplicate(
    app: &App,
    scope: &KeyScope,
    peer: Option<&axum::Extension<crate::serve::PeerNames>>,
    headers: &HeaderMap,
    hash: &str,
) -> Option<Response> {
    let id = headers.get("idempotency-key")?.to_str().ok()?.parse::<backhaul_shared::BatchId>().ok()?;
    let device = match app.ingest.store.duplicate_of(&id.to_string(), hash).await {
        Ok(found) => found?,
        Err(e) => return Some(storage_down(e)),
    };
    if !scope.allows(&device) {
        return None;
    }
    if app.client_certificates && *scope != KeyScope::Fleet && !peer.is_some_and(|p| p.0 .0.contains(&device)) {
        return None;
    }
    if *scope == KeyScope::Fleet {
        if let Err(wait) = app.ingest.rates.check(&device) {
            return Some(rate_limited(&device, wait));
        }
    }
    app.ingest.store.count_duplicate();
    Some((StatusCode::OK, Json(json!({ "status": "duplicate", "batch_id": id }))).into_response())
}

/// 429 with `Retry-After` for a device over its rate ([`crate::ratelimit`]).
fn rate_limited(device: &str, wait: std::time::Duration) -> Response {
    let secs = crate::ratelimit::retry_after_secs(wait);
    let message =
        format!("device `{device}` is over its rate limit (device_rate_per_sec, device_burst); retry after {secs} s");
    let mut response = error(StatusCode::TOO_MANY_REQUESTS, message, Some("device_id")).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

async fn stats(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = fleet_only(&app, &headers) {
        return r.into_response();
    }
    match app.ingest.store.stats().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => storage_down(e),
    }
}

async fn devices(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let scope = match authenticate(&app, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    match app.ingest.store.devices().await {
        // A device key sees its own device only.
        Ok(mut d) => {
            d.retain(|row| scope.allows(&row.device_id));
            Json(json!({ "devices": d })).into_response()
        }
        Err(e) => storage_down(e),
    }
}

#[derive(Debug, Deserialize)]
struct DetectionParams {
    device_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn detections(State(app): State<Arc<App>>, headers: HeaderMap, Query(mut p): Query<DetectionParams>) -> Response {
    let scope = match authenticate(&app, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    // A device key reads its own device only: no device_id means its own, another is a 403.
    if let KeyScope::Device(own) = &scope {
        match p.device_id.as_deref() {
            Some(asked) if asked != own => {
                return error(
                    StatusCode::FORBIDDEN,
                    format!("this API key may only read device `{own}`; reading `{asked}` needs a fleet key"),
                    Some("device_id"),
                )
                .into_response()
            }
            _ => p.device_id = Some(own.clone()),
        }
    }
    let time = |v: &Option<String>, field: &str| -> Result<Option<i64>, ApiError> {
        v.as_deref()
            .map(|s| {
                s.parse::<backhaul_shared::Timestamp>()
                    .map(|t| t.unix_micros())
                    .map_err(|e| error(StatusCode::BAD_REQUEST, e, Some(field)))
            })
            .transpose()
    };
    let since_us = match time(&p.since, "since") {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let until_us = match time(&p.until, "until") {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let after = match p.cursor.as_deref().map(parse_cursor) {
        None => None,
        Some(Some(c)) => Some(c),
        Some(None) => {
            return error(StatusCode::BAD_REQUEST, "cursor is not one this API returned", Some("cursor"))
                .into_response()
        }
    };
    let limit = p.limit.unwrap_or(100).clamp(1, 1000);
    let q = DetectionQuery { device_id: p.device_id, since_us, until_us, limit, after };
    match app.ingest.store.detections(&q).await {
        Ok(rows) => {
            let next_cursor = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.cursor.clone())).flatten();
            Json(json!({ "detections": rows, "next_cursor": next_cursor })).into_response()
        }
        Err(e) => storage_down(e),
    }
}

fn parse_cursor(s: &str) -> Option<(i64, String, i64)> {
    let mut parts = s.splitn(3, '.');
    let ts = parts.next()?.parse().ok()?;
    let batch = parts.next()?.to_owned();
    let idx = parts.next()?.parse().ok()?;
    Some((ts, batch, idx))
}
