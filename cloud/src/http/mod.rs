//! The HTTP ingress adapter (SPEC.md, "HTTP ingest" and the read API), in three rooms:
//! [`auth`] (the one extractor that authenticates a request and applies its key's scope),
//! [`ingest`] (the bulk post: body limits, then [`crate::ingest::Ingest::accept`]) and [`read`]
//! (health, metrics, stats, devices, detections, each with its response type), and [`commands`]
//! (commands to devices, issue #18). Storage is reached
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
        .route("/health", get(read::health))
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

/// An answer given before the request's body was read: `Connection: close`, because the server
/// closes the connection rather than read the rest (RFC 9112 §9.6). Without it a client that pools
/// connections (ureq) sends its next request on a connection the server is closing, and that
/// request fails with "peer disconnected" (seen in `tests/tests/cloud_http.rs` after a 413).
fn closing(answer: impl IntoResponse) -> Response {
    let mut response = answer.into_response();
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
}
