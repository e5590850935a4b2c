//! The HTTP ingress adapter (SPEC.md, "HTTP ingest" and the read API), in three rooms:
//! [`auth`] (the one extractor that authenticates a request and applies its key's scope),
//! [`ingest`] (the bulk post: body limits, then [`crate::ingest::Ingest::accept`]) and [`read`]
//! (health, metrics, stats, devices, detections, each with its response type), and [`commands`]
//! (commands to devices, issue #18), and [`live`] (the dashboard, its live feed and ingest rate,
//! issue #19). Storage is reached
//! only through [`crate::ingest::Ingest`].

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::config::ApiKeys;
use crate::ingest::Ingest;

mod auth;
mod commands;
mod ingest;
mod live;
pub mod openapi;
mod read;

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
    /// Woken when a command is queued, so the MQTT side publishes it at once (issue #18).
    pub commands_queued: Arc<tokio::sync::Notify>,
    /// Live listeners (`GET /api/v1/live`) at most (`max_live_clients`).
    pub max_live_clients: u64,
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
    let gate = axum::middleware::from_fn_with_state(app.clone(), ingest::gate_body);
    Router::new()
        .route("/", get(live::page))
        .route("/health", get(read::health))
        .route("/api/v1/live", get(live::live))
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .route("/api/v1/ingest-rate", get(live::ingest_rate))
        .route("/api/v1/devices/{device_id}/batches", get(live::batches))
        .route("/metrics", get(read::metrics))
        .route("/api/v1/detections/bulk", post(ingest::bulk).layer(gate))
        .route("/api/v1/stats", get(read::stats))
        .route("/api/v1/devices", get(read::devices))
        .route("/api/v1/detections", get(read::detections))
        .route("/api/v1/devices/{device_id}/gaps", get(read::gaps))
        .route("/api/v1/devices/{device_id}/status", post(ingest::status))
        .route("/api/v1/dead-letters", get(read::dead_letters))
        .route("/api/v1/devices/{device_id}/commands", post(commands::create).get(commands::list))
        .route("/api/v1/devices/{device_id}/commands/{command_id}", get(commands::get_one))
        .route("/api/v1/devices/{device_id}/commands/{command_id}/result", post(commands::result))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(app)
}

/// 404 for a path no route serves, in JSON like every other error.
async fn not_found(uri: axum::http::Uri) -> ApiError {
    error(StatusCode::NOT_FOUND, format!("no route `{}`: the routes are in /api/v1/openapi.json", uri.path()), None)
}

/// 405 for a route asked with a method it does not take.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("`{}` does not take {method}: its methods are in /api/v1/openapi.json", uri.path()),
        None,
    )
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

/// The query string (`application/x-www-form-urlencoded`), deserialized: a malformed one gets a
/// JSON 400 whose `field` names the parameter at fault (axum's own `Query` answers plain text and
/// names none).
#[derive(Debug)]
struct Query<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let params = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(params).map(Self).map_err(|e| {
            let field = e.path().to_string();
            let field = (field != ".").then_some(field);
            let message = match &field {
                Some(f) => format!("query parameter `{f}`: {}", e.inner()),
                None => format!("the query string: {}", e.inner()),
            };
            error(
                StatusCode::BAD_REQUEST,
                format!("{message}; this route's parameters are in /api/v1/openapi.json"),
                field.as_deref(),
            )
        })
    }
}

/// A `limit` query parameter: `default` when absent, else it must lie in `1..=max`.
///
/// Errors: 400 naming `limit` and its range (a 0 or an over-large page is the caller's mistake,
/// not something to answer with a page of another size).
fn limit_param(limit: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(error(StatusCode::BAD_REQUEST, format!("limit must be 1..={max} (got {n})"), Some("limit"))),
    }
}

/// A request body read whole (at most `max_body_bytes`): axum's `Bytes`, answering a body over the
/// limit with a JSON 413 (axum's is plain text).
#[derive(Debug)]
struct RawBody(axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match axum::body::Bytes::from_request(request, state).await {
            Ok(b) => Ok(Self(b)),
            Err(e) => Err(error(e.status(), format!("{} (max_body_bytes)", e.body_text()), None)),
        }
    }
}

/// axum's `Path`, answering a malformed path parameter with a JSON 400 (axum's is plain text).
#[derive(Debug)]
struct Path<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> axum::extract::FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(p) => Ok(Self(p.0)),
            Err(e) => Err(error(StatusCode::BAD_REQUEST, e.body_text(), None)),
        }
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

/// An answer given before the request's body was read: `Connection: close`, because the server
/// closes the connection rather than read the rest (RFC 9112 §9.6). Without it a client that pools
/// connections (ureq) sends its next request on a connection the server is closing, and that
/// request fails with "peer disconnected" (seen in `tests/tests/cloud_http.rs` after a 413).
fn closing(answer: impl IntoResponse) -> Response {
    let mut response = answer.into_response();
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
}
