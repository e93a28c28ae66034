//! The backend side: dial an endpoint, negotiate TLS, send the startup
//! packet and answer the server's authentication challenge.

mod auth;
mod cancel;

pub use cancel::forward_cancel;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dsql_proxy_config::Secret;
use dsql_proxy_protocol::backend::ErrorFields;
use dsql_proxy_protocol::startup::{self, StartupParam};
use dsql_proxy_routing::{Endpoint, FailureKind};
use rustls::ClientConfig;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::cancel::BackendKey;
use crate::io::send;
use crate::stream::BackendStream;
use crate::SessionError;

/// How to reach backends; built once from config.
#[derive(Clone)]
pub struct BackendSettings {
    pub tls: Option<Arc<ClientConfig>>,
    pub connect_timeout: Duration,
    pub keepalive: Duration,
}

/// A backend session that reached ReadyForQuery.
pub struct BackendSession {
    pub stream: BackendStream,
    /// ParameterStatus messages, in order, to replay to the client.
    pub parameters: Vec<(String, String)>,
    /// NoticeResponses sent during startup, to replay to the client.
    pub notices: Vec<ErrorFields>,
    pub key: Option<BackendKey>,
    /// Transaction status byte of the first ReadyForQuery.
    pub ready_status: u8,
}

fn unreachable(
    endpoint: &Endpoint,
    kind: FailureKind,
    cause: impl std::fmt::Display,
) -> SessionError {
    SessionError::BackendUnreachable {
        endpoint: endpoint.describe(),
        kind,
        cause: cause.to_string(),
    }
}

/// Opens a transport (TCP, then TLS if configured) to the endpoint.
pub async fn dial(
    endpoint: &Endpoint,
    settings: &BackendSettings,
) -> Result<BackendStream, SessionError> {
    let tcp = match endpoint.connect_address {
        Some(addr) => TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(endpoint, FailureKind::Connection, e))?,
        None => TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| unreachable(endpoint, FailureKind::Connection, e))?,
    };
    // Latency matters more than packet count for a query protocol.
    let _ = tcp.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(settings.keepalive)
        .with_interval(
            settings
                .keepalive
                .min(Duration::from_secs(10))
                .max(Duration::from_secs(1)),
        );
    let _ = SockRef::from(&tcp).set_tcp_keepalive(&keepalive);

    let Some(tls) = &settings.tls else {
        return Ok(BackendStream::Plain(tcp));
    };
    let mut tcp = tcp;
    let mut buf = BytesMut::with_capacity(8);
    startup::encode_ssl_request(&mut buf);
    send(&mut tcp, &buf)
        .await
        .map_err(|e| unreachable(endpoint, FailureKind::Connection, e))?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(|e| {
        unreachable(
            endpoint,
            FailureKind::Connection,
            format!("no answer to SSLRequest: {e}"),
        )
    })?;
    match answer[0] {
        b'S' => {}
        b'N' => {
            return Err(unreachable(
                endpoint,
                FailureKind::Protocol,
                "the server does not accept TLS connections",
            ))
        }
        b'E' => {
            return Err(unreachable(
                endpoint,
                FailureKind::Protocol,
                "the server sent an error during TLS negotiation",
            ))
        }
        other => {
            return Err(unreachable(
                endpoint,
                FailureKind::Protocol,
                format!("unexpected answer {other:#04x} to SSLRequest"),
            ))
        }
    }
    let name = crate::tls::server_name(&endpoint.host)?;
    let tls = TlsConnector::from(Arc::clone(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| {
            unreachable(
                endpoint,
                FailureKind::Tls,
                format!("TLS handshake failed: {e}"),
            )
        })?;
    Ok(BackendStream::Tls(Box::new(tls)))
}

/// Dials, starts up and authenticates, all within `timeout`.
pub async fn connect(
    endpoint: &Endpoint,
    settings: &BackendSettings,
    params: &[StartupParam],
    user: &str,
    password: Option<&Secret>,
    timeout: Duration,
) -> Result<BackendSession, SessionError> {
    let attempt = async {
        let stream = dial(endpoint, settings).await?;
        auth::start_session(endpoint, stream, params, user, password).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(unreachable(
            endpoint,
            FailureKind::Timeout,
            format!("timed out after {timeout:?}"),
        )),
    }
}
