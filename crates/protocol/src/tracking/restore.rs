//! The restore exchange: rebuild a session's state on a new backend, in one
//! pipelined round trip, all or nothing.
//!
//! In order:
//! 1. `client_encoding`, alone, when the session changed it: the rest is
//!    then read in the encoding the snapshot's values came in;
//! 2. one simple Query of `SELECT pg_catalog.set_config(E'name', E'value',
//!    false)` statements (E'' literals, so `standard_conforming_strings`
//!    does not matter; `set_config`, not `SET`, because list settings such
//!    as `search_path` take the raw value): `session_authorization` first
//!    (only when `session_user` differs from the login user), `role` last
//!    (setting `session_authorization` resets `role`). One Query is one
//!    implicit transaction: if one fails, none stays set;
//! 3. each SQL-level `PREPARE`, as its own simple Query;
//! 4. every tracked named Parse, byte for byte (parameter types included),
//!    then the unnamed one, then Sync.
//!
//! Any ErrorResponse fails the restore: the new backend must then be
//! discarded, never swapped in, so a failed replay can never surface later
//! as "prepared statement does not exist" on the client's Bind.

use bytes::BytesMut;

use super::exchange::ExchangeReader;
use super::params::ParameterValues;
use super::snapshot::SessionSnapshot;
use super::sql::push_literal;
use super::tracker::SessionTracker;
use crate::backend::{decode_fields, ErrorFields};
use crate::ProtocolError;

/// What the decoder expects from the exchange [`encode_restore`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestorePlan {
    ready_expected: usize,
    /// Settings set (`session_authorization` and `role` included).
    pub settings: usize,
    /// SQL-level and protocol-level statements prepared.
    pub statements: usize,
}

fn put_query(out: &mut BytesMut, sql: &[u8]) {
    use bytes::BufMut;
    out.put_u8(b'Q');
    // Bounded by the session-state cap the session enforces.
    out.put_i32((4 + sql.len() + 1) as i32);
    out.put_slice(sql);
    out.put_u8(0);
}

fn push_set_config(sql: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    if !sql.is_empty() {
        sql.push(b';');
    }
    sql.extend_from_slice(b"SELECT pg_catalog.set_config(");
    push_literal(sql, name);
    sql.extend_from_slice(b", ");
    push_literal(sql, value);
    sql.extend_from_slice(b", false)");
}

/// Writes the restore exchange for a session to `out`: the state in
/// `snapshot` (taken from the old backend), the statements in `tracker`.
/// `login_user` is the user the new backend logged in as. `None` when a
/// tracked statement was too large to keep (such a session is pinned and
/// must not move); `out` is then unchanged.
pub fn encode_restore(
    out: &mut BytesMut,
    snapshot: &SessionSnapshot,
    tracker: &SessionTracker,
    login_user: &[u8],
) -> Option<RestorePlan> {
    let named: Vec<&[u8]> = tracker
        .named_statements()
        .map(|(_, statement)| statement.parse_message)
        .collect::<Option<_>>()?;
    let unnamed = match tracker.unnamed_statement() {
        Some(statement) => Some(statement.parse_message?),
        None => None,
    };
    let mut plan = RestorePlan {
        ready_expected: 0,
        settings: 0,
        statements: 0,
    };

    let encoding = snapshot
        .settings
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(b"client_encoding"));
    if let Some(setting) = encoding {
        let mut sql = Vec::new();
        push_set_config(&mut sql, &setting.name, &setting.value);
        put_query(out, &sql);
        plan.ready_expected += 1;
        plan.settings += 1;
    }

    let mut sql = Vec::new();
    if let Some(user) = &snapshot.session_user {
        if user.as_slice() != login_user {
            push_set_config(&mut sql, b"session_authorization", user);
            plan.settings += 1;
        }
    }
    for setting in &snapshot.settings {
        if !setting.name.eq_ignore_ascii_case(b"client_encoding") {
            push_set_config(&mut sql, &setting.name, &setting.value);
            plan.settings += 1;
        }
    }
    if let Some(role) = &snapshot.role {
        if role.as_slice() != b"none" {
            push_set_config(&mut sql, b"role", role);
            plan.settings += 1;
        }
    }
    if !sql.is_empty() {
        put_query(out, &sql);
        plan.ready_expected += 1;
    }

    for prepared in &snapshot.sql_prepared {
        put_query(out, &prepared.statement);
        plan.ready_expected += 1;
        plan.statements += 1;
    }

    let parses = named.len() + usize::from(unnamed.is_some());
    if parses > 0 {
        for parse in named.into_iter().chain(unnamed) {
            out.extend_from_slice(parse);
        }
        out.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        plan.ready_expected += 1;
        plan.statements += parses;
    }
    Some(plan)
}

/// How the restore ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// Everything was restored. `parameters` are the values the new
    /// backend reports (its startup values updated by the restore); pass
    /// them to [`SessionTracker::sync_parameters`].
    Restored { parameters: ParameterValues },
    /// The first error: discard the new backend.
    Failed(ErrorFields),
}

/// Reads the answer to [`encode_restore`]'s exchange, incrementally.
#[derive(Debug, Clone)]
pub struct RestoreDecoder {
    plan: RestorePlan,
    max_message: usize,
    reader: ExchangeReader,
    ready: usize,
    failed: Option<ErrorFields>,
    parameters: ParameterValues,
}

impl RestoreDecoder {
    /// `backend_parameters`: the ParameterStatus values the new backend
    /// sent during its startup. `max_message` bounds every message body
    /// kept.
    pub fn new(plan: RestorePlan, backend_parameters: ParameterValues, max_message: usize) -> Self {
        Self {
            plan,
            max_message,
            reader: ExchangeReader::new(max_message),
            ready: 0,
            failed: None,
            parameters: backend_parameters,
        }
    }

    /// Reads backend bytes; returns how many belong to the exchange (it
    /// stops after the last ReadyForQuery, or at the first error, after
    /// which the backend is to be discarded).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, ProtocolError> {
        let mut input = bytes;
        while !self.is_done() {
            let Some(header) = self.reader.next(&mut input)? else {
                break;
            };
            match header.tag {
                b'Z' => self.ready += 1,
                b'E' => {
                    self.failed = Some(if header.kept {
                        decode_fields(self.reader.body(), "ErrorResponse")?
                    } else {
                        ErrorFields::default()
                    });
                }
                b'S' if header.kept => {
                    self.parameters.apply_message_body(self.reader.body());
                }
                b'S' => {
                    return Err(ProtocolError::MessageTooLarge {
                        tag: header.tag,
                        len: header.len,
                        limit: self.max_message,
                    })
                }
                // Rows of set_config, completions, notices: nothing to keep.
                _ => {}
            }
        }
        Ok(bytes.len() - input.len())
    }

    pub fn is_done(&self) -> bool {
        self.failed.is_some() || self.ready >= self.plan.ready_expected
    }

    /// The outcome; `None` before [`RestoreDecoder::is_done`].
    pub fn finish(self) -> Option<RestoreOutcome> {
        if !self.is_done() {
            return None;
        }
        Some(match self.failed {
            Some(error) => RestoreOutcome::Failed(error),
            None => RestoreOutcome::Restored {
                parameters: self.parameters,
            },
        })
    }
}
