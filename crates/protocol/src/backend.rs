//! Messages a server sends before and during authentication, decoded from a
//! [`RawMessage`] with every length checked.

use bytes::Bytes;

use crate::frame::{take_cstr, take_i32, RawMessage};
use crate::startup::CancelKey;
use crate::ProtocolError;

/// An Authentication ('R') request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    Cleartext,
    Md5 {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    /// Kerberos, SCM, GSSAPI, SSPI: nothing a proxy can answer for a client.
    Unsupported(i32),
}

/// The fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }
    pub fn code(&self) -> &str {
        self.get(b'C').unwrap_or("")
    }
    pub fn message(&self) -> &str {
        self.get(b'M').unwrap_or("")
    }
    /// Non-localized severity when present (9.6+), else the localized one.
    pub fn severity(&self) -> &str {
        self.get(b'V').or_else(|| self.get(b'S')).unwrap_or("")
    }
}

impl std::fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity(), self.code(), self.message())
    }
}

/// Backend messages the proxy must understand before the relay starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    Auth(AuthRequest),
    ParameterStatus {
        name: String,
        value: String,
    },
    BackendKeyData(CancelKey),
    ReadyForQuery {
        status: u8,
    },
    Error(ErrorFields),
    Notice(ErrorFields),
    NegotiateProtocolVersion {
        newest: i32,
        unsupported: Vec<String>,
    },
    /// Anything else; the caller decides whether it is legal here.
    Other(u8),
}

/// Bodies this large are never legitimate before the relay starts.
pub const MAX_STARTUP_PHASE_BODY: usize = 64 * 1024;

pub fn decode(msg: &RawMessage) -> Result<BackendMessage, ProtocolError> {
    let mut body: &[u8] = &msg.body;
    Ok(match msg.tag {
        b'R' => BackendMessage::Auth(decode_auth(&msg.body)?),
        b'S' => {
            let name = take_cstr(&mut body, "ParameterStatus")?.to_owned();
            let value = take_cstr(&mut body, "ParameterStatus")?.to_owned();
            BackendMessage::ParameterStatus { name, value }
        }
        b'K' => {
            let pid = take_i32(&mut body, "BackendKeyData")?;
            if !(4..=256).contains(&body.len()) {
                return Err(ProtocolError::Malformed {
                    what: "BackendKeyData",
                    why: "secret key must be 4 to 256 bytes",
                });
            }
            BackendMessage::BackendKeyData(CancelKey {
                pid,
                secret: msg.body.slice(4..),
            })
        }
        b'Z' => match body {
            [status @ (b'I' | b'T' | b'E')] => BackendMessage::ReadyForQuery { status: *status },
            _ => {
                return Err(ProtocolError::Malformed {
                    what: "ReadyForQuery",
                    why: "bad transaction status",
                })
            }
        },
        b'E' => BackendMessage::Error(decode_fields(body, "ErrorResponse")?),
        b'N' => BackendMessage::Notice(decode_fields(body, "NoticeResponse")?),
        b'v' => {
            let newest = take_i32(&mut body, "NegotiateProtocolVersion")?;
            let count = take_i32(&mut body, "NegotiateProtocolVersion")?;
            let mut unsupported = Vec::new();
            for _ in 0..count.max(0) {
                unsupported.push(take_cstr(&mut body, "NegotiateProtocolVersion")?.to_owned());
            }
            BackendMessage::NegotiateProtocolVersion {
                newest,
                unsupported,
            }
        }
        other => BackendMessage::Other(other),
    })
}

fn decode_auth(body: &Bytes) -> Result<AuthRequest, ProtocolError> {
    let mut rest: &[u8] = body;
    let code = take_i32(&mut rest, "Authentication")?;
    Ok(match code {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => match rest {
            [a, b, c, d] => AuthRequest::Md5 {
                salt: [*a, *b, *c, *d],
            },
            _ => {
                return Err(ProtocolError::Malformed {
                    what: "AuthenticationMD5Password",
                    why: "salt must be 4 bytes",
                })
            }
        },
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = take_cstr(&mut rest, "AuthenticationSASL")?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m.to_owned());
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(body.slice(4..)),
        12 => AuthRequest::SaslFinal(body.slice(4..)),
        other => AuthRequest::Unsupported(other),
    })
}

/// Decodes ErrorResponse/NoticeResponse fields.
pub fn decode_fields(mut body: &[u8], what: &'static str) -> Result<ErrorFields, ProtocolError> {
    let mut fields = Vec::new();
    loop {
        match body.split_first() {
            Some((0, _)) => break,
            Some((code, rest)) => {
                body = rest;
                let value = take_cstr(&mut body, what)?;
                fields.push((*code, value.to_owned()));
            }
            None => {
                return Err(ProtocolError::Malformed {
                    what,
                    why: "missing terminator",
                })
            }
        }
    }
    Ok(ErrorFields { fields })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(tag: u8, body: &[u8]) -> RawMessage {
        RawMessage {
            tag,
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn decodes_auth_requests() {
        assert_eq!(
            decode(&raw(b'R', &[0, 0, 0, 5, 1, 2, 3, 4])),
            Ok(BackendMessage::Auth(AuthRequest::Md5 {
                salt: [1, 2, 3, 4]
            }))
        );
        assert_eq!(
            decode(&raw(
                b'R',
                b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
            )),
            Ok(BackendMessage::Auth(AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()]
            }))
        );
        assert!(decode(&raw(b'R', &[0, 0, 0, 5, 1])).is_err());
        assert!(decode(&raw(b'R', &[0, 0])).is_err());
        assert!(decode(&raw(b'R', b"\0\0\0\x0aSCRAM")).is_err());
    }

    #[test]
    fn decodes_status_key_and_errors() {
        assert_eq!(
            decode(&raw(b'Z', b"I")),
            Ok(BackendMessage::ReadyForQuery { status: b'I' })
        );
        assert!(decode(&raw(b'Z', b"")).is_err());
        assert!(decode(&raw(b'K', &[0, 0, 0, 1, 9])).is_err());
        let BackendMessage::Error(e) = decode(&raw(b'E', b"SFATAL\0C28P01\0Mbad\0\0")).unwrap()
        else {
            panic!()
        };
        assert_eq!(e.code(), "28P01");
        assert_eq!(e.message(), "bad");
        assert!(decode(&raw(b'E', b"SFATAL\0C28")).is_err());
    }
}
