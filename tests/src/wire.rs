//! A tiny PostgreSQL wire-protocol client for tests that need to send exact
//! bytes: untyped startup packets (StartupMessage, SSLRequest,
//! GSSENCRequest, CancelRequest), typed frontend messages, and a reader for
//! typed backend messages. Every read takes a timeout so a misbehaving peer
//! fails a test instead of hanging it.
//!
//! Works on any `AsyncRead`/`AsyncWrite` stream, so the same helpers serve
//! plain TCP and TLS connections.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// Protocol 3.2 (PostgreSQL 18): longer cancel secrets.
pub const PROTOCOL_3_2: u32 = (3 << 16) | 2;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;

/// `major.minor` as a protocol version word.
pub const fn protocol_version(major: u16, minor: u16) -> u32 {
    ((major as u32) << 16) | minor as u32
}

// ---------------------------------------------------------------------------
// Untyped (startup-phase) packets.

/// A StartupMessage with `version` and `params` in order (names and values
/// are sent as given, so `_pq_.` options can be included).
pub fn startup_message(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    untyped(&body)
}

/// A 3.0 StartupMessage for `user` and `database`.
pub fn startup_v3(user: &str, database: &str) -> Vec<u8> {
    startup_message(PROTOCOL_3_0, &[("user", user), ("database", database)])
}

pub fn ssl_request() -> Vec<u8> {
    untyped(&SSL_REQUEST_CODE.to_be_bytes())
}

pub fn gssenc_request() -> Vec<u8> {
    untyped(&GSSENC_REQUEST_CODE.to_be_bytes())
}

/// A CancelRequest: pid plus a secret of any length (4 bytes for 3.0,
/// up to 256 for 3.2).
pub fn cancel_request(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut body = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(secret);
    untyped(&body)
}

/// Length word (counting itself) followed by `body`.
pub fn untyped(body: &[u8]) -> Vec<u8> {
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

// ---------------------------------------------------------------------------
// Typed frontend messages.

/// Tag, length word (counting itself, not the tag) and body.
pub fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
}

/// Simple Query.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    typed(b'Q', &body)
}

pub fn terminate() -> Vec<u8> {
    typed(b'X', &[])
}

pub fn sync() -> Vec<u8> {
    typed(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    typed(b'H', &[])
}

/// Parse: statement name, SQL, parameter type OIDs.
pub fn parse(statement: &str, sql: &str, param_types: &[u32]) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, statement);
    cstr(&mut body, sql);
    body.extend_from_slice(&(param_types.len() as i16).to_be_bytes());
    for oid in param_types {
        body.extend_from_slice(&oid.to_be_bytes());
    }
    typed(b'P', &body)
}

/// Bind with all parameters and results in text format; `None` is NULL.
pub fn bind(portal: &str, statement: &str, params: &[Option<&str>]) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    cstr(&mut body, statement);
    body.extend_from_slice(&0i16.to_be_bytes()); // all parameters text
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    body.extend_from_slice(&0i16.to_be_bytes()); // all results text
    typed(b'B', &body)
}

/// Describe a statement (`b'S'`) or portal (`b'P'`).
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    cstr(&mut body, name);
    typed(b'D', &body)
}

/// Execute a portal; `max_rows` 0 means all rows.
pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    body.extend_from_slice(&max_rows.to_be_bytes());
    typed(b'E', &body)
}

/// Close a statement (`b'S'`) or portal (`b'P'`).
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    cstr(&mut body, name);
    typed(b'C', &body)
}

// ---------------------------------------------------------------------------
// Backend messages.

/// One typed backend message (body without tag and length).
#[derive(Clone, PartialEq, Eq)]
pub struct BackendMessage {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl fmt::Debug for BackendMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("BackendMessage");
        d.field("tag", &char::from(self.tag));
        if let Some(e) = self.error_fields() {
            d.field("fields", &e);
        } else if self.body.len() <= 128 {
            d.field("body", &String::from_utf8_lossy(&self.body));
        } else {
            d.field("body_len", &self.body.len());
        }
        d.finish()
    }
}

impl BackendMessage {
    /// ErrorResponse (`E`) or NoticeResponse (`N`) fields.
    pub fn error_fields(&self) -> Option<ErrorFields> {
        if self.tag != b'E' && self.tag != b'N' {
            return None;
        }
        Some(ErrorFields::parse(&self.body))
    }

    /// The SQLSTATE of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.error_fields()
            .and_then(|f| f.code().map(str::to_owned))
    }

    /// Authentication request code of an `R` message.
    pub fn auth_code(&self) -> Option<i32> {
        (self.tag == b'R' && self.body.len() >= 4).then(|| be_i32(&self.body[..4]))
    }

    /// Name and value of a ParameterStatus (`S`).
    pub fn parameter_status(&self) -> Option<(String, String)> {
        if self.tag != b'S' {
            return None;
        }
        let mut parts = self.body.split(|b| *b == 0);
        let name = String::from_utf8_lossy(parts.next()?).into_owned();
        let value = String::from_utf8_lossy(parts.next()?).into_owned();
        Some((name, value))
    }

    /// Process id and secret of BackendKeyData (`K`).
    pub fn backend_key(&self) -> Option<(i32, Vec<u8>)> {
        (self.tag == b'K' && self.body.len() >= 8)
            .then(|| (be_i32(&self.body[..4]), self.body[4..].to_vec()))
    }

    /// Transaction status byte of ReadyForQuery (`Z`).
    pub fn ready_status(&self) -> Option<u8> {
        (self.tag == b'Z' && self.body.len() == 1).then(|| self.body[0])
    }

    /// Command tag of CommandComplete (`C`).
    pub fn command_tag(&self) -> Option<String> {
        (self.tag == b'C').then(|| {
            let end = self
                .body
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(self.body.len());
            String::from_utf8_lossy(&self.body[..end]).into_owned()
        })
    }

    /// Column values of a DataRow (`D`), text as lossy UTF-8.
    pub fn data_row(&self) -> Option<Vec<Option<String>>> {
        if self.tag != b'D' || self.body.len() < 2 {
            return None;
        }
        let n = i16::from_be_bytes([self.body[0], self.body[1]]);
        let mut rest = &self.body[2..];
        let mut out = Vec::new();
        for _ in 0..n {
            if rest.len() < 4 {
                return None;
            }
            let len = be_i32(&rest[..4]);
            rest = &rest[4..];
            if len < 0 {
                out.push(None);
                continue;
            }
            let len = len as usize;
            if rest.len() < len {
                return None;
            }
            out.push(Some(String::from_utf8_lossy(&rest[..len]).into_owned()));
            rest = &rest[len..];
        }
        Some(out)
    }
}

/// NegotiateProtocolVersion (`v`) contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiateProtocolVersion {
    pub newest_minor_version: u32,
    pub unrecognized_options: Vec<String>,
}

impl NegotiateProtocolVersion {
    /// Parses the body strictly: the option count must match the names that
    /// follow and nothing may trail them.
    pub fn parse(msg: &BackendMessage) -> Result<Self, String> {
        if msg.tag != b'v' {
            return Err(format!("not a NegotiateProtocolVersion: {msg:?}"));
        }
        let b = &msg.body;
        if b.len() < 8 {
            return Err(format!("NegotiateProtocolVersion body too short: {b:?}"));
        }
        let version = be_i32(&b[..4]) as u32;
        let count = be_i32(&b[4..8]);
        let mut rest = &b[8..];
        let mut options = Vec::new();
        for i in 0..count.max(0) {
            let nul = rest
                .iter()
                .position(|c| *c == 0)
                .ok_or_else(|| format!("option {i} of {count} is not NUL-terminated: {b:?}"))?;
            options.push(String::from_utf8_lossy(&rest[..nul]).into_owned());
            rest = &rest[nul + 1..];
        }
        if !rest.is_empty() {
            return Err(format!(
                "{} trailing bytes after {count} options: {b:?}",
                rest.len()
            ));
        }
        Ok(Self {
            newest_minor_version: version,
            unrecognized_options: options,
        })
    }
}

/// Fields of an ErrorResponse or NoticeResponse, by field type byte.
#[derive(Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl fmt::Debug for ErrorFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.fields.iter().map(|(k, v)| (char::from(*k), v)))
            .finish()
    }
}

impl ErrorFields {
    pub fn parse(body: &[u8]) -> Self {
        let mut fields = Vec::new();
        let mut rest = body;
        while let Some((&kind, tail)) = rest.split_first() {
            if kind == 0 {
                break;
            }
            let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
            fields.push((kind, String::from_utf8_lossy(&tail[..end]).into_owned()));
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        Self { fields }
    }

    pub fn get(&self, kind: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_str())
    }

    /// Localised severity (`S`).
    pub fn severity(&self) -> Option<&str> {
        self.get(b'S')
    }

    /// Non-localised severity (`V`).
    pub fn severity_v(&self) -> Option<&str> {
        self.get(b'V')
    }

    /// SQLSTATE (`C`).
    pub fn code(&self) -> Option<&str> {
        self.get(b'C')
    }

    /// Primary message (`M`).
    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn timed_out(what: &str, limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("timed out after {limit:?} waiting for {what}"),
    )
}

/// Writes all of `bytes` and flushes (flushing matters for TLS).
pub async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads a single byte (the answer to SSLRequest/GSSENCRequest); `None` at
/// end of stream.
pub async fn read_byte<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    match tokio::time::timeout(limit, stream.read(&mut b)).await {
        Err(_) => Err(timed_out("a single byte", limit)),
        Ok(Ok(0)) => Ok(None),
        Ok(Ok(_)) => Ok(Some(b[0])),
        Ok(Err(e)) => Err(e),
    }
}

/// Largest backend message body the reader accepts (a sanity bound).
const MAX_BODY: usize = 64 << 20;

/// Reads one typed message, or `None` if the stream ends cleanly before its
/// first byte. End of stream inside a message is `UnexpectedEof`.
pub async fn read_message_or_eof<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> io::Result<Option<BackendMessage>> {
    let read = async {
        let mut tag = [0u8; 1];
        if stream.read(&mut tag).await? == 0 {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        let len = i32::from_be_bytes(len);
        if len < 4 || len as usize - 4 > MAX_BODY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "backend message {:?} (0x{:02x}) has invalid length {len}",
                    char::from(tag[0]),
                    tag[0]
                ),
            ));
        }
        let mut body = vec![0u8; len as usize - 4];
        stream.read_exact(&mut body).await?;
        Ok(Some(BackendMessage { tag: tag[0], body }))
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| Err(timed_out("a backend message", limit)))
}

/// Reads one typed message; end of stream is an error.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> io::Result<BackendMessage> {
    read_message_or_eof(stream, limit).await?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a backend message",
        )
    })
}

/// Reads messages up to and including the first one tagged `last`, all
/// within `limit`.
pub async fn read_until<S: AsyncRead + Unpin>(
    stream: &mut S,
    last: u8,
    limit: Duration,
) -> io::Result<Vec<BackendMessage>> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let msg = match read_message(stream, left).await {
            Ok(m) => m,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{e} (waiting for {:?}; got so far: {out:?})",
                        char::from(last)
                    ),
                ))
            }
        };
        let done = msg.tag == last;
        out.push(msg);
        if done {
            return Ok(out);
        }
    }
}

/// Reads messages until end of stream (or a read error such as a reset) and
/// returns them with the error, if any. Used where a peer is expected to
/// send something and close.
pub async fn read_to_close<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> (Vec<BackendMessage>, Option<io::Error>) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match read_message_or_eof(stream, left).await {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Reads raw bytes until end of stream within `limit`. Returns what was
/// read and the error that ended the read instead of a clean end of stream
/// (a timeout, a reset, a TLS close without close_notify), if any.
pub async fn read_raw_to_close<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> (Vec<u8>, Option<io::Error>) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                let err = timed_out(
                    &format!("end of stream (read {} bytes: {out:?})", out.len()),
                    limit,
                );
                return (out, Some(err));
            }
            Ok(Ok(0)) => return (out, None),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (out, Some(e)),
        }
    }
}

/// Splits raw bytes into typed messages; a trailing partial message, if
/// any, is returned as the second value.
pub fn split_messages(mut bytes: &[u8]) -> (Vec<BackendMessage>, Vec<u8>) {
    let mut out = Vec::new();
    while bytes.len() >= 5 {
        let len = be_i32(&bytes[1..5]);
        if len < 4 || bytes.len() < 1 + len as usize {
            break;
        }
        let end = 1 + len as usize;
        out.push(BackendMessage {
            tag: bytes[0],
            body: bytes[5..end].to_vec(),
        });
        bytes = &bytes[end..];
    }
    (out, bytes.to_vec())
}

/// What a server sent from the startup packet to the first ReadyForQuery.
#[derive(Debug, Clone)]
pub struct StartupResponse {
    /// Every message in order, including the final `Z`.
    pub messages: Vec<BackendMessage>,
}

impl StartupResponse {
    pub fn tags(&self) -> String {
        self.messages.iter().map(|m| char::from(m.tag)).collect()
    }

    pub fn parameters(&self) -> HashMap<String, String> {
        self.messages
            .iter()
            .filter_map(BackendMessage::parameter_status)
            .collect()
    }

    pub fn backend_key(&self) -> Option<(i32, Vec<u8>)> {
        self.messages.iter().find_map(BackendMessage::backend_key)
    }

    pub fn negotiate(&self) -> Option<&BackendMessage> {
        self.messages.iter().find(|m| m.tag == b'v')
    }

    pub fn ready_status(&self) -> Option<u8> {
        self.messages.last().and_then(BackendMessage::ready_status)
    }
}

/// Reads the startup response of a trusted client up to ReadyForQuery.
/// Fails on ErrorResponse, end of stream or timeout, with everything read so
/// far in the error.
pub async fn read_startup_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> io::Result<StartupResponse> {
    let messages = read_until_ready_or_error(stream, limit).await?;
    match messages.last() {
        Some(m) if m.tag == b'Z' => Ok(StartupResponse { messages }),
        _ => Err(io::Error::other(format!(
            "startup failed; messages: {messages:?}"
        ))),
    }
}

async fn read_until_ready_or_error<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> io::Result<Vec<BackendMessage>> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let msg = match read_message(stream, left).await {
            Ok(m) => m,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{e} (during startup; got so far: {out:?})"),
                ))
            }
        };
        let done = msg.tag == b'Z' || msg.tag == b'E';
        out.push(msg);
        if done {
            return Ok(out);
        }
    }
}

/// Sends `startup` and reads up to ReadyForQuery.
pub async fn startup<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    startup_packet: &[u8],
    limit: Duration,
) -> io::Result<StartupResponse> {
    send(stream, startup_packet).await?;
    read_startup_response(stream, limit).await
}

/// Runs a simple query and returns every message up to ReadyForQuery.
pub async fn simple_query<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    sql: &str,
    limit: Duration,
) -> io::Result<Vec<BackendMessage>> {
    send(stream, &query(sql)).await?;
    read_until(stream, b'Z', limit).await
}

/// Data rows of a message sequence, as text.
pub fn rows(messages: &[BackendMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(BackendMessage::data_row)
        .collect()
}

/// The first ErrorResponse in a message sequence.
pub fn first_error(messages: &[BackendMessage]) -> Option<ErrorFields> {
    messages.iter().find_map(BackendMessage::error_fields)
}

/// A small deterministic PRNG (xorshift64*) for reproducible fuzz inputs
/// without a `rand` dependency.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}
