//! Protocol-level prepared statements, tracked exactly from Parse and
//! Close as the server confirms them.
//!
//! Parse and Close messages wait in a queue, tagged with their sync group,
//! until the server answers them: ParseComplete (`1`) and CloseComplete
//! (`3`) confirm the front entry. After an ErrorResponse the server skips
//! the rest of the group up to Sync, so the group's unconfirmed entries are
//! dropped. The Parse bytes of entries waiting for an answer live in one
//! append-only arena that is cleared whenever the queue empties, so
//! steady traffic allocates nothing; a confirmed named statement is copied
//! out (the one allocation per statement the client creates), the unnamed
//! statement into one reusable buffer.

use std::collections::{HashMap, VecDeque};

/// PostgreSQL keys prepared statements by their first NAMEDATALEN - 1 bytes.
pub const NAME_MAX: usize = 63;

/// Arena and unnamed-statement capacity kept across uses; more is freed
/// when no longer needed.
const KEEP_CAPACITY: usize = 16 * 1024;

/// A statement name as the server keys it (truncated to [`NAME_MAX`]).
/// The empty name is the unnamed statement.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatementName {
    len: u8,
    bytes: [u8; NAME_MAX],
}

impl Default for StatementName {
    fn default() -> Self {
        Self {
            len: 0,
            bytes: [0; NAME_MAX],
        }
    }
}

impl std::fmt::Debug for StatementName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

impl StatementName {
    /// The name the server would use for `name` (its first 63 bytes).
    pub fn new(name: &[u8]) -> Self {
        let mut key = Self::default();
        key.push(name);
        key
    }

    fn push(&mut self, piece: &[u8]) {
        let len = usize::from(self.len);
        let n = piece.len().min(NAME_MAX - len);
        self.bytes[len..len + n].copy_from_slice(&piece[..n]);
        // n <= NAME_MAX - len, so the sum fits in u8.
        self.len = (len + n) as u8;
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn is_unnamed(&self) -> bool {
        self.len == 0
    }
}

/// Reads a NUL-terminated name from a streamed message body.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NameReader {
    pub(crate) name: StatementName,
    pub(crate) done: bool,
}

impl NameReader {
    /// Consumes bytes of the name; returns how many (the NUL included).
    pub(crate) fn feed(&mut self, piece: &[u8]) -> usize {
        if self.done {
            return 0;
        }
        match piece.iter().position(|b| *b == 0) {
            Some(nul) => {
                self.name.push(&piece[..nul]);
                self.done = true;
                nul + 1
            }
            None => {
                self.name.push(piece);
                piece.len()
            }
        }
    }
}

/// A tracked statement's Parse message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackedStatement<'a> {
    /// The whole Parse message (type byte, length, body) exactly as the
    /// client sent it, or `None` when it was larger than the capture limit
    /// (the session then cannot move; [`TrackedStatement::size`] says why).
    pub parse_message: Option<&'a [u8]>,
    /// Size of the Parse message in bytes.
    pub size: usize,
    /// The text looked state-changing (see the keyword scan): executing it
    /// again makes the session dirty.
    pub state_changing: bool,
}

#[derive(Debug, Clone)]
enum Text {
    Kept(Box<[u8]>),
    TooLarge(usize),
}

impl Text {
    fn size(&self) -> usize {
        match self {
            Text::Kept(bytes) => bytes.len(),
            Text::TooLarge(size) => *size,
        }
    }
}

#[derive(Debug, Clone)]
struct Named {
    text: Text,
    state_changing: bool,
}

#[derive(Debug, Clone, Copy)]
enum PendingText {
    /// Absolute offsets into the arena.
    Arena {
        start: u64,
        end: u64,
    },
    TooLarge(usize),
}

#[derive(Debug, Clone, Copy)]
enum OpKind {
    Parse {
        name: StatementName,
        text: PendingText,
        state_changing: bool,
    },
    CloseStatement(StatementName),
    ClosePortal,
    /// A simple Query drops the unnamed statement when the server starts it.
    DropUnnamed,
}

#[derive(Debug, Clone, Copy)]
struct PendingOp {
    group: u64,
    /// A Bind, Describe or Execute of the same group came between the
    /// previous entry (or the group's start) and this one: an error before
    /// this entry was confirmed may be theirs.
    after_other: bool,
    kind: OpKind,
}

/// The server answered something the queue did not expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mismatch;

#[derive(Debug, Clone, Copy, Default)]
struct UnnamedMeta {
    too_large: Option<usize>,
    state_changing: bool,
}

/// Confirmed and pending protocol-level prepared statements.
#[derive(Debug, Clone, Default)]
pub(crate) struct Statements {
    named: HashMap<StatementName, Named>,
    unnamed: Option<UnnamedMeta>,
    unnamed_parse: Vec<u8>,
    pending: VecDeque<PendingOp>,
    arena: Vec<u8>,
    /// Absolute offset of `arena[0]`.
    arena_base: u64,
    /// Parse being captured: its start in the arena, or its size when it is
    /// over the limit.
    capture: Option<PendingText>,
    state_changing: usize,
    bytes: usize,
}

impl Statements {
    /// A Parse message of `body_len` bytes starts: capture it when the
    /// whole message fits in `limit` bytes.
    pub(crate) fn parse_started(&mut self, body_len: usize, limit: usize) {
        let size = body_len.saturating_add(5);
        if size > limit {
            self.capture = Some(PendingText::TooLarge(size));
            return;
        }
        let start = self.arena_base + self.arena.len() as u64;
        self.arena.push(b'P');
        // body_len + 4 came from the message's own i32 length field.
        self.arena
            .extend_from_slice(&((body_len + 4) as i32).to_be_bytes());
        self.capture = Some(PendingText::Arena { start, end: start });
    }

    /// The next piece of the Parse body.
    pub(crate) fn parse_piece(&mut self, piece: &[u8]) {
        if let Some(PendingText::Arena { .. }) = self.capture {
            self.arena.extend_from_slice(piece);
        }
    }

    /// The Parse ended; queue it for the server's answer.
    pub(crate) fn parse_finished(
        &mut self,
        group: u64,
        after_other: bool,
        name: StatementName,
        state_changing: bool,
    ) {
        let text = match self.capture.take() {
            Some(PendingText::Arena { start, .. }) => PendingText::Arena {
                start,
                end: self.arena_base + self.arena.len() as u64,
            },
            Some(too_large) => too_large,
            None => PendingText::TooLarge(0),
        };
        self.pending.push_back(PendingOp {
            group,
            after_other,
            kind: OpKind::Parse {
                name,
                text,
                state_changing,
            },
        });
    }

    /// A Close of a statement (`S`) or portal (`P`, or anything else the
    /// server will reject: its error drops the entry).
    pub(crate) fn close(
        &mut self,
        group: u64,
        after_other: bool,
        statement: Option<StatementName>,
    ) {
        let kind = match statement {
            Some(name) => OpKind::CloseStatement(name),
            None => OpKind::ClosePortal,
        };
        self.pending.push_back(PendingOp {
            group,
            after_other,
            kind,
        });
    }

    /// A simple Query was sent: the server drops the unnamed statement when
    /// it gets there.
    pub(crate) fn query(&mut self, group: u64) {
        if self.pending.is_empty() {
            self.drop_unnamed();
        } else {
            self.pending.push_back(PendingOp {
                group,
                after_other: false,
                kind: OpKind::DropUnnamed,
            });
        }
    }

    /// ParseComplete arrived.
    pub(crate) fn parse_complete(&mut self) -> Result<(), Mismatch> {
        let Some(PendingOp {
            kind:
                OpKind::Parse {
                    name,
                    text,
                    state_changing,
                },
            ..
        }) = self.pending.front().copied()
        else {
            return Err(Mismatch);
        };
        let text = match text {
            PendingText::Arena { start, end } => {
                let from = (start - self.arena_base) as usize;
                let to = (end - self.arena_base) as usize;
                Ok(from..to)
            }
            PendingText::TooLarge(size) => Err(size),
        };
        if name.is_unnamed() {
            self.drop_unnamed();
            match text {
                Ok(range) => {
                    self.unnamed_parse.clear();
                    self.unnamed_parse.extend_from_slice(&self.arena[range]);
                    if self.unnamed_parse.capacity() > KEEP_CAPACITY
                        && self.unnamed_parse.len() < KEEP_CAPACITY
                    {
                        self.unnamed_parse.shrink_to(KEEP_CAPACITY);
                    }
                    self.unnamed = Some(UnnamedMeta {
                        too_large: None,
                        state_changing,
                    });
                    self.bytes += self.unnamed_parse.len();
                }
                Err(size) => {
                    self.unnamed_parse.clear();
                    self.unnamed = Some(UnnamedMeta {
                        too_large: Some(size),
                        state_changing,
                    });
                    self.bytes += size;
                }
            }
            if state_changing {
                self.state_changing += 1;
            }
        } else {
            let text = match text {
                Ok(range) => Text::Kept(self.arena[range].into()),
                Err(size) => Text::TooLarge(size),
            };
            self.remove_named(&name);
            self.bytes += usize::from(name.len) + text.size();
            if state_changing {
                self.state_changing += 1;
            }
            self.named.insert(
                name,
                Named {
                    text,
                    state_changing,
                },
            );
        }
        self.pop_front();
        Ok(())
    }

    /// CloseComplete arrived.
    pub(crate) fn close_complete(&mut self) -> Result<(), Mismatch> {
        match self.pending.front().map(|op| op.kind) {
            Some(OpKind::CloseStatement(name)) => {
                if name.is_unnamed() {
                    self.drop_unnamed();
                } else {
                    self.remove_named(&name);
                }
            }
            Some(OpKind::ClosePortal) => {}
            _ => return Err(Mismatch),
        }
        self.pop_front();
        Ok(())
    }

    /// An ErrorResponse answered `group`: the server skips the rest of the
    /// group, so none of its unconfirmed entries will take effect. When the
    /// first of them is an unnamed Parse that nothing else could have
    /// failed before, that Parse failed, and a failed unnamed Parse leaves
    /// no unnamed statement (the server drops the old one first).
    pub(crate) fn error(&mut self, group: u64) {
        if let Some(PendingOp {
            group: g,
            after_other: false,
            kind: OpKind::Parse { name, .. },
        }) = self.pending.front().copied()
        {
            if g == group && name.is_unnamed() {
                self.drop_unnamed();
            }
        }
        self.drop_group(group);
    }

    /// ReadyForQuery ended `group`. Returns true when entries of it were
    /// still unanswered (they were skipped after an error).
    pub(crate) fn group_answered(&mut self, group: u64) -> bool {
        self.drop_group(group)
    }

    fn drop_group(&mut self, group: u64) -> bool {
        let mut dropped = false;
        while self.pending.front().is_some_and(|op| op.group <= group) {
            dropped = true;
            self.pop_front();
        }
        dropped
    }

    fn pop_front(&mut self) {
        if let Some(PendingOp {
            kind:
                OpKind::Parse {
                    text: PendingText::Arena { end, .. },
                    ..
                },
            ..
        }) = self.pending.pop_front()
        {
            let consumed = (end - self.arena_base) as usize;
            // Compact now and then when the queue never empties.
            if consumed > KEEP_CAPACITY && consumed * 2 > self.arena.len() {
                self.arena.drain(..consumed);
                self.arena_base = end;
            }
        }
        while let Some(PendingOp {
            kind: OpKind::DropUnnamed,
            ..
        }) = self.pending.front()
        {
            self.pending.pop_front();
            self.drop_unnamed();
        }
        if self.pending.is_empty() && self.capture.is_none() {
            self.arena_base += self.arena.len() as u64;
            self.arena.clear();
            if self.arena.capacity() > KEEP_CAPACITY {
                self.arena = Vec::new();
            }
        }
    }

    pub(crate) fn drop_unnamed(&mut self) {
        if let Some(meta) = self.unnamed.take() {
            self.bytes -= meta.too_large.unwrap_or(self.unnamed_parse.len());
            if meta.state_changing {
                self.state_changing -= 1;
            }
            self.unnamed_parse.clear();
        }
    }

    fn remove_named(&mut self, name: &StatementName) -> bool {
        match self.named.remove(name) {
            Some(old) => {
                self.bytes -= usize::from(name.len) + old.text.size();
                if old.state_changing {
                    self.state_changing -= 1;
                }
                true
            }
            None => false,
        }
    }

    /// Keeps only the named statements `keep` accepts; returns how many
    /// were removed.
    pub(crate) fn retain_named(&mut self, mut keep: impl FnMut(&StatementName) -> bool) -> usize {
        let gone: Vec<StatementName> = self
            .named
            .keys()
            .filter(|name| !keep(name))
            .copied()
            .collect();
        for name in &gone {
            self.remove_named(name);
        }
        gone.len()
    }

    pub(crate) fn contains(&self, name: &StatementName) -> bool {
        self.named.contains_key(name)
    }

    /// Whether Bind of `name` runs a statement flagged state-changing.
    pub(crate) fn binds_state_changing(&self, name: &StatementName) -> bool {
        if name.is_unnamed() {
            self.unnamed.is_some_and(|meta| meta.state_changing)
        } else {
            self.named
                .get(name)
                .is_some_and(|statement| statement.state_changing)
        }
    }

    /// Confirmed statements flagged state-changing (when 0, Bind need not
    /// be read at all).
    pub(crate) fn state_changing_count(&self) -> usize {
        self.state_changing
    }

    pub(crate) fn pending_is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub(crate) fn named(&self) -> impl Iterator<Item = (&StatementName, TrackedStatement<'_>)> {
        self.named.iter().map(|(name, statement)| {
            (
                name,
                TrackedStatement {
                    parse_message: match &statement.text {
                        Text::Kept(bytes) => Some(&bytes[..]),
                        Text::TooLarge(_) => None,
                    },
                    size: statement.text.size(),
                    state_changing: statement.state_changing,
                },
            )
        })
    }

    pub(crate) fn named_count(&self) -> usize {
        self.named.len()
    }

    pub(crate) fn unnamed(&self) -> Option<TrackedStatement<'_>> {
        self.unnamed.map(|meta| TrackedStatement {
            parse_message: match meta.too_large {
                None => Some(&self.unnamed_parse[..]),
                Some(_) => None,
            },
            size: meta.too_large.unwrap_or(self.unnamed_parse.len()),
            state_changing: meta.state_changing,
        })
    }

    /// Bytes of confirmed statements (names and Parse messages).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}
