//! The data path: bytes between client and backend, in one task, with one
//! fixed buffer per direction allocated at session start. No locks, no
//! per-message allocation, no awaits on anything but the two streams.
//!
//! With a [`SessionTracker`] (session continuity), the relay also feeds it
//! every byte it forwards, stops at idle points when the session asks (or
//! when the tracker wants a snapshot), and holds back an ErrorResponse the
//! backend sends while the session is idle (a FATAL of a dying server), so
//! the session can move instead of passing the error on.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use std::sync::Arc;

use dsql_proxy_protocol::relay::{requests_in_flight, BoundaryTracker};
use dsql_proxy_protocol::tracking::SessionTracker;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::busy_poll::BusyPoll;
use crate::retry::{BackoffEnd, Retry, ServerChunk};

/// A Terminate message, as the client sends it.
const TERMINATE: &[u8] = &[b'X', 0, 0, 0, 4];

/// Per-direction buffer. Query traffic is mostly small messages; bulk
/// transfers take two reads per 16 KiB TLS record, the second served from
/// rustls's memory. 8 KiB keeps 1,000 idle sessions well under 50 MB.
pub const RELAY_BUFFER: usize = 8 * 1024;

/// A direction's buffer until a read fills it: most sessions (a short
/// query, a connection per request) never move more at once, so they skip
/// allocating and zeroing the full buffer; the first full read grows it to
/// [`RELAY_BUFFER`].
pub const FIRST_RELAY_BUFFER: usize = 1024;

/// How the relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client closed its side (normally after Terminate) and the backend
    /// then closed too.
    ClientClosed,
    /// The backend closed the session (after a FATAL, or a server shutdown).
    BackendClosed,
    ClientError(io::Error),
    BackendError(io::Error),
    /// The client sent Terminate while the session was idle (with
    /// [`Relay::with_park_on_terminate`]): the backend did not get it and
    /// is idle, open and whole.
    ClientTerminated,
    /// Not an end: the relay stopped at an idle point (only with a
    /// session tracker, when asked to or when the tracker is dirty).
    /// Polling again resumes.
    IdlePoint,
    /// Not an end: while the session was idle the backend began an
    /// ErrorResponse, which is held back (see [`Relay::release_held`] and
    /// [`Relay::drop_held`]); everything before it was relayed.
    IdleError,
}

impl RelayEnd {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ClientClosed | Self::ClientTerminated => "client_closed",
            Self::BackendClosed => "backend_closed",
            Self::ClientError(_) => "client_error",
            Self::BackendError(_) => "backend_error",
            Self::IdlePoint => "idle_point",
            Self::IdleError => "idle_error",
        }
    }

    /// The backend connection is gone (closed or broken).
    pub fn backend_gone(&self) -> bool {
        matches!(self, Self::BackendClosed | Self::BackendError(_))
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

enum Fault {
    Read(io::Error),
    Write(io::Error),
    /// An ErrorResponse from the backend at an idle point is held.
    HeldError,
    /// Retry released held bytes: they go to the client before anything
    /// more is read from the backend.
    RetryOutput,
    /// The client's Terminate, kept from the backend (a pool may reuse it).
    ClientTerminated,
}

/// Which stream a half reads from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// What watches the bytes a half reads: the boundary tracker always, the
/// session tracker when the session can move.
struct Observers<'t> {
    boundary: &'t mut BoundaryTracker,
    session: Option<&'t mut SessionTracker>,
    side: Side,
    /// Hold back an ErrorResponse that starts while idle (not while the
    /// session settles before the proxy ends it).
    hold_idle_errors: bool,
    /// Transparent retry (only with a session tracker): sees each chunk a
    /// half reads, after the trackers.
    retry: Option<&'t mut Retry>,
    /// Client side, with a pool: a Terminate that arrives alone while the
    /// session is idle is kept from the backend (see
    /// [`RelayEnd::ClientTerminated`]).
    park_terminate: bool,
}

/// The session's state before a chunk was observed, for retry.
#[derive(Clone, Copy)]
struct Before {
    idle: bool,
    status: u8,
}

impl Observers<'_> {
    /// A Terminate alone, read while the session is idle, when a pool
    /// wants the backend: it is not forwarded.
    #[inline]
    fn keeps_terminate(&self, bytes: &[u8]) -> bool {
        self.park_terminate
            && bytes == TERMINATE
            && self.session.as_deref().is_some_and(|s| s.at_idle_point())
            && self.retry.as_deref().is_none_or(Retry::is_quiet)
    }

    #[inline]
    fn before_chunk(&self) -> Before {
        match (&self.retry, self.session.as_deref()) {
            (Some(_), Some(session)) => Before {
                idle: session.at_idle_point(),
                status: session.transaction_status(),
            },
            _ => Before {
                idle: false,
                status: b'I',
            },
        }
    }

    /// Hands a chunk just observed to retry: a server chunk may be held.
    #[inline]
    fn after_chunk(&mut self, before: Before, bytes: &[u8]) -> ServerChunk {
        let (Some(retry), Some(session)) = (self.retry.as_deref_mut(), self.session.as_deref())
        else {
            return ServerChunk::Forward;
        };
        match self.side {
            Side::Client => {
                retry.on_client_chunk(before.idle, before.status, bytes, session);
                ServerChunk::Forward
            }
            Side::Server => retry.on_server_chunk(bytes, session),
        }
    }

    fn retry_has_output(&self) -> bool {
        self.retry.as_deref().is_some_and(Retry::has_output)
    }

    #[inline]
    fn observe(&mut self, bytes: &[u8]) {
        self.boundary.observe(bytes);
        if let Some(session) = self.session.as_deref_mut() {
            match self.side {
                Side::Client => session.observe_client(bytes),
                Side::Server => session.observe_server(bytes),
            }
        }
    }

    /// Where, in a chunk just read from the backend, an ErrorResponse
    /// begins while the session is idle (the chunk then starts at a message
    /// boundary). Later messages of a chunk that ends inside one are not
    /// looked at: an idle backend sends one message at a time.
    fn idle_error_offset(&self, chunk: &[u8]) -> Option<usize> {
        let session = self.session.as_deref()?;
        if self.side != Side::Server
            || !self.hold_idle_errors
            || !session.at_idle_point()
            || self.retry.as_deref().is_some_and(|r| !r.is_quiet())
        {
            return None;
        }
        let mut at = 0;
        while at < chunk.len() {
            if chunk[at] == b'E' {
                return Some(at);
            }
            let header = chunk.get(at + 1..at + 5)?;
            let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            at = at.checked_add(1 + len)?;
        }
        None
    }
}

struct Half {
    buf: Box<[u8]>,
    /// The last read filled `buf`: the next read gets [`RELAY_BUFFER`].
    grow: bool,
    pos: usize,
    cap: usize,
    read_eof: bool,
    need_flush: bool,
    done: bool,
    total: u64,
    /// Bytes read but held back after `cap` (an idle ErrorResponse).
    held: usize,
    /// Shut the writer down when the reader ends: the backend's write side
    /// follows the client's EOF; the client's stream outlives a backend
    /// (the session decides what the client hears).
    shutdown_at_eof: bool,
}

impl Half {
    fn new(shutdown_at_eof: bool) -> Self {
        Self {
            buf: vec![0u8; FIRST_RELAY_BUFFER].into_boxed_slice(),
            grow: false,
            pos: 0,
            cap: 0,
            read_eof: false,
            need_flush: false,
            done: false,
            total: 0,
            held: 0,
            shutdown_at_eof,
        }
    }

    /// After a read that filled the buffer, while it holds nothing: the
    /// full-size buffer.
    fn grow_if_filled(&mut self) {
        if std::mem::take(&mut self.grow) && self.buf.len() < RELAY_BUFFER {
            self.buf = vec![0u8; RELAY_BUFFER].into_boxed_slice();
        }
    }

    /// Nothing read is waiting to be written.
    fn is_empty(&self) -> bool {
        self.pos == self.cap && self.held == 0
    }

    /// Moves bytes from `reader` to `writer` until both would block, the
    /// reader reaches EOF (then shuts the writer down), or an error.
    ///
    /// With a `gate` (the client's side while the session settles before
    /// the proxy ends it), only the current message and COPY traffic pass:
    /// reads stop at message boundaries, and a message that would start a
    /// new request is not forwarded; the gate then closes (`true`) and
    /// nothing more is read.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        mut observers: Observers<'_>,
        mut gate: Option<&mut bool>,
    ) -> Poll<Result<(), Fault>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            let tracker = &*observers.boundary;
            let closed = gate
                .as_deref()
                .is_some_and(|closed| *closed || tracker.is_broken());
            if self.pos == self.cap && self.held > 0 {
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx)).map_err(Fault::Write)?;
                    self.need_flush = false;
                }
                return Poll::Ready(Err(Fault::HeldError));
            }
            if self.pos == self.cap && !self.read_eof && !closed {
                self.pos = 0;
                self.cap = 0;
                self.grow_if_filled();
                let limit = match gate {
                    None => self.buf.len(),
                    // One byte at a boundary: the next message's type.
                    Some(_) if tracker.at_boundary() => 1,
                    Some(_) => tracker.bytes_to_boundary().min(self.buf.len()),
                };
                let mut rb = ReadBuf::new(&mut self.buf[..limit]);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.grow = n == self.buf.len();
                        if n == 0 {
                            self.read_eof = true;
                        } else if observers.keeps_terminate(&self.buf[..n]) {
                            self.pos = 0;
                            self.cap = 0;
                            return Poll::Ready(Err(Fault::ClientTerminated));
                        } else if gate.is_some()
                            && tracker.at_boundary()
                            && !continues_a_request(self.buf[0])
                        {
                            // A new request: never forwarded (the session
                            // is ending; the client hears so next).
                            if let Some(closed) = gate.as_deref_mut() {
                                *closed = true;
                            }
                        } else {
                            let forward = observers.idle_error_offset(&self.buf[..n]).unwrap_or(n);
                            let before = observers.before_chunk();
                            observers.observe(&self.buf[..forward]);
                            self.cap = forward;
                            self.held = n - forward;
                            self.total += forward as u64;
                            if observers.after_chunk(before, &self.buf[..forward])
                                == ServerChunk::Held
                            {
                                // Retry keeps the bytes; nothing to write.
                                self.cap = 0;
                                if observers.retry_has_output() {
                                    return Poll::Ready(Err(Fault::RetryOutput));
                                }
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::Read(e))),
                    Poll::Pending => {
                        // Nothing more to read now: push out what was written
                        // (TLS may hold a partial record) before sleeping.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx)).map_err(Fault::Write)?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            } else if self.pos == self.cap && closed {
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx)).map_err(Fault::Write)?;
                    self.need_flush = false;
                }
                // Woken again only by the other direction.
                return Poll::Pending;
            }
            while self.pos < self.cap {
                let n = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.pos..self.cap]))
                .map_err(Fault::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(Fault::Write(io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.need_flush = true;
            }
            if self.pos == self.cap && self.read_eof && self.held == 0 {
                ready!(writer.as_mut().poll_flush(cx)).map_err(Fault::Write)?;
                if self.shutdown_at_eof {
                    ready!(writer.as_mut().poll_shutdown(cx)).map_err(Fault::Write)?;
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// While a session settles: the message types that belong to a request
/// already in flight (a COPY's data, its end or failure) or end the
/// session (Terminate). Anything else would start a new request.
fn continues_a_request(tag: u8) -> bool {
    matches!(tag, b'd' | b'c' | b'f' | b'X')
}

impl Half {
    /// Writes the bytes read but not yet written, then flushes.
    async fn write_out<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        writer: &mut W,
    ) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            let mut writer = Pin::new(&mut *writer);
            while self.pos < self.cap {
                let n = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
            }
            writer.as_mut().poll_flush(cx)
        })
        .await
    }

    /// Writes what was read, then copies the rest of the current message
    /// (and nothing after it) from `reader` to `writer`.
    async fn finish_message<R, W>(
        &mut self,
        mut observers: Observers<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> io::Result<()>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        self.write_out(writer).await?;
        while !observers.boundary.at_boundary() && !observers.boundary.is_broken() {
            self.grow_if_filled();
            let want = observers.boundary.bytes_to_boundary().min(self.buf.len());
            let n = reader.read(&mut self.buf[..want]).await?;
            self.grow = n == self.buf.len();
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            observers.observe(&self.buf[..n]);
            self.total += n as u64;
            self.pos = 0;
            self.cap = n;
            self.write_out(writer).await?;
        }
        Ok(())
    }
}

/// Relays until one side ends the session. Trackers watch message headers
/// in both directions: downstream, so the caller knows whether the client
/// stream stopped at a message boundary; upstream, to tell a client's
/// Terminate from a backend hanging up.
pub struct Relay<'a, C: ?Sized, B: ?Sized> {
    client: &'a mut C,
    backend: &'a mut B,
    up: Half,
    down: Half,
    pub downstream: BoundaryTracker,
    pub upstream: BoundaryTracker,
    busy_poll: Option<Arc<BusyPoll>>,
    /// Settling (see [`Relay::settle`]): the client's side is gated.
    settling: bool,
    /// The gate closed: a new request from the client was held back.
    gate_closed: bool,
    /// Session continuity: the message-level view of the session.
    session: Option<SessionTracker>,
    /// Stop at the next idle point (see [`RelayEnd::IdlePoint`]).
    pause_at_idle: bool,
    /// Session continuity: stop at idle points when the tracker is dirty
    /// (for a snapshot) and hold back errors of an idle backend. Off when
    /// the tracker only serves retry.
    continuity: bool,
    /// Transparent retry (`[retry]`), with a session tracker only.
    retry: Option<Retry>,
    /// How the relay ended, reported once retry's held bytes reached the
    /// client.
    deferred_end: Option<RelayEnd>,
    /// A pool takes the backend when the client leaves while idle.
    park_on_terminate: bool,
}

impl<'a, C, B> Relay<'a, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    pub fn new(client: &'a mut C, backend: &'a mut B) -> Self {
        Self {
            client,
            backend,
            up: Half::new(true),
            down: Half::new(false),
            downstream: BoundaryTracker::backend(),
            upstream: BoundaryTracker::frontend(),
            busy_poll: None,
            settling: false,
            gate_closed: false,
            session: None,
            pause_at_idle: false,
            continuity: true,
            retry: None,
            deferred_end: None,
            park_on_terminate: false,
        }
    }

    /// With a session tracker: a client's Terminate at an idle point ends
    /// the relay with [`RelayEnd::ClientTerminated`] and never reaches the
    /// backend, which stays open for a pool.
    pub fn with_park_on_terminate(mut self, park: bool) -> Self {
        self.park_on_terminate = park && self.session.is_some();
        self
    }

    /// Retries conflicts of autocommit requests (needs a session tracker:
    /// ignored without one).
    pub fn with_retry(mut self, retry: Option<Retry>) -> Self {
        if self.session.is_some() {
            self.retry = retry;
        }
        self
    }

    /// Whether the tracker serves session continuity (on by default): a
    /// dirty tracker stops the relay at idle points, and an idle backend's
    /// error is held back.
    pub fn with_continuity(mut self, continuity: bool) -> Self {
        self.continuity = continuity;
        self
    }

    fn retry_quiet(&self) -> bool {
        self.retry.as_ref().is_none_or(Retry::is_quiet)
    }

    /// Gives retry up (the session is ending) and writes what it held to
    /// the client.
    async fn release_retry(&mut self) -> io::Result<()> {
        let Some(retry) = self.retry.as_mut() else {
            return Ok(());
        };
        retry.give_up();
        let client = &mut *self.client;
        std::future::poll_fn(|cx| retry.poll_output(cx, Pin::new(&mut *client))).await
    }

    /// Feeds `tracker` every byte relayed, and stops at idle points when
    /// it is dirty (to take a snapshot) or when [`Relay::pause_at_idle`]
    /// asks.
    pub fn with_session_tracker(mut self, tracker: SessionTracker) -> Self {
        self.session = Some(tracker);
        self
    }

    pub fn session(&self) -> Option<&SessionTracker> {
        self.session.as_ref()
    }

    pub fn session_mut(&mut self) -> Option<&mut SessionTracker> {
        self.session.as_mut()
    }

    /// Whether polling stops at the next idle point even when the tracker
    /// is clean (a move is due).
    pub fn pause_at_idle(&mut self, pause: bool) {
        self.pause_at_idle = pause;
    }

    /// An idle point: the tracker says both streams rest between
    /// transactions with nothing in flight, and the relay holds no bytes.
    pub fn at_idle_point(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.at_idle_point())
            && self.up.is_empty()
            && self.down.is_empty()
            && !self.up.read_eof
            && self.downstream.at_boundary()
            && self.upstream.at_boundary()
            && self.retry_quiet()
    }

    fn wants_pause(&self) -> bool {
        !self.settling
            && self
                .session
                .as_ref()
                .is_some_and(|s| self.pause_at_idle || (self.continuity && s.is_dirty()))
            && self.at_idle_point()
    }

    /// After [`RelayEnd::IdleError`]: relays the held error after all (the
    /// session stays on this backend and ends the way it always did).
    pub fn release_held(&mut self) {
        let (start, end) = (self.down.cap, self.down.cap + self.down.held);
        let mut observers = Observers {
            boundary: &mut self.downstream,
            session: self.session.as_mut(),
            side: Side::Server,
            hold_idle_errors: false,
            retry: None,
            park_terminate: false,
        };
        observers.observe(&self.down.buf[start..end]);
        self.down.cap = end;
        self.down.total += self.down.held as u64;
        self.down.held = 0;
    }

    /// After [`RelayEnd::IdleError`]: the bytes held back (the error's
    /// start, or all of it, and whatever followed in the same read).
    pub fn held_bytes(&self) -> &[u8] {
        &self.down.buf[self.down.cap..self.down.cap + self.down.held]
    }

    /// After [`RelayEnd::IdleError`]: forgets the held error (the session
    /// leaves this backend; the client never sees it).
    pub fn drop_held(&mut self) {
        self.down.held = 0;
    }

    /// Reads the client's next bytes into the relay without forwarding
    /// them, at an idle point whose backend must be left first (a lazy
    /// move): they go to whichever backend is in place when relaying
    /// resumes. `Ok(false)` when the client closed instead.
    pub async fn read_client_ahead(&mut self) -> io::Result<bool> {
        if !self.up.is_empty() {
            // Bytes read but not yet written: they are the next message.
            return Ok(true);
        }
        self.up.grow_if_filled();
        let n = self.client.read(&mut self.up.buf[..]).await?;
        self.up.grow = n == self.up.buf.len();
        if n == 0 {
            self.up.read_eof = true;
            return Ok(false);
        }
        let mut observers = Observers {
            boundary: &mut self.upstream,
            session: self.session.as_mut(),
            side: Side::Client,
            hold_idle_errors: false,
            retry: self.retry.as_mut(),
            park_terminate: false,
        };
        let before = observers.before_chunk();
        observers.observe(&self.up.buf[..n]);
        observers.after_chunk(before, &self.up.buf[..n]);
        self.up.pos = 0;
        self.up.cap = n;
        self.up.total += n as u64;
        Ok(true)
    }

    /// Forgets the bytes [`Relay::read_client_ahead`] read (the session
    /// ends before they could go anywhere).
    pub fn discard_client_ahead(&mut self) {
        self.up.pos = self.up.cap;
    }

    /// The bytes [`Relay::read_client_ahead`] read, not yet forwarded.
    pub fn client_bytes_ahead(&self) -> &[u8] {
        &self.up.buf[self.up.pos..self.up.cap]
    }

    /// Reports each poll to the busy poller, when there is one.
    pub fn with_busy_poll(mut self, busy_poll: Option<Arc<BusyPoll>>) -> Self {
        self.busy_poll = busy_poll;
        self
    }

    /// Writes what was already read from the backend to the client, so a
    /// message the proxy injects next lands after it. Used when the session
    /// is being ended by the proxy; reads nothing more from either side.
    pub async fn flush_downstream(&mut self) -> io::Result<()> {
        self.release_retry().await?;
        self.down.write_out(&mut *self.client).await
    }

    /// Flushes what was written to the client (TLS may hold the end of an
    /// answer), so it is not left waiting while the proxy waits for it.
    pub async fn flush_client(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.client.flush().await?;
        self.down.need_flush = false;
        Ok(())
    }

    /// Writes `bytes` to the client (at an idle point, messages the proxy
    /// owes it), feeding them to the trackers like relayed backend bytes.
    pub async fn send_to_client(&mut self, bytes: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut observers = Observers {
            boundary: &mut self.downstream,
            session: self.session.as_mut(),
            side: Side::Server,
            hold_idle_errors: false,
            retry: None,
            park_terminate: false,
        };
        observers.observe(bytes);
        self.down.total += bytes.len() as u64;
        self.client.write_all(bytes).await?;
        self.client.flush().await
    }

    /// Flushes what was read, then relays the backend's current message to
    /// its end (and nothing after it), so a message the proxy injects next
    /// does not cut one in half. Reads nothing from the client. Callers
    /// bound it in time: a backend may stall mid-message.
    pub async fn finish_downstream_message(&mut self) -> io::Result<()> {
        self.release_retry().await?;
        let observers = Observers {
            boundary: &mut self.downstream,
            session: self.session.as_mut(),
            side: Side::Server,
            hold_idle_errors: false,
            retry: None,
            park_terminate: false,
        };
        self.down
            .finish_message(observers, &mut *self.backend, &mut *self.client)
            .await
    }

    /// The same towards the backend: writes what was read from the client,
    /// then relays the client's current message to its end (a long Bind or
    /// CopyData the backend has only part of), so a Terminate the proxy
    /// sends next does not land inside it. Reads nothing from the backend.
    pub async fn finish_upstream_message(&mut self) -> io::Result<()> {
        let observers = Observers {
            boundary: &mut self.upstream,
            session: self.session.as_mut(),
            side: Side::Client,
            hold_idle_errors: false,
            retry: None,
            park_terminate: false,
        };
        self.up
            .finish_message(observers, &mut *self.client, &mut *self.backend)
            .await
    }

    /// True when everything read from the client was also written to the
    /// backend and that ended at a message boundary: only then can the
    /// proxy add a message of its own (Terminate) without cutting one. (The
    /// tracker sees bytes when they are read; the buffer says whether they
    /// were written.)
    pub fn upstream_settled(&self) -> bool {
        self.upstream.at_boundary()
            && self.up.pos == self.up.cap
            && !self.retry.as_ref().is_some_and(Retry::is_resending)
    }

    /// The same towards the client: every byte read from the backend was
    /// written, ending between two messages.
    pub fn downstream_settled(&self) -> bool {
        self.downstream.at_boundary() && self.down.pos == self.down.cap && self.retry_quiet()
    }

    /// Requests the client sent (Query, Sync, FunctionCall) that the
    /// backend has not answered with ReadyForQuery yet.
    pub fn requests_in_flight(&self) -> u64 {
        requests_in_flight(&self.upstream, &self.downstream)
    }

    /// Relays until no request is in flight and both directions are
    /// settled: the client then has every answer the server gave, and the
    /// server has only whole messages. From the client only the message it
    /// is in the middle of and COPY traffic pass; a new request is held
    /// back (and never sent), so the wait ends. `Err` when the session
    /// ended on its own meanwhile. Used before the proxy ends a session, so
    /// a COMMIT already forwarded is answered rather than reported as
    /// terminated. Callers bound it in time: a server may be slow.
    pub async fn settle(&mut self) -> Result<(), RelayEnd> {
        if self.is_settled() {
            return Ok(());
        }
        // From here the client may finish the message it is in the middle
        // of and feed a COPY in flight, but not start a new request; and
        // nothing is retried (what retry holds goes out).
        self.settling = true;
        if let Some(retry) = self.retry.as_mut() {
            retry.give_up();
        }
        // An error held back while idle is the backend's last word: relayed.
        if self.down.held > 0 {
            self.release_held();
        }
        std::future::poll_fn(|cx| {
            if self.is_settled() {
                return Poll::Ready(Ok(()));
            }
            match self.poll_relay(cx) {
                Poll::Ready(end) => Poll::Ready(Err(end)),
                // Everything that could move has moved.
                Poll::Pending if self.is_settled() => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    fn is_settled(&self) -> bool {
        self.requests_in_flight() == 0 && self.upstream_settled() && self.downstream_settled()
    }

    pub fn client(&mut self) -> &mut C {
        self.client
    }

    pub fn backend(&mut self) -> &mut B {
        self.backend
    }

    pub fn stats(&self) -> RelayStats {
        RelayStats {
            client_to_backend: self.up.total,
            backend_to_client: self.down.total,
        }
    }
}

impl<C, B> Relay<'_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin,
{
    /// Puts `backend` in place of the current backend at an idle point
    /// (or after the backend was lost there) and returns the old one.
    /// Both streams are between messages, so the trackers carry on.
    pub fn replace_backend(&mut self, backend: B) -> B {
        let down = &mut self.down;
        down.pos = 0;
        down.cap = 0;
        down.held = 0;
        down.read_eof = false;
        down.need_flush = false;
        down.done = false;
        std::mem::replace(self.backend, backend)
    }
}

impl<C, B> Future for Relay<'_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        self.get_mut().poll_relay(cx)
    }
}

impl<C, B> Relay<'_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = self;
        if let Some(busy) = &this.busy_poll {
            busy.note_activity();
        }
        if this.wants_pause() {
            return Poll::Ready(RelayEnd::IdlePoint);
        }
        // Backend to client first: results are what the client waits for.
        // What retry released goes out before anything more is read.
        loop {
            if let Some(retry) = this.retry.as_mut().filter(|r| r.has_output()) {
                match retry.poll_output(cx, Pin::new(&mut *this.client)) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::ClientError(e)),
                    Poll::Pending => break,
                }
            }
            if let Some(end) = this.deferred_end.take() {
                return Poll::Ready(end);
            }
            if this.down.done {
                break;
            }
            let observers = Observers {
                boundary: &mut this.downstream,
                session: this.session.as_mut(),
                side: Side::Server,
                hold_idle_errors: !this.settling && this.continuity,
                retry: this.retry.as_mut(),
                park_terminate: false,
            };
            let end = match this.down.poll_copy(
                cx,
                Pin::new(&mut *this.backend),
                Pin::new(&mut *this.client),
                observers,
                None,
            ) {
                // The server closing ends the session, whatever the client
                // still has in flight: PostgreSQL never half-closes. After a
                // Terminate, or the client's own EOF, that is the normal end
                // of a client's session.
                Poll::Ready(Ok(())) if this.up.done || this.upstream.last_tag() == b'X' => {
                    RelayEnd::ClientClosed
                }
                Poll::Ready(Ok(())) => RelayEnd::BackendClosed,
                Poll::Ready(Err(Fault::Read(e))) => RelayEnd::BackendError(e),
                Poll::Ready(Err(Fault::Write(e))) => return Poll::Ready(RelayEnd::ClientError(e)),
                Poll::Ready(Err(Fault::HeldError)) => return Poll::Ready(RelayEnd::IdleError),
                Poll::Ready(Err(Fault::RetryOutput)) => continue,
                // Never produced for the server's side.
                Poll::Ready(Err(Fault::ClientTerminated)) => {
                    return Poll::Ready(RelayEnd::ClientTerminated)
                }
                // Only an answer (a ReadyForQuery) makes an idle point:
                // stop before reading the client's next request.
                Poll::Pending if this.wants_pause() => return Poll::Ready(RelayEnd::IdlePoint),
                Poll::Pending => break,
            };
            match this.retry.as_mut() {
                // The backend is gone: what retry held is the client's
                // last word from it.
                Some(retry) if !retry.is_quiet() => {
                    retry.give_up();
                    this.deferred_end = Some(end);
                }
                _ => return Poll::Ready(end),
            }
        }
        if let Some(retry) = this.retry.as_mut() {
            if let Poll::Ready(BackoffEnd::Resend) = retry.poll_backoff(cx) {
                // The trackers see the resend like bytes from the client.
                let mut observers = Observers {
                    boundary: &mut this.upstream,
                    session: this.session.as_mut(),
                    side: Side::Client,
                    hold_idle_errors: false,
                    retry: None,
                    park_terminate: false,
                };
                observers.observe(retry.resend_bytes());
            }
            if retry.is_resending() {
                match retry.poll_resend(cx, Pin::new(&mut *this.backend)) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(RelayEnd::BackendError(e)),
                    Poll::Pending => {}
                }
            }
        }
        // Client to backend, unless a resend is being written.
        let resending = this.retry.as_ref().is_some_and(Retry::is_resending);
        if !this.up.done && !resending {
            let gate = this.settling.then_some(&mut this.gate_closed);
            let observers = Observers {
                boundary: &mut this.upstream,
                session: this.session.as_mut(),
                side: Side::Client,
                hold_idle_errors: false,
                retry: this.retry.as_mut(),
                park_terminate: this.park_on_terminate && !this.settling,
            };
            match this.up.poll_copy(
                cx,
                Pin::new(&mut *this.client),
                Pin::new(&mut *this.backend),
                observers,
                gate,
            ) {
                // Client EOF: the backend's write side is shut; keep relaying
                // the backend's last words until it closes too.
                Poll::Ready(Ok(())) => {
                    if this.down.done && this.retry_quiet() {
                        return Poll::Ready(RelayEnd::ClientClosed);
                    }
                    // Poll `down` again so its waker is registered.
                    cx.waker().wake_by_ref();
                }
                Poll::Ready(Err(Fault::Read(e))) => return Poll::Ready(RelayEnd::ClientError(e)),
                Poll::Ready(Err(Fault::Write(e))) => return Poll::Ready(RelayEnd::BackendError(e)),
                Poll::Ready(Err(Fault::ClientTerminated)) => {
                    return Poll::Ready(RelayEnd::ClientTerminated)
                }
                // Never produced for the client's side.
                Poll::Ready(Err(Fault::HeldError | Fault::RetryOutput)) => {
                    return Poll::Ready(RelayEnd::IdleError)
                }
                Poll::Pending => {}
            }
        }
        if let Some(retry) = this.retry.as_mut() {
            if this.up.read_eof && !retry.is_quiet() {
                // The client left: nothing is sent again for it.
                retry.give_up();
                cx.waker().wake_by_ref();
            }
            if retry.take_kick() {
                cx.waker().wake_by_ref();
            }
        }
        if this.up.done && this.down.done && this.retry_quiet() {
            return Poll::Ready(RelayEnd::ClientClosed);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_and_ends_when_backend_closes() {
        let (mut client_app, mut client_proxy) = duplex(64);
        let (mut backend_proxy, mut backend_server) = duplex(64);
        let relay = tokio::spawn(async move {
            let mut relay = Relay::new(&mut client_proxy, &mut backend_proxy);
            let end = (&mut relay).await;
            (end.reason(), relay.stats())
        });
        let big = vec![7u8; 100_000];
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                client_app.write_all(&big).await.unwrap();
                let mut back = vec![0u8; 5];
                client_app.read_exact(&mut back).await.unwrap();
                assert_eq!(&back, b"Z\0\0\0\x05");
                let mut rest = Vec::new();
                client_app.read_to_end(&mut rest).await.unwrap();
                assert_eq!(rest, b"I");
            })
        };
        let mut got = vec![0u8; big.len()];
        backend_server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
        backend_server.write_all(b"Z\0\0\0\x05I").await.unwrap();
        drop(backend_server);
        let (reason, stats) = relay.await.unwrap();
        writer.await.unwrap();
        assert_eq!(reason, "backend_closed");
        assert_eq!(stats.client_to_backend, 100_000);
        assert_eq!(stats.backend_to_client, 6);
    }

    #[tokio::test]
    async fn finish_downstream_message_stops_at_the_boundary() {
        let (mut client_app, mut client_proxy) = duplex(1024);
        let (mut backend_proxy, mut backend_server) = duplex(1024);
        // A DataRow's header and the first 2 of its 6 body bytes.
        backend_server
            .write_all(&[b'D', 0, 0, 0, 10, 1, 2])
            .await
            .unwrap();
        let mut relay = Relay::new(&mut client_proxy, &mut backend_proxy);
        let pending = tokio::time::timeout(std::time::Duration::from_millis(100), &mut relay).await;
        assert!(pending.is_err(), "the relay is still running");
        assert!(!relay.downstream.at_boundary());
        // The rest of the row, then a whole ReadyForQuery that must stay
        // with the backend.
        backend_server
            .write_all(&[3, 4, 5, 6, b'Z', 0, 0, 0, 5, b'I'])
            .await
            .unwrap();
        relay.finish_downstream_message().await.unwrap();
        assert!(relay.downstream.at_boundary());
        assert_eq!(relay.stats().backend_to_client, 11);
        drop(relay);
        drop(client_proxy);
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [b'D', 0, 0, 0, 10, 1, 2, 3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn settle_relays_the_answer_to_a_request_in_flight_and_no_further() {
        let (mut client_app, mut client_proxy) = duplex(1024);
        let (mut backend_proxy, mut backend_server) = duplex(1024);
        let mut relay = Relay::new(&mut client_proxy, &mut backend_proxy);
        // Idle: nothing to wait for.
        relay.settle().await.unwrap();
        client_app.write_all(b"Q\0\0\0\x0bCOMMIT\0").await.unwrap();
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), &mut relay).await;
        assert!(pending.is_err());
        assert_eq!(relay.requests_in_flight(), 1);
        let mut got = [0u8; 12];
        backend_server.read_exact(&mut got).await.unwrap();
        // The answer and its ReadyForQuery.
        backend_server
            .write_all(b"C\0\0\0\x0bCOMMIT\0Z\0\0\0\x05I")
            .await
            .unwrap();
        relay.settle().await.unwrap();
        assert_eq!(relay.requests_in_flight(), 0);
        assert!(relay.downstream_settled() && relay.upstream_settled());
        drop(relay);
        drop(client_proxy);
        let mut answer = Vec::new();
        client_app.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"C\0\0\0\x0bCOMMIT\0Z\0\0\0\x05I");
    }

    #[tokio::test]
    async fn settling_holds_back_new_requests_but_feeds_a_copy_in_flight() {
        let (mut client_app, mut client_proxy) = duplex(1 << 16);
        let (mut backend_proxy, mut backend_server) = duplex(1 << 16);
        let mut relay = Relay::new(&mut client_proxy, &mut backend_proxy);
        // A COPY in flight: the Query went through.
        client_app.write_all(b"Q\0\0\0\x09COPY\0").await.unwrap();
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), &mut relay).await;
        assert!(pending.is_err());
        assert_eq!(relay.requests_in_flight(), 1);
        // While settling the client sends its data, the end of the COPY,
        // and then a new Query, which must never reach the server.
        client_app
            .write_all(b"d\0\0\0\x06a\nc\0\0\0\x04Q\0\0\0\x0dDROP ALL\0")
            .await
            .unwrap();
        backend_server
            .write_all(b"C\0\0\0\x0bCOPY 1\0Z\0\0\0\x05I")
            .await
            .unwrap();
        relay.settle().await.unwrap();
        assert!(relay.upstream_settled());
        drop(relay);
        drop(backend_proxy);
        let mut got = Vec::new();
        backend_server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"Q\0\0\0\x09COPY\0d\0\0\0\x06a\nc\0\0\0\x04");
    }

    #[tokio::test]
    async fn finish_upstream_message_completes_the_clients_message_only() {
        let (mut client_app, mut client_proxy) = duplex(1024);
        let (mut backend_proxy, mut backend_server) = duplex(1024);
        // A Bind's header and 3 of its 8 body bytes.
        client_app
            .write_all(&[b'B', 0, 0, 0, 12, 1, 2, 3])
            .await
            .unwrap();
        let mut relay = Relay::new(&mut client_proxy, &mut backend_proxy);
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), &mut relay).await;
        assert!(pending.is_err());
        assert!(!relay.upstream.at_boundary() && !relay.upstream_settled());
        // The rest of it, then a whole Sync that must stay with the client.
        client_app
            .write_all(&[4, 5, 6, 7, 8, b'S', 0, 0, 0, 4])
            .await
            .unwrap();
        relay.finish_upstream_message().await.unwrap();
        assert!(relay.upstream_settled());
        assert_eq!(relay.requests_in_flight(), 0, "the Sync was not read");
        drop(relay);
        drop(backend_proxy);
        let mut got = Vec::new();
        backend_server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [b'B', 0, 0, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[tokio::test]
    async fn client_eof_half_closes_the_backend() {
        let (client_app, mut client_proxy) = duplex(64);
        let (mut backend_proxy, mut backend_server) = duplex(64);
        let relay = tokio::spawn(async move {
            Relay::new(&mut client_proxy, &mut backend_proxy)
                .await
                .reason()
        });
        drop(client_app);
        let mut rest = Vec::new();
        backend_server.read_to_end(&mut rest).await.unwrap();
        drop(backend_server);
        let reason = relay.await.unwrap();
        assert!(
            reason == "client_closed" || reason == "client_error",
            "{reason}"
        );
    }
}
