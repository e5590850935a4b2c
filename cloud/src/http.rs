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
}

/// Reads `BACKHAUL_FAILPOINT=bulk_500:N` (see [`App::fail_next_bulk`]); 0 without it.
pub fn failpoint_bulk_500() -> u64 {
    std::env::var("BACKHAUL_FAILPOINT")
        .ok()
        .and_then(|v| v.strip_prefix("bulk_500:").and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

pub fn router(app: Arc<App>, max_body_bytes: usize) -> Router {
    let gate = axum::middleware::from_fn_with_state((app.clone(), max_body_bytes), gate_body);
    Router::new()
        .route("/health", get(health))
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

/// Before a body is read (issue #14: 400 unauthenticated requests declaring 1 MB bodies took the
/// cloud from 10 to 409 MiB): a declared `Content-Length` over `max_body_bytes` is a 413 at once,
/// and a request without a valid key is a 401 at once; neither body is read. (A body without a
/// declared length is still cut at `max_body_bytes` while it is read.)
async fn gate_body(
    State((app, max_body_bytes)): State<(Arc<App>, usize)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body_bytes as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body declares {} bytes; the limit is {max_body_bytes} (max_body_bytes)",
                declared.unwrap_or(0)
            ),
            None,
        )
        .into_response();
    }
    if let Err(e) = authenticate(&app, request.headers()) {
        return e.into_response();
    }
    next.run(request).await
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.ingest.store.ping().await {
        Json(json!({ "status": "ok" })).into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "database does not answer", None).into_response()
    }
}

async fn bulk(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
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
    let Ok(_permit) = app.permits.try_acquire() else {
        return ApiError {
            retry_after: Some("1"),
            ..error(StatusCode::TOO_MANY_REQUESTS, "too many ingests in progress; retry after the delay", None)
        }
        .into_response();
    };
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
    let ingest = app.ingest.clone();
    let accepted = tokio::spawn(async move { ingest.accept(batch, &body, "http").await }).await;
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

async fn stats(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authenticate(&app, &headers) {
        return r.into_response();
    }
    match app.ingest.store.stats().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => storage_down(e),
    }
}

async fn devices(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authenticate(&app, &headers) {
        return r.into_response();
    }
    match app.ingest.store.devices().await {
        Ok(d) => Json(json!({ "devices": d })).into_response(),
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

async fn detections(State(app): State<Arc<App>>, headers: HeaderMap, Query(p): Query<DetectionParams>) -> Response {
    if let Err(r) = authenticate(&app, &headers) {
        return r.into_response();
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
