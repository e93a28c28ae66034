use std::time::Duration;

use dsql_proxy_protocol::backend::ErrorFields;
use dsql_proxy_protocol::sqlstate;
use dsql_proxy_routing::FailureKind;
use thiserror::Error;

/// Why one attempt to reach one backend failed. Every variant but
/// [`ConnectError::Setup`] names the endpoint (`name (host:port)`).
///
/// [`ConnectError::failover_kind`] classifies it: a failure another
/// endpoint might not have (transport, TLS, protocol, timeout, a busy or
/// unavailable server) has a kind; an answer that would be the same
/// everywhere (the server refused the login, the proxy declined to send a
/// secret) has none and belongs to the client.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The TCP connect failed, or the connection broke before ReadyForQuery.
    #[error("cannot connect to backend {endpoint}: {cause}")]
    Transport { endpoint: String, cause: String },
    /// The server declined TLS, or the handshake or certificate check
    /// failed.
    #[error("cannot connect to backend {endpoint}: {cause}")]
    Tls { endpoint: String, cause: String },
    /// The attempt did not finish in time (or was abandoned).
    #[error("cannot connect to backend {endpoint}: {cause}")]
    Timeout { endpoint: String, cause: String },
    /// The server sent something that is not PostgreSQL's startup protocol.
    #[error("backend {endpoint} broke the protocol: {cause}")]
    Protocol { endpoint: String, cause: String },
    /// The server refused the session with this ErrorResponse.
    #[error("backend {endpoint} refused the session: {fields}")]
    Refused {
        endpoint: String,
        fields: ErrorFields,
        /// From the proxy's last message to the refusal: a round trip on
        /// an established connection (the probes' latency sample when
        /// their login is refused).
        round_trip: Duration,
    },
    /// The proxy would not answer the server's authentication request: no
    /// secret for the user, a method it cannot speak, or a cleartext
    /// password request it refuses (`[backend] allow_cleartext_password`).
    /// No secret was sent.
    #[error("backend {endpoint}: {reason}")]
    Declined { endpoint: String, reason: String },
    /// The TLS settings cannot be used (unreadable `ca_file`, no roots, a
    /// host name that is no TLS server name).
    #[error("backend TLS setup: {0}")]
    Setup(String),
}

impl ConnectError {
    /// The failure class when another endpoint might take the session;
    /// `None` when the answer would be the same anywhere.
    pub fn failover_kind(&self) -> Option<FailureKind> {
        match self {
            Self::Transport { .. } => Some(FailureKind::Connection),
            Self::Tls { .. } => Some(FailureKind::Tls),
            Self::Timeout { .. } => Some(FailureKind::Timeout),
            Self::Protocol { .. } => Some(FailureKind::Protocol),
            Self::Refused { fields, .. } => refusal_kind(fields.code()),
            Self::Declined { .. } | Self::Setup(_) => None,
        }
    }

    /// The server's ErrorResponse, when it refused the session.
    pub fn refusal(&self) -> Option<&ErrorFields> {
        match self {
            Self::Refused { fields, .. } => Some(fields),
            _ => None,
        }
    }

    /// 53300/53400: the server is over its connection limits, not down.
    pub fn is_busy(&self) -> bool {
        self.failover_kind() == Some(FailureKind::Busy)
    }

    /// The refusal's round trip (see [`ConnectError::Refused`]).
    pub fn round_trip(&self) -> Option<Duration> {
        match self {
            Self::Refused { round_trip, .. } => Some(*round_trip),
            _ => None,
        }
    }

    /// The failure without the endpoint's name, for lists of attempts.
    pub fn cause(&self) -> String {
        match self {
            Self::Transport { cause, .. }
            | Self::Tls { cause, .. }
            | Self::Timeout { cause, .. } => cause.clone(),
            Self::Protocol { cause, .. } => format!("protocol error: {cause}"),
            Self::Refused { fields, .. } => format!("{} {}", fields.code(), fields.message()),
            Self::Declined { reason, .. } => reason.clone(),
            Self::Setup(cause) => cause.clone(),
        }
    }

    /// A short, bounded label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Transport { .. } | Self::Tls { .. } | Self::Timeout { .. } => {
                "backend_unreachable"
            }
            Self::Protocol { .. } => "backend_protocol_error",
            Self::Refused { .. } => "backend_refused",
            Self::Declined { .. } => "backend_auth_declined",
            Self::Setup(_) => "setup_error",
        }
    }
}

/// How a server's refusal at startup is classified.
fn refusal_kind(code: &str) -> Option<FailureKind> {
    match code {
        sqlstate::TOO_MANY_CONNECTIONS | sqlstate::CONFIGURATION_LIMIT_EXCEEDED => {
            Some(FailureKind::Busy)
        }
        sqlstate::CANNOT_CONNECT_NOW | sqlstate::ADMIN_SHUTDOWN => Some(FailureKind::Unavailable),
        code if code.starts_with("08") => Some(FailureKind::Unavailable),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &str) -> ConnectError {
        ConnectError::Refused {
            endpoint: "a (h:1)".into(),
            fields: ErrorFields {
                fields: vec![(b'S', "FATAL".into()), (b'C', code.into())],
            },
            round_trip: Duration::from_millis(3),
        }
    }

    #[test]
    fn refusals_are_classified_by_sqlstate() {
        assert_eq!(refused("53300").failover_kind(), Some(FailureKind::Busy));
        assert_eq!(refused("53400").failover_kind(), Some(FailureKind::Busy));
        assert!(refused("53300").is_busy());
        for unavailable in ["57P03", "57P01", "08006"] {
            assert_eq!(
                refused(unavailable).failover_kind(),
                Some(FailureKind::Unavailable),
                "{unavailable}"
            );
        }
        // The same everywhere: the client's to hear.
        for same in ["28P01", "28000", "3D000"] {
            assert_eq!(refused(same).failover_kind(), None, "{same}");
        }
        assert_eq!(
            refused("28P01").round_trip(),
            Some(Duration::from_millis(3))
        );
        let declined = ConnectError::Declined {
            endpoint: "a".into(),
            reason: "no".into(),
        };
        assert_eq!(declined.failover_kind(), None);
        assert!(declined.refusal().is_none());
    }
}
