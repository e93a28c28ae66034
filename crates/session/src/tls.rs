//! TLS towards local clients, built once at startup (the backend leg's is
//! `dsql_proxy_connector::tls`).

use std::path::Path;
use std::sync::Arc;

use dsql_proxy_connector::tls::provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::SessionError;

/// ALPN protocol id PostgreSQL 17 requires for direct TLS negotiation.
pub const POSTGRES_ALPN: &[u8] = b"postgresql";

fn setup_error(what: String) -> SessionError {
    SessionError::Setup(what)
}

/// Server config for TLS towards local clients.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, SessionError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect())
        .map_err(|e| {
            setup_error(format!(
                "cannot read TLS certificate {}: {e}",
                cert_file.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(setup_error(format!(
            "no certificate in {}",
            cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| setup_error(format!("cannot read TLS key {}: {e}", key_file.display())))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup_error(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| setup_error(format!("TLS certificate/key mismatch or invalid: {e}")))?;
    config.alpn_protocols = vec![POSTGRES_ALPN.to_vec()];
    Ok(Arc::new(config))
}
