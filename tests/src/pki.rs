//! A private CA for tests (rcgen): a CA certificate and leaf certificates it signs, written as PEM
//! files into a temp dir, with the names and validity a test asks for (issue #16).

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use time::{Duration, OffsetDateTime};

/// A CA in a temp dir; `ca_file` is its certificate (PEM).
pub struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    pub ca_file: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("ca_file", &self.ca_file).finish_non_exhaustive()
    }
}

/// A leaf certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Pki {
    /// A new CA named `name`, valid from a day ago for a year.
    pub fn new(name: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("backhaul-pki-").tempdir()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365);
        let ca_key = KeyPair::generate()?;
        let ca = params.self_signed(&ca_key)?;
        let ca_file = dir.path().join(format!("{name}.pem"));
        std::fs::write(&ca_file, ca.pem())?;
        Ok(Self { dir, ca, ca_key, ca_file })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A certificate with common name `cn` and subjectAltNames `sans` (an IP address string
    /// becomes an IP SAN), valid from a day ago for 30 days.
    pub fn issue(&self, cn: &str, sans: &[&str]) -> Result<Issued> {
        let now = OffsetDateTime::now_utc();
        self.issue_valid(cn, sans, now - Duration::days(1), now + Duration::days(30))
    }

    /// Like [`Pki::issue`], valid from `not_before` to `not_after`.
    pub fn issue_valid(
        &self,
        cn: &str,
        sans: &[&str],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued> {
        let mut params = CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca, &self.ca_key)?;
        let stem = format!("{cn}-{}", fastrand::u32(..));
        let (cert_file, key_file) =
            (self.dir.path().join(format!("{stem}.pem")), self.dir.path().join(format!("{stem}.key")));
        std::fs::write(&cert_file, cert.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        Ok(Issued { cert_file, key_file })
    }
}
