//! The client's byte streams. Enums rather than trait objects so the
//! relay's reads and writes are static calls (the backend's is
//! `dsql_proxy_connector::BackendStream`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A client's transport before TLS.
pub enum Transport {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Bytes already read off a transport, replayed before reading more. Used
/// when the first byte shows a direct TLS ClientHello.
pub struct Rewind<S> {
    prefix: Option<Box<[u8]>>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        let prefix = (!prefix.is_empty()).then(|| prefix.into_boxed_slice());
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

/// A client connection, plain or with TLS terminated by the proxy.
pub enum ClientStream {
    Plain(Transport),
    Tls(Box<tokio_rustls::server::TlsStream<Rewind<Transport>>>),
}

impl ClientStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

dsql_proxy_connector::delegate_async_io!(Transport, Transport::Tcp, Transport::Unix);
dsql_proxy_connector::delegate_async_io!(ClientStream, ClientStream::Plain, ClientStream::Tls);

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(prefix) = &this.prefix {
            let n = (prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == prefix.len() {
                this.prefix = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
