//! The untyped packets a client may send first: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage.

use bytes::{BufMut, Bytes, BytesMut};
use subtle::ConstantTimeEq;

use crate::frame::{take_cbytes, take_cstr};
use crate::ProtocolError;

/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
/// Length word plus request code: the shortest valid startup packet.
pub const MIN_STARTUP_PACKET_LEN: usize = 8;

const CANCEL_REQUEST_CODE: u32 = 80_877_102;
const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;

/// The first byte of a TLS handshake record: a client using PostgreSQL 17's
/// `sslnegotiation=direct` starts with a ClientHello instead of SSLRequest.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A protocol version as sent on the wire: major in the high 16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProtocolVersion(pub u32);

impl ProtocolVersion {
    pub const V3_0: Self = Self::new(3, 0);
    pub const V3_2: Self = Self::new(3, 2);

    pub const fn new(major: u16, minor: u16) -> Self {
        Self(((major as u32) << 16) | minor as u32)
    }
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    pub const fn minor(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// The version the proxy speaks for a client that asked for `self`: the
    /// newest one it supports that is not newer than the request. 3.1 was
    /// never a real version, so it falls back to 3.0.
    pub fn negotiated(self) -> Self {
        if self.minor() >= 2 {
            Self::V3_2
        } else {
            Self::V3_0
        }
    }

    /// Length of the cancel secret the proxy hands out at this version: 3.0
    /// only has room for four bytes; 3.2 allows up to 256 and we use 32.
    pub fn cancel_secret_len(self) -> usize {
        if self >= Self::V3_2 {
            32
        } else {
            4
        }
    }
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

/// A process id plus secret, as in BackendKeyData and CancelRequest.
#[derive(Clone, PartialEq, Eq)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: Bytes,
}

impl CancelKey {
    /// Compares secrets in constant time so a client cannot learn a valid key
    /// byte by byte from response timing.
    pub fn secret_matches(&self, other: &[u8]) -> bool {
        self.secret.len() == other.len() && bool::from(self.secret[..].ct_eq(other))
    }

    /// Encodes a CancelRequest packet carrying this key.
    pub fn encode_cancel_request(&self, buf: &mut BytesMut) {
        let len = 12 + self.secret.len();
        buf.put_u32(len as u32);
        buf.put_u32(CANCEL_REQUEST_CODE);
        buf.put_i32(self.pid);
        buf.put_slice(&self.secret);
    }
}

impl std::fmt::Debug for CancelKey {
    // The secret is what authorises a cancel; keep it out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelKey")
            .field("pid", &self.pid)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// One startup parameter. Values are bytes: PostgreSQL accepts any
/// encoding there (old clients send Latin-1), and the proxy forwards them
/// untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupParam {
    pub name: String,
    pub value: Vec<u8>,
}

impl StartupParam {
    pub fn new(name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// A parsed StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// The version the client asked for.
    pub requested: ProtocolVersion,
    /// Parameters in the order the client sent them, `_pq_.` options removed.
    pub params: Vec<StartupParam>,
    /// `_pq_.` protocol options the client asked for; the proxy supports none.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    /// A parameter's value as text (invalid UTF-8 replaced), for logs and
    /// decisions; forwarding uses the raw bytes.
    pub fn param(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| String::from_utf8_lossy(&p.value))
    }

    /// Whether the client must be told about a version or option it asked
    /// for but will not get (NegotiateProtocolVersion).
    pub fn needs_negotiation(&self) -> bool {
        self.requested.negotiated() != self.requested || !self.protocol_options.is_empty()
    }
}

/// What the first packet of a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitialPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// Validates the length word of an untyped packet and returns the number of
/// bytes that follow it.
pub fn packet_body_len(len_field: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = i32::from_be_bytes(len_field);
    match usize::try_from(len) {
        Ok(n) if (MIN_STARTUP_PACKET_LEN..=MAX_STARTUP_PACKET_LEN).contains(&n) => Ok(n - 4),
        _ => Err(ProtocolError::InvalidStartupLength(len.into())),
    }
}

/// Parses the bytes after the length word of an untyped packet.
pub fn parse_initial_packet(body: &[u8]) -> Result<InitialPacket, ProtocolError> {
    let Some((code, rest)) = body.split_first_chunk::<4>() else {
        return Err(ProtocolError::InvalidStartupLength(body.len() as i64 + 4));
    };
    let code = u32::from_be_bytes(*code);
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !rest.is_empty() => {
            Err(ProtocolError::InvalidStartupLength(body.len() as i64 + 4))
        }
        SSL_REQUEST_CODE => Ok(InitialPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(InitialPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => parse_cancel(rest).map(InitialPacket::Cancel),
        version => parse_startup(ProtocolVersion(version), rest).map(InitialPacket::Startup),
    }
}

fn parse_cancel(rest: &[u8]) -> Result<CancelKey, ProtocolError> {
    // pid plus a 4..=256 byte secret (3.0 has exactly 4; 3.2 allows more).
    if rest.len() < 8 || rest.len() > 4 + 256 {
        return Err(ProtocolError::Malformed {
            what: "CancelRequest",
            why: "bad length",
        });
    }
    let pid = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    Ok(CancelKey {
        pid,
        secret: Bytes::copy_from_slice(&rest[4..]),
    })
}

fn parse_startup(
    requested: ProtocolVersion,
    mut rest: &[u8],
) -> Result<StartupMessage, ProtocolError> {
    if requested.major() != 3 {
        return Err(ProtocolError::UnsupportedProtocol {
            major: requested.major(),
            minor: requested.minor(),
        });
    }
    if rest.last() != Some(&0) {
        return Err(ProtocolError::InvalidStartupLayout(
            "expected terminator as last byte",
        ));
    }
    let mut params = Vec::new();
    let mut protocol_options = Vec::new();
    loop {
        let name = take_cstr(&mut rest, "startup packet")?;
        if name.is_empty() {
            break;
        }
        if rest.is_empty() {
            return Err(ProtocolError::InvalidStartupLayout(
                "parameter name without a value",
            ));
        }
        let value = take_cbytes(&mut rest, "startup packet")?;
        if name.starts_with("_pq_.") {
            protocol_options.push(name.to_owned());
        } else {
            params.push(StartupParam::new(name, value));
        }
    }
    if !rest.is_empty() {
        return Err(ProtocolError::InvalidStartupLayout(
            "expected terminator as last byte",
        ));
    }
    Ok(StartupMessage {
        requested,
        params,
        protocol_options,
    })
}

/// Encodes the 8-byte SSLRequest packet.
pub fn encode_ssl_request(buf: &mut BytesMut) {
    buf.put_u32(8);
    buf.put_u32(SSL_REQUEST_CODE);
}

/// The length word of the StartupMessage [`encode_startup`] makes from
/// `params`: a server drops a packet over [`MAX_STARTUP_PACKET_LEN`]
/// without a word, so check this before sending one.
pub fn startup_len(params: &[StartupParam]) -> usize {
    let params: usize = params
        .iter()
        .map(|p| p.name.len() + 1 + p.value.len() + 1)
        .sum();
    4 + 4 + params + 1
}

/// Encodes a 3.0 StartupMessage with the given parameters, in order.
pub fn encode_startup(buf: &mut BytesMut, params: &[StartupParam]) {
    let start = buf.len();
    buf.put_u32(0);
    buf.put_u32(ProtocolVersion::V3_0.0);
    for p in params {
        buf.put_slice(p.name.as_bytes());
        buf.put_u8(0);
        buf.put_slice(&p.value);
        buf.put_u8(0);
    }
    buf.put_u8(0);
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, tail: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(tail);
        v
    }

    #[test]
    fn startup_len_is_the_encoded_length() {
        for params in [
            vec![],
            vec![StartupParam::new("user", "app")],
            vec![
                StartupParam::new("user", "app"),
                StartupParam::new("application_name", vec![b'x'; 9_000]),
            ],
        ] {
            let mut buf = BytesMut::new();
            encode_startup(&mut buf, &params);
            assert_eq!(startup_len(&params), buf.len());
            assert_eq!(&buf[..4], &(buf.len() as u32).to_be_bytes());
        }
    }

    #[test]
    fn classifies_requests() {
        assert_eq!(
            parse_initial_packet(&packet(SSL_REQUEST_CODE, b"")),
            Ok(InitialPacket::SslRequest)
        );
        assert_eq!(
            parse_initial_packet(&packet(GSSENC_REQUEST_CODE, b"")),
            Ok(InitialPacket::GssEncRequest)
        );
        let cancel = parse_initial_packet(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4]));
        match cancel {
            Ok(InitialPacket::Cancel(k)) => {
                assert_eq!(k.pid, 7);
                assert!(k.secret_matches(&[1, 2, 3, 4]));
                assert!(!k.secret_matches(&[1, 2, 3, 5]));
                assert!(!k.secret_matches(&[1, 2, 3]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_startup_with_protocol_options() {
        let body = packet(
            ProtocolVersion::new(3, 5).0,
            b"user\0alice\0_pq_.foo\0bar\0database\0db\0\0",
        );
        let InitialPacket::Startup(m) = parse_initial_packet(&body).unwrap() else {
            panic!()
        };
        assert_eq!(m.param("user").as_deref(), Some("alice"));
        assert_eq!(m.param("database").as_deref(), Some("db"));
        assert_eq!(m.protocol_options, vec!["_pq_.foo".to_string()]);
        assert_eq!(m.requested.negotiated(), ProtocolVersion::V3_2);
        assert!(m.needs_negotiation());
    }

    #[test]
    fn rejects_bad_startup_packets() {
        assert!(packet_body_len(7u32.to_be_bytes()).is_err());
        assert!(packet_body_len(10_001u32.to_be_bytes()).is_err());
        assert!(packet_body_len((-1i32).to_be_bytes()).is_err());
        assert_eq!(packet_body_len(8u32.to_be_bytes()), Ok(4));
        // Missing terminator, dangling name, wrong major, short cancel.
        for bad in [
            packet(ProtocolVersion::V3_0.0, b"user\0a\0"),
            packet(ProtocolVersion::V3_0.0, b"user\0"),
            packet(ProtocolVersion::V3_0.0, b"user\0a\0\0x"),
            packet(ProtocolVersion::new(2, 0).0, b"user\0a\0\0"),
            packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 1]),
            packet(SSL_REQUEST_CODE, b"x"),
            vec![1, 2],
        ] {
            assert!(parse_initial_packet(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn non_utf8_values_are_kept_as_bytes() {
        let body = packet(
            ProtocolVersion::V3_0.0,
            b"user\0u\0application_name\0h\xe9llo\0\0",
        );
        let InitialPacket::Startup(m) = parse_initial_packet(&body).unwrap() else {
            panic!()
        };
        assert_eq!(m.params[1].value, b"h\xe9llo");
        assert_eq!(m.param("application_name").as_deref(), Some("h\u{fffd}llo"));
    }

    #[test]
    fn startup_round_trips() {
        let params = vec![
            StartupParam::new("user", "u"),
            StartupParam::new("x", &b"\xff"[..]),
        ];
        let mut buf = BytesMut::new();
        encode_startup(&mut buf, &params);
        let len = packet_body_len([buf[0], buf[1], buf[2], buf[3]]).unwrap();
        assert_eq!(len + 4, buf.len());
        let InitialPacket::Startup(m) = parse_initial_packet(&buf[4..]).unwrap() else {
            panic!()
        };
        assert_eq!(m.params, params);
        assert_eq!(m.requested, ProtocolVersion::V3_0);
    }
}
