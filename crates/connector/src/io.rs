//! Framed reads and writes for the startup phase (never the relay). Public
//! because the session's client handshake, the probes and the DSQL emulator
//! read and write packets the same way.

use dsql_proxy_protocol::frame::{body_len, RawMessage, HEADER_LEN};
use dsql_proxy_protocol::ProtocolError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one typed message whose body may be at most `max_body` bytes.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_body: usize,
) -> Result<Result<RawMessage, ProtocolError>, std::io::Error> {
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).await?;
    let tag = header[0];
    let len = match body_len(tag, [header[1], header[2], header[3], header[4]]) {
        Ok(len) => len,
        Err(e) => return Ok(Err(e)),
    };
    if len > max_body {
        return Ok(Err(ProtocolError::MessageTooLarge {
            tag,
            len,
            limit: max_body,
        }));
    }
    let body = read_body(stream, len).await?;
    Ok(Ok(RawMessage {
        tag,
        body: body.into(),
    }))
}

/// Reads exactly `len` bytes, growing the buffer only as bytes arrive: a
/// length word is a claim, and a client that claims 65,535 bytes and sends
/// nothing must not cost 64 KiB while it waits.
pub async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let read = (&mut *stream)
        .take(len as u64)
        .read_to_end(&mut body)
        .await?;
    if read < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(body)
}

/// Writes and flushes (flushing matters for TLS streams).
pub async fn send<S: AsyncWrite + Unpin + ?Sized>(
    stream: &mut S,
    buf: &[u8],
) -> std::io::Result<()> {
    stream.write_all(buf).await?;
    stream.flush().await
}
