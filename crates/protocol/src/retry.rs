//! Transparent retry of serialization conflicts, the pure part: which
//! request may be retried, what its held response says, and what to send
//! again. The session crate feeds a [`RetryCandidate`] the bytes of one
//! request and of its response and acts on the answers; nothing here does
//! I/O.
//!
//! A request is a candidate only when it is one simple Query, or one
//! extended-protocol batch through its Sync, started while the session was
//! idle: an implicit transaction. When its response ends in a listed
//! SQLSTATE with the backend idle again and no transaction control among
//! the completed commands, nothing of it was committed, so sending the same
//! bytes again is what the client would have done itself.

use crate::backend::decode_fields;
use crate::tracking::command::{classify_tag, CommandClass};

/// Why a request that could have hit a conflict was not retried (the
/// `cause` label of `dsql_proxy_retry_not_eligible_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotEligible {
    /// The client sent more before the request's ReadyForQuery.
    Pipelined,
    /// The request, or its response, is larger than `max_buffered`.
    TooLarge,
    /// The request started inside a transaction block.
    InTransaction,
    /// A transaction-control command completed (part of it may be
    /// committed), or a procedure ran that may commit inside.
    TransactionControl,
    /// A command whose effect a rollback does not undo completed
    /// (`PREPARE`, `DEALLOCATE`, `DISCARD`, `CLOSE`, `LOAD`).
    NotTransactional,
    /// Not a Query or a batch through Sync: a FunctionCall, COPY, a Flush
    /// the client waits on, or a stream the proxy cannot follow.
    Protocol,
    /// The client cancelled the request while it waited for a retry.
    Cancelled,
    /// The session was ending (shutdown, drain) or its backend was lost.
    SessionEnding,
}

impl NotEligible {
    pub const ALL: [Self; 8] = [
        Self::Pipelined,
        Self::TooLarge,
        Self::InTransaction,
        Self::TransactionControl,
        Self::NotTransactional,
        Self::Protocol,
        Self::Cancelled,
        Self::SessionEnding,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Pipelined => "pipelined",
            Self::TooLarge => "too_large",
            Self::InTransaction => "in_transaction",
            Self::TransactionControl => "transaction_control",
            Self::NotTransactional => "not_transactional",
            Self::Protocol => "protocol",
            Self::Cancelled => "cancelled",
            Self::SessionEnding => "session_ending",
        }
    }
}

/// A SQLSTATE, five ASCII characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(pub [u8; 5]);

impl SqlState {
    /// `None` unless `code` is exactly five ASCII digits or upper-case
    /// letters.
    pub fn parse(code: &str) -> Option<Self> {
        let bytes: [u8; 5] = code.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            .then_some(Self(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (see `parse`).
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// Where a request stands after more of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestProgress {
    /// More is to come (a batch before its Sync, a message cut short).
    Incomplete,
    /// The request ended exactly at its Query or Sync.
    Complete,
    NotEligible(NotEligible),
}

/// Where a held response stands after more of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseProgress {
    /// No ReadyForQuery yet.
    Pending,
    /// The ReadyForQuery arrived: judge it.
    Ready,
    /// Stop holding: forward what is held and relay the rest as it comes.
    NotEligible(NotEligible),
}

/// What to do with a complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The request ended in a listed error and nothing of it committed.
    Retry(SqlState),
    /// Forward the response; when it ended in a listed error, say why it
    /// is not retried (`None` when it did not).
    Forward(Option<(SqlState, NotEligible)>),
}

const CLOSE_COMPLETE: [u8; 5] = [b'3', 0, 0, 0, 4];

/// One request and its response, buffered. Reused from request to request:
/// the buffers keep their capacity, so steady traffic allocates nothing.
#[derive(Debug, Default)]
pub struct RetryCandidate {
    max_buffered: usize,
    request: Vec<u8>,
    /// Whole messages of `request` looked at so far.
    request_scanned: usize,
    request_complete: bool,
    /// An extended-protocol message was seen.
    extended: bool,
    /// Type of the last whole client message.
    last_client_tag: u8,
    response: Vec<u8>,
    response_scanned: usize,
    /// End of the ReadyForQuery in `response`, once seen.
    ready_end: Option<usize>,
    /// Type of the last whole message before it (a quick no to most
    /// responses: only one ending in an ErrorResponse can be retried).
    last_server_tag: u8,
    /// CloseCompletes the backend answers first for the Closes a resend
    /// put before the request: never the client's.
    closes_sent: usize,
}

impl RetryCandidate {
    pub fn new(max_buffered: usize) -> Self {
        Self {
            max_buffered,
            ..Self::default()
        }
    }

    /// Starts a new request (buffers keep their capacity; a very large one
    /// is given back).
    pub fn begin(&mut self) {
        const KEEP: usize = 16 * 1024;
        for buffer in [&mut self.request, &mut self.response] {
            buffer.clear();
            if buffer.capacity() > KEEP {
                buffer.shrink_to(KEEP);
            }
        }
        self.request_scanned = 0;
        self.request_complete = false;
        self.extended = false;
        self.last_client_tag = 0;
        self.response_scanned = 0;
        self.ready_end = None;
        self.last_server_tag = 0;
        self.closes_sent = 0;
    }

    /// The request's bytes as the client sent them.
    pub fn request(&self) -> &[u8] {
        &self.request
    }

    /// Adds bytes the client sent (in any split).
    pub fn push_request(&mut self, bytes: &[u8]) -> RequestProgress {
        if self.request_complete {
            return RequestProgress::NotEligible(NotEligible::Pipelined);
        }
        if self.request.len() + bytes.len() > self.max_buffered {
            return RequestProgress::NotEligible(NotEligible::TooLarge);
        }
        self.request.extend_from_slice(bytes);
        while let Some((tag, end)) = next_message(&self.request, self.request_scanned) {
            let Some(end) = end else {
                return RequestProgress::NotEligible(NotEligible::Protocol);
            };
            self.request_scanned = end;
            self.last_client_tag = tag;
            match tag {
                b'Q' if !self.extended => self.request_complete = true,
                b'S' => self.request_complete = true,
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => self.extended = true,
                // FunctionCall, COPY data outside a COPY, Terminate, a Query
                // inside a batch, anything unknown.
                _ => return RequestProgress::NotEligible(NotEligible::Protocol),
            }
            if self.request_complete {
                return if end == self.request.len() {
                    RequestProgress::Complete
                } else {
                    RequestProgress::NotEligible(NotEligible::Pipelined)
                };
            }
        }
        RequestProgress::Incomplete
    }

    /// True when the client may be waiting for an answer before it sends
    /// the rest of the batch: what it sent so far ends with a Flush.
    pub fn client_may_wait(&self) -> bool {
        !self.request_complete
            && self.request_scanned == self.request.len()
            && self.last_client_tag == b'H'
    }

    pub fn request_complete(&self) -> bool {
        self.request_complete
    }

    /// Adds bytes the backend sent (in any split).
    /// The bytes are always kept, so forwarding [`Self::response_for_client`]
    /// after any answer loses nothing.
    pub fn push_response(&mut self, bytes: &[u8]) -> ResponseProgress {
        self.response.extend_from_slice(bytes);
        if self.response.len() > self.max_buffered {
            return ResponseProgress::NotEligible(NotEligible::TooLarge);
        }
        if self.ready_end.is_some() {
            // Bytes after the ReadyForQuery: not the request's.
            return ResponseProgress::Ready;
        }
        while let Some((tag, end)) = next_message(&self.response, self.response_scanned) {
            let Some(end) = end else {
                return ResponseProgress::NotEligible(NotEligible::Protocol);
            };
            self.response_scanned = end;
            match tag {
                // COPY wants the client, or streams without end.
                b'G' | b'H' | b'W' => return ResponseProgress::NotEligible(NotEligible::Protocol),
                b'Z' => {
                    self.ready_end = Some(end);
                    return ResponseProgress::Ready;
                }
                _ => self.last_server_tag = tag,
            }
        }
        ResponseProgress::Pending
    }

    /// What the client gets when the response is forwarded: everything
    /// held, minus the CloseCompletes answering a resend's own Closes.
    pub fn response_for_client(&self) -> &[u8] {
        let mut start = 0;
        for _ in 0..self.closes_sent {
            match self.response.get(start..start + CLOSE_COMPLETE.len()) {
                Some(unit) if unit == CLOSE_COMPLETE => start += CLOSE_COMPLETE.len(),
                _ => break,
            }
        }
        &self.response[start..]
    }

    /// Judges a response that reached its ReadyForQuery.
    pub fn judge(&self, retry_on: &[SqlState]) -> Verdict {
        let Some(ready_end) = self.ready_end else {
            return Verdict::Forward(None);
        };
        if self.last_server_tag != b'E' {
            return Verdict::Forward(None);
        }
        let mut at = 0;
        let mut last_error: Option<(usize, usize)> = None;
        let mut transaction_control = false;
        let mut not_transactional = false;
        let mut status = 0;
        while let Some((tag, Some(end))) = next_message(&self.response, at) {
            let body = &self.response[at + 5..end];
            match tag {
                b'E' => last_error = Some((at + 5, end)),
                b'C' => match classify_tag(body) {
                    CommandClass::TransactionControl => transaction_control = true,
                    CommandClass::StateChanging if survives_rollback(body) => {
                        not_transactional = true
                    }
                    _ => {}
                },
                b'Z' => status = body.first().copied().unwrap_or(0),
                _ => {}
            }
            at = end;
            if at == ready_end {
                break;
            }
        }
        let Some((start, end)) = last_error else {
            return Verdict::Forward(None);
        };
        // The error must be the last message before ReadyForQuery.
        if end + 6 != ready_end {
            return Verdict::Forward(None);
        }
        let Ok(fields) = decode_fields(&self.response[start..end], "ErrorResponse") else {
            return Verdict::Forward(None);
        };
        let Some(sqlstate) = SqlState::parse(fields.code()).filter(|s| retry_on.contains(s)) else {
            return Verdict::Forward(None);
        };
        if fields.severity() != "ERROR" {
            return Verdict::Forward(None);
        }
        let cause = if transaction_control || status != b'I' || self.runs_procedure() {
            Some(NotEligible::TransactionControl)
        } else if not_transactional {
            Some(NotEligible::NotTransactional)
        } else if ready_end != self.response.len() {
            // Something followed the ReadyForQuery (a notification): it
            // must not be sent before the answer of a later try.
            Some(NotEligible::Pipelined)
        } else {
            None
        };
        match cause {
            Some(cause) => Verdict::Forward(Some((sqlstate, cause))),
            None => Verdict::Retry(sqlstate),
        }
    }

    /// After [`Verdict::Retry`]: writes into `out` what to send the backend
    /// again, and forgets the response. Protocol-level statements a Parse
    /// of the failed try created survive its rollback, so each is closed
    /// first (the matching CloseCompletes never reach the client).
    pub fn prepare_resend(&mut self, out: &mut Vec<u8>) {
        out.clear();
        let mut parsed = self.count_response(b'1');
        let mut closes = 0;
        let mut at = 0;
        while parsed > 0 {
            let Some((tag, Some(end))) = next_message(&self.request, at) else {
                break;
            };
            if tag == b'P' {
                parsed -= 1;
                let body = &self.request[at + 5..end];
                let name = body.split(|b| *b == 0).next().unwrap_or(b"");
                if !name.is_empty() {
                    out.push(b'C');
                    out.extend_from_slice(&(4 + 1 + name.len() as u32 + 1).to_be_bytes());
                    out.push(b'S');
                    out.extend_from_slice(name);
                    out.push(0);
                    closes += 1;
                }
            }
            at = end;
        }
        out.extend_from_slice(&self.request);
        self.response.clear();
        self.response_scanned = 0;
        self.ready_end = None;
        self.last_server_tag = 0;
        self.closes_sent = closes;
    }

    fn count_response(&self, wanted: u8) -> usize {
        let mut at = 0;
        let mut count = 0;
        while let Some((tag, Some(end))) = next_message(&self.response, at) {
            count += usize::from(tag == wanted);
            at = end;
        }
        count
    }

    /// A statement of the request calls a procedure or runs a `DO` block,
    /// either of which may commit inside (judged roughly: a false positive
    /// only costs a retry).
    fn runs_procedure(&self) -> bool {
        let mut at = 0;
        while let Some((tag, Some(end))) = next_message(&self.request, at) {
            let body = &self.request[at + 5..end];
            let text = match tag {
                b'Q' => body,
                b'P' => body
                    .iter()
                    .position(|b| *b == 0)
                    .map_or(&b""[..], |nul| &body[nul + 1..]),
                _ => &b""[..],
            };
            if text
                .split(|b| *b == b';')
                .any(|statement| matches!(first_word(statement), Some(w) if w.eq_ignore_ascii_case(b"call") || w.eq_ignore_ascii_case(b"do")))
            {
                return true;
            }
            at = end;
        }
        false
    }
}

/// The next message at `at`: its type and, when its length is sane, its
/// end (`Some(None)` for an impossible length); `None` until the whole
/// message is there.
fn next_message(buffer: &[u8], at: usize) -> Option<(u8, Option<usize>)> {
    let header = buffer.get(at..at + 5)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len < 4 {
        return Some((header[0], None));
    }
    let end = at + 1 + len;
    (end <= buffer.len()).then_some((header[0], Some(end)))
}

/// State-changing tags a rollback of the implicit transaction leaves in
/// place.
fn survives_rollback(tag: &[u8]) -> bool {
    let word = tag.split(|b| *b == b' ' || *b == 0).next().unwrap_or(b"");
    matches!(
        word,
        b"PREPARE" | b"DEALLOCATE" | b"DISCARD" | b"CLOSE" | b"LOAD" | b"CALL" | b"DO"
    )
}

/// The first keyword of a statement, past blanks and comments.
fn first_word(mut text: &[u8]) -> Option<&[u8]> {
    loop {
        text = text.trim_ascii_start();
        if let Some(rest) = text.strip_prefix(b"--") {
            let newline = rest.iter().position(|b| *b == b'\n')?;
            text = &rest[newline + 1..];
        } else if let Some(rest) = text.strip_prefix(b"/*") {
            let close = rest.windows(2).position(|w| w == b"*/")?;
            text = &rest[close + 2..];
        } else {
            break;
        }
    }
    let len = text
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(text.len());
    (len > 0).then_some(&text[..len])
}

#[cfg(test)]
mod tests;
