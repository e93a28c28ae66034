//! Encoders for the messages the proxy itself writes, built on `pgwire`'s
//! message types where they fit.

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::response::{ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, Password, SASLInitialResponse,
    SASLResponse, SecretKey,
};
use pgwire::messages::terminate::Terminate;
use pgwire::messages::Message;

use crate::startup::{CancelKey, ProtocolVersion};

/// An error the proxy reports to a client as ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl PgError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let severity = match self.severity {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        };
        let mut fields = vec![
            (b'S', severity.to_owned()),
            (b'V', severity.to_owned()),
            (b'C', self.code.to_owned()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            fields.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        encode_pgwire(&ErrorResponse::new(fields), buf);
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

/// pgwire only fails to encode messages over its size limits; every message
/// the proxy encodes is bounded well below them, and on the off chance one is
/// not, writing nothing makes the peer see a short read rather than garbage.
fn encode_pgwire<M: Message>(msg: &M, buf: &mut BytesMut) {
    let mark = buf.len();
    if msg.encode(buf).is_err() {
        buf.truncate(mark);
    }
}

/// True when pgwire would refuse `password` as a PasswordMessage.
pub fn password_fits(password: &str) -> bool {
    password.len() + 5 <= 10_000
}

pub fn auth_ok(buf: &mut BytesMut) {
    encode_pgwire(&Authentication::Ok, buf);
}
pub fn auth_cleartext(buf: &mut BytesMut) {
    encode_pgwire(&Authentication::CleartextPassword, buf);
}
pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    let mechs = mechanisms.iter().map(|m| (*m).to_owned()).collect();
    encode_pgwire(&Authentication::SASL(mechs), buf);
}
pub fn auth_sasl_continue(buf: &mut BytesMut, data: Bytes) {
    encode_pgwire(&Authentication::SASLContinue(data), buf);
}
pub fn auth_sasl_final(buf: &mut BytesMut, data: Bytes) {
    encode_pgwire(&Authentication::SASLFinal(data), buf);
}
/// A session's answer once its login is done: AuthenticationOk, the
/// backend's ParameterStatus values, the notices it sent during startup,
/// BackendKeyData (when there is a key) and ReadyForQuery, for one write.
pub fn startup_answer(
    buf: &mut BytesMut,
    parameters: &crate::tracking::ParameterValues,
    notices: &[crate::backend::ErrorFields],
    key: Option<&CancelKey>,
    ready_status: u8,
) {
    auth_ok(buf);
    for (name, value) in parameters.iter() {
        crate::tracking::params::encode_parameter_status(buf, name, value);
    }
    for notice in notices {
        self::notice(buf, &notice.fields);
    }
    if let Some(key) = key {
        backend_key_data(buf, key);
    }
    ready_for_query(buf, ready_status);
}
pub fn backend_key_data(buf: &mut BytesMut, key: &CancelKey) {
    let secret = SecretKey::Bytes(key.secret.clone());
    encode_pgwire(&BackendKeyData::new(key.pid, secret), buf);
}
/// ReadyForQuery with the backend's transaction status (`I`, `T`, `E`).
pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode_pgwire(&ReadyForQuery::new(status), buf);
}
/// A NoticeResponse with the given fields (replaying a backend's notice).
pub fn notice(buf: &mut BytesMut, fields: &[(u8, String)]) {
    encode_pgwire(&NoticeResponse::new(fields.to_vec()), buf);
}
/// An ErrorResponse with the given fields (passing a backend's error on).
pub fn error_response(buf: &mut BytesMut, fields: &[(u8, String)]) {
    encode_pgwire(&ErrorResponse::new(fields.to_vec()), buf);
}
/// Tells a client which version it gets and which `_pq_.` options it does not.
pub fn negotiate_protocol_version(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    unsupported: &[String],
) {
    let msg = NegotiateProtocolVersion::new(version.0 as i32, unsupported.to_vec());
    encode_pgwire(&msg, buf);
}
pub fn password(buf: &mut BytesMut, password: &str) {
    encode_pgwire(&Password::new(password.to_owned()), buf);
}
pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: Bytes) {
    let msg = SASLInitialResponse::new(mechanism.to_owned(), Some(data));
    encode_pgwire(&msg, buf);
}
pub fn sasl_response(buf: &mut BytesMut, data: Bytes) {
    encode_pgwire(&SASLResponse::new(data), buf);
}
pub fn terminate(buf: &mut BytesMut) {
    encode_pgwire(&Terminate::new(), buf);
}
/// The one-byte answer to SSLRequest/GSSENCRequest.
pub fn negotiation_answer(buf: &mut BytesMut, accept: bool) {
    buf.put_u8(if accept { b'S' } else { b'N' });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{decode, BackendMessage};
    use crate::frame::split_message;

    #[test]
    fn error_response_round_trips() {
        let mut buf = BytesMut::new();
        PgError::fatal("08001", "cannot reach endpoint")
            .with_detail("d")
            .encode(&mut buf);
        let raw = split_message(&mut buf, 1000).unwrap().unwrap();
        let BackendMessage::Error(e) = decode(&raw).unwrap() else {
            panic!()
        };
        assert_eq!(e.code(), "08001");
        assert_eq!(e.severity(), "FATAL");
        assert_eq!(e.get(b'D'), Some("d"));
    }

    #[test]
    fn backend_key_data_has_the_secret_length() {
        for len in [4usize, 32] {
            let mut buf = BytesMut::new();
            let key = CancelKey {
                pid: 42,
                secret: Bytes::from(vec![7u8; len]),
            };
            backend_key_data(&mut buf, &key);
            assert_eq!(buf.len(), 1 + 4 + 4 + len);
            let raw = split_message(&mut buf, 1000).unwrap().unwrap();
            assert_eq!(decode(&raw).unwrap(), BackendMessage::BackendKeyData(key));
        }
    }
}
