//! A throwaway CA and a server certificate for `localhost` and 127.0.0.1, for TLS tests.

use std::path::PathBuf;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use super::ServerTls;

/// Installs rustls' ring provider as the process default (once; later calls do nothing).
/// tonic's TLS server needs a default provider.
pub fn install_crypto_provider() {
    // Err means one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A CA and a server certificate it signed (SANs `localhost` and `127.0.0.1`), as PEM strings
/// and as files in a temporary directory removed on drop.
pub struct TestCertificates {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub ca_path: PathBuf,
    pub server_cert_path: PathBuf,
    pub server_key_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl TestCertificates {
    pub fn generate() -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "rover-rs test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)
            .context("self-signing the CA")?;

        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_key = KeyPair::generate()?;
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .context("signing the server certificate")?;

        let dir = tempfile::tempdir()?;
        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let ca_pem = ca.pem();
        let server_cert_pem = server_cert.pem();
        let server_key_pem = server_key.serialize_pem();
        Ok(Self {
            ca_path: write("ca.pem", &ca_pem)?,
            server_cert_path: write("server.pem", &server_cert_pem)?,
            server_key_path: write("server-key.pem", &server_key_pem)?,
            ca_pem,
            server_cert_pem,
            server_key_pem,
            dir,
        })
    }

    /// What [`FakeOapConfig::tls`](super::FakeOapConfig::tls) takes.
    pub fn server_tls(&self) -> ServerTls {
        ServerTls {
            cert_pem: self.server_cert_pem.clone(),
            key_pem: self.server_key_pem.clone(),
        }
    }
}
