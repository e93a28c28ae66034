//! Message-boundary tracking for the relay. The relay copies bytes without
//! decoding them; this tracker only reads the 5-byte headers as they pass so
//! the session knows (a) whether the stream is between messages, where the
//! proxy may inject its own message, such as a FATAL on shutdown, and (b) the
//! transaction status of the last ReadyForQuery, and (c) how many requests
//! are in flight: each frontend Query, Sync or FunctionCall earns exactly
//! one ReadyForQuery, so the frontend tracker counts those and the backend
//! tracker counts ReadyForQuery. It never allocates.

use crate::tracking::framing::{FrameSink, Framer};

/// Which protocol direction a tracker watches: it decides which messages
/// count as request boundaries (the same tag byte means different messages
/// in the two directions, e.g. `S` is Sync from a client and
/// ParameterStatus from a server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// Client to server: Query (`Q`), Sync (`S`) and FunctionCall (`F`) each
    /// ask for one ReadyForQuery.
    Frontend,
    /// Server to client: ReadyForQuery (`Z`) answers one of them.
    #[default]
    Backend,
}

impl Direction {
    fn counts(self, tag: u8) -> bool {
        match self {
            Self::Frontend => matches!(tag, b'Q' | b'S' | b'F'),
            Self::Backend => tag == b'Z',
        }
    }
}

/// PostgreSQL's `PQ_SMALL_MESSAGE_LIMIT`: the longest length word a server
/// accepts for Sync, Flush, Execute, Describe, Close, CopyDone, CopyFail
/// and Terminate.
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;
/// PostgreSQL's `PQ_LARGE_MESSAGE_LIMIT` (`MaxAllocSize - 1`): the longest
/// length word for Query, Parse, Bind, FunctionCall and CopyData.
pub const LARGE_MESSAGE_LIMIT: usize = 0x3fff_ffff - 1;

/// The longest length word (which counts itself) a PostgreSQL server
/// accepts for a frontend message of type `tag` once a session runs, as
/// its `SocketBackend` checks it; `None` for a type it does not know. A
/// server closes the connection over either, the length without an
/// ErrorResponse.
pub fn frontend_length_limit(tag: u8) -> Option<usize> {
    match tag {
        b'Q' | b'F' | b'B' | b'P' | b'd' => Some(LARGE_MESSAGE_LIMIT),
        b'C' | b'D' | b'E' | b'H' | b'S' | b'X' | b'c' | b'f' => Some(SMALL_MESSAGE_LIMIT),
        _ => None,
    }
}

#[derive(Debug, Clone, Default)]
pub struct BoundaryTracker {
    framer: Framer,
    marks: MarkSink,
}

/// Keeps the status byte of ReadyForQuery messages and counts request
/// marks; wants no other body.
#[derive(Debug, Clone)]
struct MarkSink {
    direction: Direction,
    last_status: u8,
    /// Messages seen that open (frontend) or close (backend) a request.
    request_marks: u64,
    /// Frontend only: a message a server would refuse by closing.
    violation: bool,
}

impl MarkSink {
    fn new(direction: Direction) -> Self {
        Self {
            direction,
            last_status: b'I',
            request_marks: 0,
            violation: false,
        }
    }
}

impl Default for MarkSink {
    fn default() -> Self {
        Self::new(Direction::default())
    }
}

impl FrameSink for MarkSink {
    fn start(&mut self, tag: u8, body_len: usize) -> bool {
        // The length word counts itself.
        let len = body_len.saturating_add(4);
        if self.direction == Direction::Frontend
            && !matches!(frontend_length_limit(tag), Some(max) if len <= max)
        {
            self.violation = true;
        }
        if self.direction.counts(tag) {
            self.request_marks = self.request_marks.saturating_add(1);
        }
        tag == b'Z' && body_len == 1
    }
    fn body(&mut self, piece: &[u8]) {
        self.last_status = piece[0];
    }
    fn end(&mut self, _tag: u8) {}
}

/// Requests the client sent (read by the relay) that the server has not
/// answered with ReadyForQuery yet. Conservative: a Query the server
/// discards (after an extended-protocol error, before Sync) or a Sync inside
/// COPY IN never gets its own ReadyForQuery, so it stays counted.
pub fn requests_in_flight(frontend: &BoundaryTracker, backend: &BoundaryTracker) -> u64 {
    frontend
        .marks
        .request_marks
        .saturating_sub(backend.marks.request_marks)
}

impl BoundaryTracker {
    pub fn new(direction: Direction) -> Self {
        Self {
            framer: Framer::default(),
            marks: MarkSink::new(direction),
        }
    }

    /// Tracks client-to-server messages.
    pub fn frontend() -> Self {
        Self::new(Direction::Frontend)
    }

    /// Tracks server-to-client messages.
    pub fn backend() -> Self {
        Self::new(Direction::Backend)
    }

    /// Feeds bytes that are being forwarded, in order.
    pub fn observe(&mut self, chunk: &[u8]) {
        self.framer.feed(chunk, &mut self.marks);
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
        self.marks.last_status
    }

    /// Type byte of the last message whose header has passed (0 if none).
    pub fn last_tag(&self) -> u8 {
        self.framer.last_tag()
    }

    /// True when the stream could not be framed.
    pub fn is_broken(&self) -> bool {
        self.framer.is_broken()
    }

    /// True once the stream broke the protocol in a way a PostgreSQL
    /// server answers by closing the connection, often without an
    /// ErrorResponse: bytes that cannot be framed, or (frontend) a message
    /// type the server does not know or a length over its limit for the
    /// type. A connection that breaks after that is the peer's doing, not
    /// the other side's.
    pub fn protocol_violation(&self) -> bool {
        self.framer.is_broken() || self.marks.violation
    }

    /// Messages whose header has passed that open a request (frontend:
    /// Query, Sync, FunctionCall) or close one (backend: ReadyForQuery).
    pub fn request_marks(&self) -> u64 {
        self.marks.request_marks
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
    fn counts_requests_until_their_ready_for_query() {
        // Simple query, then Parse/Bind/Execute/Sync: two requests.
        let mut front = BoundaryTracker::frontend();
        let mut back = BoundaryTracker::backend();
        front.observe(&[b'Q', 0, 0, 0, 6, b'x', 0]);
        assert_eq!(requests_in_flight(&front, &back), 1);
        for tag in [b'P', b'B', b'E'] {
            front.observe(&[tag, 0, 0, 0, 4]);
        }
        assert_eq!(requests_in_flight(&front, &back), 1, "no Sync yet");
        front.observe(&[b'S', 0, 0, 0, 4]);
        assert_eq!(requests_in_flight(&front, &back), 2);
        // ParameterStatus ('S' from a server) answers nothing.
        back.observe(&[b'S', 0, 0, 0, 8, b'a', 0, b'b', 0]);
        back.observe(&[b'C', 0, 0, 0, 5, 0, b'Z', 0, 0, 0, 5, b'I']);
        assert_eq!(requests_in_flight(&front, &back), 1);
        back.observe(&[b'Z', 0, 0, 0, 5]);
        assert_eq!(requests_in_flight(&front, &back), 0);
        // More answers than requests (the proxy's own greeting is never
        // observed) never wrap around.
        back.observe(&[b'I', b'Z', 0, 0, 0, 5, b'I']);
        assert_eq!(requests_in_flight(&front, &back), 0);
        assert_eq!(back.transaction_status(), b'I');
    }

    #[test]
    fn frontend_messages_over_the_servers_limits_are_violations() {
        let ok = [
            vec![b'Q', 0, 0, 0, 5, 0],
            vec![b'S', 0, 0, 0, 4],
            // A Sync of exactly PQ_SMALL_MESSAGE_LIMIT is still accepted.
            vec![b'S', 0, 0, 0x27, 0x10],
        ];
        for m in ok {
            let mut t = BoundaryTracker::frontend();
            t.observe(&m);
            assert!(!t.protocol_violation(), "{m:?}");
        }
        for header in [
            [b'S', 0, 0, 0x27, 0x11],
            [b'?', 0, 0, 0, 4],
            [b'Q', 0x40, 0, 0, 0],
        ] {
            let mut t = BoundaryTracker::frontend();
            t.observe(&header);
            assert!(t.protocol_violation(), "{header:?}");
        }
        // The backend direction has no such rules, only framing.
        let mut t = BoundaryTracker::backend();
        t.observe(&[b'?', 0, 0, 0x27, 0x11]);
        assert!(!t.protocol_violation());
        let mut t = BoundaryTracker::backend();
        t.observe(&[b'?', 0xff, 0xff, 0xff, 0xff]);
        assert!(t.protocol_violation());
    }

    #[test]
    fn stops_on_broken_framing() {
        let mut t = BoundaryTracker::default();
        t.observe(&[b'D', 0, 0, 0, 1, 9, 9]);
        assert!(t.is_broken());
        assert!(!t.at_boundary());
    }
}
