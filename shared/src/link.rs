//! What both binaries' links to a broker share (issue #16, item 7), so that TLS, credentials and
//! reconnect pacing exist once: the broker's address and login with its TLS config
//! ([`MqttEndpoint`], from the URL parsed by [`crate::wire::parse_mqtt_url`] and the TLS material
//! of [`crate::tls`]), the reconnect [`Backoff`], and [`notify`] for systemd.

use std::sync::Arc;

pub use crate::backoff::Backoff;

/// Where and how to reach an MQTT broker: host, port, login and TLS. Each binary adds its own
/// session settings (persistence, limits, last will) to the options this builds.
#[derive(Clone)]
pub struct MqttEndpoint {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    /// Never logged.
    pub password: Option<String>,
    /// For `mqtts://` (see [`crate::tls::ClientMaterial::rustls_config`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for MqttEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttEndpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl MqttEndpoint {
    /// MQTT 5 options for `client_id` with this endpoint's address, login and TLS.
    pub fn v5_options(&self, client_id: impl Into<String>) -> rumqttc::v5::MqttOptions {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, self.host.clone(), self.port);
        if let Some(user) = &self.username {
            o.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
        }
        o
    }

    /// MQTT 3.1.1 options, as [`MqttEndpoint::v5_options`].
    pub fn v311_options(&self, client_id: impl Into<String>) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(client_id, self.host.clone(), self.port);
        if let Some(user) = &self.username {
            o.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
        }
        o
    }

    /// `host:port`, for messages.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Sends to systemd's notify socket, if there is one (sd_notify(3)). A failure is logged, not
/// fatal: the watchdog (if any) then restarts the service, which is the right outcome for a broken
/// notify socket.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sending a notification to systemd failed");
    }
}
