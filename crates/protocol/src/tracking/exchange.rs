//! Reading the answer to a hidden exchange one message at a time, with a
//! bound on what is kept: bodies the decoders need are buffered up to a
//! limit, others are skipped, and reading stops exactly at the end of the
//! exchange so the bytes after it stay with the caller.

use bytes::BufMut;

use super::framing::{FrameSink, Framer};
use crate::frame::HEADER_LEN;
use crate::ProtocolError;

#[derive(Debug, Clone)]
struct Collector {
    max_body: usize,
    tag: u8,
    len: usize,
    kept: bool,
    body: Vec<u8>,
    complete: bool,
}

/// Messages whose bodies the exchanges read: rows, errors, status, and the
/// asynchronous messages they hand on to the client.
fn wanted(tag: u8) -> bool {
    matches!(tag, b'D' | b'E' | b'Z' | b'S' | b'N' | b'A')
}

impl FrameSink for Collector {
    fn start(&mut self, tag: u8, body_len: usize) -> bool {
        self.tag = tag;
        self.len = body_len;
        self.body.clear();
        self.complete = false;
        self.kept = wanted(tag) && body_len <= self.max_body;
        self.kept
    }
    fn body(&mut self, piece: &[u8]) {
        self.body.extend_from_slice(piece);
    }
    fn end(&mut self, _tag: u8) {
        self.complete = true;
    }
}

/// A complete message of the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) tag: u8,
    pub(crate) len: usize,
    /// The body is available from [`ExchangeReader::body`]. False for
    /// messages nobody reads, and for wanted ones over the size limit.
    pub(crate) kept: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct ExchangeReader {
    framer: Framer,
    collector: Collector,
}

impl ExchangeReader {
    /// Bodies over `max_body` bytes are not kept.
    pub(crate) fn new(max_body: usize) -> Self {
        Self {
            framer: Framer::default(),
            collector: Collector {
                max_body,
                tag: 0,
                len: 0,
                kept: false,
                body: Vec::new(),
                complete: false,
            },
        }
    }

    /// Reads from `input` up to the end of the next message. Returns it
    /// when complete (its body then is [`ExchangeReader::body`]), or `None`
    /// when `input` ran out first.
    pub(crate) fn next(&mut self, input: &mut &[u8]) -> Result<Option<Header>, ProtocolError> {
        loop {
            if self.collector.complete {
                self.collector.complete = false;
                return Ok(Some(Header {
                    tag: self.collector.tag,
                    len: self.collector.len,
                    kept: self.collector.kept,
                }));
            }
            if input.is_empty() {
                return Ok(None);
            }
            // Never read past the current message: the bytes after the
            // exchange belong to the relay.
            let step = if self.framer.at_boundary() {
                HEADER_LEN
            } else {
                self.framer.bytes_to_boundary()
            };
            let n = step.min(input.len());
            self.framer.feed(&input[..n], &mut self.collector);
            *input = &input[n..];
            if self.framer.is_broken() {
                return Err(ProtocolError::Malformed {
                    what: "backend message",
                    why: "invalid message length in a hidden exchange",
                });
            }
        }
    }

    /// Body of the message [`ExchangeReader::next`] returned (empty unless
    /// it was kept).
    pub(crate) fn body(&self) -> &[u8] {
        &self.collector.body
    }

    /// Appends the message just read, whole, to `out` (for messages handed
    /// on to the client; only kept ones can be).
    pub(crate) fn copy_message(&self, out: &mut Vec<u8>) {
        out.put_u8(self.collector.tag);
        // The length came from the message's own i32 field.
        out.put_i32((self.collector.len + 4) as i32);
        out.extend_from_slice(&self.collector.body);
    }
}

/// Reads a DataRow body's columns (`None` for NULL) into `columns`, as
/// ranges into `body`. False when the body is malformed.
pub(crate) fn data_row_columns(
    body: &[u8],
    columns: &mut Vec<Option<std::ops::Range<usize>>>,
) -> bool {
    columns.clear();
    let Some(count) = body.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])) else {
        return false;
    };
    let mut at = 2;
    for _ in 0..count {
        let Some(len) = body.get(at..at + 4) else {
            return false;
        };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        at += 4;
        if len < 0 {
            columns.push(None);
            continue;
        }
        let end = at + len as usize;
        if end > body.len() {
            return false;
        }
        columns.push(Some(at..end));
        at = end;
    }
    at == body.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_each_message_and_skips_unwanted_bodies() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&[b'T', 0, 0, 0, 6, 0, 0]);
        stream.extend_from_slice(&[b'D', 0, 0, 0, 11, 0, 1, 0, 0, 0, 1, b'x']);
        stream.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        stream.extend_from_slice(b"after");
        for split in 0..stream.len() {
            let mut reader = ExchangeReader::new(100);
            let mut seen = Vec::new();
            let mut rest: &[u8] = &stream[..split];
            let mut second: &[u8] = &stream[split..];
            loop {
                let input = if rest.is_empty() {
                    &mut second
                } else {
                    &mut rest
                };
                match reader.next(input).unwrap() {
                    Some(h) => {
                        seen.push((h.tag, reader.body().to_vec()));
                        if h.tag == b'Z' {
                            break;
                        }
                    }
                    None if second.is_empty() => panic!("ran out"),
                    None => {}
                }
            }
            assert_eq!(
                seen,
                vec![
                    (b'T', vec![]),
                    (b'D', vec![0, 1, 0, 0, 0, 1, b'x']),
                    (b'Z', vec![b'I'])
                ]
            );
            let left: Vec<u8> = [rest, second].concat();
            assert_eq!(left, b"after", "split {split}");
        }
        let mut columns = Vec::new();
        assert!(data_row_columns(
            &[0, 2, 0, 0, 0, 1, b'x', 0xff, 0xff, 0xff, 0xff],
            &mut columns
        ));
        assert_eq!(columns, vec![Some(6..7), None]);
        assert!(!data_row_columns(&[0, 1, 0, 0, 0, 9, b'x'], &mut columns));
        assert!(!data_row_columns(&[0], &mut columns));
    }

    #[test]
    fn oversized_bodies_are_not_kept_and_bad_lengths_fail() {
        let mut reader = ExchangeReader::new(2);
        let mut input: &[u8] = &[b'D', 0, 0, 0, 7, 1, 2, 3];
        let h = reader.next(&mut input).unwrap().unwrap();
        assert!(!h.kept);
        assert_eq!(h.len, 3);
        assert!(reader.body().is_empty());
        let mut input: &[u8] = &[b'D', 0, 0, 0, 1];
        assert!(reader.next(&mut input).is_err());
    }
}
