use std::io;

use bytes::BytesMut;
use dsql_proxy_connector::ConnectError;
use dsql_proxy_protocol::{messages, sqlstate, PgError, ProtocolError};
use dsql_proxy_routing::FailureKind;
use thiserror::Error;

/// Why a session ended early, and what the client is told.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("client connection: {0}")]
    ClientIo(#[source] io::Error),
    #[error("client did not finish startup within {0:?}")]
    StartupTimeout(std::time::Duration),
    #[error("client protocol violation: {0}")]
    ClientProtocol(#[from] ProtocolError),
    /// The proxy refuses the client with this error.
    #[error("{0}")]
    Rejected(PgError),
    /// Reaching one backend failed; a server's refusal is passed to the
    /// client verbatim.
    #[error(transparent)]
    Backend(#[from] ConnectError),
    /// Every candidate endpoint failed; each with its failure.
    #[error("no endpoint could be reached: {}", describe_attempts(.attempts))]
    NoEndpointReachable {
        attempts: Vec<(String, String)>,
        /// The servers' common SQLSTATE when they all refused alike for
        /// load (53300, 53400, 57P03), so clients back off.
        code: Option<&'static str>,
    },
    /// The proxy's own backend connect rate limit refused the connect
    /// (queue full, or the wait would outlast connect_timeout).
    #[error("{0}")]
    ConnectRateLimited(String),
    #[error("setup: {0}")]
    Setup(String),
    /// The proxy is shutting down and closed the session before it started.
    #[error("dsql-proxy is shutting down")]
    Shutdown,
}

/// What every session the proxy closes on shutdown is told: PostgreSQL's
/// own words for a server shutdown, so drivers and pools treat it alike.
pub fn shutdown_error() -> PgError {
    PgError::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        "terminating connection due to administrator command",
    )
    .with_detail("dsql-proxy is shutting down")
}

impl SessionError {
    /// The ErrorResponse to send, if the client can still be told anything.
    pub fn encode_for_client(&self, buf: &mut BytesMut) -> bool {
        let err = match self {
            Self::ClientIo(_) | Self::Setup(_) => return false,
            Self::StartupTimeout(_) => PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "canceling authentication due to timeout",
            ),
            Self::ClientProtocol(e) => PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()),
            Self::Rejected(e) => e.clone(),
            Self::Backend(ConnectError::Refused { fields, .. }) => {
                messages::error_response(buf, &fields.fields);
                return true;
            }
            Self::Backend(e @ ConnectError::Declined { .. }) => PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("dsql-proxy: {}", e.cause()),
            ),
            Self::Backend(ConnectError::Protocol { endpoint, cause }) => PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("dsql-proxy: endpoint {endpoint} broke the protocol: {cause}"),
            ),
            Self::Backend(ConnectError::Setup(cause)) => PgError::fatal(
                sqlstate::UNABLE_TO_CONNECT,
                format!("dsql-proxy cannot connect: {cause}"),
            ),
            Self::Backend(
                ConnectError::Transport { endpoint, cause }
                | ConnectError::Tls { endpoint, cause }
                | ConnectError::Timeout { endpoint, cause },
            ) => PgError::fatal(
                sqlstate::UNABLE_TO_CONNECT,
                format!("dsql-proxy cannot connect to endpoint {endpoint}: {cause}"),
            ),
            Self::NoEndpointReachable { attempts, code } => PgError::fatal(
                code.unwrap_or(sqlstate::UNABLE_TO_CONNECT),
                format!(
                    "dsql-proxy could not connect to any endpoint: {}",
                    describe_attempts(attempts)
                ),
            ),
            Self::ConnectRateLimited(message) => PgError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!("dsql-proxy: {message}"),
            )
            .with_hint(
                "new backend connections are limited by [backend] connect_rate, \
                         connect_burst and connect_queue; retry with backoff or keep connections \
                         open longer (a connection pool)",
            ),
            Self::Shutdown => shutdown_error(),
        };
        err.encode(buf);
        true
    }

    /// A short, bounded label for the close-reason log field and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ClientIo(_) => "client_io_error",
            Self::StartupTimeout(_) => "startup_timeout",
            Self::ClientProtocol(_) => "client_protocol_error",
            Self::Rejected(_) => "rejected",
            Self::Backend(e) => e.reason(),
            Self::NoEndpointReachable { .. } => "no_endpoint_reachable",
            Self::ConnectRateLimited(_) => "connect_rate_limit",
            Self::Setup(_) => "setup_error",
            Self::Shutdown => "shutdown",
        }
    }
}

fn describe_attempts(attempts: &[(String, String)]) -> String {
    attempts
        .iter()
        .map(|(endpoint, failure)| format!("{endpoint}: {failure}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl SessionError {
    /// The failure class when this connect error says the endpoint cannot
    /// take sessions right now, so the next endpoint should be tried; `None`
    /// for answers that would be the same anywhere (authentication
    /// refusals, a missing database) and are passed to the client.
    pub fn failover_kind(&self) -> Option<FailureKind> {
        match self {
            Self::Backend(e) => e.failover_kind(),
            _ => None,
        }
    }
}
