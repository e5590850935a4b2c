//! `POST /api/v1/detections/bulk` (SPEC.md, "HTTP ingest"): the body gate, then one batch through
//! [`crate::ingest::Ingest`]: a resend answered from its stored hash, or parsed, checked against
//! the caller's scope, rate and certificate, and stored exactly once.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::auth::{authenticate, Caller};
use super::{closing, error, storage_down, ApiError, App};
use crate::config::KeyScope;
use crate::ingest::{Accepted, Lookup};

/// Before a body is read (issue #14: 400 unauthenticated requests declaring 1 MB bodies took the
/// cloud from 10 to 409 MiB): a declared `Content-Length` over `max_body_bytes` is a 413 at once,
/// and a request without a valid key is a 401 at once; neither body is read. Then the body is read
/// whole, cut at `max_body_bytes` (413) and within `body_read_timeout` (408), so a client that
/// trickles its body holds a connection only that long.
pub(super) async fn gate_body(
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

#[utoipa::path(post, path = "/api/v1/detections/bulk", tag = "ingest", params(("Idempotency-Key" = Option<String>, Header, pattern = "^([0-9A-HJKMNP-TV-Z]{26}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$", description = "The body's batch_id: a ULID or a UUID; left out only with the seed agent's body (a key is derived)")), request_body(content = super::openapi::BulkBody, content_type = "application/json", description = "One batch (SPEC.md, \"The batch\"), or the seed agent's body (issue #20)"), responses((status = 201, description = "Stored", body = super::openapi::BulkAnswer), (status = 200, description = "Stored before with this payload: a duplicate, not stored again", body = super::openapi::BulkAnswer), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 409, description = "A seed agent's body for a device that runs backhaul-edge", body = super::openapi::ErrorBody), (status = 422, description = "The body is not what this route takes (`field` names what is wrong)", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying"))), (status = 408, description = "The body did not arrive within body_read_timeout", body = super::openapi::ErrorBody), (status = 413, description = "The body is over max_body_bytes", body = super::openapi::ErrorBody), (status = 429, description = "Too many ingests at once, or the device is over its rate: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn bulk(
    State(app): State<Arc<App>>,
    Caller(scope): Caller,
    peer: Option<axum::Extension<crate::serve::PeerNames>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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
    // A batch; or, if it is not one and has no `schema`, the seed agent's body (issue #20), which
    // becomes the batch it maps to: that batch's bytes are what is hashed and stored.
    let mut seed = false;
    let parsed = match app.ingest.parse(&body) {
        Err(_) if crate::compat::is_seed_body(&body) => {
            seed = true;
            let id = match headers.get("idempotency-key").map(|v| v.to_str().map(str::parse::<backhaul_shared::BatchId>)) {
                None => None,
                Some(Ok(Ok(id))) => Some(id),
                Some(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "the Idempotency-Key header must be a ULID or a UUID (or be left out: a key is derived from the body)",
                        Some("batch_id"),
                    )
                    .into_response()
                }
            };
            crate::compat::agent_batch(&body, id, &app.ingest.limits)
        }
        other => other,
    };
    let batch = match parsed {
        Ok(b) => b,
        Err(e) => {
            if let Err(se) = app.ingest.dead_letter("http", None, None, body.len(), &e.to_string(), false).await {
                return storage_down(se);
            }
            return error(StatusCode::BAD_REQUEST, e.to_string(), Some(e.field())).into_response();
        }
    };
    if seed {
        match app.ingest.runs_edge(&batch.device_id).await {
            Ok(false) => {}
            Ok(true) => {
                let message = format!(
                    "device `{}` runs backhaul-edge: a seed agent's body in its name is refused (stop the seed agent on that Pi)",
                    batch.device_id
                );
                return error(StatusCode::CONFLICT, message, Some("device_id")).into_response();
            }
            Err(e) => return storage_down(e),
        }
    }
    let (body, hash) = if seed {
        let raw = Bytes::from(batch.to_json());
        let hash = crate::ingest::payload_hash(&raw);
        (raw, hash)
    } else {
        (body, hash)
    };
    if !scope.allows(&batch.device_id) {
        if let Err(se) = app.ingest.count_rejected().await {
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
            if let Err(se) = app.ingest.count_rejected().await {
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
        // The seed agent's body: its key is the header's, or derived from it.
        None if seed => Ok(()),
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
        // A batch's own bytes were looked up by `known_duplicate` (its Idempotency-Key equals its
        // batch_id, checked above); a seed body's mapped batch was not.
        let (via, lookup) = if seed { ("http-seed", Lookup::First) } else { ("http", Lookup::Done) };
        ingest.accept_hashed(batch, &body, hash, via, lookup).await
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
    let stored = match app.ingest.duplicate_of(&id.to_string(), hash).await {
        Ok(found) => found?,
        Err(e) => return Some(storage_down(e)),
    };
    let device = &stored.device_id;
    if !scope.allows(device) {
        return None;
    }
    if app.client_certificates && *scope != KeyScope::Fleet && !peer.is_some_and(|p| p.0 .0.contains(device)) {
        return None;
    }
    if *scope == KeyScope::Fleet {
        if let Err(wait) = app.ingest.rates.check(device) {
            return Some(rate_limited(device, wait));
        }
    }
    app.ingest.count_duplicate(&id.to_string(), &stored, "http");
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

/// `POST /api/v1/devices/{device_id}/status` (the device's key; issue #18): an HTTP-mode edge's
/// status (`backhaul_shared::DeviceStatus`, as MQTT edges publish on `{prefix}/{device_id}/status`),
/// for the ledger and the backlog in `GET /api/v1/devices`. 200; 422 not a status; 403 another
/// device's key.
#[utoipa::path(post, path = "/api/v1/devices/{device_id}/status", tag = "ingest", params(("device_id" = String, Path, description = "The device (1..=64 bytes, no `/`, `+`, `#`)")), request_body(content = backhaul_shared::DeviceStatus, content_type = "application/json", description = "The device's status (SPEC.md, \"Device status\")"), responses((status = 200, description = "Recorded", body = super::openapi::Recorded), (status = 413, description = "The body is over max_body_bytes", body = super::openapi::ErrorBody), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 422, description = "The body is not what this route takes (`field` names what is wrong)", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn status(
    State(app): State<Arc<App>>,
    caller: Caller,
    peer: Option<axum::Extension<crate::serve::PeerNames>>,
    super::Path(device_id): super::Path<String>,
    super::RawBody(body): super::RawBody,
) -> Response {
    if let Err(e) = caller.for_device(&app, peer.as_ref(), &device_id) {
        return e.into_response();
    }
    if let Err(e) = backhaul_shared::batch::validate_device_id(&device_id) {
        return error(StatusCode::BAD_REQUEST, format!("device_id {e}"), Some("device_id")).into_response();
    }
    let status: backhaul_shared::DeviceStatus = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return error(StatusCode::UNPROCESSABLE_ENTITY, format!("not a device status: {e}"), None).into_response()
        }
    };
    match app.ingest.device_status(&device_id, &status, false).await {
        Ok(()) => Json(json!({ "status": "recorded" })).into_response(),
        Err(e) => storage_down(e),
    }
}
