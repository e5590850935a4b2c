//! The read routes: `/health`, `/metrics`, `/api/v1/stats`, `/api/v1/devices` and
//! `/api/v1/detections` (SPEC.md, "Read API"), each with its response type, each scoped by
//! [`Caller`].

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::Caller;
use super::{error, storage_down, ApiError, App, Path, Query};
use crate::store::{DetectionQuery, DetectionRow, DeviceRow};

/// `GET /api/v1/devices`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct DevicesList {
    devices: Vec<DeviceRow>,
}

/// `GET /api/v1/detections`: a page, newest first; `next_cursor` is set when more rows follow.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct DetectionsPage {
    detections: Vec<DetectionRow>,
    next_cursor: Option<String>,
}

/// 200 `{"status":"ok"}` while the database answers and no ingress is stalled; otherwise 503 with
/// `error` saying which and what to do, and `stalled` listing the stalled ingresses.
#[utoipa::path(get, path = "/health", tag = "meta", security(()), responses((status = 200, description = "The database answers and no ingress is stalled", body = super::openapi::Health), (status = 503, description = "The database does not answer, or an ingress is stalled (`error` says which)", body = super::openapi::Health)))]
pub(super) async fn health(State(app): State<Arc<App>>) -> Response {
    if !app.ingest.ping().await {
        let body = json!({ "status": "unhealthy", "error": "the database does not answer: check it is running and reachable" });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
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
#[utoipa::path(get, path = "/metrics", tag = "meta", responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn metrics(State(app): State<Arc<App>>, caller: Caller) -> Response {
    if let Err(r) = caller.fleet_only() {
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
    let live = &app.ingest.live;
    family(
        "backhaul_cloud_live_clients",
        "gauge",
        "Dashboards' live streams (GET /api/v1/live) connected to this replica.",
        &[(String::new(), live.clients.load(std::sync::atomic::Ordering::Relaxed).to_string())],
    );
    family(
        "backhaul_cloud_live_dropped_total",
        "counter",
        "Live events not delivered to a stream that fell behind (or got over 400 events/s), since start.",
        &[(String::new(), live.dropped.load(std::sync::atomic::Ordering::Relaxed).to_string())],
    );
    // Each device as its last status reported it (issue #19): a fleet's backlog without scraping
    // every Pi (most sit behind NAT).
    let devices = match app.ingest.devices().await {
        Ok(d) => d,
        Err(e) => return storage_down(e),
    };
    let per_device = |f: &dyn Fn(&DeviceRow) -> Option<String>| -> Vec<(String, String)> {
        devices.iter().filter_map(|d| Some((format!("{{device_id=\"{}\"}}", label(&d.device_id)), f(d)?))).collect()
    };
    family(
        "backhaul_cloud_device_online",
        "gauge",
        "1 while the device is online (its last status, or its last will).",
        &per_device(&|d| Some(u8::from(d.online).to_string())),
    );
    family(
        "backhaul_cloud_device_backlog_batches",
        "gauge",
        "Batches the device holds to send (pending + in flight), as it last reported.",
        &per_device(&|d| d.backlog.as_ref().map(|b| b.batches.to_string())),
    );
    family(
        "backhaul_cloud_device_oldest_pending_age_seconds",
        "gauge",
        "Age of the device's oldest batch waiting to be sent, as it last reported.",
        // Nothing pending is age 0, so a healthy fleet is not "No data".
        &per_device(&|d| d.backlog.as_ref().map(|b| b.oldest_age_s.unwrap_or(0).to_string())),
    );
    let by_reason: Vec<(String, String)> = devices
        .iter()
        .flat_map(|d| {
            let reasons = d
                .status
                .as_ref()
                .and_then(|s| s.get("dropped_invalid_by_reason"))
                .and_then(|r| r.as_object())
                .cloned()
                .unwrap_or_default();
            reasons.into_iter().filter_map(move |(reason, n)| {
                let labels = format!("{{device_id=\"{}\",reason=\"{}\"}}", label(&d.device_id), label(&reason));
                Some((labels, n.as_u64()?.to_string()))
            })
        })
        .collect();
    family(
        "backhaul_cloud_device_dropped_invalid_detections",
        "gauge",
        "Detections the device dropped before batching, by reason, since it started, as it last reported.",
        &by_reason,
    );
    family(
        "backhaul_cloud_device_drain_rate_batches_per_second",
        "gauge",
        "How fast the device's backlog shrank (negative: grew), as it last reported.",
        &per_device(&|d| d.backlog.as_ref().and_then(|b| b.drain_rate).map(|r| r.to_string())),
    );
    family(
        "backhaul_cloud_device_gaps_batches",
        "gauge",
        "seq numbers missing below the device's last seq (dropped at the edge, or not arrived yet).",
        &per_device(&|d| Some(d.gaps.to_string())),
    );
    family(
        "backhaul_cloud_device_ledger_difference_batches",
        "gauge",
        "produced - (stored + queued + dropped + quarantined + lost + dead-lettered): above 0, batches lost.",
        &per_device(&|d| d.ledger.as_ref().map(|l| l.difference.to_string())),
    );
    family(
        "backhaul_cloud_device_ledger_balanced",
        "gauge",
        "1 if the device's conservation ledger balances (GET /api/v1/devices, ledger.balanced).",
        &per_device(&|d| d.ledger.as_ref().map(|l| u8::from(l.balanced).to_string())),
    );
    match app.ingest.stats().await {
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

/// A Prometheus label value: `\`, `"` and newlines escaped (exposition format 0.0.4).
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[utoipa::path(get, path = "/api/v1/stats", tag = "read", responses((status = 200, description = "Fleet-wide counts", body = crate::store::Stats), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn stats(State(app): State<Arc<App>>, caller: Caller) -> Response {
    if let Err(r) = caller.fleet_only() {
        return r.into_response();
    }
    match app.ingest.stats().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => storage_down(e),
    }
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "read", responses((status = 200, description = "Every device (a device key: its own)", body = DevicesList), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn devices(State(app): State<Arc<App>>, caller: Caller) -> Response {
    match app.ingest.devices().await {
        // A device key sees its own device only.
        Ok(mut d) => {
            d.retain(|row| caller.allows(&row.device_id));
            Json(DevicesList { devices: d }).into_response()
        }
        Err(e) => storage_down(e),
    }
}

/// For a route about one device: 403 unless the caller may read it, 404 if this cloud never
/// heard from it.
pub(super) async fn readable_device(app: &App, caller: &Caller, device_id: &str) -> Result<(), Response> {
    caller.read_scope(Some(device_id.to_owned())).map_err(IntoResponse::into_response)?;
    match app.ingest.commands().device_known(device_id).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(super::commands::unknown_device(device_id)),
        Err(e) => Err(storage_down(e)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitParam {
    limit: Option<i64>,
}

/// `GET /api/v1/devices/{device_id}/gaps`: the device's missing `seq` ranges, lowest first
/// (`{"device_id", "gaps": [{"first", "last"}], "missing"}`, at most `limit` ranges, 1..=10000).
#[utoipa::path(get, path = "/api/v1/devices/{device_id}/gaps", tag = "read", params(("device_id" = String, Path, description = "The device (1..=64 bytes, no `/`, `+`, `#`)"), ("limit" = Option<i64>, Query, description = "Ranges at most, 1..=10000 (default 1000)")), responses((status = 200, description = "Missing seq ranges, lowest first", body = super::openapi::Gaps), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 404, description = "No such device (this cloud never heard from it)", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn gaps(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(device_id): Path<String>,
    Query(p): Query<LimitParam>,
) -> Response {
    if let Err(r) = readable_device(&app, &caller, &device_id).await {
        return r;
    }
    let limit = match super::limit_param(p.limit, 1000, 10_000) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    match app.ingest.gaps(&device_id, limit).await {
        Ok(gaps) => {
            let missing: i64 = gaps.iter().map(|g| g.last - g.first + 1).sum();
            Json(json!({ "device_id": device_id, "gaps": gaps, "missing": missing })).into_response()
        }
        Err(e) => storage_down(e),
    }
}

/// `GET /api/v1/dead-letters` (fleet key): the newest dead letters, newest first
/// (`{"dead_letters": [{"received_at", "via", "topic", "device_id", "size", "error"}]}`, at most
/// `limit`, 1..=1000).
#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "read", params(("limit" = Option<i64>, Query, description = "1..=1000 (default 100)")), responses((status = 200, description = "The newest dead letters, newest first", body = super::openapi::DeadLetters), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn dead_letters(State(app): State<Arc<App>>, caller: Caller, Query(p): Query<LimitParam>) -> Response {
    if let Err(r) = caller.fleet_only() {
        return r.into_response();
    }
    let limit = match super::limit_param(p.limit, 100, 1000) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    match app.ingest.dead_letters(limit).await {
        Ok(rows) => Json(json!({ "dead_letters": rows })).into_response(),
        Err(e) => storage_down(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DetectionParams {
    device_id: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/detections", tag = "read", params(("device_id" = Option<String>, Query, description = "One device (a device key: its own only)"), ("since" = Option<String>, Query, description = "RFC 3339, inclusive"), ("until" = Option<String>, Query, description = "RFC 3339, exclusive"), ("limit" = Option<i64>, Query, description = "1..=1000 (default 100)"), ("cursor" = Option<String>, Query, description = "A `next_cursor` this API returned")), responses((status = 200, description = "A page of detections, newest first", body = DetectionsPage), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn detections(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(mut p): Query<DetectionParams>,
) -> Response {
    // An empty or impossible device_id matches nothing: say so rather than answer an empty page.
    if let Some(Err(e)) = p.device_id.as_deref().map(backhaul_shared::batch::validate_device_id) {
        return error(StatusCode::BAD_REQUEST, format!("device_id {e}"), Some("device_id")).into_response();
    }
    p.device_id = match caller.read_scope(p.device_id.take()) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
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
    if let (Some(since), Some(until)) = (since_us, until_us) {
        if since > until {
            return error(StatusCode::BAD_REQUEST, "`since` is after `until`: nothing can match", Some("until"))
                .into_response();
        }
    }
    let after = match p.cursor.as_deref().map(parse_cursor) {
        None => None,
        Some(Some(c)) => Some(c),
        Some(None) => {
            return error(StatusCode::BAD_REQUEST, "cursor is not one this API returned", Some("cursor"))
                .into_response()
        }
    };
    let limit = match super::limit_param(p.limit, 100, 1000) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    // One row more than the page: `next_cursor` only when another page has rows (a full last page
    // used to lead to one empty page).
    let q = DetectionQuery { device_id: p.device_id, since_us, until_us, limit: limit + 1, after };
    match app.ingest.detections(&q).await {
        Ok(mut rows) => {
            let more = rows.len() as i64 > limit;
            rows.truncate(limit as usize);
            let next_cursor = more.then(|| rows.last().map(|r| r.cursor.clone())).flatten();
            Json(DetectionsPage { detections: rows, next_cursor }).into_response()
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
