//! Message-boundary tracking for the relay. The relay copies bytes without
//! decoding them; this tracker only reads the 5-byte headers as they pass so
//! the session knows (a) whether the stream is between messages, where the
//! proxy may inject its own message, such as a FATAL on shutdown, and (b) the
//! transaction status of the last ReadyForQuery. It never allocates.

use crate::tracking::framing::{FrameSink, Framer};

#[derive(Debug, Clone, Default)]
pub struct BoundaryTracker {
    framer: Framer,
    status: StatusSink,
}

/// Keeps the status byte of ReadyForQuery messages; wants no other body.
#[derive(Debug, Clone)]
struct StatusSink {
    last_status: u8,
}

impl Default for StatusSink {
    fn default() -> Self {
        Self { last_status: b'I' }
    }
}

impl FrameSink for StatusSink {
    fn start(&mut self, tag: u8, body_len: usize) -> bool {
        tag == b'Z' && body_len == 1
    }
    fn body(&mut self, piece: &[u8]) {
        self.last_status = piece[0];
    }
    fn end(&mut self, _tag: u8) {}
}

impl BoundaryTracker {
    /// Feeds bytes that are being forwarded, in order.
    pub fn observe(&mut self, chunk: &[u8]) {
        self.framer.feed(chunk, &mut self.status);
    }

    /// True when every forwarded message is complete.
    pub fn at_boundary(&self) -> bool {
        self.framer.at_boundary()
    }

    /// How many more bytes surely belong to the current message: the rest
    /// of its header, else the rest of its body; 0 at a boundary or when
    /// broken. Reading no more than this and observing it, repeatedly,
    /// stops exactly at the next boundary.
    pub fn bytes_to_boundary(&self) -> usize {
        self.framer.bytes_to_boundary()
    }

    /// Transaction status from the last ReadyForQuery: `I`, `T` or `E`.
    pub fn transaction_status(&self) -> u8 {
        self.status.last_status
    }

    /// Type byte of the last message whose header has passed (0 if none).
    pub fn last_tag(&self) -> u8 {
        self.framer.last_tag()
    }

    /// True when the stream could not be framed.
    pub fn is_broken(&self) -> bool {
        self.framer.is_broken()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_boundaries_across_arbitrary_splits() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&[b'C', 0, 0, 0, 8, b'a', b'b', b'c', 0]);
        stream.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'T']);
        for split in 0..stream.len() {
            let mut t = BoundaryTracker::default();
            t.observe(&stream[..split]);
            assert_eq!(t.at_boundary(), split == 0 || split == 9, "split {split}");
            t.observe(&stream[split..]);
            assert!(t.at_boundary());
            assert_eq!(t.transaction_status(), b'T');
            assert_eq!(t.last_tag(), b'Z');
        }
    }

    #[test]
    fn bytes_to_boundary_walks_to_the_next_boundary() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&[b'D', 0, 0, 0, 10, 1, 2, 3, 4, 5, 6]);
        stream.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        for split in 1..11 {
            let mut t = BoundaryTracker::default();
            t.observe(&stream[..split]);
            let mut at = split;
            while !t.at_boundary() {
                let n = t.bytes_to_boundary().min(2);
                assert!(n > 0);
                t.observe(&stream[at..at + n]);
                at += n;
            }
            assert_eq!(at, 11, "split {split}");
        }
        let mut t = BoundaryTracker::default();
        assert_eq!(t.bytes_to_boundary(), 0);
        t.observe(&[b'D', 0, 0, 0, 1]);
        assert!(t.is_broken());
        assert_eq!(t.bytes_to_boundary(), 0);
    }

    #[test]
    fn stops_on_broken_framing() {
        let mut t = BoundaryTracker::default();
        t.observe(&[b'D', 0, 0, 0, 1, 9, 9]);
        assert!(t.is_broken());
        assert!(!t.at_boundary());
    }
}
