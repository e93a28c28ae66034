//! Optimistic-concurrency conflict injection (`--conflict-every N`): every
//! Nth commit point of a session fails the way Aurora DSQL fails a
//! transaction that lost an OCC race, with SQLSTATE `40001` and the
//! `(OC000)` / `(OC001)` message, and nothing of it committed upstream.
//!
//! [`ConflictInjector`] sits between the relay and the upstream stream, so
//! the relay sees an ordinary exchange: each request it forwards gets one
//! answer ending in ReadyForQuery, whether the upstream or the injector
//! wrote it. It frames both directions (headers only, except for the few
//! messages it must read whole) and keeps its own view of the session:
//! the last ReadyForQuery status and the requests (Query, Sync,
//! FunctionCall) forwarded but not answered yet.
//!
//! Commit points, counted per session:
//! * a simple Query while idle (status `I`, nothing in flight) whose
//!   statement is not transaction control: an autocommit statement;
//! * an extended-protocol batch started while idle that contains an
//!   Execute: its messages are held until Sync (a Flush, or anything but
//!   Parse/Bind/Describe/Execute/Close, forwards them as they are and the
//!   batch no longer counts);
//! * a simple `COMMIT` / `END` run in a transaction block (`T`). Drivers
//!   pipeline a COMMIT behind requests still in flight (tokio-postgres
//!   sends the Close + Sync of a dropped statement just before it), so a
//!   COMMIT that arrives while the last known status is `T` counts even
//!   with requests in flight, and is checked once its answer comes: if the
//!   transaction block had ended or failed by then, it was no commit point
//!   and the client gets what its COMMIT would have got.
//!
//! A conflict on the first two is answered by the injector itself
//! (ErrorResponse, ReadyForQuery `I`) and never reaches the upstream; on a
//! COMMIT the upstream gets `ROLLBACK` instead, its CommandComplete is
//! dropped and the client gets the ErrorResponse, then the upstream's
//! ReadyForQuery.
//!
//! Where the request bookkeeping could go wrong, injection stops for the
//! rest of the session: after a CopyInResponse / CopyBothResponse (a Sync
//! sent during COPY FROM STDIN gets no ReadyForQuery), or a Query or
//! FunctionCall sent inside an unsynced extended-protocol batch.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use dsql_proxy_protocol::messages;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use crate::config::ConflictKind;

/// `serialization_failure`: what DSQL reports OCC conflicts as.
pub const SERIALIZATION_FAILURE: &str = "40001";
/// Most bytes of client messages held back to decide on a commit point
/// (a batch until its Sync, or one Query). Bigger requests are forwarded
/// as they come and are not commit points.
const MAX_HELD: usize = 8 << 20;
/// Bytes waiting for the upstream beyond which writes wait.
const HIGH_WATER: usize = 64 * 1024;
/// Upstream read size.
const READ_CHUNK: usize = 8 * 1024;

/// The injection settings and the emulator-wide count.
#[derive(Debug)]
pub(crate) struct Conflicts {
    every: u32,
    kind: ConflictKind,
    injected: AtomicU64,
}

impl Conflicts {
    pub(crate) fn new(every: u32, kind: ConflictKind) -> Self {
        Self {
            every,
            kind,
            injected: AtomicU64::new(0),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.every > 0
    }

    /// The ErrorResponse DSQL sends for the configured conflict.
    fn error_response(&self, buf: &mut BytesMut) {
        messages::error_response(
            buf,
            &[
                (b'S', "ERROR".to_owned()),
                (b'V', "ERROR".to_owned()),
                (b'C', SERIALIZATION_FAILURE.to_owned()),
                (b'M', self.kind.message().to_owned()),
            ],
        );
    }
}

/// Which kind of commit point a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// A simple Query outside a transaction block.
    Autocommit,
    /// An extended-protocol batch with an Execute, through Sync.
    Batch,
    /// COMMIT or END in a transaction block.
    Commit,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Self::Autocommit => "autocommit_query",
            Self::Batch => "extended_batch",
            Self::Commit => "commit",
        }
    }
}

/// A COMMIT sent behind requests still in flight (so counted on the last
/// known status), or replaced by `ROLLBACK`, until its answer says whether
/// it ran in a transaction block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    None,
    /// Sent; `after` requests before it are still to be answered.
    Pending {
        after: u64,
        replaced: bool,
    },
    /// The ROLLBACK's CommandComplete was dropped: the conflict goes before
    /// its ReadyForQuery.
    Conflict,
    /// Its CommandComplete went to the client (with the tag the client's
    /// COMMIT would have got).
    Answered,
}

/// Incremental framing of one direction: the header being read, then the
/// body, passed on piece by piece or (`whole`) collected.
#[derive(Debug, Default)]
struct Framer {
    header: [u8; 5],
    have: usize,
    /// Body bytes of the current message still to come, once its header
    /// is complete.
    body_left: Option<usize>,
    whole: Option<BytesMut>,
    broken: bool,
}

impl Framer {
    /// Takes header bytes from `data`; the header once complete.
    fn take_header(&mut self, data: &mut &[u8]) -> Option<[u8; 5]> {
        let n = (5 - self.have).min(data.len());
        self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
        self.have += n;
        *data = &data[n..];
        if self.have < 5 {
            return None;
        }
        self.have = 0;
        Some(self.header)
    }

    /// Between two messages on the output side (a header still being read
    /// was not passed on yet).
    fn at_boundary(&self) -> bool {
        self.body_left.is_none()
    }
}

/// The length word of a header (counting itself); `None` below 4.
fn body_len(header: &[u8; 5]) -> Option<usize> {
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    len.checked_sub(4)
}

/// An extended-protocol batch held until its Sync.
#[derive(Debug, Default)]
struct Batch {
    bytes: BytesMut,
    has_execute: bool,
}

/// The upstream stream of one session, with conflict injection.
pub(crate) struct ConflictInjector<'a, B> {
    inner: B,
    conflicts: &'a Conflicts,
    peer: SocketAddr,
    role: String,
    /// Commit points seen and conflicts injected in this session.
    commit_points: u64,
    injected: u64,
    /// Transaction status of the last ReadyForQuery.
    status: u8,
    /// Query, Sync and FunctionCall forwarded upstream without their
    /// ReadyForQuery yet.
    in_flight: u64,
    /// Extended-protocol messages forwarded since the last Sync.
    open_extended: bool,
    batch: Option<Batch>,
    /// A COMMIT being checked (see [`Commit`]).
    commit: Commit,
    /// The bookkeeping may be wrong from here on: no more injection.
    lost_track: bool,
    /// Client to upstream.
    frontend: Framer,
    to_upstream: BytesMut,
    /// Upstream to client (what the relay reads).
    backend: Framer,
    to_client: BytesMut,
    /// Injected answers waiting for the upstream stream's next boundary.
    inject_pending: BytesMut,
    /// An answer was injected while the relay wrote: wake it to read.
    wake_reader: bool,
    read_eof: bool,
}

impl<'a, B> ConflictInjector<'a, B> {
    /// `ready_status` is the upstream's first ReadyForQuery status.
    pub(crate) fn new(
        inner: B,
        conflicts: &'a Conflicts,
        ready_status: u8,
        peer: SocketAddr,
        role: &str,
    ) -> Self {
        Self {
            inner,
            conflicts,
            peer,
            role: role.to_owned(),
            commit_points: 0,
            injected: 0,
            status: ready_status,
            in_flight: 0,
            open_extended: false,
            batch: None,
            commit: Commit::None,
            lost_track: false,
            frontend: Framer::default(),
            to_upstream: BytesMut::with_capacity(READ_CHUNK),
            backend: Framer::default(),
            to_client: BytesMut::with_capacity(READ_CHUNK),
            inject_pending: BytesMut::new(),
            wake_reader: false,
            read_eof: false,
        }
    }

    /// Commit points seen and conflicts injected in this session.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.commit_points, self.injected)
    }

    /// Injection stops for good once either direction cannot be framed.
    fn active(&self) -> bool {
        !self.frontend.broken && !self.backend.broken && !self.lost_track
    }

    /// Nothing in flight, nothing half-sent: the status is current.
    fn idle(&self) -> bool {
        self.in_flight == 0 && !self.open_extended && self.batch.is_none()
    }

    // ---- client to upstream ----

    fn client_bytes(&mut self, mut data: &[u8]) {
        loop {
            if self.frontend.body_left == Some(0) {
                self.frontend.body_left = None;
                if let Some(msg) = self.frontend.whole.take() {
                    self.client_message(msg);
                }
            }
            if data.is_empty() {
                return;
            }
            if self.frontend.broken {
                self.to_upstream.extend_from_slice(data);
                return;
            }
            if let Some(left) = self.frontend.body_left {
                let n = left.min(data.len());
                let (piece, rest) = data.split_at(n);
                data = rest;
                match self.frontend.whole.as_mut() {
                    Some(whole) => whole.extend_from_slice(piece),
                    None => self.to_upstream.extend_from_slice(piece),
                }
                self.frontend.body_left = Some(left - n);
                continue;
            }
            let Some(header) = self.frontend.take_header(&mut data) else {
                continue;
            };
            let Some(body) = body_len(&header) else {
                self.break_frontend();
                self.to_upstream.extend_from_slice(&header);
                continue;
            };
            let tag = header[0];
            if self.collect_client(tag, body) {
                let mut whole = BytesMut::with_capacity(5 + body);
                whole.extend_from_slice(&header);
                self.frontend.whole = Some(whole);
            } else {
                self.note_forwarded(tag);
                self.to_upstream.extend_from_slice(&header);
            }
            self.frontend.body_left = Some(body);
        }
    }

    /// The client stream cannot be framed: forward everything as it is.
    fn break_frontend(&mut self) {
        self.frontend.broken = true;
        if let Some(batch) = self.batch.take() {
            self.to_upstream.extend_from_slice(&batch.bytes);
        }
        if let Some(partial) = self.frontend.whole.take() {
            self.to_upstream.extend_from_slice(&partial);
        }
    }

    /// Updates the request bookkeeping for a message going upstream.
    fn note_forwarded(&mut self, tag: u8) {
        match tag {
            b'Q' | b'F' => {
                // After an error the server skips to Sync: this one may
                // never be answered.
                if self.open_extended {
                    self.lose_track("a Query or FunctionCall inside an unsynced batch");
                }
                self.in_flight += 1;
            }
            b'S' => {
                self.in_flight += 1;
                self.open_extended = false;
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => self.open_extended = true,
            _ => {}
        }
    }

    fn lose_track(&mut self, why: &'static str) {
        if !self.lost_track {
            self.lost_track = true;
            debug!(
                client = %self.peer, user = %self.role, reason = why,
                "conflict injection stops for this session"
            );
        }
    }

    /// Forwards whole messages upstream.
    fn forward_messages(&mut self, mut bytes: &[u8]) {
        self.to_upstream.extend_from_slice(bytes);
        while bytes.len() >= 5 {
            let tag = bytes[0];
            let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
            self.note_forwarded(tag);
            bytes = bytes.get(1 + len..).unwrap_or_default();
        }
    }

    /// Whether the message whose header just arrived is read whole.
    fn collect_client(&mut self, tag: u8, body: usize) -> bool {
        if !self.active() {
            return false;
        }
        if let Some(batch) = &self.batch {
            if batch.bytes.len() + 5 + body <= MAX_HELD {
                return true;
            }
            // Too big to hold: forwarded, and no commit point.
            if let Some(batch) = self.batch.take() {
                self.forward_messages(&batch.bytes);
            }
            return false;
        }
        if 5 + body > MAX_HELD {
            return false;
        }
        if tag == b'Q' && self.status == b'T' && self.commit == Commit::None {
            // Maybe a COMMIT pipelined behind requests of the transaction.
            return !self.open_extended;
        }
        if !self.idle() {
            return false;
        }
        match (tag, self.status) {
            (b'Q', b'I' | b'T') => true,
            (b'P' | b'B' | b'D' | b'E' | b'C', b'I') => {
                self.batch = Some(Batch::default());
                true
            }
            _ => false,
        }
    }

    /// A client message read whole: part of a held batch, or a Query
    /// received while idle.
    fn client_message(&mut self, msg: BytesMut) {
        let tag = msg[0];
        if let Some(batch) = self.batch.as_mut() {
            match tag {
                b'P' | b'B' | b'D' | b'C' => batch.bytes.extend_from_slice(&msg),
                b'E' => {
                    batch.has_execute = true;
                    batch.bytes.extend_from_slice(&msg);
                }
                b'S' => {
                    batch.bytes.extend_from_slice(&msg);
                    if let Some(batch) = self.batch.take() {
                        if batch.has_execute {
                            self.commit_point(Point::Batch, &batch.bytes);
                        } else {
                            self.forward_messages(&batch.bytes);
                        }
                    }
                }
                b'X' => {
                    // Nothing of an unsynced batch would commit.
                    self.batch = None;
                    self.forward_messages(&msg);
                }
                _ => {
                    // A Flush (the client wants answers before Sync) or
                    // anything unexpected: forwarded as it is.
                    if let Some(batch) = self.batch.take() {
                        self.forward_messages(&batch.bytes);
                    }
                    self.forward_messages(&msg);
                }
            }
            return;
        }
        if tag != b'Q' {
            self.forward_messages(&msg);
            return;
        }
        let sql = query_text(&msg[5..]);
        let point = match self.status {
            b'I' if self.idle() && is_autocommit_statement(&sql) => Some(Point::Autocommit),
            b'T' if is_commit(&sql) => Some(Point::Commit),
            _ => None,
        };
        match point {
            Some(point) => self.commit_point(point, &msg),
            None => self.forward_messages(&msg),
        }
    }

    /// Counts a commit point; every Nth fails.
    fn commit_point(&mut self, point: Point, request: &[u8]) {
        self.commit_points += 1;
        if !self
            .commit_points
            .is_multiple_of(u64::from(self.conflicts.every))
        {
            if point == Point::Commit && self.in_flight > 0 {
                // Counted on the last known status: checked on its answer.
                self.commit = Commit::Pending {
                    after: self.in_flight,
                    replaced: false,
                };
            }
            self.forward_messages(request);
            return;
        }
        match point {
            Point::Autocommit | Point::Batch => {
                self.record_conflict(point);
                let mut answer = BytesMut::with_capacity(128);
                self.conflicts.error_response(&mut answer);
                messages::ready_for_query(&mut answer, b'I');
                self.inject(&answer);
            }
            Point::Commit => {
                // A conflict once its answer shows it ran in the block.
                self.commit = Commit::Pending {
                    after: self.in_flight,
                    replaced: true,
                };
                let mut rollback = BytesMut::with_capacity(16);
                encode_query(&mut rollback, "ROLLBACK");
                self.forward_messages(&rollback);
            }
        }
    }

    fn record_conflict(&mut self, point: Point) {
        self.injected += 1;
        let total = self.conflicts.injected.fetch_add(1, Ordering::Relaxed) + 1;
        debug!(
            client = %self.peer, user = %self.role,
            commit_point = point.name(),
            commit_points = self.commit_points,
            session_conflicts = self.injected,
            total_conflicts = total,
            code = self.conflicts.kind.code(),
            "injected an optimistic-concurrency conflict"
        );
    }

    /// A COMMIT counted on the last known status ran outside a
    /// transaction block (or in a failed one) after all.
    fn not_a_commit_point(&mut self) {
        self.commit_points = self.commit_points.saturating_sub(1);
        debug!(
            client = %self.peer, user = %self.role,
            "a pipelined COMMIT ran outside a transaction block: not a commit point"
        );
    }

    /// Queues an answer for the client at the upstream stream's next
    /// message boundary.
    fn inject(&mut self, answer: &[u8]) {
        if self.backend.at_boundary() {
            self.to_client.extend_from_slice(answer);
        } else {
            self.inject_pending.extend_from_slice(answer);
        }
        self.wake_reader = true;
    }

    // ---- upstream to client ----

    fn upstream_bytes(&mut self, mut data: &[u8]) {
        loop {
            if self.backend.body_left == Some(0) {
                self.backend.body_left = None;
                if let Some(msg) = self.backend.whole.take() {
                    self.server_message(msg);
                }
                if !self.inject_pending.is_empty() {
                    let pending = self.inject_pending.split();
                    self.to_client.extend_from_slice(&pending);
                }
            }
            if data.is_empty() {
                return;
            }
            if self.backend.broken {
                self.to_client.extend_from_slice(data);
                return;
            }
            if let Some(left) = self.backend.body_left {
                let n = left.min(data.len());
                let (piece, rest) = data.split_at(n);
                data = rest;
                match self.backend.whole.as_mut() {
                    Some(whole) => whole.extend_from_slice(piece),
                    None => self.to_client.extend_from_slice(piece),
                }
                self.backend.body_left = Some(left - n);
                continue;
            }
            let Some(header) = self.backend.take_header(&mut data) else {
                continue;
            };
            let Some(body) = body_len(&header) else {
                self.backend.broken = true;
                let pending = self.inject_pending.split();
                self.to_client.extend_from_slice(&pending);
                self.to_client.extend_from_slice(&header);
                continue;
            };
            let tag = header[0];
            if matches!(tag, b'G' | b'W') {
                self.lose_track("COPY FROM STDIN");
            }
            let whole = (tag == b'Z' && body == 1)
                || (tag == b'C'
                    && matches!(self.commit, Commit::Pending { after: 0, .. })
                    && body <= 1024);
            if whole {
                let mut msg = BytesMut::with_capacity(5 + body);
                msg.extend_from_slice(&header);
                self.backend.whole = Some(msg);
            } else {
                self.to_client.extend_from_slice(&header);
            }
            self.backend.body_left = Some(body);
        }
    }

    /// A ReadyForQuery, or the CommandComplete of a COMMIT being checked.
    fn server_message(&mut self, msg: BytesMut) {
        match msg[0] {
            b'Z' => {
                // The state the request answered here ran in.
                let before = std::mem::replace(&mut self.status, msg[5]);
                self.in_flight = self.in_flight.saturating_sub(1);
                match self.commit {
                    Commit::None => {}
                    Commit::Pending { after, replaced } if after > 0 => {
                        self.commit = Commit::Pending {
                            after: after - 1,
                            replaced,
                        };
                    }
                    Commit::Pending { replaced, .. } => {
                        // No CommandComplete: an error, passed on as it is.
                        // A failed COMMIT in a block was a commit point; a
                        // failed ROLLBACK is no conflict.
                        if replaced || before != b'T' {
                            self.not_a_commit_point();
                        }
                        self.commit = Commit::None;
                    }
                    Commit::Conflict => {
                        let mut error = BytesMut::with_capacity(96);
                        self.conflicts.error_response(&mut error);
                        self.to_client.extend_from_slice(&error);
                        self.commit = Commit::None;
                    }
                    Commit::Answered => self.commit = Commit::None,
                }
                self.to_client.extend_from_slice(&msg);
            }
            b'C' if matches!(self.commit, Commit::Pending { after: 0, .. }) => {
                let replaced = matches!(self.commit, Commit::Pending { replaced: true, .. });
                self.commit = Commit::Answered;
                // `status` is from the ReadyForQuery before: the state the
                // client's COMMIT ran (or would have run) in.
                if self.status == b'T' {
                    if replaced {
                        // Dropped: the conflict goes before ReadyForQuery.
                        self.commit = Commit::Conflict;
                        self.record_conflict(Point::Commit);
                    } else {
                        self.to_client.extend_from_slice(&msg);
                    }
                    return;
                }
                self.not_a_commit_point();
                if replaced && self.status == b'I' {
                    // COMMIT outside a block: the same WARNING as ROLLBACK
                    // (passed on already), but the tag says COMMIT. (In a
                    // failed block COMMIT answers ROLLBACK too.)
                    let mut commit = BytesMut::with_capacity(16);
                    commit.put_u8(b'C');
                    commit.put_u32(4 + 7);
                    commit.put_slice(b"COMMIT\0");
                    self.to_client.extend_from_slice(&commit);
                } else {
                    self.to_client.extend_from_slice(&msg);
                }
            }
            _ => self.to_client.extend_from_slice(&msg),
        }
    }
}

impl<B: AsyncWrite + Unpin> ConflictInjector<'_, B> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.to_upstream.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.to_upstream))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.to_upstream.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<B: AsyncRead + Unpin> AsyncRead for ConflictInjector<'_, B> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.to_client.is_empty() {
                let n = this.to_client.len().min(buf.remaining());
                buf.put_slice(&this.to_client[..n]);
                this.to_client.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.read_eof = true;
            } else {
                this.upstream_bytes(read.filled());
            }
        }
    }
}

impl<B: AsyncWrite + Unpin> AsyncWrite for ConflictInjector<'_, B> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.to_upstream.len() >= HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        this.client_bytes(buf);
        if std::mem::take(&mut this.wake_reader) {
            // The relay reads the answer on its next poll.
            cx.waker().wake_by_ref();
        }
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Appends a Query message.
fn encode_query(buf: &mut BytesMut, sql: &str) {
    buf.put_u8(b'Q');
    buf.put_u32((4 + sql.len() + 1) as u32);
    buf.put_slice(sql.as_bytes());
    buf.put_u8(0);
}

/// A Query body's text, without its terminator.
fn query_text(body: &[u8]) -> String {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}

/// Skips whitespace, `--` line comments and (nested) `/* */` comments.
fn skip_space(mut s: &str) -> &str {
    loop {
        let t = s.trim_start();
        if let Some(rest) = t.strip_prefix("--") {
            s = rest.find('\n').map_or("", |i| &rest[i + 1..]);
        } else if let Some(rest) = t.strip_prefix("/*") {
            s = skip_block_comment(rest);
        } else {
            return t;
        }
    }
}

/// The text after the `*/` closing a block comment whose `/*` was just
/// consumed (PostgreSQL's block comments nest); empty when unterminated.
fn skip_block_comment(s: &str) -> &str {
    let bytes = s.as_bytes();
    let mut depth = 1usize;
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return &s[i..];
                }
            }
            _ => i += 1,
        }
    }
    ""
}

/// The next word (letters, digits, `_`) after whitespace and comments, and
/// the text after it; the word is empty when something else comes first.
fn word(s: &str) -> (&str, &str) {
    let s = skip_space(s);
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    s.split_at(end)
}

/// BEGIN, START, COMMIT, END, ROLLBACK, ABORT, SAVEPOINT, RELEASE or
/// PREPARE TRANSACTION, by the first keyword(s).
fn is_transaction_control(sql: &str) -> bool {
    let (first, rest) = word(sql);
    const CONTROL: &[&str] = &[
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
    ];
    if CONTROL.iter().any(|k| first.eq_ignore_ascii_case(k)) {
        return true;
    }
    first.eq_ignore_ascii_case("prepare") && word(rest).0.eq_ignore_ascii_case("transaction")
}

/// A statement outside a transaction block that commits on its own: not
/// transaction control, and not empty.
fn is_autocommit_statement(sql: &str) -> bool {
    !word(sql).0.is_empty() && !is_transaction_control(sql)
}

/// `COMMIT` or `END` (optionally `WORK` / `TRANSACTION`), case-insensitive,
/// with an optional trailing `;`.
fn is_commit(sql: &str) -> bool {
    let (first, rest) = word(sql);
    if !(first.eq_ignore_ascii_case("commit") || first.eq_ignore_ascii_case("end")) {
        return false;
    }
    let (second, after) = word(rest);
    let rest = if second.eq_ignore_ascii_case("work") || second.eq_ignore_ascii_case("transaction")
    {
        after
    } else if second.is_empty() {
        rest
    } else {
        return false;
    };
    let rest = skip_space(rest);
    let rest = rest.strip_prefix(';').unwrap_or(rest);
    skip_space(rest).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    #[test]
    fn classifies_statements() {
        for sql in [
            "update t set n = n + 1",
            "  /* a /* nested */ comment */ -- line\n INSERT into t values (1)",
            "select 1",
            "prepare p as select 1",
            "startup_table_insert()",
        ] {
            assert!(is_autocommit_statement(sql), "{sql}");
        }
        for sql in [
            "BEGIN",
            "begin isolation level repeatable read",
            "start transaction",
            " commit;",
            "End",
            "rollback to savepoint a",
            "ABORT",
            "savepoint a",
            "release a",
            "prepare transaction 'x'",
            "PREPARE /* c */ TRANSACTION 'x'",
            "",
            "  -- nothing\n",
            ";",
        ] {
            assert!(!is_autocommit_statement(sql), "{sql:?}");
        }
        for sql in [
            "COMMIT",
            "commit;",
            " end ; ",
            "Commit Work",
            "end transaction;",
            "/* c */ commit",
        ] {
            assert!(is_commit(sql), "{sql:?}");
        }
        for sql in [
            "commit and chain",
            "commit prepared 'x'",
            "rollback",
            "commit; select 1",
            "committed",
            "endx",
        ] {
            assert!(!is_commit(sql), "{sql:?}");
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        msg(b'Q', &body)
    }

    fn ready(status: u8) -> Vec<u8> {
        msg(b'Z', &[status])
    }

    fn complete(tag: &str) -> Vec<u8> {
        let mut body = tag.as_bytes().to_vec();
        body.push(0);
        msg(b'C', &body)
    }

    fn conflict(kind: ConflictKind) -> Vec<u8> {
        let mut buf = BytesMut::new();
        Conflicts::new(1, kind).error_response(&mut buf);
        buf.to_vec()
    }

    /// Reads exactly `n` bytes, bounded in time.
    async fn read_n<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), r.read_exact(&mut got))
            .await
            .expect("read in time")
            .expect("read");
        got
    }

    /// Nothing arrives within a short while.
    async fn nothing<R: AsyncRead + Unpin>(r: &mut R) {
        let mut b = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(100), r.read(&mut b)).await;
        assert!(read.is_err(), "unexpected bytes: {read:?}");
    }

    type Injector<'a> = ConflictInjector<'a, DuplexStream>;

    fn injector(conflicts: &Conflicts, status: u8) -> (Injector<'_>, DuplexStream) {
        let (near, far) = duplex(1 << 20);
        let peer = "127.0.0.1:1".parse().unwrap();
        (
            ConflictInjector::new(near, conflicts, status, peer, "app"),
            far,
        )
    }

    /// The client sends `request`, the upstream answers `answer` to what
    /// it received (which must be `request`); the client reads `answer`.
    async fn round_trip(inj: &mut Injector<'_>, server: &mut DuplexStream, request: &[u8]) {
        inj.write_all(request).await.unwrap();
        inj.flush().await.unwrap();
        assert_eq!(read_n(server, request.len()).await, request);
        let answer = [complete("UPDATE 1"), ready(b'I')].concat();
        server.write_all(&answer).await.unwrap();
        assert_eq!(read_n(inj, answer.len()).await, answer);
    }

    #[tokio::test]
    async fn every_second_autocommit_query_conflicts_without_reaching_upstream() {
        let conflicts = Conflicts::new(2, ConflictKind::Oc000);
        let (mut inj, mut server) = injector(&conflicts, b'I');
        let update = query("update t set n = n + 1");
        for round in 0..3 {
            round_trip(&mut inj, &mut server, &update).await;
            // Byte by byte: framing must not care.
            for b in &update {
                inj.write_all(std::slice::from_ref(b)).await.unwrap();
            }
            inj.flush().await.unwrap();
            let expected = [conflict(ConflictKind::Oc000), ready(b'I')].concat();
            assert_eq!(read_n(&mut inj, expected.len()).await, expected, "{round}");
            nothing(&mut server).await;
        }
        // Transaction control is no commit point.
        round_trip(&mut inj, &mut server, &query("begin")).await;
        assert_eq!(inj.counts(), (6, 3));
        assert_eq!(conflicts.injected.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn extended_batches_are_held_until_sync() {
        let conflicts = Conflicts::new(2, ConflictKind::Oc001);
        let (mut inj, mut server) = injector(&conflicts, b'I');
        let parse = msg(b'P', b"\0update t set n = n + 1\0\0\0");
        let bind = msg(b'B', b"\0\0\0\0\0\0\0\0");
        let execute = msg(b'E', b"\0\0\0\0\0");
        let sync = msg(b'S', b"");
        let flush = msg(b'H', b"");
        let batch = [parse.clone(), bind.clone(), execute.clone(), sync.clone()].concat();

        // Parse + Sync only (a prepare) is not a commit point.
        round_trip(
            &mut inj,
            &mut server,
            &[parse.clone(), sync.clone()].concat(),
        )
        .await;
        round_trip(&mut inj, &mut server, &batch).await;
        // Nothing goes upstream before Sync; then nothing at all.
        inj.write_all(&[parse.clone(), bind.clone(), execute.clone()].concat())
            .await
            .unwrap();
        inj.flush().await.unwrap();
        nothing(&mut server).await;
        inj.write_all(&sync).await.unwrap();
        inj.flush().await.unwrap();
        let expected = [conflict(ConflictKind::Oc001), ready(b'I')].concat();
        assert_eq!(read_n(&mut inj, expected.len()).await, expected);
        nothing(&mut server).await;

        // With a Flush the batch goes through as it is, and does not count.
        let flushed = [parse, bind, execute, flush].concat();
        inj.write_all(&flushed).await.unwrap();
        inj.flush().await.unwrap();
        assert_eq!(read_n(&mut server, flushed.len()).await, flushed);
        round_trip(&mut inj, &mut server, &sync).await;
        assert_eq!(inj.counts(), (2, 1));
        // The next one is the third commit point.
        round_trip(&mut inj, &mut server, &batch).await;
        assert_eq!(inj.counts(), (3, 1));
    }

    #[tokio::test]
    async fn a_commit_becomes_a_rollback_and_a_conflict() {
        let conflicts = Conflicts::new(1, ConflictKind::Oc000);
        let (mut inj, mut server) = injector(&conflicts, b'I');
        inj.write_all(&query("begin")).await.unwrap();
        inj.flush().await.unwrap();
        read_n(&mut server, query("begin").len()).await;
        let answer = [complete("BEGIN"), ready(b'T')].concat();
        server.write_all(&answer).await.unwrap();
        assert_eq!(read_n(&mut inj, answer.len()).await, answer);

        // In a transaction block, statements are no commit points.
        let update = query("update t set n = n + 1");
        inj.write_all(&update).await.unwrap();
        inj.flush().await.unwrap();
        assert_eq!(read_n(&mut server, update.len()).await, update);
        let answer = [complete("UPDATE 1"), ready(b'T')].concat();
        server.write_all(&answer).await.unwrap();
        assert_eq!(read_n(&mut inj, answer.len()).await, answer);

        inj.write_all(&query("COMMIT;")).await.unwrap();
        inj.flush().await.unwrap();
        let rollback = query("ROLLBACK");
        assert_eq!(read_n(&mut server, rollback.len()).await, rollback);
        // A notice on the way passes; the CommandComplete does not.
        let notice = msg(b'N', b"SWARNING\0Mx\0\0");
        server
            .write_all(&[notice.clone(), complete("ROLLBACK"), ready(b'I')].concat())
            .await
            .unwrap();
        let expected = [notice, conflict(ConflictKind::Oc000), ready(b'I')].concat();
        assert_eq!(read_n(&mut inj, expected.len()).await, expected);
        assert_eq!(inj.counts(), (1, 1));
    }

    /// Sends `request`, checks the upstream got `upstream_sees`.
    async fn send(
        inj: &mut Injector<'_>,
        server: &mut DuplexStream,
        request: &[u8],
        upstream_sees: &[u8],
    ) {
        inj.write_all(request).await.unwrap();
        inj.flush().await.unwrap();
        assert_eq!(read_n(server, upstream_sees.len()).await, upstream_sees);
    }

    #[tokio::test]
    async fn a_commit_pipelined_behind_a_sync_still_counts() {
        let conflicts = Conflicts::new(1, ConflictKind::Oc000);
        let (mut inj, mut server) = injector(&conflicts, b'T');
        // tokio-postgres: Close + Sync of a dropped statement, then COMMIT
        // before the Sync's answer.
        let close = [msg(b'C', b"Ss0\0"), msg(b'S', b"")].concat();
        let rollback = query("ROLLBACK");
        send(
            &mut inj,
            &mut server,
            &[close.clone(), query("COMMIT")].concat(),
            &[close.clone(), rollback.clone()].concat(),
        )
        .await;
        let close_answer = [msg(b'3', b""), ready(b'T')].concat();
        server
            .write_all(&[close_answer.clone(), complete("ROLLBACK"), ready(b'I')].concat())
            .await
            .unwrap();
        let expected = [close_answer, conflict(ConflictKind::Oc000), ready(b'I')].concat();
        assert_eq!(read_n(&mut inj, expected.len()).await, expected);
        assert_eq!(inj.counts(), (1, 1));

        // Pipelined behind a request that ends the block: the client gets
        // what COMMIT outside a block gets, and it is no commit point.
        send(&mut inj, &mut server, &query("begin"), &query("begin")).await;
        server
            .write_all(&[complete("BEGIN"), ready(b'T')].concat())
            .await
            .unwrap();
        read_n(&mut inj, complete("BEGIN").len() + 6).await;
        send(
            &mut inj,
            &mut server,
            &[query("rollback"), query("commit")].concat(),
            &[query("rollback"), rollback].concat(),
        )
        .await;
        let warning = msg(
            b'N',
            b"SWARNING\0C25P01\0Mthere is no transaction in progress\0\0",
        );
        server
            .write_all(
                &[
                    complete("ROLLBACK"),
                    ready(b'I'),
                    warning.clone(),
                    complete("ROLLBACK"),
                    ready(b'I'),
                ]
                .concat(),
            )
            .await
            .unwrap();
        let expected = [
            complete("ROLLBACK"),
            ready(b'I'),
            warning,
            complete("COMMIT"),
            ready(b'I'),
        ]
        .concat();
        assert_eq!(read_n(&mut inj, expected.len()).await, expected);
        assert_eq!(inj.counts(), (1, 1));
        assert_eq!(inj.commit, Commit::None);
    }

    #[tokio::test]
    async fn a_pipelined_commit_outside_a_block_is_not_counted() {
        let conflicts = Conflicts::new(2, ConflictKind::Oc000);
        let (mut inj, mut server) = injector(&conflicts, b'T');
        let request = [query("rollback"), query("commit")].concat();
        send(&mut inj, &mut server, &request, &request).await;
        let warning = msg(
            b'N',
            b"SWARNING\0C25P01\0Mthere is no transaction in progress\0\0",
        );
        let answer = [
            complete("ROLLBACK"),
            ready(b'I'),
            warning,
            complete("COMMIT"),
            ready(b'I'),
        ]
        .concat();
        server.write_all(&answer).await.unwrap();
        assert_eq!(read_n(&mut inj, answer.len()).await, answer);
        assert_eq!(inj.counts(), (0, 0));
        // So the second autocommit statement is the second commit point.
        let update = query("update t set n = 1");
        round_trip(&mut inj, &mut server, &update).await;
        inj.write_all(&update).await.unwrap();
        inj.flush().await.unwrap();
        let expected = [conflict(ConflictKind::Oc000), ready(b'I')].concat();
        assert_eq!(read_n(&mut inj, expected.len()).await, expected);
        assert_eq!(inj.counts(), (2, 1));
    }

    #[tokio::test]
    async fn copy_from_stdin_stops_injection() {
        let conflicts = Conflicts::new(2, ConflictKind::Oc000);
        let (mut inj, mut server) = injector(&conflicts, b'I');
        let copy = query("copy t from stdin");
        send(&mut inj, &mut server, &copy, &copy).await;
        let copy_in = msg(b'G', b"\0\0\0");
        server.write_all(&copy_in).await.unwrap();
        assert_eq!(read_n(&mut inj, copy_in.len()).await, copy_in);
        let data = [msg(b'd', b"1\n"), msg(b'c', b""), msg(b'S', b"")].concat();
        send(&mut inj, &mut server, &data, &data).await;
        let answer = [complete("COPY 1"), ready(b'I')].concat();
        server.write_all(&answer).await.unwrap();
        assert_eq!(read_n(&mut inj, answer.len()).await, answer);
        // No more commit points.
        let update = query("update t set n = 1");
        for _ in 0..3 {
            send(&mut inj, &mut server, &update, &update).await;
        }
        assert_eq!(inj.counts(), (1, 0));
        assert!(inj.lost_track);
    }

    #[tokio::test]
    async fn pipelined_requests_are_no_commit_points() {
        let conflicts = Conflicts::new(1, ConflictKind::Oc000);
        let (mut inj, mut server) = injector(&conflicts, b'I');
        let select = query("select 1");
        // The first is answered with a conflict; the second arrives while
        // idle again and conflicts too; a third sent before the upstream
        // answered a forwarded request is not a commit point.
        let two = [select.clone(), select.clone()].concat();
        inj.write_all(&two).await.unwrap();
        inj.flush().await.unwrap();
        let expected = [conflict(ConflictKind::Oc000), ready(b'I')]
            .concat()
            .repeat(2);
        assert_eq!(read_n(&mut inj, expected.len()).await, expected);
        nothing(&mut server).await;

        let copy = query("begin");
        inj.write_all(&[copy.clone(), select.clone()].concat())
            .await
            .unwrap();
        inj.flush().await.unwrap();
        assert_eq!(
            read_n(&mut server, copy.len() + select.len()).await,
            [copy, select].concat()
        );
        assert_eq!(inj.counts(), (2, 2));
    }

    #[tokio::test]
    async fn an_answer_waits_for_the_upstream_message_in_progress() {
        let conflicts = Conflicts::new(1, ConflictKind::Oc000);
        let (mut inj, mut server) = injector(&conflicts, b'I');
        // Half of an asynchronous notice, read by the relay.
        let notice = msg(b'N', b"SNOTICE\0Mhello\0\0");
        let (first, second) = notice.split_at(8);
        server.write_all(first).await.unwrap();
        assert_eq!(read_n(&mut inj, first.len()).await, first);
        inj.write_all(&query("select 1")).await.unwrap();
        inj.flush().await.unwrap();
        server.write_all(second).await.unwrap();
        let expected = [second.to_vec(), conflict(ConflictKind::Oc000), ready(b'I')].concat();
        assert_eq!(read_n(&mut inj, expected.len()).await, expected);
    }
}
