//! The simple query protocol as the proxy's own probes use it: encode a
//! Query, decode the DataRows and the end of the exchange. Values are kept
//! as text (the simple protocol's format).

use bytes::{BufMut, BytesMut};

use crate::backend::{decode_fields, ErrorFields};
use crate::frame::{take_i32, RawMessage};
use crate::ProtocolError;

/// Appends a Query ('Q') message.
pub fn encode_query(buf: &mut BytesMut, sql: &str) {
    buf.put_u8(b'Q');
    // Length covers itself, the text and its terminator.
    buf.put_i32((4 + sql.len() + 1) as i32);
    buf.put_slice(sql.as_bytes());
    buf.put_u8(0);
}

/// One message of a simple-query response, as far as a probe cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryMessage {
    /// A row: each column's text, `None` for NULL.
    Row(Vec<Option<String>>),
    /// The statement failed; the exchange still ends with ReadyForQuery.
    Error(ErrorFields),
    /// ReadyForQuery with its transaction status.
    Ready(u8),
    /// RowDescription, CommandComplete, notices and the like.
    Other,
}

pub fn decode_query_message(msg: &RawMessage) -> Result<QueryMessage, ProtocolError> {
    let mut body: &[u8] = &msg.body;
    Ok(match msg.tag {
        b'D' => {
            let count = u16::from_be_bytes(match body {
                [a, b, ..] => [*a, *b],
                _ => {
                    return Err(ProtocolError::Malformed {
                        what: "DataRow",
                        why: "missing column count",
                    })
                }
            });
            body = &body[2..];
            let mut row = Vec::with_capacity(usize::from(count).min(64));
            for _ in 0..count {
                let len = take_i32(&mut body, "DataRow")?;
                if len < 0 {
                    row.push(None);
                    continue;
                }
                let len = len as usize;
                if body.len() < len {
                    return Err(ProtocolError::Malformed {
                        what: "DataRow",
                        why: "column longer than the message",
                    });
                }
                let (value, rest) = body.split_at(len);
                row.push(Some(String::from_utf8_lossy(value).into_owned()));
                body = rest;
            }
            QueryMessage::Row(row)
        }
        b'E' => QueryMessage::Error(decode_fields(body, "ErrorResponse")?),
        b'Z' => match body {
            [status] => QueryMessage::Ready(*status),
            _ => {
                return Err(ProtocolError::Malformed {
                    what: "ReadyForQuery",
                    why: "body must be one byte",
                })
            }
        },
        _ => QueryMessage::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn query_round_trip_pieces() {
        let mut buf = BytesMut::new();
        encode_query(&mut buf, "SELECT 1");
        assert_eq!(&buf[..], b"Q\0\0\0\x0dSELECT 1\0");

        let row = RawMessage {
            tag: b'D',
            body: Bytes::from_static(b"\0\x02\0\0\0\x01t\xff\xff\xff\xff"),
        };
        assert_eq!(
            decode_query_message(&row).unwrap(),
            QueryMessage::Row(vec![Some("t".into()), None])
        );
        let ready = RawMessage {
            tag: b'Z',
            body: Bytes::from_static(b"I"),
        };
        assert_eq!(
            decode_query_message(&ready).unwrap(),
            QueryMessage::Ready(b'I')
        );
    }

    #[test]
    fn malformed_rows_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"\0",
            b"\0\x01",
            b"\0\x01\0\0\0\x09ab",
            b"\0\x01\x7f\xff\xff\xff",
        ] {
            let msg = RawMessage {
                tag: b'D',
                body: Bytes::copy_from_slice(body),
            };
            assert!(decode_query_message(&msg).is_err(), "{body:?}");
        }
    }
}
