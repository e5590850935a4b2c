//! The command routes (issue #18; SPEC.md "Wave 2 additions", "HTTP, more routes"):
//!
//! | request | who | answers |
//! | --- | --- | --- |
//! | `POST /api/v1/devices/{device_id}/commands` `{"kind": ...}` | a fleet key | 202 `{"command_id", "status": "queued"}`; 422 unknown kind or bad field (naming it); 404 a device this cloud has never heard from (also for the listings) |
//! | `GET /api/v1/devices/{device_id}/commands[?status=S&limit=N]` | a fleet key, or that device's key | 200 `{"commands": [...]}`, newest first (a device fetching its work: oldest first) |
//! | `GET /api/v1/devices/{device_id}/commands/{command_id}` | the same | 200 the command; 404 |
//! | `POST /api/v1/devices/{device_id}/commands/{command_id}/result` | that device's key (or a fleet key) | 200 `{"status": "recorded" \| "already_final"}`; 404; 422 |
//!
//! A device's own key asking for `status=queued` (or any key with `&fetch=1`: an edge that holds
//! a fleet key) is the device fetching its work (HTTP mode): it
//! gets every command it has not answered yet (`queued` or `delivered`: an answer lost on the way
//! may need a redelivery, which the device answers from its record without running it again),
//! and they become `delivered`. With mTLS (`tls.client_ca_file`) a device key's request must come
//! with that device's certificate, as for the bulk route.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use backhaul_shared::command::{CommandKind, CommandResult, CommandStatus};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::Caller;
use super::{error, storage_down, App, Path, Query, RawBody};
use crate::config::KeyScope;
use crate::store::{CommandFilter, CommandRow, Finished};

/// 404: the cloud never heard from `device_id`.
pub(super) fn unknown_device(device_id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no device `{device_id}` has sent anything to this cloud: check the id (GET /api/v1/devices); a new Pi \
             can be commanded once it has connected"
        ),
        Some("device_id"),
    )
    .into_response()
}

/// `GET /api/v1/devices/{device_id}/commands`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct CommandList {
    commands: Vec<CommandRow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    status: Option<String>,
    limit: Option<i64>,
    /// `1`: the device itself fetching its work (an edge that holds a fleet key says so; one
    /// with its own key need not).
    fetch: Option<u8>,
}

/// The most commands a listing returns.
const MAX_LIST: i64 = 1000;

/// `POST /api/v1/devices/{device_id}/commands`.
#[utoipa::path(post, path = "/api/v1/devices/{device_id}/commands", tag = "commands", params(("device_id" = String, Path, description = "The device (1..=64 bytes, no `/`, `+`, `#`)")), request_body(content = backhaul_shared::command::CommandKind, content_type = "application/json", description = "What the device is to do (SPEC.md, \"Commands\")"), responses((status = 202, description = "Queued", body = super::openapi::CommandQueued), (status = 413, description = "The body is over max_body_bytes", body = super::openapi::ErrorBody), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 404, description = "No such device (never heard from), or no such command", body = super::openapi::ErrorBody), (status = 422, description = "The body is not what this route takes (`field` names what is wrong)", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn create(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(device_id): Path<String>,
    RawBody(body): RawBody,
) -> Response {
    if caller.0 != KeyScope::Fleet {
        return error(
            StatusCode::FORBIDDEN,
            "only a fleet (operator) key (\"*\" in the keys file) may command a device; a device key, even the \
             device's own, may only read and answer its commands",
            None,
        )
        .into_response();
    }
    let kind = match CommandKind::parse(&body) {
        Ok(k) => k,
        Err((field, message)) => {
            return error(StatusCode::UNPROCESSABLE_ENTITY, message, field.as_deref()).into_response()
        }
    };
    match app.ingest.commands().device_known(&device_id).await {
        Ok(true) => {}
        Ok(false) => return unknown_device(&device_id),
        Err(e) => return storage_down(e),
    }
    match app.ingest.commands().create(&device_id, &kind).await {
        Ok(row) => {
            tracing::info!(device_id, command_id = %row.command_id, kind = kind.name(), "command queued");
            app.commands_queued.notify_one();
            (StatusCode::ACCEPTED, Json(json!({ "command_id": row.command_id, "status": row.status }))).into_response()
        }
        Err(e) => storage_down(e),
    }
}

/// `GET /api/v1/devices/{device_id}/commands`.
#[utoipa::path(get, path = "/api/v1/devices/{device_id}/commands", tag = "commands", params(("device_id" = String, Path, description = "The device (1..=64 bytes, no `/`, `+`, `#`)"), ("status" = Option<String>, Query, description = "queued, delivered, done or failed"), ("limit" = Option<i64>, Query, description = "1..=1000 (default 100)"), ("fetch" = Option<u8>, Query, description = "1: the device itself fetching its work")), responses((status = 200, description = "The device's commands, newest first", body = CommandList), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 404, description = "No such device (never heard from), or no such command", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn list(
    State(app): State<Arc<App>>,
    caller: Caller,
    peer: Option<axum::Extension<crate::serve::PeerNames>>,
    Path(device_id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(e) = caller.for_device(&app, peer.as_ref(), &device_id) {
        return e.into_response();
    }
    let status = match q.status.as_deref().map(str::parse::<CommandStatus>).transpose() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e, Some("status")).into_response(),
    };
    let limit = match super::limit_param(q.limit, 100, MAX_LIST) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let fetching = status == Some(CommandStatus::Queued) && (caller.0 != KeyScope::Fleet || q.fetch == Some(1));
    if !fetching {
        match app.ingest.commands().device_known(&device_id).await {
            Ok(true) => {}
            Ok(false) => return unknown_device(&device_id),
            Err(e) => return storage_down(e),
        }
    }
    let filter = match status {
        _ if fetching => CommandFilter::Open,
        Some(s) => CommandFilter::Status(s),
        None => CommandFilter::All,
    };
    let commands = app.ingest.commands();
    let mut rows = match commands.list(&device_id, filter, limit).await {
        Ok(r) => r,
        Err(e) => return storage_down(e),
    };
    if fetching {
        // Only the ones not handed out yet: a command fetched again (its answer not in yet) costs
        // no write at every poll.
        for row in rows.iter_mut().filter(|r| r.status == CommandStatus::Queued.as_str()) {
            if let Err(e) = commands.delivered(&device_id, &row.command_id, None).await {
                return storage_down(e);
            }
            row.status = CommandStatus::Delivered.as_str().into();
        }
    }
    Json(CommandList { commands: rows }).into_response()
}

/// `GET /api/v1/devices/{device_id}/commands/{command_id}`.
#[utoipa::path(get, path = "/api/v1/devices/{device_id}/commands/{command_id}", tag = "commands", params(("device_id" = String, Path, description = "The device (1..=64 bytes, no `/`, `+`, `#`)"), ("command_id" = String, Path, description = "The command (a ULID)")), responses((status = 200, description = "The command", body = crate::store::CommandRow), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 404, description = "No such device (never heard from), or no such command", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn get_one(
    State(app): State<Arc<App>>,
    caller: Caller,
    peer: Option<axum::Extension<crate::serve::PeerNames>>,
    Path((device_id, command_id)): Path<(String, String)>,
) -> Response {
    if let Err(e) = caller.for_device(&app, peer.as_ref(), &device_id) {
        return e.into_response();
    }
    match app.ingest.commands().get(&device_id, &command_id).await {
        Ok(Some(row)) => Json(row).into_response(),
        Ok(None) => not_found(&device_id, &command_id),
        Err(e) => storage_down(e),
    }
}

fn not_found(device_id: &str, command_id: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("device `{device_id}` has no command `{command_id}`"), Some("command_id"))
        .into_response()
}

/// `POST /api/v1/devices/{device_id}/commands/{command_id}/result`.
#[utoipa::path(post, path = "/api/v1/devices/{device_id}/commands/{command_id}/result", tag = "commands", params(("device_id" = String, Path, description = "The device (1..=64 bytes, no `/`, `+`, `#`)"), ("command_id" = String, Path, description = "The command (a ULID)")), request_body(content = backhaul_shared::command::CommandResult, content_type = "application/json", description = "The device's answer"), responses((status = 200, description = "Recorded (`recorded`, or `already_final` if it was answered before)", body = super::openapi::Recorded), (status = 413, description = "The body is over max_body_bytes", body = super::openapi::ErrorBody), (status = 400, description = "A malformed parameter or body (`field` names it)", body = super::openapi::ErrorBody), (status = 401, description = "No key, or a key this cloud does not know", body = super::openapi::ErrorBody), (status = 403, description = "The key may not do this: a device key on a fleet-wide route or for another device", body = super::openapi::ErrorBody), (status = 404, description = "No such device (never heard from), or no such command", body = super::openapi::ErrorBody), (status = 422, description = "The body is not what this route takes (`field` names what is wrong)", body = super::openapi::ErrorBody), (status = 503, description = "The database does not answer: retry after Retry-After", body = super::openapi::ErrorBody, headers(("Retry-After" = String, description = "Seconds to wait before retrying")))))]
pub(super) async fn result(
    State(app): State<Arc<App>>,
    caller: Caller,
    peer: Option<axum::Extension<crate::serve::PeerNames>>,
    Path((device_id, command_id)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Response {
    if let Err(e) = caller.for_device(&app, peer.as_ref(), &device_id) {
        return e.into_response();
    }
    let result: CommandResult = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("not a command result ({{\"command_id\", \"status\": \"done\"|\"failed\", \"result\", \"finished_at\"}}): {e}"),
                None,
            )
            .into_response()
        }
    };
    if result.command_id.to_string() != command_id {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body's command_id is not the one in the path",
            Some("command_id"),
        )
        .into_response();
    }
    if !result.status.is_final() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "a result's status is `done` or `failed`", Some("status"))
            .into_response();
    }
    match app.ingest.commands().finish(&device_id, &result).await {
        Ok(Finished::Recorded) => {
            tracing::info!(device_id, command_id, status = result.status.as_str(), "command answered");
            Json(json!({ "status": "recorded" })).into_response()
        }
        Ok(Finished::AlreadyFinal) => Json(json!({ "status": "already_final" })).into_response(),
        Ok(Finished::Unknown) => not_found(&device_id, &command_id),
        Err(e) => storage_down(e),
    }
}
