//! Incremental framing of typed messages as they pass, in arbitrary splits.
//!
//! [`Framer`] reads the 5-byte headers and counts bodies down; a
//! [`FrameSink`] decides per message whether it wants the body (handed over
//! in the pieces it arrived in) or only the header. Bodies nobody wants are
//! skipped without being looked at, so a DataRow-heavy stream costs one
//! header decode per message.

use crate::frame::HEADER_LEN;

/// Receives the messages a [`Framer`] finds, in order.
pub trait FrameSink {
    /// A message header has passed. Returns true to receive its body.
    fn start(&mut self, tag: u8, body_len: usize) -> bool;
    /// The next piece of a wanted body (never empty).
    fn body(&mut self, piece: &[u8]);
    /// The message is complete (called for every message, wanted or not).
    fn end(&mut self, tag: u8);
}

/// Framing state of one direction.
#[derive(Debug, Clone, Default)]
pub struct Framer {
    header: [u8; HEADER_LEN],
    header_filled: usize,
    tag: u8,
    in_body: bool,
    body_remaining: usize,
    want_body: bool,
    broken: bool,
    messages: u64,
    last_tag: u8,
}

impl Framer {
    /// Feeds the next bytes of the stream. After a header with an invalid
    /// length the stream cannot be framed any more: [`Framer::is_broken`]
    /// turns true and everything after is ignored.
    #[inline]
    pub fn feed<S: FrameSink>(&mut self, mut chunk: &[u8], sink: &mut S) {
        while !chunk.is_empty() && !self.broken {
            if self.in_body {
                let n = self.body_remaining.min(chunk.len());
                if self.want_body {
                    sink.body(&chunk[..n]);
                }
                self.body_remaining -= n;
                chunk = &chunk[n..];
                if self.body_remaining == 0 {
                    self.in_body = false;
                    sink.end(self.tag);
                }
                continue;
            }
            let len_field = if self.header_filled == 0 && chunk.len() >= HEADER_LEN {
                // The whole header is in this chunk: no copy.
                self.tag = chunk[0];
                let field = [chunk[1], chunk[2], chunk[3], chunk[4]];
                chunk = &chunk[HEADER_LEN..];
                field
            } else {
                let n = (HEADER_LEN - self.header_filled).min(chunk.len());
                self.header[self.header_filled..self.header_filled + n]
                    .copy_from_slice(&chunk[..n]);
                self.header_filled += n;
                chunk = &chunk[n..];
                if self.header_filled < HEADER_LEN {
                    return;
                }
                self.header_filled = 0;
                self.tag = self.header[0];
                [
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]
            };
            let len = i32::from_be_bytes(len_field);
            if len < 4 {
                // The peer's framing is broken; the peer will notice too.
                // Stop rather than guess.
                self.broken = true;
                return;
            }
            // Non-negative and at least 4: the conversion cannot fail.
            let body_len = len as usize - 4;
            self.messages += 1;
            self.last_tag = self.tag;
            self.want_body = sink.start(self.tag, body_len);
            if body_len == 0 {
                sink.end(self.tag);
            } else {
                self.in_body = true;
                self.body_remaining = body_len;
            }
        }
    }

    /// True when every byte fed so far belongs to a complete message.
    pub fn at_boundary(&self) -> bool {
        !self.broken && self.header_filled == 0 && !self.in_body
    }

    /// How many more bytes surely belong to the current message: the rest
    /// of its header, else the rest of its body; 0 at a boundary or when
    /// broken. Reading no more than this and feeding it, repeatedly, stops
    /// exactly at the next boundary.
    pub fn bytes_to_boundary(&self) -> usize {
        if self.broken {
            0
        } else if self.header_filled > 0 {
            HEADER_LEN - self.header_filled
        } else if self.in_body {
            self.body_remaining
        } else {
            0
        }
    }

    /// True once a header with an impossible length was seen.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Messages whose header has passed.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Type byte of the last message whose header has passed (0 if none).
    pub fn last_tag(&self) -> u8 {
        self.last_tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        events: Vec<(u8, Vec<u8>)>,
        current: Vec<u8>,
    }

    impl FrameSink for Recorder {
        fn start(&mut self, tag: u8, _body_len: usize) -> bool {
            self.current.clear();
            tag != b'D'
        }
        fn body(&mut self, piece: &[u8]) {
            assert!(!piece.is_empty());
            self.current.extend_from_slice(piece);
        }
        fn end(&mut self, tag: u8) {
            self.events.push((tag, std::mem::take(&mut self.current)));
        }
    }

    #[test]
    fn frames_wanted_bodies_and_skips_the_rest_in_any_split() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&[b'D', 0, 0, 0, 7, 1, 2, 3]);
        stream.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        stream.extend_from_slice(&[b'C', 0, 0, 0, 8, b'a', b'b', b'c', 0]);
        for split in 0..=stream.len() {
            let mut framer = Framer::default();
            let mut rec = Recorder::default();
            framer.feed(&stream[..split], &mut rec);
            framer.feed(&stream[split..], &mut rec);
            assert!(framer.at_boundary());
            assert_eq!(framer.messages(), 3);
            assert_eq!(
                rec.events,
                vec![(b'D', vec![]), (b'S', vec![]), (b'C', b"abc\0".to_vec())],
                "split {split}"
            );
        }
    }

    #[test]
    fn broken_length_stops_framing() {
        let mut framer = Framer::default();
        let mut rec = Recorder::default();
        framer.feed(&[b'Q', 0, 0, 0, 3, b'Z', 0, 0, 0, 5, b'I'], &mut rec);
        assert!(framer.is_broken());
        assert!(!framer.at_boundary());
        assert_eq!(framer.bytes_to_boundary(), 0);
        assert!(rec.events.is_empty());
        let mut framer = Framer::default();
        framer.feed(&[b'Q', 0xff, 0xff, 0xff, 0xff], &mut rec);
        assert!(framer.is_broken());
    }
}
