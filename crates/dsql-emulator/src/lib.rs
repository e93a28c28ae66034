//! `dsql-emulator`: test support for `dsql-proxy`. An Aurora DSQL endpoint
//! emulator that speaks the PostgreSQL wire protocol the way DSQL does and
//! relays accepted sessions to a real PostgreSQL server.
//!
//! What it enforces, like DSQL:
//!
//! * TLS only: plaintext StartupMessages get FATAL `08P01`; ClientHellos
//!   without SNI fail the handshake; PostgreSQL 17 direct TLS (ALPN
//!   `postgresql`) works.
//! * The password is an IAM auth token (a SigV4 presigned `DbConnect` /
//!   `DbConnectAdmin` URL), verified with the emulator's own SigV4 code
//!   ([`sigv4`]) against its own copy of the test credentials. Failures are
//!   FATAL `28P01` `password authentication failed for user "ROLE"` with the
//!   reason as DETAIL.
//! * Refused startup parameters, a connection rate limit (`53400`) and a
//!   connection limit (`53300`).
//! * A maximum session duration: a transaction still running then may
//!   finish (for up to [`TRANSACTION_GRACE`]), then the connection is
//!   closed without a message, or after FATAL `57P01` with
//!   [`SessionEnd::Fatal`].
//! * Optionally, optimistic-concurrency conflicts
//!   ([`EmulatorConfig::conflict_every`]): every Nth commit point of a
//!   session fails with SQLSTATE `40001` and DSQL's `(OC000)` / `(OC001)`
//!   message, with nothing of it committed upstream.
//!
//! Accepted sessions log in to the upstream PostgreSQL as the same role
//! (password from [`UpstreamConfig::role_passwords`]) through
//! `dsql-proxy-connector`, then bytes are relayed unchanged (with
//! `dsql-proxy-session`'s relay). Clients get the upstream's own
//! BackendKeyData, and their CancelRequests are forwarded as they are.
//!
//! This is a test tool: secrets are test credentials, and the token signer
//! [`sign_token`] exists so tests can forge tokens.

pub mod config;
mod conflict;
mod error;
pub mod limits;
mod server;
pub mod sigv4;
pub mod tls;

pub use config::{
    parse_duration, parse_pair, ConflictKind, EmulatorConfig, RateLimit, SessionEnd,
    UpstreamConfig, UpstreamTls, TRANSACTION_GRACE,
};
pub use dsql_proxy_config::Secret;
pub use error::{EmulatorError, TokenRejection};
pub use server::Emulator;
pub use sigv4::{
    action_for_role, sign_token, TokenVerifier, VerifiedToken, ACTION_CONNECT, ACTION_CONNECT_ADMIN,
};
