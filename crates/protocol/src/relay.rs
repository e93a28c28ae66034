//! Message-boundary tracking for the relay. The relay copies bytes without
//! decoding them; this tracker only reads the 5-byte headers as they pass so
//! the session knows (a) whether the stream is between messages, where the
//! proxy may inject its own message, such as a FATAL on shutdown, and (b) the
//! transaction status of the last ReadyForQuery. It never allocates.

use crate::frame::HEADER_LEN;

#[derive(Debug, Clone)]
pub struct BoundaryTracker {
    header: [u8; HEADER_LEN],
    header_filled: usize,
    body_remaining: usize,
    /// Set while the body of a ReadyForQuery is still to come.
    in_ready_for_query: bool,
    last_status: u8,
    last_tag: u8,
    broken: bool,
}

impl Default for BoundaryTracker {
    fn default() -> Self {
        Self {
            header: [0; HEADER_LEN],
            header_filled: 0,
            body_remaining: 0,
            in_ready_for_query: false,
            last_status: b'I',
            last_tag: 0,
            broken: false,
        }
    }
}

impl BoundaryTracker {
    /// Feeds bytes that are being forwarded, in order.
    pub fn observe(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() && !self.broken {
            if self.body_remaining > 0 {
                let n = self.body_remaining.min(chunk.len());
                if self.in_ready_for_query {
                    self.last_status = chunk[0];
                    self.in_ready_for_query = false;
                }
                self.body_remaining -= n;
                chunk = &chunk[n..];
                continue;
            }
            let need = HEADER_LEN - self.header_filled;
            let n = need.min(chunk.len());
            self.header[self.header_filled..self.header_filled + n].copy_from_slice(&chunk[..n]);
            self.header_filled += n;
            chunk = &chunk[n..];
            if self.header_filled == HEADER_LEN {
                self.header_filled = 0;
                let len = i32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                match usize::try_from(len) {
                    Ok(len) if len >= 4 => {
                        self.body_remaining = len - 4;
                        self.last_tag = self.header[0];
                        self.in_ready_for_query = self.header[0] == b'Z' && len == 5;
                    }
                    // The peer's framing is broken; the peer will notice too.
                    // Stop tracking rather than guess.
                    _ => self.broken = true,
                }
            }
        }
    }

    /// True when every forwarded message is complete.
    pub fn at_boundary(&self) -> bool {
        !self.broken && self.header_filled == 0 && self.body_remaining == 0
    }

    /// How many more bytes surely belong to the current message: the rest
    /// of its header, else the rest of its body; 0 at a boundary or when
    /// broken. Reading no more than this and observing it, repeatedly,
    /// stops exactly at the next boundary.
    pub fn bytes_to_boundary(&self) -> usize {
        if self.broken {
            0
        } else if self.header_filled > 0 {
            HEADER_LEN - self.header_filled
        } else {
            self.body_remaining
        }
    }

    /// Transaction status from the last ReadyForQuery: `I`, `T` or `E`.
    pub fn transaction_status(&self) -> u8 {
        self.last_status
    }

    /// Type byte of the last message whose header has passed (0 if none).
    pub fn last_tag(&self) -> u8 {
        self.last_tag
    }

    /// True when the stream could not be framed.
    pub fn is_broken(&self) -> bool {
        self.broken
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
