//! Session continuity, the pure part: the message-level view of a session
//! and the two hidden exchanges that move its state to another backend.
//!
//! Nothing here does I/O. The session feeds bytes in and reads facts out.
//!
//! # The tracker
//!
//! [`SessionTracker`] watches the bytes the relay forwards, in order, in
//! whatever pieces the sockets produced: [`SessionTracker::observe_client`]
//! for client-to-backend bytes, [`SessionTracker::observe_server`] for
//! backend-to-client bytes. It starts right after the startup exchange (the
//! client has seen ReadyForQuery `I` and the startup ParameterStatus
//! values, which [`SessionTracker::new`] takes). It allocates only when
//! session state is created: a named statement confirmed, a ParameterStatus
//! value changed, a custom setting name first seen. Bodies it does not need
//! (DataRow, CopyData, Bind unless a flagged statement exists, Execute) are
//! skipped unread; Query and Parse texts get a token scan; CommandComplete
//! tags, ErrorResponse fields and ParameterStatus are read into small
//! buffers.
//!
//! What it knows, and when each fact is valid:
//!
//! | observable | meaning | valid |
//! |---|---|---|
//! | `client_at_boundary`, `server_at_boundary`, `*_bytes_to_boundary`, `last_*_tag`, `*_messages` | framing of each direction | always (0 / false once that direction's framing broke) |
//! | `requests_pending` | Query, Sync and FunctionCall sent and not yet answered by ReadyForQuery (a Sync swallowed by COPY FROM STDIN does not count) | always |
//! | `batch_open` | an extended-protocol message since the last Sync | always |
//! | `copy_state` | a COPY in progress on either side | always |
//! | `transaction_status` | status byte of the last ReadyForQuery | always |
//! | `terminate_seen` | the client sent Terminate | always |
//! | `at_idle_point` | all of: both at a boundary, nothing pending, no batch, no COPY, status `I`, no Terminate, in sync | always; the relay must add "no unwritten bytes" |
//! | `unnamed_statement`, `named_statements` | protocol-level prepared statements, each with its exact Parse message | at an idle point (in between, they reflect what the server confirmed so far) |
//! | `parameters` | ParameterStatus values the client has seen | always |
//! | `is_dirty`, `dirty_reasons` | a state-changing signal since the last `mark_clean` | always; snapshot at the next idle point, then `mark_clean` |
//! | `custom_settings`, `custom_settings_unknown` | placeholder setting names to read in a snapshot | always |
//! | `last_error`, `errors_seen` | severity and SQLSTATE of the last ErrorResponse | always |
//! | `last_command`, `commands_completed`, `transaction_control_commands` | class of CommandComplete tags | always |
//! | `state_bytes` | size of tracked state, against the session-state cap | always |
//! | `desync` | why request or statement tracking stopped (framing broken, or a pattern whose outcome is unknowable from the wire) | always; once set, the session never reaches an idle point again |
//!
//! ## Requests and statements
//!
//! Every Query, Sync and FunctionCall closes a *group* of client messages
//! that the backend answers with exactly one ReadyForQuery. Parse and Close
//! wait in a queue with their group until ParseComplete / CloseComplete
//! confirm them in order. An ErrorResponse makes the server skip the rest of
//! the group up to Sync, so the group's unconfirmed entries are dropped (a
//! failing Parse of an existing name, 42P05, leaves the old statement, as
//! the server does). The unnamed statement is dropped by every simple
//! Query and by a failed unnamed Parse. COPY FROM STDIN started by an
//! Execute swallows the Sync the client already sent; the group then stays
//! open until the Sync after the client's CopyDone or CopyFail.
//!
//! Two patterns cannot be followed from the wire, and set
//! [`SessionTracker::desync`] instead of guessing: an error in a group that
//! mixes extended-protocol messages with a simple Query or FunctionCall
//! before its Sync (did the server skip the Query?), and a client that
//! pipelines messages behind a COPY FROM STDIN request before the COPY
//! started. No driver does either.
//!
//! ## Dirty
//!
//! The tracker cannot know settings exactly (`SET LOCAL`, rolled-back
//! `SET`, `RESET ALL`, `set_config` inside functions), so it only knows
//! *that* something may have changed ([`DirtyReasons`]): a CommandComplete
//! of [`CommandClass::StateChanging`], a ParameterStatus, the keyword scan
//! (`set_config`, advisory locks, temporary tables made by `SELECT INTO` /
//! `CREATE TABLE AS`, custom setting names), a Bind of a statement the scan
//! flagged, a FunctionCall. The session then takes a snapshot at the next
//! idle point.
//!
//! # Using it (the session's side)
//!
//! 1. `SessionTracker::new(limits, startup_parameters)` when the relay
//!    starts; `observe_client` / `observe_server` on every forwarded byte.
//! 2. At an idle point (the relay holds no unwritten bytes and
//!    [`SessionTracker::at_idle_point`]) with [`SessionTracker::is_dirty`]:
//!    stop relaying, send [`snapshot::encode_snapshot`] (when it declines,
//!    the session is pinned, `state_too_large`), read the answer
//!    with [`snapshot::SnapshotDecoder`] (its bytes never reach the
//!    tracker; the messages it hands back via `take_forward` go to the
//!    client and through `observe_server`, like relayed bytes), then
//!    [`SessionTracker::apply_snapshot`] and [`snapshot::session_pins`].
//!    Keep the snapshot: it is what a move restores (a session never dirty
//!    restores from `SessionSnapshot::default()`).
//! 3. To move a movable session (idle point, clean, no pins): connect,
//!    send [`restore::encode_restore`], read with
//!    [`restore::RestoreDecoder`]; on success
//!    [`SessionTracker::sync_parameters`] gives the ParameterStatus
//!    messages to send the client before anything else, and the tracker
//!    carries on unchanged on the new backend (a fresh [`framing::Framer`]
//!    state is not needed: both streams are at a boundary).
//!
//! Known limits: values are restored as `E''` literals of the bytes the
//! backend sent, which is wrong for client encodings whose multibyte
//! characters contain `\` or `'` bytes (SJIS, BIG5, GBK); a Parse is
//! replayed with its parameter type OIDs, which only mean the same on a
//! server with the same catalog (a replica, the same DSQL cluster); a
//! statement is re-parsed under the restored `search_path`, not the one it
//! was first parsed under.
//!
//! # Snapshot
//!
//! [`snapshot::encode_snapshot`] writes the hidden requests (pipelined
//! simple Queries, the unnamed statement's Parse again when one exists,
//! Sync); [`snapshot::SnapshotDecoder`] reads the answer, bounded, into a
//! [`snapshot::SessionSnapshot`] and hands back the asynchronous messages
//! (notifications, notices, ParameterStatus) the client must still get.
//!
//! # Restore
//!
//! [`restore::encode_restore`] writes the exchange that rebuilds a session
//! on a new backend in one round trip; [`restore::RestoreDecoder`] reads
//! its answer: all or nothing, with the new backend's ParameterStatus
//! values, from which [`SessionTracker::sync_parameters`] makes what the
//! client must be told.

/// A set of named causes over one byte, each with a label value for logs
/// and metrics.
macro_rules! label_set {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$member_meta:meta])* $member:ident = $bit:literal => $label:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name(u8);

        impl $name {
            $( $(#[$member_meta])* pub const $member: Self = Self($bit); )*

            /// Every member with its label (to pre-create metric labels).
            pub const ALL: &'static [(Self, &'static str)] = &[$( (Self::$member, $label) ),*];

            pub fn is_empty(self) -> bool {
                self.0 == 0
            }

            /// Whether every member of `other` (not empty) is in `self`.
            pub fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0 && other.0 != 0
            }

            /// Labels of the members in `self`.
            pub fn labels(self) -> impl Iterator<Item = &'static str> {
                Self::ALL
                    .iter()
                    .filter(move |(member, _)| self.contains(*member))
                    .map(|(_, label)| *label)
            }
        }

        impl std::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                Self(self.0 | rhs.0)
            }
        }

        impl std::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: Self) {
                self.0 |= rhs.0;
            }
        }
    };
}

pub mod command;
mod exchange;
pub mod framing;
pub mod params;
pub mod restore;
mod scan;
pub mod server_error;
pub mod snapshot;
pub mod sql;
pub mod statements;
mod tracker;

pub use command::{classify_tag, CommandClass};
pub use params::ParameterValues;
pub use server_error::{ErrorSeverity, ServerError};
pub use statements::TrackedStatement;
pub use tracker::{
    CopyState, DesyncCause, DirtyReasons, Reconciled, SessionTracker, TrackerLimits,
};
