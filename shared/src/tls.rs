//! TLS for every backhaul link (issue #16), in one place for both binaries: the `[transport.tls]`
//! (edge) and `[mqtt.tls]` (cloud) client settings, the cloud's server settings, and the loading
//! and checking of certificates and keys.
//!
//! - rustls with **ring as the only crypto provider**, passed explicitly to every config
//!   (rumqttc's and ureq's default features pull in aws-lc-rs, which breaks aarch64 cross builds;
//!   with two providers compiled in rustls panics at the first handshake: PITFALLS.md).
//! - Every certificate is read and checked when the config is loaded (`run`, `serve` and
//!   `check-config`), so a bad file is a clear error at start that names the file and what to do,
//!   never a panic or a handshake failure later: unreadable, not PEM, X.509 v1 (rustls accepts
//!   only v3; ureq 3.5 panics on v1, ureq #1077), expired, and a server certificate without a
//!   subjectAltName (rustls matches host names only against SANs, RFC 6125 section 6.4.4).
//! - A certificate that is not yet valid is a warning, not an error: on a Pi without an RTC the
//!   clock reads 1970 until NTP syncs, so the clock is the likely cause, and the link retries
//!   until the time is right ([`explain_handshake_error`] says so when a handshake fails).

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};

/// Where a client's trusted roots come from, instead of a `ca_file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Roots {
    /// The operating system's store (`/etc/ssl/certs` on Debian), via `rustls-native-certs`.
    System,
    /// Mozilla's roots, compiled in (`webpki-roots`).
    Webpki,
}

/// A client's TLS settings: `[transport.tls]` on the edge, `[mqtt.tls]` on the cloud (SPEC.md,
/// wave 2 additions, "TLS"). Used by `mqtts://` and `https://` URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM file of the CA(s) that issued the server's certificate (a private CA, the usual case).
    pub ca_file: Option<PathBuf>,
    /// Or the system's or Mozilla's roots. Exactly one of `ca_file` and `roots` must be set.
    pub roots: Option<Roots>,
    /// A client certificate (PEM, the leaf first) and its private key (PEM: PKCS#8, PKCS#1 or
    /// SEC1), for mTLS; both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the URL's host (e.g. a broker
    /// reached by IP address whose certificate names its DNS name).
    pub server_name: Option<String>,
}

/// A TLS setting that cannot be used: the message names the file or key and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn err(message: impl Into<String>) -> TlsError {
    TlsError(message.into())
}

/// The crypto provider of every config: ring (see the module docs).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a certificate is for, which decides the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A CA in a `ca_file` or `client_ca_file`.
    Ca,
    /// A server's own certificate: needs a subjectAltName.
    Server,
    /// A client's certificate (mTLS).
    Client,
}

/// Certificates read from a PEM file and checked, with warnings that do not stop a start (a
/// certificate not yet valid).
#[derive(Debug, Clone)]
pub struct Certs {
    pub certs: Vec<CertificateDer<'static>>,
    pub warnings: Vec<String>,
}

/// Reads the certificates of a PEM file and checks the first (the leaf; for [`Role::Ca`] every
/// one) against `now` (seconds since the Unix epoch). `key` names the setting, for messages.
pub fn load_certs(path: &Path, key: &str, role: Role, now: i64) -> Result<Certs, TlsError> {
    let text = std::fs::read(path)
        .map_err(|e| err(format!("{key}: cannot read the certificate file {}: {e}", path.display())))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("{key}: {} is not a PEM certificate file: {e:?}", path.display())))?;
    if certs.is_empty() {
        return Err(err(format!(
            "{key}: {} holds no certificate (expected PEM blocks `-----BEGIN CERTIFICATE-----`)",
            path.display()
        )));
    }
    let mut warnings = Vec::new();
    let checked = if role == Role::Ca { certs.len() } else { 1 };
    for (i, der) in certs.iter().take(checked).enumerate() {
        let what = if checked > 1 {
            format!("{key}: certificate {} of {}", i + 1, path.display())
        } else {
            format!("{key}: {}", path.display())
        };
        if let Some(warning) = check_certificate(der, &what, role, now)? {
            warnings.push(warning);
        }
    }
    Ok(Certs { certs, warnings })
}

/// Checks one DER certificate; `Ok(Some(warning))` if it is not valid yet.
pub fn check_certificate(der: &[u8], what: &str, role: Role, now: i64) -> Result<Option<String>, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| err(format!("{what}: not an X.509 certificate ({e}): reissue it")))?;
    if cert.version() != x509_parser::x509::X509Version::V3 {
        return Err(err(format!(
            "{what}: an X.509 v{} certificate; TLS needs v3 (rustls refuses older ones): reissue it with \
             extensions (openssl: `-extfile` with subjectAltName, or `openssl req -x509 -addext ...`)",
            cert.version().0 + 1
        )));
    }
    let validity = cert.validity();
    let (from, until) = (validity.not_before.timestamp(), validity.not_after.timestamp());
    if now > until {
        return Err(err(format!(
            "{what}: expired on {} (now {}): issue a new certificate{}",
            rfc3339(until),
            rfc3339(now),
            if role == Role::Ca { " for the CA and reissue what it signed" } else { "" }
        )));
    }
    if role == Role::Server && !has_san(&cert) {
        return Err(err(format!(
            "{what}: has no subjectAltName; TLS clients match the host only against it (RFC 6125): reissue \
             it with subjectAltName = DNS:your.host (or IP:address)"
        )));
    }
    if now < from {
        return Ok(Some(format!(
            "{what}: not valid until {} but the clock says {}; if this machine's clock is not synced yet (a \
             Pi without an RTC starts in 1970 until NTP syncs) that is the likely cause, and connections \
             succeed once it is; otherwise the certificate was issued with a future start",
            rfc3339(from),
            rfc3339(now)
        )));
    }
    Ok(None)
}

fn has_san(cert: &x509_parser::certificate::X509Certificate<'_>) -> bool {
    cert.subject_alternative_name().ok().flatten().is_some_and(|san| !san.value.general_names.is_empty())
}

/// The names a certificate carries: its subjectAltName DNS names and its subject's common names
/// (for mTLS, where a device's certificate must name its `device_id`).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    names.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_owned));
    names
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{unix} s after the Unix epoch"))
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1). The key's bytes never appear in an error.
pub fn load_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_key_pem(path, key)?;
    parse_key(&pem).ok_or_else(|| err(format!("{key}: {} holds no PEM private key", path.display())))
}

/// The PEM text of a private key file, checked to hold a key (see [`load_key`]). For clients that
/// take PEM (ureq) as well as rustls, so the file is read once.
pub fn read_key_pem(path: &Path, key: &str) -> Result<Vec<u8>, TlsError> {
    let text = std::fs::read(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (the service's user must be able to read it: chown it to that user with mode 0600, or pass it as a \
             systemd credential with LoadCredential=)"
        } else {
            ""
        };
        err(format!("{key}: cannot read the key file {}: {e}{hint}", path.display()))
    })?;
    if parse_key(&text).is_none() {
        return Err(err(format!(
            "{key}: {} holds no PEM private key (expected `-----BEGIN PRIVATE KEY-----`, `RSA PRIVATE KEY` or `EC \
             PRIVATE KEY`)",
            path.display()
        )));
    }
    Ok(text)
}

fn parse_key(pem: &[u8]) -> Option<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).ok()
}

/// The current time, seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A client's checked TLS material, ready to build the config a transport needs. Its Debug
/// output never shows the key.
#[derive(Clone)]
pub struct ClientMaterial {
    /// The trusted roots (from `ca_file` or `roots = "system"`); with `webpki`, Mozilla's too.
    pub roots: Vec<CertificateDer<'static>>,
    pub webpki: bool,
    /// The client certificate and key, for mTLS.
    pub identity: Option<ClientIdentity>,
    pub server_name: Option<String>,
    /// Things to log at start (a certificate not yet valid).
    pub warnings: Vec<String>,
}

/// A client certificate chain and its key, with the files they came from (for messages).
#[derive(Clone)]
pub struct ClientIdentity {
    pub certs: Vec<CertificateDer<'static>>,
    /// The key file's PEM text, checked to hold a key: rustls parses it, ureq takes it as it is.
    /// Never logged.
    pub key_pem: Arc<Vec<u8>>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ClientMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientMaterial")
            .field("roots", &self.roots.len())
            .field("webpki", &self.webpki)
            .field("client_certificate", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Loads and checks everything the settings name; `section` is `transport.tls` or
    /// `mqtt.tls`, for messages.
    pub fn load(&self, section: &str, now: i64) -> Result<ClientMaterial, TlsError> {
        let mut warnings = Vec::new();
        let roots = match (&self.ca_file, self.roots) {
            (Some(_), Some(_)) => {
                return Err(err(format!("{section}: set either ca_file or roots, not both")));
            }
            (None, None) => {
                return Err(err(format!(
                    "{section}: set ca_file (the CA that issued the server's certificate) or roots = \"system\" \
                     or \"webpki\""
                )));
            }
            (Some(file), None) => {
                let c = load_certs(file, &format!("{section}.ca_file"), Role::Ca, now)?;
                warnings.extend(c.warnings);
                c.certs
            }
            (None, Some(Roots::Webpki)) => Vec::new(),
            (None, Some(Roots::System)) => {
                let found = rustls_native_certs::load_native_certs();
                if found.certs.is_empty() {
                    return Err(err(format!(
                        "{section}.roots = \"system\": no certificate found in the system's store ({} errors); \
                         install ca-certificates or use ca_file",
                        found.errors.len()
                    )));
                }
                found.certs
            }
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let c = load_certs(cert, &format!("{section}.cert_file"), Role::Client, now)?;
                warnings.extend(c.warnings);
                Some(ClientIdentity {
                    certs: c.certs,
                    key_pem: Arc::new(read_key_pem(key, &format!("{section}.key_file"))?),
                    cert_file: cert.clone(),
                    key_file: key.clone(),
                })
            }
            _ => return Err(err(format!("{section}: cert_file and key_file go together (mTLS); set both or neither"))),
        };
        if let Some(name) = &self.server_name {
            rustls::pki_types::ServerName::try_from(name.as_str())
                .map_err(|e| err(format!("{section}.server_name: `{name}` is not a DNS name or IP address: {e}")))?;
        }
        let webpki = self.roots == Some(Roots::Webpki);
        let material = ClientMaterial { roots, webpki, identity, server_name: self.server_name.clone(), warnings };
        // Build once now, so a key that does not match its certificate fails at start.
        material.rustls_config(section)?;
        Ok(material)
    }
}

impl ClientMaterial {
    /// A rustls client config (ring only). `webpki`: trust Mozilla's roots.
    pub fn rustls_config(&self, section: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut store = RootCertStore::empty();
        if self.webpki {
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for cert in &self.roots {
            // A CA file with one unusable certificate among good ones still works; all unusable
            // is an error below.
            let _ = store.add(cert.clone());
        }
        if store.is_empty() {
            return Err(err(format!("{section}: none of the CA certificates can be used as a trust anchor")));
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(format!("{section}: {e}")))?;
        let builder = match &self.server_name {
            None => builder.with_root_certificates(store),
            Some(name) => {
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
                    .build()
                    .map_err(|e| err(format!("{section}: {e}")))?;
                let name = rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| err(format!("{section}.server_name: {e}")))?;
                builder.dangerous().with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }))
            }
        };
        let config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some(id) => {
                let key =
                    parse_key(&id.key_pem).ok_or_else(|| err(format!("{section}.key_file: no PEM private key")))?;
                builder.with_client_auth_cert(id.certs.clone(), key).map_err(|e| {
                    err(format!(
                        "{section}: the key in {} is not the key of the certificate in {} ({e}): point key_file at \
                         the key that was made with that certificate (issue.sh writes NAME.pem and NAME.key side by \
                         side)",
                        id.key_file.display(),
                        id.cert_file.display()
                    ))
                })?
            }
        };
        Ok(Arc::new(config))
    }
}

/// WebPKI verification against a configured `server_name` instead of the host connected to
/// (rumqttc takes the name it verifies from the host it connects to). Everything else is
/// rustls's own verifier: chain, validity, signatures.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connected_to: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS material for a link: `url_tls` says whether its URL asks for TLS (`mqtts://`,
/// `https://`). TLS without a `[…tls]` section trusts the system's roots (as curl does); a section
/// with a URL that does not ask for TLS is an error (a forgotten `s` would silently send in clear).
pub fn client_material(
    url_tls: bool,
    tls: Option<&ClientTls>,
    section: &str,
    url_key: &str,
    now: i64,
) -> Result<Option<ClientMaterial>, TlsError> {
    match (url_tls, tls) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(err(format!(
            "{section} is set but {url_key} does not ask for TLS: use {} or remove {section}",
            if url_key.contains("http") { "https://" } else { "mqtts://" }
        ))),
        (true, Some(t)) => t.load(section, now).map(Some),
        (true, None) => ClientTls { roots: Some(Roots::System), ..Default::default() }.load(section, now).map(Some),
    }
}

/// The cloud's HTTP listener settings (`[tls]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// The server's certificate chain (PEM, leaf first; it needs a subjectAltName) and key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// mTLS: clients must present a certificate issued by this CA, whose CN or a DNS
    /// subjectAltName equals the `device_id` they post for.
    pub client_ca_file: Option<PathBuf>,
}

impl ServerTls {
    /// Loads, checks and builds the rustls server config (ring only). Warnings in the second
    /// field.
    pub fn load(&self, now: i64) -> Result<(Arc<rustls::ServerConfig>, Vec<String>), TlsError> {
        let certs = load_certs(&self.cert_file, "tls.cert_file", Role::Server, now)?;
        let mut warnings = certs.warnings;
        let key = load_key(&self.key_file, "tls.key_file")?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(format!("tls: {e}")))?;
        let builder = match &self.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(file) => {
                let ca = load_certs(file, "tls.client_ca_file", Role::Ca, now)?;
                warnings.extend(ca.warnings);
                let mut store = RootCertStore::empty();
                for cert in ca.certs {
                    let _ = store.add(cert);
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
                    .build()
                    .map_err(|e| err(format!("tls.client_ca_file {}: {e}", file.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(certs.certs, key).map_err(|e| {
            err(format!(
                "tls: the key in {} is not the key of the certificate in {} ({e}): point tls.key_file at the key \
                 that was made with that certificate",
                self.key_file.display(),
                self.cert_file.display()
            ))
        })?;
        Ok((Arc::new(config), warnings))
    }
}

/// A failed TLS handshake, in words an operator can act on: a certificate that is not valid yet
/// is most likely this machine's unsynced clock.
pub fn explain_handshake_error(error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    if lower.contains("notvalidyet") || lower.contains("not valid yet") || lower.contains("not valid until") {
        format!(
            "{error}: the server's certificate is not valid yet by this machine's clock; if the clock is not synced \
             (no RTC, NTP not yet reached) that is the cause, and the link retries until it is"
        )
    } else if lower.contains("expired") {
        format!("{error}: a certificate has expired (or this machine's clock is wrong)")
    } else if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        format!("{error}: the server's certificate is not issued by the configured CA (ca_file / roots)")
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        format!("{error}: the server's certificate does not name this host; set server_name or fix the URL")
    } else {
        error.to_owned()
    }
}
