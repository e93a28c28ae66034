//! A minimal HTTP/1.1 client for a running proxy's admin server, for the
//! `status`, `healthcheck` and `drill` commands (container images have no
//! curl).
//! Blocking std sockets with timeouts: one request, `Connection: close`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Largest answer read; `/status` for dozens of endpoints is a few KiB.
const MAX_RESPONSE: u64 = 4 * 1024 * 1024;

pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// `GET path` on `addr`; connect, send and every read within `timeout`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Reply> {
    request(addr, "GET", path, timeout, None)
}

/// `POST path` with an empty body, with `Authorization: Bearer <token>`
/// when a token is given (a mutating route on a non-loopback admin
/// server needs it).
pub fn post(addr: SocketAddr, path: &str, timeout: Duration, token: Option<&str>) -> Result<Reply> {
    request(addr, "POST", path, timeout, token)
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
    token: Option<&str>,
) -> Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot reach the admin server at {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: dsql-proxy-cli\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("cannot send a request to the admin server at {addr}"))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut raw)
        .with_context(|| format!("no complete answer from the admin server at {addr}"))?;
    parse_response(&raw).with_context(|| format!("bad answer from {addr}{path}"))
}

/// Status line, headers (only `Transfer-Encoding` matters), body.
fn parse_response(raw: &[u8]) -> Result<Reply> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("not an HTTP response (no end of headers)");
    };
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("not an HTTP response: {status_line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 response: {status_line:?}");
    }
    let status: u16 = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = &raw[split + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            bail!("truncated chunked body");
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ndrai\r\n4;x=y\r\nning\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "draining"));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }

    #[test]
    fn a_dead_address_is_a_clear_error() {
        // A port just released by a listener: nothing is accepting there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = get(addr, "/healthz", Duration::from_secs(2))
            .err()
            .expect("nothing listens");
        let text = format!("{err:#}");
        assert!(text.contains("cannot reach the admin server"), "{text}");
        assert!(text.contains(&addr.to_string()), "{text}");
    }
}
