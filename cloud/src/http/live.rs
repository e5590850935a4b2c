//! The dashboard's routes (issue #19): `GET /` (the page, embedded in the binary),
//! `GET /api/v1/live` (every batch taken in, as server-sent events), `GET /api/v1/ingest-rate`
//! and `GET /api/v1/devices/{device_id}/batches`. The events and the rate are this replica's
//! ([`crate::live`]).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::auth::Caller;
use super::{error, storage_down, ApiError, App, Path, Query};
use crate::config::KeyScope;
use crate::live::{Refused, MAX_PER_DEVICE_KEY};

/// The page: one HTML file, its script and style inline, no request to any other origin.
const PAGE: &str = include_str!("../../assets/dashboard.html");

/// A listener with nothing to send writes a comment this often, so proxies and the browser see
/// the stream alive.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// The page's Content-Security-Policy (CSP 3): its one inline script and one inline style by
/// their SHA-256, requests to its own origin only, no plugin, frame, base or form target.
fn content_security_policy() -> HeaderValue {
    use base64::Engine;
    use sha2::Digest;
    static CSP: std::sync::OnceLock<HeaderValue> = std::sync::OnceLock::new();
    let hash = |tag: &str| {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        let start = PAGE.find(&open).expect("the page has its inline element") + open.len();
        let end = start + PAGE[start..].find(&close).expect("closed");
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&PAGE[start..end]))
    };
    CSP.get_or_init(|| {
        let policy = format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; img-src 'self' data:; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash("script"),
            hash("style")
        );
        HeaderValue::from_str(&policy).expect("a CSP is ASCII")
    })
    .clone()
}

/// `GET /`: the dashboard. Served without a key (it holds no data); it asks for one and sends it
/// as `X-API-Key` on each request, under [`content_security_policy`].
#[utoipa::path(get, path = "/", tag = "dashboard", security(()), responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String)))]
pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::CONTENT_SECURITY_POLICY, content_security_policy()),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /api/v1/live`: `text/event-stream` of `event: batch` frames (data: a
/// [`crate::live::LiveEvent`] as JSON), `event: dropped` frames (`{"dropped": n}`: events this
/// listener lost, for falling behind or for more than 50 events/s) and keep-alive comments every
/// 15 s. A fleet key gets every device's batches, a device key its own. 503 with Retry-After when
/// `max_live_clients` listeners are connected.
#[utoipa::path(get, path = "/api/v1/live", tag = "dashboard", responses((status = 200, description = "text/event-stream: `event: batch` (data: a LiveEvent), `event: dropped` (data: `{\"dropped\": n}`) and keep-alive comments, until the cloud stops", content_type = "text/event-stream", body = String), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 503, description = "max_live_clients streams are open, or this device key holds its share of them: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn live(State(app): State<Arc<App>>, caller: Caller) -> Response {
    let device = match caller.0 {
        KeyScope::Fleet => None,
        KeyScope::Device(d) => Some(d),
    };
    let listener = match app.ingest.live.try_listen(app.max_live_clients, device.as_deref()) {
        Ok(l) => l,
        Err(why) => {
            let message = match why {
                Refused::Full if app.max_live_clients == 0 => {
                    "the live feed is off on this cloud (max_live_clients = 0)".to_owned()
                }
                Refused::Full => format!(
                    "{} live streams are open, the most this cloud allows (max_live_clients); close a dashboard \
                     tab or raise max_live_clients",
                    app.max_live_clients
                ),
                Refused::DeviceFull => format!(
                    "this device's key holds {MAX_PER_DEVICE_KEY} live streams already, the most one device key may; \
                     close one, or sign in with a fleet key"
                ),
            };
            let refused = error(StatusCode::SERVICE_UNAVAILABLE, message, None);
            return ApiError { retry_after: Some("30"), ..refused }.into_response();
        }
    };
    let last = tokio::time::Instant::now();
    let hello = Bytes::from_static(b"retry: 5000\n: connected\n\n");
    let state = (listener, last, Some(hello));
    let stream = futures_util::stream::unfold(state, |(mut listener, mut last, hello)| async move {
        if let Some(hello) = hello {
            return Some((Ok::<_, Infallible>(hello), (listener, last, None)));
        }
        let chunk = listener.chunk(&mut last, KEEPALIVE).await?;
        Some((Ok(chunk), (listener, last, None)))
    });
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no")),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateParams {
    seconds: Option<u64>,
}

/// `GET /api/v1/ingest-rate?seconds=N` (fleet key): detections taken in per second over the last
/// N seconds (1..=600, default 300), oldest first, this replica's:
/// `{"interval_s": 1, "points": [{"t", "new", "duplicate"}]}` (`t`: Unix seconds).
#[utoipa::path(get, path = "/api/v1/ingest-rate", tag = "dashboard", params(("seconds" = Option<u64>, Query, description = "1..=600 (default 300)")), responses((status = 200, description = "Detections per second, oldest first (this replica)", body = super::openapi::IngestRate), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody)))]
pub(super) async fn ingest_rate(State(app): State<Arc<App>>, caller: Caller, Query(p): Query<RateParams>) -> Response {
    if let Err(r) = caller.fleet_only() {
        return r.into_response();
    }
    let points = app.ingest.live.rate(p.seconds.unwrap_or(300));
    Json(json!({ "interval_s": 1, "points": points })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchesParams {
    limit: Option<i64>,
}

/// `GET /api/v1/devices/{device_id}/batches?limit=N`: the device's latest N batches by `seq`
/// (1..=1000, default 100), newest first: `{"device_id", "batches": [{"batch_id", "seq",
/// "received_at", "detections", "via"}]}`. 404 for a device never seen; 403 for another device's
/// key.
#[utoipa::path(get, path = "/api/v1/devices/{device_id}/batches", tag = "dashboard", params(("device_id" = String, Path, description = "The device (1..=64 bytes, no `/`, `+`, `#`)"), ("limit" = Option<i64>, Query, description = "1..=1000 (default 100)")), responses((status = 200, description = "The device's latest batches, newest first", body = super::openapi::Batches), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 404, description = "No such device (this cloud never heard from it)", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn batches(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(device_id): Path<String>,
    Query(p): Query<BatchesParams>,
) -> Response {
    if let Err(r) = super::read::readable_device(&app, &caller, &device_id).await {
        return r;
    }
    let limit = match super::limit_param(p.limit, 100, 1000) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    match app.ingest.recent_batches(&device_id, limit).await {
        Ok(rows) => Json(json!({ "device_id": device_id, "batches": rows })).into_response(),
        Err(e) => storage_down(e),
    }
}
