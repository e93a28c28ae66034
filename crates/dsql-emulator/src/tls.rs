//! Server TLS the way DSQL does it: a certificate for the cluster host and
//! no handshake without SNI.

use std::path::Path;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tracing::warn;

use crate::error::tls_error;
use crate::EmulatorError;

/// The session crate's server config (aws-lc-rs provider, ALPN `postgresql` for
/// direct TLS) with a certificate resolver that refuses ClientHellos
/// without SNI, which fails the handshake.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, EmulatorError> {
    let base = dsql_proxy_session::tls::server_config(cert, key).map_err(tls_error)?;
    let mut config = ServerConfig::clone(&base);
    config.cert_resolver = Arc::new(RequireSni {
        inner: Arc::clone(&config.cert_resolver),
    });
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct RequireSni {
    inner: Arc<dyn ResolvesServerCert>,
}

impl ResolvesServerCert for RequireSni {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if client_hello.server_name().is_none() {
            warn!("refusing TLS handshake: ClientHello has no SNI (DSQL requires the server name)");
            return None;
        }
        self.inner.resolve(client_hello)
    }
}
