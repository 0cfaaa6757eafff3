//! Test certificates, made afresh by each test and removed with it (no
//! key is ever committed): a test CA standing in for an ACM Private CA,
//! server certificates it issues (valid, expired, for another name), and
//! a certificate from a CA nobody trusts.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::unique_name;

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate, PEM.
    pub pem: String,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From yesterday for ten years.
    Current,
    /// Ended in 2021.
    Expired,
}

/// A CA of the test's own and the files it wrote, removed on drop.
pub struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_file: PathBuf,
}

impl TestCa {
    /// A new CA named `name` (its certificate's common name).
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-pki", unique_name()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_file = dir.join("ca.pem");
        write(&ca_file, &cert.pem());
        Self {
            issuer: Issuer::new(params, key),
            dir,
            ca_file,
        }
    }

    /// The CA certificate (PEM): what `--ca-file` and clients trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A server certificate for `names` (DNS names or IP addresses),
    /// written as `<file>.pem` and `<file>.key`.
    pub fn issue(&self, file: &str, names: &[&str], validity: Validity) -> CertFiles {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("server certificate names");
        params.distinguished_name = dn(names.first().copied().unwrap_or(file));
        let (from, until) = match validity {
            Validity::Current => (
                rcgen::date_time_ymd(2024, 1, 1),
                rcgen::date_time_ymd(2039, 1, 1),
            ),
            Validity::Expired => (
                rcgen::date_time_ymd(2020, 1, 1),
                rcgen::date_time_ymd(2021, 1, 1),
            ),
        };
        params.not_before = from;
        params.not_after = until;
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
            pem: cert.pem(),
        };
        write(&files.cert, &files.pem);
        write(&files.key, &key.serialize_pem());
        files
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
