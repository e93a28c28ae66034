use thiserror::Error;

/// Everything that can be wrong with bytes a peer sent.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid length {0} in startup packet")]
    InvalidStartupLength(i64),
    #[error("invalid message length {len} for message type '{tag}'", tag = char::from(*.tag))]
    InvalidMessageLength { tag: u8, len: i64 },
    #[error("message of type '{tag}' is {len} bytes, over the {limit} byte limit", tag = char::from(*.tag))]
    MessageTooLarge { tag: u8, len: usize, limit: usize },
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    InvalidStartupLayout(&'static str),
    #[error("malformed {what} message: {why}")]
    Malformed {
        what: &'static str,
        why: &'static str,
    },
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    #[error("SCRAM authentication failed: {0}")]
    Scram(&'static str),
}
