//! Reaching one backend, and nothing else: dial (TCP with NODELAY,
//! keepalive and `TCP_USER_TIMEOUT`), SSLRequest and TLS (rustls, SNI =
//! the endpoint's host, `connect_address` dialled instead of `host:port`),
//! the StartupMessage, authentication (cleartext, MD5, SCRAM-SHA-256 with
//! the codec from `dsql-proxy-protocol`) up to ReadyForQuery; and
//! forwarding a CancelRequest.
//!
//! Every dialer uses it: the session data path (through its connect loop),
//! the health probes, the cancel forwarder and the DSQL emulator. It knows
//! no routing policy, no client and no session: one endpoint, one attempt,
//! and a [`ConnectError`] that says what failed and whether another
//! endpoint is worth trying.

mod auth;
mod cancel;
mod dial;
mod error;
pub mod io;
pub mod stream;
pub mod tls;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dsql_proxy_config::{BackendConfig, Secret, TlsMode};
use dsql_proxy_protocol::backend::ErrorFields;
use dsql_proxy_protocol::startup::StartupParam;
use dsql_proxy_protocol::tracking::ParameterValues;
use dsql_proxy_protocol::CancelKey;
use dsql_proxy_routing::Endpoint;
use rustls::ClientConfig;

pub use error::ConnectError;
pub use stream::BackendStream;

/// How long written data may stay unacknowledged before the kernel gives
/// up on a backend connection (`TCP_USER_TIMEOUT`): a peer that vanished
/// mid-request is noticed after this, not after the ~15 minutes of
/// retransmissions Linux allows by default.
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach backends: TLS, socket options and the authentication
/// policy. Built once from `[backend]`; cheap to share behind an `Arc`.
#[derive(Clone)]
pub struct Connector {
    tls: Option<Arc<ClientConfig>>,
    tls_mode: TlsMode,
    keepalive: Duration,
    user_timeout: Duration,
    allow_cleartext_password: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls_mode", &self.tls_mode)
            .field("keepalive", &self.keepalive)
            .field("user_timeout", &self.user_timeout)
            .field("allow_cleartext_password", &self.allow_cleartext_password)
            .finish_non_exhaustive()
    }
}

/// Who to log in as: the startup parameters (`user` and `database`
/// included) and the secret for the server's challenge, if any.
#[derive(Debug, Clone, Copy)]
pub struct StartupLogin<'a> {
    pub user: &'a str,
    pub params: &'a [StartupParam],
    pub password: Option<&'a Secret>,
}

/// A backend connection that reached ReadyForQuery.
pub struct BackendConnection {
    pub stream: BackendStream,
    /// The ParameterStatus values it reported (the last of one name wins).
    pub parameters: ParameterValues,
    /// NoticeResponses sent during startup.
    pub notices: Vec<ErrorFields>,
    /// The server's BackendKeyData, if it sent one.
    pub key: Option<BackendKey>,
    /// Transaction status byte of the first ReadyForQuery.
    pub ready_status: u8,
    /// When the server accepted the login: a connection's lifetime
    /// (`server_lifetime`, Aurora DSQL's 60-minute cut) counts from here,
    /// across the client sessions that reuse it.
    pub connected_at: std::time::Instant,
}

/// The cancel key a backend gave the proxy: its process id and secret. The
/// secret is never shown to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendKey(pub CancelKey);

impl BackendKey {
    /// The backend's process id.
    pub fn pid(&self) -> i32 {
        self.0.pid
    }
}

impl Connector {
    /// A connector for `tls` (with `ca_file` as its only trusted roots when
    /// set) and the defaults: 30 s keepalive, [`USER_TIMEOUT`], cleartext
    /// passwords only over `verify-full`.
    pub fn new(tls: TlsMode, ca_file: Option<&Path>) -> Result<Self, ConnectError> {
        Ok(Self {
            tls: tls::client_config(tls, ca_file)?,
            tls_mode: tls,
            keepalive: Duration::from_secs(30),
            user_timeout: USER_TIMEOUT,
            allow_cleartext_password: false,
        })
    }

    /// The connector `[backend]` describes (`ca_file` is read now).
    pub fn from_config(backend: &BackendConfig) -> Result<Self, ConnectError> {
        Ok(Self::new(backend.tls, backend.ca_file.as_deref())?
            .with_keepalive(backend.keepalive.get())
            .with_cleartext_password(backend.allow_cleartext_password))
    }

    /// TCP keepalive idle time (probes then every `min(idle, 10 s)`).
    pub fn with_keepalive(mut self, idle: Duration) -> Self {
        self.keepalive = idle;
        self
    }

    /// Answer a cleartext password request even without `verify-full`.
    pub fn with_cleartext_password(mut self, allow: bool) -> Self {
        self.allow_cleartext_password = allow;
        self
    }

    pub fn tls_mode(&self) -> TlsMode {
        self.tls_mode
    }

    /// `TCP_USER_TIMEOUT` on backend sockets (Linux).
    pub fn user_timeout(&self) -> Duration {
        self.user_timeout
    }

    /// Whether a server's cleartext password request is answered: always
    /// under `verify-full` (the certificate names the server, so the secret
    /// goes where it was meant to; Aurora DSQL and RDS IAM ask for tokens
    /// this way), otherwise only when allowed.
    pub fn cleartext_allowed(&self) -> bool {
        self.tls_mode == TlsMode::VerifyFull || self.allow_cleartext_password
    }

    /// Dials `endpoint`, starts up and authenticates as `login`, all within
    /// `timeout`.
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        login: &StartupLogin<'_>,
        timeout: Duration,
    ) -> Result<BackendConnection, ConnectError> {
        let attempt = async {
            let stream = self.dial(endpoint).await?;
            auth::Handshake::new(endpoint, stream, self.cleartext_allowed())
                .run(login)
                .await
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout {
                endpoint: endpoint.describe(),
                cause: format!("timed out after {timeout:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsql_proxy_routing::EndpointId;

    fn local(addr: std::net::SocketAddr) -> Endpoint {
        Endpoint {
            id: EndpointId(0),
            name: "local".into(),
            region: None,
            host: "localhost".into(),
            port: addr.port(),
            connect_address: Some(addr),
            priority: 1,
            route53_health_check_id: None,
        }
    }

    #[tokio::test]
    async fn backend_sockets_get_nodelay_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = local(listener.local_addr().unwrap());
        let connector = Connector::new(TlsMode::Disable, None)
            .unwrap()
            .with_keepalive(Duration::from_secs(42));
        let stream = connector.dial(&endpoint).await.unwrap();
        let socket = socket2::SockRef::from(stream.tcp());
        assert!(socket.nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.keepalive_time().unwrap(), Duration::from_secs(42));
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
    }

    #[test]
    fn cleartext_passwords_need_verify_full_or_an_explicit_allowance() {
        let allowed = |mode, allow| {
            Connector {
                tls: None,
                tls_mode: mode,
                keepalive: Duration::from_secs(30),
                user_timeout: USER_TIMEOUT,
                allow_cleartext_password: allow,
            }
            .cleartext_allowed()
        };
        assert!(allowed(TlsMode::VerifyFull, false));
        for mode in [TlsMode::Disable, TlsMode::Require, TlsMode::VerifyCa] {
            assert!(!allowed(mode, false), "{mode:?}");
            assert!(allowed(mode, true), "{mode:?}");
        }
    }
}
