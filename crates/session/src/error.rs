use std::io;

use bytes::BytesMut;
use dsql_proxy_protocol::backend::ErrorFields;
use dsql_proxy_protocol::{sqlstate, PgError, ProtocolError};
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
    /// The backend's own error during startup, passed through verbatim.
    #[error("backend {endpoint} refused the session: {fields}")]
    BackendRefused {
        endpoint: String,
        fields: ErrorFields,
    },
    #[error("cannot connect to backend {endpoint}: {cause}")]
    BackendUnreachable { endpoint: String, cause: String },
    #[error("backend {endpoint}: {cause}")]
    BackendProtocol { endpoint: String, cause: String },
    #[error("setup: {0}")]
    Setup(String),
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
            Self::BackendRefused { fields, .. } => {
                let msg = pgwire::messages::response::ErrorResponse::new(fields.fields.clone());
                let mark = buf.len();
                if pgwire::messages::Message::encode(&msg, buf).is_err() {
                    buf.truncate(mark);
                    return false;
                }
                return true;
            }
            Self::BackendUnreachable { endpoint, cause } => PgError::fatal(
                sqlstate::UNABLE_TO_CONNECT,
                format!("dsql-proxy cannot connect to endpoint {endpoint}: {cause}"),
            ),
            Self::BackendProtocol { endpoint, cause } => PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!("dsql-proxy: endpoint {endpoint} broke the protocol: {cause}"),
            ),
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
            Self::BackendRefused { .. } => "backend_refused",
            Self::BackendUnreachable { .. } => "backend_unreachable",
            Self::BackendProtocol { .. } => "backend_protocol_error",
            Self::Setup(_) => "setup_error",
        }
    }
}
