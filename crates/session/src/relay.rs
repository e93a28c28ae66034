//! The data path: bytes between client and backend, in one task, with one
//! fixed buffer per direction allocated at session start. No locks, no
//! per-message allocation, no awaits on anything but the two streams.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use std::sync::Arc;

use dsql_proxy_protocol::relay::BoundaryTracker;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::busy_poll::BusyPoll;

/// Per-direction buffer. Query traffic is mostly small messages; bulk
/// transfers take two reads per 16 KiB TLS record, the second served from
/// rustls's memory. 8 KiB keeps 1,000 idle sessions well under 50 MB.
pub const RELAY_BUFFER: usize = 8 * 1024;

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
}

impl RelayEnd {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::BackendClosed => "backend_closed",
            Self::ClientError(_) => "client_error",
            Self::BackendError(_) => "backend_error",
        }
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
}

struct Half {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    read_eof: bool,
    need_flush: bool,
    done: bool,
    total: u64,
}

impl Half {
    fn new() -> Self {
        Self {
            buf: vec![0u8; RELAY_BUFFER].into_boxed_slice(),
            pos: 0,
            cap: 0,
            read_eof: false,
            need_flush: false,
            done: false,
            total: 0,
        }
    }

    /// Moves bytes from `reader` to `writer` until both would block, the
    /// reader reaches EOF (then shuts the writer down), or an error.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        mut tracker: Option<&mut BoundaryTracker>,
    ) -> Poll<Result<(), Fault>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_eof {
                self.pos = 0;
                self.cap = 0;
                let mut rb = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_eof = true;
                        } else {
                            if let Some(t) = tracker.as_deref_mut() {
                                t.observe(&self.buf[..n]);
                            }
                            self.cap = n;
                            self.total += n as u64;
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
            if self.pos == self.cap && self.read_eof {
                ready!(writer.as_mut().poll_flush(cx)).map_err(Fault::Write)?;
                ready!(writer.as_mut().poll_shutdown(cx)).map_err(Fault::Write)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
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
            up: Half::new(),
            down: Half::new(),
            downstream: BoundaryTracker::default(),
            upstream: BoundaryTracker::default(),
            busy_poll: None,
        }
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
        std::future::poll_fn(|cx| {
            let down = &mut self.down;
            let mut client = Pin::new(&mut *self.client);
            while down.pos < down.cap {
                let n = ready!(client
                    .as_mut()
                    .poll_write(cx, &down.buf[down.pos..down.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                down.pos += n;
            }
            client.as_mut().poll_flush(cx)
        })
        .await
    }

    /// Flushes what was read, then relays the backend's current message to
    /// its end (and nothing after it), so a message the proxy injects next
    /// does not cut one in half. Reads nothing from the client. Callers
    /// bound it in time: a backend may stall mid-message.
    pub async fn finish_downstream_message(&mut self) -> io::Result<()> {
        self.flush_downstream().await?;
        while !self.downstream.at_boundary() && !self.downstream.is_broken() {
            let want = self.downstream.bytes_to_boundary().min(RELAY_BUFFER);
            let n = self.backend.read(&mut self.down.buf[..want]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.downstream.observe(&self.down.buf[..n]);
            self.down.total += n as u64;
            self.down.pos = 0;
            self.down.cap = n;
            self.flush_downstream().await?;
        }
        Ok(())
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

impl<C, B> Future for Relay<'_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = self.get_mut();
        if let Some(busy) = &this.busy_poll {
            busy.note_activity();
        }
        // Backend to client first: results are what the client waits for.
        if !this.down.done {
            match this.down.poll_copy(
                cx,
                Pin::new(&mut *this.backend),
                Pin::new(&mut *this.client),
                Some(&mut this.downstream),
            ) {
                // The server closing ends the session, whatever the client
                // still has in flight: PostgreSQL never half-closes. After a
                // Terminate, or the client's own EOF, that is the normal end
                // of a client's session.
                Poll::Ready(Ok(())) if this.up.done || this.upstream.last_tag() == b'X' => {
                    return Poll::Ready(RelayEnd::ClientClosed)
                }
                Poll::Ready(Ok(())) => return Poll::Ready(RelayEnd::BackendClosed),
                Poll::Ready(Err(Fault::Read(e))) => return Poll::Ready(RelayEnd::BackendError(e)),
                Poll::Ready(Err(Fault::Write(e))) => return Poll::Ready(RelayEnd::ClientError(e)),
                Poll::Pending => {}
            }
        }
        if !this.up.done {
            match this.up.poll_copy(
                cx,
                Pin::new(&mut *this.client),
                Pin::new(&mut *this.backend),
                Some(&mut this.upstream),
            ) {
                // Client EOF: the backend's write side is shut; keep relaying
                // the backend's last words until it closes too.
                Poll::Ready(Ok(())) => {
                    if this.down.done {
                        return Poll::Ready(RelayEnd::ClientClosed);
                    }
                    // Poll `down` again so its waker is registered.
                    cx.waker().wake_by_ref();
                }
                Poll::Ready(Err(Fault::Read(e))) => return Poll::Ready(RelayEnd::ClientError(e)),
                Poll::Ready(Err(Fault::Write(e))) => return Poll::Ready(RelayEnd::BackendError(e)),
                Poll::Pending => {}
            }
        }
        if this.up.done && this.down.done {
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
