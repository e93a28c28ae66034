//! The snapshot exchange: ask the live backend, with requests whose answers
//! the client never sees, for the session state the wire cannot show
//! exactly, at an idle point.
//!
//! The requests are simple Queries, pipelined in one round trip:
//! 1. settings: `pg_settings` rows with `source = 'session'` (minus the
//!    per-transaction `transaction_*` ones, which at an idle point only
//!    mirror their defaults and cannot be set outside a transaction), plus
//!    `session_user` and `current_setting('role')` (PostgreSQL lists
//!    neither `session_authorization` nor `role` in `pg_settings`), plus
//!    the custom placeholder settings the tracker saw named, read with
//!    `current_setting(name, true)` (PostgreSQL 15 lists placeholders in no
//!    view);
//! 2. `pg_prepared_statements`: SQL-level statements to replay from their
//!    text, protocol-level names to reconcile with the tracker;
//! 3. one query per pin (listening channels, WITH HOLD cursors, temporary
//!    relations, session advisory locks), each alone so a server without
//!    the feature answers "none" with an undefined-object or
//!    feature-not-supported error instead of failing the rest.
//!
//! A simple Query drops the unnamed statement, so when the tracker holds
//! one its exact Parse follows, then Sync.

use bytes::BytesMut;

use super::exchange::{data_row_columns, ExchangeReader};
use super::sql::{find_prepare, push_literal};
use super::tracker::SessionTracker;
use crate::backend::{decode_fields, ErrorFields};
use crate::query::encode_query;
use crate::ProtocolError;

label_set! {
    /// Why a session cannot move (the `cause` label values of the pinned
    /// sessions metric).
    pub struct Pins {
        /// `LISTEN` on some channel.
        LISTEN = 1 => "listen",
        /// An open `WITH HOLD` cursor.
        HOLD_CURSOR = 2 => "hold_cursor",
        /// A temporary table (or other relation) exists.
        TEMP_TABLE = 4 => "temp_table",
        /// A session-level advisory lock is held.
        ADVISORY_LOCK = 8 => "advisory_lock",
        /// Tracked state is over the session-state cap.
        STATE_TOO_LARGE = 16 => "state_too_large",
        /// Something could not be classified (a failed snapshot query, a SQL
        /// PREPARE whose text cannot be isolated, statements the tracker
        /// never saw, custom settings whose names cannot be known, a
        /// desynchronized tracker).
        UNCLASSIFIABLE = 32 => "unclassifiable",
    }
}

/// A setting and its value as `pg_settings.setting` (or `current_setting`)
/// shows it: in the base unit, so `set_config` takes it back unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// A SQL-level prepared statement and the single `PREPARE` statement that
/// recreates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlPrepared {
    pub name: Vec<u8>,
    pub statement: Vec<u8>,
}

/// What became of the unnamed statement the exchange had to re-Parse.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UnnamedReparse {
    /// There was none.
    #[default]
    NotNeeded,
    /// Parsed again: the live backend has it as before.
    Done,
    /// The Parse failed (a table it names is gone): the live backend has
    /// no unnamed statement now, and the tracker must drop its copy.
    Failed(ErrorFields),
}

/// The session state of a live backend at an idle point.
///
/// A session that was never dirty needs no snapshot: nothing the tracker
/// cannot see changed, so the default (empty) snapshot restores it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionSnapshot {
    /// Settings changed in the session (`session_authorization` and `role`
    /// are in their own fields).
    pub settings: Vec<Setting>,
    /// `session_user` (differs from the login user after
    /// `SET SESSION AUTHORIZATION`).
    pub session_user: Option<Vec<u8>>,
    /// `current_setting('role')`; `none` when no `SET ROLE` is in effect.
    pub role: Option<Vec<u8>>,
    pub sql_prepared: Vec<SqlPrepared>,
    /// Names of protocol-level prepared statements on the backend.
    pub protocol_statements: Vec<Vec<u8>>,
    /// Causes found by the exchange (the tracker adds its own, see
    /// [`session_pins`]).
    pub pins: Pins,
    pub unnamed: UnnamedReparse,
}

impl SessionSnapshot {
    /// Bytes the snapshot holds, against the session-state cap.
    pub fn size_bytes(&self) -> usize {
        self.settings
            .iter()
            .map(|s| s.name.len() + s.value.len())
            .chain(
                self.sql_prepared
                    .iter()
                    .map(|p| p.name.len() + p.statement.len()),
            )
            .chain(self.protocol_statements.iter().map(Vec::len))
            .sum::<usize>()
            + self.session_user.as_ref().map_or(0, Vec::len)
            + self.role.as_ref().map_or(0, Vec::len)
    }
}

/// Every reason the session cannot move, from a snapshot and the tracker
/// it was applied to (see [`SessionTracker::apply_snapshot`]).
pub fn session_pins(
    snapshot: &SessionSnapshot,
    tracker: &SessionTracker,
    unknown_statements: usize,
    max_session_state: usize,
) -> Pins {
    let mut pins = snapshot.pins;
    if tracker.custom_settings_unknown() || unknown_statements > 0 || tracker.desync().is_some() {
        pins |= Pins::UNCLASSIFIABLE;
    }
    let too_large = tracker
        .named_statements()
        .any(|(_, s)| s.parse_message.is_none())
        || tracker
            .unnamed_statement()
            .is_some_and(|s| s.parse_message.is_none());
    if too_large || tracker.state_bytes() + snapshot.size_bytes() > max_session_state {
        pins |= Pins::STATE_TOO_LARGE;
    }
    pins
}

const SETTINGS_QUERY: &str = "SELECT name, setting FROM pg_catalog.pg_settings \
     WHERE source = 'session' \
     AND name NOT IN ('transaction_isolation', 'transaction_read_only', 'transaction_deferrable') \
     UNION ALL SELECT 'session_authorization', session_user::pg_catalog.text \
     UNION ALL SELECT 'role', pg_catalog.current_setting('role')";

const PREPARED_QUERY: &str =
    "SELECT name, from_sql, statement FROM pg_catalog.pg_prepared_statements";

/// The pin queries, in order, with the pin each one's non-zero count means.
const PIN_QUERIES: [(&str, Pins); 4] = [
    (
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_listening_channels()",
        Pins::LISTEN,
    ),
    (
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable",
        Pins::HOLD_CURSOR,
    ),
    (
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_class \
         WHERE relnamespace = pg_catalog.pg_my_temp_schema()",
        Pins::TEMP_TABLE,
    ),
    (
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks \
         WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()",
        Pins::ADVISORY_LOCK,
    ),
];

/// SQLSTATEs that mean "this server has no such feature": the pin is absent.
const FEATURE_ABSENT: [&str; 4] = ["0A000", "42883", "42P01", "42704"];

/// What the decoder expects from the exchange [`encode_snapshot`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPlan {
    reparse_unnamed: bool,
}

/// The settings query, with the custom setting names read by name.
fn settings_query<'a>(custom: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut sql = SETTINGS_QUERY.as_bytes().to_vec();
    let mut names = custom.into_iter().peekable();
    if names.peek().is_some() {
        sql.extend_from_slice(
            b" UNION ALL SELECT c.n, pg_catalog.current_setting(c.n, true) \
              FROM pg_catalog.unnest(ARRAY[",
        );
        for (i, name) in names.enumerate() {
            if i > 0 {
                sql.push(b',');
            }
            push_literal(&mut sql, name);
        }
        sql.extend_from_slice(
            b"]::pg_catalog.text[]) AS c(n) \
              WHERE pg_catalog.current_setting(c.n, true) IS NOT NULL \
              AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_settings s \
              WHERE pg_catalog.lower(s.name) = pg_catalog.lower(c.n))",
        );
    }
    sql
}

fn put_query(out: &mut BytesMut, sql: &[u8]) {
    use bytes::BufMut;
    out.put_u8(b'Q');
    // Bounded by the tracker's limits on custom setting names.
    out.put_i32((4 + sql.len() + 1) as i32);
    out.put_slice(sql);
    out.put_u8(0);
}

/// Writes the snapshot exchange for `tracker`'s session to `out`. Send it
/// at an idle point only, and relay nothing until
/// [`SnapshotDecoder::is_done`]. `None` (and nothing written) when the
/// session has an unnamed statement too large to have been kept: the
/// exchange's Queries would drop it from the live backend with no way to
/// Parse it again, so take no snapshot (the session is pinned,
/// `state_too_large`).
pub fn encode_snapshot(out: &mut BytesMut, tracker: &SessionTracker) -> Option<SnapshotPlan> {
    let unnamed = match tracker.unnamed_statement() {
        Some(statement) => Some(statement.parse_message?),
        None => None,
    };
    put_query(out, &settings_query(tracker.custom_settings()));
    encode_query(out, PREPARED_QUERY);
    for (sql, _) in PIN_QUERIES {
        encode_query(out, sql);
    }
    if let Some(parse) = unnamed {
        out.extend_from_slice(parse);
        out.extend_from_slice(&[b'S', 0, 0, 0, 4]);
    }
    Some(SnapshotPlan {
        reparse_unnamed: unnamed.is_some(),
    })
}

/// Bounds on the snapshot's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// Largest message body kept (a row, an error, a notice).
    pub max_message: usize,
    /// Most bytes of rows kept in all; past it the rest of the answer is
    /// read and dropped, and the outcome is [`SnapshotOutcome::TooLarge`].
    pub max_state: usize,
}

/// How the exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOutcome {
    Taken(SessionSnapshot),
    /// The state is larger than [`SnapshotLimits::max_state`]: the session
    /// is pinned (`state_too_large`).
    TooLarge,
    /// The backend sent a FATAL: it is going away.
    Fatal(ErrorFields),
}

const STAGE_SETTINGS: usize = 0;
const STAGE_PREPARED: usize = 1;
const STAGE_FIRST_PIN: usize = 2;
const STAGE_REPARSE: usize = STAGE_FIRST_PIN + PIN_QUERIES.len();

/// Reads the answer to [`encode_snapshot`]'s exchange, incrementally.
#[derive(Debug, Clone)]
pub struct SnapshotDecoder {
    plan: SnapshotPlan,
    limits: SnapshotLimits,
    reader: ExchangeReader,
    /// ReadyForQuery messages seen: the index of the request being answered.
    stage: usize,
    done: bool,
    kept: usize,
    too_large: bool,
    fatal: Option<ErrorFields>,
    snapshot: SessionSnapshot,
    forward: Vec<u8>,
    columns: Vec<Option<std::ops::Range<usize>>>,
}

impl SnapshotDecoder {
    pub fn new(plan: SnapshotPlan, limits: SnapshotLimits) -> Self {
        Self {
            plan,
            limits,
            reader: ExchangeReader::new(limits.max_message),
            stage: 0,
            done: false,
            kept: 0,
            too_large: false,
            fatal: None,
            snapshot: SessionSnapshot {
                settings: Vec::new(),
                session_user: None,
                role: None,
                sql_prepared: Vec::new(),
                protocol_statements: Vec::new(),
                pins: Pins::default(),
                unnamed: UnnamedReparse::NotNeeded,
            },
            forward: Vec::new(),
            columns: Vec::new(),
        }
    }

    fn expected_ready(&self) -> usize {
        STAGE_REPARSE + usize::from(self.plan.reparse_unnamed)
    }

    /// Reads backend bytes; returns how many belong to the exchange. It
    /// stops right after the exchange's last ReadyForQuery: bytes after it
    /// are the relay's. Errors mean bytes no server sends (the backend must
    /// be discarded).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, ProtocolError> {
        let mut input = bytes;
        while !self.done {
            let Some(header) = self.reader.next(&mut input)? else {
                break;
            };
            self.message(header)?;
        }
        Ok(bytes.len() - input.len())
    }

    /// The exchange's last ReadyForQuery was read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Notifications, notices and ParameterStatus messages that arrived
    /// during the exchange, whole, in order: the client must get them.
    /// Take them after each [`SnapshotDecoder::feed`] (that keeps this
    /// buffer as small as the bytes fed) and relay them as backend bytes.
    pub fn take_forward(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.forward)
    }

    /// The outcome; `None` before [`SnapshotDecoder::is_done`].
    pub fn finish(self) -> Option<SnapshotOutcome> {
        if !self.done {
            return None;
        }
        Some(match (self.fatal, self.too_large) {
            (Some(fatal), _) => SnapshotOutcome::Fatal(fatal),
            (None, true) => SnapshotOutcome::TooLarge,
            (None, false) => SnapshotOutcome::Taken(self.snapshot),
        })
    }

    fn message(&mut self, header: super::exchange::Header) -> Result<(), ProtocolError> {
        match header.tag {
            b'N' | b'A' | b'S' => {
                if !header.kept {
                    return Err(ProtocolError::MessageTooLarge {
                        tag: header.tag,
                        len: header.len,
                        limit: self.limits.max_message,
                    });
                }
                self.reader.copy_message(&mut self.forward);
            }
            b'D' => {
                if !header.kept {
                    self.too_large = true;
                } else if !self.too_large {
                    self.kept += header.len;
                    if self.kept > self.limits.max_state {
                        self.too_large = true;
                    } else {
                        self.row();
                    }
                }
            }
            b'E' => {
                let fields = if header.kept {
                    decode_fields(self.reader.body(), "ErrorResponse")?
                } else {
                    ErrorFields::default()
                };
                self.error(fields);
            }
            b'1' if self.stage == STAGE_REPARSE => self.snapshot.unnamed = UnnamedReparse::Done,
            b'Z' => {
                self.stage += 1;
                if self.stage == self.expected_ready() {
                    self.done = true;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn row(&mut self) {
        let body = self.reader.body();
        if !data_row_columns(body, &mut self.columns) {
            self.snapshot.pins |= Pins::UNCLASSIFIABLE;
            return;
        }
        let column = |i: usize| -> Option<&[u8]> {
            self.columns
                .get(i)
                .and_then(|c| c.clone())
                .map(|range| &body[range])
        };
        match self.stage {
            STAGE_SETTINGS => match (column(0), column(1)) {
                (Some(b"session_authorization"), Some(user)) => {
                    self.snapshot.session_user = Some(user.to_vec())
                }
                (Some(b"role"), Some(role)) => self.snapshot.role = Some(role.to_vec()),
                (Some(name), Some(value)) => self.snapshot.settings.push(Setting {
                    name: name.to_vec(),
                    value: value.to_vec(),
                }),
                _ => self.snapshot.pins |= Pins::UNCLASSIFIABLE,
            },
            STAGE_PREPARED => match (column(0), column(1), column(2)) {
                (Some(name), Some(b"f"), _) => {
                    self.snapshot.protocol_statements.push(name.to_vec())
                }
                (Some(name), Some(b"t"), Some(text)) => match find_prepare(text, name) {
                    Some(statement) => self.snapshot.sql_prepared.push(SqlPrepared {
                        name: name.to_vec(),
                        statement: statement.to_vec(),
                    }),
                    None => self.snapshot.pins |= Pins::UNCLASSIFIABLE,
                },
                _ => self.snapshot.pins |= Pins::UNCLASSIFIABLE,
            },
            stage if (STAGE_FIRST_PIN..STAGE_REPARSE).contains(&stage) => {
                let (_, pin) = PIN_QUERIES[stage - STAGE_FIRST_PIN];
                match column(0) {
                    Some(b"0") => {}
                    Some(count) if count.iter().all(u8::is_ascii_digit) => {
                        self.snapshot.pins |= pin
                    }
                    _ => self.snapshot.pins |= Pins::UNCLASSIFIABLE,
                }
            }
            _ => self.snapshot.pins |= Pins::UNCLASSIFIABLE,
        }
    }

    fn error(&mut self, fields: ErrorFields) {
        if matches!(fields.severity(), "FATAL" | "PANIC") {
            // The backend closes after it; no ReadyForQuery comes.
            self.fatal = Some(fields);
            self.done = true;
            return;
        }
        match self.stage {
            stage
                if (STAGE_FIRST_PIN..STAGE_REPARSE).contains(&stage)
                    && FEATURE_ABSENT.contains(&fields.code()) => {}
            STAGE_REPARSE => self.snapshot.unnamed = UnnamedReparse::Failed(fields),
            _ => self.snapshot.pins |= Pins::UNCLASSIFIABLE,
        }
    }
}
