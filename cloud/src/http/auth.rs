//! Who is asking (`X-API-Key` or `Authorization: Bearer`) and what their key may do: one extractor,
//! [`Caller`], for every route but `/health`; each route asks it for its scope.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};

use super::{error, ApiError, App};
use crate::config::KeyScope;

/// The authenticated caller. Extracting it answers 401 without a valid key.
#[derive(Debug, Clone)]
pub(super) struct Caller(pub KeyScope);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        authenticate(app, &parts.headers).map(Caller)
    }
}

impl Caller {
    /// For fleet-wide routes (`/api/v1/stats`, `/metrics`): a device key is a 403 that says what
    /// to use.
    pub(super) fn fleet_only(&self) -> Result<(), ApiError> {
        match &self.0 {
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

    /// The device a read is limited to: a fleet key reads what it asked (`None`: every device);
    /// a device key reads its own device (no `device_id` means its own; another is a 403 on the
    /// field `device_id`).
    pub(super) fn read_scope(&self, asked: Option<String>) -> Result<Option<String>, ApiError> {
        match &self.0 {
            KeyScope::Fleet => Ok(asked),
            KeyScope::Device(own) => match asked {
                Some(asked) if asked != *own => Err(error(
                    StatusCode::FORBIDDEN,
                    format!("this API key may only read device `{own}`; reading `{asked}` needs a fleet key"),
                    Some("device_id"),
                )),
                _ => Ok(Some(own.clone())),
            },
        }
    }

    /// 403 unless the caller may act for `device_id`: a fleet key, or the device's own key, over
    /// a connection whose client certificate names it when mTLS is on (as for the bulk route).
    pub(super) fn for_device(
        &self,
        app: &App,
        peer: Option<&axum::Extension<crate::serve::PeerNames>>,
        device_id: &str,
    ) -> Result<(), ApiError> {
        if !self.allows(device_id) {
            return Err(error(
                StatusCode::FORBIDDEN,
                format!("this API key may not act for device `{device_id}`: use that device's key or a fleet key"),
                Some("device_id"),
            ));
        }
        if app.client_certificates
            && self.0 != KeyScope::Fleet
            && !peer.is_some_and(|p| p.0 .0.iter().any(|n| n == device_id))
        {
            return Err(error(
                StatusCode::FORBIDDEN,
                format!("mTLS is on: a device key's request must come with a client certificate naming `{device_id}`"),
                None,
            ));
        }
        Ok(())
    }

    /// Whether this key may read or write `device_id`'s data.
    pub(super) fn allows(&self, device_id: &str) -> bool {
        self.0.allows(device_id)
    }
}

/// The key from `X-API-Key` or `Authorization: Bearer`.
pub(super) fn authenticate(app: &App, headers: &HeaderMap) -> Result<KeyScope, ApiError> {
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
