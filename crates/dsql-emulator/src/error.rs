use std::fmt;
use std::time::Duration;

use thiserror::Error;

/// Everything that can go wrong in the emulator: configuration, setup, I/O
/// and (as [`EmulatorError::Token`]) a refused IAM auth token.
#[derive(Debug, Error)]
pub enum EmulatorError {
    /// A configuration value or command-line flag is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// TLS material could not be loaded or the TLS config could not be built.
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The auth token was refused; the reason is safe to show to the client.
    #[error("auth token refused: {0}")]
    Token(TokenRejection),
}

/// A session-crate TLS setup error without its own "setup:" prefix.
pub(crate) fn tls_error(e: dsql_proxy_session::SessionError) -> EmulatorError {
    match e {
        dsql_proxy_session::SessionError::Setup(m) => EmulatorError::Tls(m),
        other => EmulatorError::Tls(other.to_string()),
    }
}

/// The upstream connector's TLS setup error without its own prefix.
pub(crate) fn upstream_tls_error(e: dsql_proxy_connector::ConnectError) -> EmulatorError {
    match e {
        dsql_proxy_connector::ConnectError::Setup(m) => EmulatorError::Tls(m),
        other => EmulatorError::Tls(other.to_string()),
    }
}

impl From<TokenRejection> for EmulatorError {
    fn from(r: TokenRejection) -> Self {
        Self::Token(r)
    }
}

/// Why a token was refused. The `Display` text is what the client sees as
/// the DETAIL of its `28P01` error; it never contains the token, its
/// signature or any secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRejection {
    /// The token is not a presigned URL of the expected shape.
    Malformed(String),
    /// `X-Amz-Algorithm` is not `AWS4-HMAC-SHA256`.
    UnsupportedAlgorithm(String),
    /// `X-Amz-SignedHeaders` is not exactly `host`.
    SignedHeaders(String),
    /// The access key id in the credential scope is not one the emulator knows.
    UnknownAccessKey(String),
    /// The credential scope is not `<date>/<region>/dsql/aws4_request` with the
    /// date of `X-Amz-Date`.
    CredentialScope(String),
    /// The credential scope names another region.
    WrongRegion { expected: String, got: String },
    /// The host the token was signed for is not this cluster.
    WrongHost { expected: String, got: String },
    /// The TLS SNI differs from the host in the token.
    SniMismatch { sni: String, host: String },
    /// `Action` does not fit the role: `DbConnectAdmin` for `admin`,
    /// `DbConnect` for every other role.
    WrongAction {
        role: String,
        expected: &'static str,
        got: String,
    },
    /// `X-Amz-Expires` is missing, not a number or outside 1..=604800.
    InvalidExpires(String),
    /// `X-Amz-Date` is further in the future than the allowed clock skew.
    ClockSkew {
        signed_at: String,
        max_skew: Duration,
    },
    /// `X-Amz-Date + X-Amz-Expires` is in the past.
    Expired { signed_at: String, expires_in: u64 },
    /// The signature does not match the emulator's recomputation.
    SignatureMismatch,
}

impl TokenRejection {
    /// A short, stable label for logs and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            Self::SignedHeaders(_) => "signed_headers",
            Self::UnknownAccessKey(_) => "unknown_access_key",
            Self::CredentialScope(_) => "credential_scope",
            Self::WrongRegion { .. } => "wrong_region",
            Self::WrongHost { .. } => "wrong_host",
            Self::SniMismatch { .. } => "sni_mismatch",
            Self::WrongAction { .. } => "wrong_action",
            Self::InvalidExpires(_) => "invalid_expires",
            Self::ClockSkew { .. } => "clock_skew",
            Self::Expired { .. } => "expired",
            Self::SignatureMismatch => "signature_mismatch",
        }
    }
}

impl fmt::Display for TokenRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed auth token: {why}"),
            Self::UnsupportedAlgorithm(a) => {
                write!(
                    f,
                    "malformed auth token: unsupported X-Amz-Algorithm {a:?}, expected AWS4-HMAC-SHA256"
                )
            }
            Self::SignedHeaders(h) => write!(
                f,
                "malformed auth token: X-Amz-SignedHeaders is {h:?}, expected \"host\""
            ),
            Self::UnknownAccessKey(k) => write!(f, "unknown access key id {k:?}"),
            Self::CredentialScope(why) => write!(f, "invalid credential scope: {why}"),
            Self::WrongRegion { expected, got } => write!(
                f,
                "wrong region: token is signed for region {got:?}, cluster is in {expected:?}"
            ),
            Self::WrongHost { expected, got } => write!(
                f,
                "wrong host: token is signed for host {got:?}, not for this cluster {expected:?}"
            ),
            Self::SniMismatch { sni, host } => write!(
                f,
                "wrong host: TLS server name {sni:?} differs from the token's host {host:?}"
            ),
            Self::WrongAction {
                role,
                expected,
                got,
            } => write!(
                f,
                "wrong action for role: role {role:?} needs a token for action {expected}, got {got:?}"
            ),
            Self::InvalidExpires(why) => write!(f, "malformed auth token: X-Amz-Expires {why}"),
            Self::ClockSkew {
                signed_at,
                max_skew,
            } => write!(
                f,
                "clock skew: token is dated {signed_at}, more than {}s in the future",
                max_skew.as_secs()
            ),
            Self::Expired {
                signed_at,
                expires_in,
            } => write!(
                f,
                "token expired: signed at {signed_at}, valid for {expires_in}s"
            ),
            Self::SignatureMismatch => f.write_str(
                "signature mismatch: the signature does not match the request (wrong secret access key or altered token)",
            ),
        }
    }
}
