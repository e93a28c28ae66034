//! A throwaway certificate authority for TLS tests.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tempfile::TempDir;

use crate::process::Watchdog;

/// A self-signed CA plus the directory its files live in. The directory is
/// removed when the `TestPki` is dropped, so keep it alive as long as any
/// process may read the files.
pub struct TestPki {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    ca_cert_path: PathBuf,
    issued: AtomicUsize,
    // Removes `dir` if the test process dies without unwinding.
    _watchdog: Watchdog,
    dir: TempDir,
}

/// A server certificate signed by a [`TestPki`] CA.
#[derive(Clone, Debug)]
pub struct ServerCert {
    /// PEM certificate, mode 0644.
    pub cert_path: PathBuf,
    /// PEM PKCS#8 private key, mode 0600, owned by the current user.
    pub key_path: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("dsql-pki-")
            .tempdir()
            .expect("create PKI tempdir");
        // Tempdirs are 0700; let other users (e.g. `postgres`) read the certs.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod PKI tempdir 0755");

        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "dsql-proxy test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("generate CA key");
        let ca_cert = params.self_signed(&ca_key).expect("self-sign CA");

        let ca_cert_path = dir.path().join("ca.crt");
        write_file(&ca_cert_path, ca_cert.pem().as_bytes(), 0o644);

        TestPki {
            ca_cert,
            ca_key,
            ca_cert_path,
            issued: AtomicUsize::new(0),
            _watchdog: Watchdog::spawn(r#"rm -rf "$1""#, &[dir.path().as_os_str()]),
            dir,
        }
    }

    /// Issues a server certificate (serverAuth) for `dns_names`; entries that
    /// parse as IP addresses become IP SANs. Each call gets a fresh key.
    pub fn issue_server(&self, dns_names: &[&str]) -> ServerCert {
        assert!(
            !dns_names.is_empty(),
            "issue_server needs at least one name"
        );
        let names: Vec<String> = dns_names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names)
            .unwrap_or_else(|e| panic!("invalid server cert names {dns_names:?}: {e}"));
        params
            .distinguished_name
            .push(DnType::CommonName, dns_names[0]);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];

        let key = KeyPair::generate().expect("generate server key");
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign server cert with test CA");

        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let cert_path = self.dir.path().join(format!("server-{n}.crt"));
        let key_path = self.dir.path().join(format!("server-{n}.key"));
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        write_file(&cert_path, cert_pem.as_bytes(), 0o644);
        write_file(&key_path, key_pem.as_bytes(), 0o600);
        ServerCert {
            cert_path,
            key_path,
            cert_pem,
            key_pem,
        }
    }

    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert_path
    }

    pub fn ca_pem(&self) -> String {
        self.ca_cert.pem()
    }

    pub fn ca_cert_der(&self) -> CertificateDer<'static> {
        self.ca_cert.der().clone()
    }

    /// The directory holding the CA and issued files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A root store containing only this CA.
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_cert_der())
            .expect("add test CA to root store");
        roots
    }

    /// A rustls client config trusting only this CA. The aws-lc-rs provider is
    /// passed explicitly so no process-wide default provider is required.
    pub fn rustls_client_config(&self) -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs provider supports the default TLS versions")
        .with_root_certificates(self.root_store())
        .with_no_client_auth();
        Arc::new(config)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// Writes `contents` to `path` with `mode`, applying the mode at creation so
/// a key is never briefly world-readable.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(contents)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    // `mode` above is filtered by the umask and ignored for existing files.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {} {mode:o}: {e}", path.display()));
}
