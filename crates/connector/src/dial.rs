//! The transport: TCP with the socket options a long-lived database
//! connection needs, then SSLRequest and TLS.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dsql_proxy_protocol::startup;
use dsql_proxy_routing::Endpoint;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::io::send;
use crate::stream::BackendStream;
use crate::{ConnectError, Connector};

impl Connector {
    /// Opens a transport to `endpoint`: TCP (to `connect_address` when
    /// set, else `host:port`), then SSLRequest and TLS with SNI = `host`
    /// unless `tls = "disable"`. Unbounded: callers set the time limit.
    pub async fn dial(&self, endpoint: &Endpoint) -> Result<BackendStream, ConnectError> {
        let transport = |cause: String| ConnectError::Transport {
            endpoint: endpoint.describe(),
            cause,
        };
        let tcp = match endpoint.connect_address {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await,
        }
        .map_err(|e| transport(e.to_string()))?;
        self.tune(&tcp);

        let Some(tls) = &self.tls else {
            return Ok(BackendStream::Plain(tcp));
        };
        let tls_error = |cause: String| ConnectError::Tls {
            endpoint: endpoint.describe(),
            cause,
        };
        let mut tcp = tcp;
        let mut buf = BytesMut::with_capacity(8);
        startup::encode_ssl_request(&mut buf);
        send(&mut tcp, &buf)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| transport(format!("no answer to SSLRequest: {e}")))?;
        match answer[0] {
            b'S' => {}
            b'N' => {
                return Err(tls_error(
                    "the server does not accept TLS connections".into(),
                ))
            }
            b'E' => {
                return Err(ConnectError::Protocol {
                    endpoint: endpoint.describe(),
                    cause: "the server sent an error during TLS negotiation".into(),
                })
            }
            other => {
                return Err(ConnectError::Protocol {
                    endpoint: endpoint.describe(),
                    cause: format!("unexpected answer {other:#04x} to SSLRequest"),
                })
            }
        }
        let name = crate::tls::server_name(&endpoint.host)?;
        let tls = TlsConnector::from(Arc::clone(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| tls_error(format!("TLS handshake failed: {e}")))?;
        Ok(BackendStream::Tls(Box::new(tls)))
    }

    /// NODELAY (latency matters more than packet count for a query
    /// protocol), keepalive (an idle connection to a vanished peer is
    /// noticed), and TCP_USER_TIMEOUT (so is one whose written data is
    /// never acknowledged, within [`Connector::user_timeout`], instead of
    /// the kernel's ~15 minutes of retransmissions).
    fn tune(&self, tcp: &TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on a backend socket");
        }
        let socket = SockRef::from(tcp);
        let keepalive = TcpKeepalive::new().with_time(self.keepalive).with_interval(
            self.keepalive
                .min(Duration::from_secs(10))
                .max(Duration::from_secs(1)),
        );
        if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
            debug!(error = %e, "cannot set TCP keepalive on a backend socket");
        }
        #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
        if let Err(e) = socket.set_tcp_user_timeout(Some(self.user_timeout)) {
            debug!(error = %e, "cannot set TCP_USER_TIMEOUT on a backend socket");
        }
    }
}
