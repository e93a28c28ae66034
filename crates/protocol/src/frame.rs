//! Framing of typed messages: one tag byte, a 4-byte big-endian length that
//! counts itself, then the body.

use bytes::{Buf, Bytes, BytesMut};

use crate::ProtocolError;

/// Size of a typed message header (tag + length).
pub const HEADER_LEN: usize = 5;

/// One complete typed message, body only (without tag and length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub tag: u8,
    pub body: Bytes,
}

/// Decodes a header, returning the body length.
pub fn body_len(tag: u8, len_field: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = i32::from_be_bytes(len_field);
    if len < 4 {
        return Err(ProtocolError::InvalidMessageLength {
            tag,
            len: len.into(),
        });
    }
    // Non-negative and at least 4, so the conversion cannot fail on any
    // platform with usize >= 32 bits.
    Ok(len as usize - 4)
}

/// Takes one complete message off the front of `buf`, or returns `None` when
/// more bytes are needed. `max_body` bounds what a peer can make us buffer.
pub fn split_message(
    buf: &mut BytesMut,
    max_body: usize,
) -> Result<Option<RawMessage>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let body = body_len(tag, [buf[1], buf[2], buf[3], buf[4]])?;
    if body > max_body {
        return Err(ProtocolError::MessageTooLarge {
            tag,
            len: body,
            limit: max_body,
        });
    }
    if buf.len() < HEADER_LEN + body {
        buf.reserve(HEADER_LEN + body - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let body = buf.split_to(body).freeze();
    Ok(Some(RawMessage { tag, body }))
}

/// Reads NUL-terminated bytes from the front of `buf`.
pub fn take_cbytes<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], ProtocolError> {
    let nul = buf
        .iter()
        .position(|b| *b == 0)
        .ok_or(ProtocolError::Malformed {
            what,
            why: "string is not NUL-terminated",
        })?;
    let s = &buf[..nul];
    *buf = &buf[nul + 1..];
    Ok(s)
}

/// Reads a NUL-terminated UTF-8 string from the front of `buf`.
pub fn take_cstr<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a str, ProtocolError> {
    let mut probe = *buf;
    let bytes = take_cbytes(&mut probe, what)?;
    let s = std::str::from_utf8(bytes).map_err(|_| ProtocolError::InvalidUtf8(what))?;
    *buf = probe;
    Ok(s)
}

/// Reads a big-endian i32 from the front of `buf`.
pub fn take_i32(buf: &mut &[u8], what: &'static str) -> Result<i32, ProtocolError> {
    if buf.len() < 4 {
        return Err(ProtocolError::Malformed {
            what,
            why: "truncated integer",
        });
    }
    let v = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    *buf = &buf[4..];
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn splits_complete_messages_and_waits_for_partial_ones() {
        let mut buf = BytesMut::new();
        buf.put_u8(b'Z');
        buf.put_i32(5);
        buf.put_u8(b'I');
        buf.put_u8(b'S');
        buf.put_i32(10);
        buf.put_slice(b"ab");
        let first = split_message(&mut buf, 100).unwrap().unwrap();
        assert_eq!(first.tag, b'Z');
        assert_eq!(&first.body[..], b"I");
        assert_eq!(split_message(&mut buf, 100).unwrap(), None);
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        let mut buf = BytesMut::from(&[b'R', 0, 0, 0, 3][..]);
        assert!(split_message(&mut buf, 100).is_err());
        let mut buf = BytesMut::from(&[b'R', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            split_message(&mut buf, 100),
            Err(ProtocolError::MessageTooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[b'R', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(split_message(&mut buf, 100).is_err());
    }

    #[test]
    fn cstr_needs_terminator_and_utf8() {
        let mut s: &[u8] = b"abc\0rest";
        assert_eq!(take_cstr(&mut s, "t").unwrap(), "abc");
        assert_eq!(s, b"rest");
        let mut s: &[u8] = b"abc";
        assert!(take_cstr(&mut s, "t").is_err());
        let mut s: &[u8] = b"\xff\0";
        assert!(take_cstr(&mut s, "t").is_err());
    }
}
