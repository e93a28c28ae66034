//! The backend connection's byte stream: an enum rather than a trait
//! object so the relay's reads and writes are static calls.

use tokio::net::TcpStream;

/// A backend connection, plain or with TLS.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BackendStream {
    /// The TCP socket underneath (for socket options and addresses).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }
}

/// Implements `AsyncRead` and `AsyncWrite` for an enum of streams by
/// delegating every call to the variant's stream. Exported so the session
/// crate's client-side enums delegate the same way.
#[macro_export]
macro_rules! delegate_async_io {
    ($ty:ty, $($variant:path),+) => {
        impl ::tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &mut ::tokio::io::ReadBuf<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                match self.get_mut() { $($variant(s) => ::tokio::io::AsyncRead::poll_read(::std::pin::Pin::new(s), cx, buf),)+ }
            }
        }
        impl ::tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                match self.get_mut() { $($variant(s) => ::tokio::io::AsyncWrite::poll_write(::std::pin::Pin::new(s), cx, buf),)+ }
            }
            fn poll_write_vectored(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                bufs: &[::std::io::IoSlice<'_>],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                match self.get_mut() { $($variant(s) => ::tokio::io::AsyncWrite::poll_write_vectored(::std::pin::Pin::new(s), cx, bufs),)+ }
            }
            fn is_write_vectored(&self) -> bool {
                match self { $($variant(s) => ::tokio::io::AsyncWrite::is_write_vectored(s),)+ }
            }
            fn poll_flush(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                match self.get_mut() { $($variant(s) => ::tokio::io::AsyncWrite::poll_flush(::std::pin::Pin::new(s), cx),)+ }
            }
            fn poll_shutdown(
                self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                match self.get_mut() { $($variant(s) => ::tokio::io::AsyncWrite::poll_shutdown(::std::pin::Pin::new(s), cx),)+ }
            }
        }
    };
}

delegate_async_io!(BackendStream, BackendStream::Plain, BackendStream::Tls);
