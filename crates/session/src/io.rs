//! Small framed reads and writes for the startup phase (never the relay);
//! public so the DSQL emulator reads packets the same way. Typed messages
//! are read and written with the connector's helpers, re-exported here.

use dsql_proxy_protocol::{startup, InitialPacket, ProtocolError};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use dsql_proxy_connector::io::{read_body, read_message, send};

use crate::drain::CloseSignal;

/// Reads an untyped packet (startup, SSLRequest, cancel, ...); `first` is
/// a byte already consumed by the caller.
pub async fn read_initial<S: AsyncRead + Unpin>(
    stream: &mut S,
    first: Option<u8>,
) -> std::io::Result<Result<InitialPacket, ProtocolError>> {
    let mut len = [0u8; 4];
    match first {
        Some(b) => {
            len[0] = b;
            stream.read_exact(&mut len[1..]).await?;
        }
        None => {
            stream.read_exact(&mut len).await?;
        }
    }
    let body_len = match startup::packet_body_len(len) {
        Ok(n) => n,
        Err(e) => return Ok(Err(e)),
    };
    let body = read_body(stream, body_len).await?;
    Ok(startup::parse_initial_packet(&body))
}

/// The time a client has left to finish startup, and the proxy's close
/// signal: a shutdown ends a handshake as surely as a timeout, and the
/// client is told why in both cases.
#[derive(Clone)]
pub struct Deadline {
    pub at: tokio::time::Instant,
    pub limit: std::time::Duration,
    close: Option<CloseSignal>,
}

impl Deadline {
    pub fn after(limit: std::time::Duration) -> Self {
        Self {
            at: tokio::time::Instant::now() + limit,
            limit,
            close: None,
        }
    }

    /// Also fails with [`crate::SessionError::Shutdown`] once `close` fires.
    pub fn or_closed(mut self, close: CloseSignal) -> Self {
        self.close = Some(close);
        self
    }

    /// Runs client I/O, failing with StartupTimeout when time runs out (or
    /// Shutdown when the proxy closes every session), so the caller still
    /// owns the stream and can tell the client why.
    pub async fn run<T>(
        &self,
        fut: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, crate::SessionError> {
        let closed = async {
            match &self.close {
                Some(close) => {
                    let mut close = close.clone();
                    close.closed().await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            r = tokio::time::timeout_at(self.at, fut) => match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(crate::SessionError::ClientIo(e)),
                Err(_) => Err(crate::SessionError::StartupTimeout(self.limit)),
            },
            () = closed => Err(crate::SessionError::Shutdown),
        }
    }
}
