//! [`SessionTracker`]: the message-level view of one session, built from
//! the bytes the relay forwards in both directions.

use bytes::BytesMut;

use super::command::{classify_tag, CommandClass, TAG_PREFIX};
use super::framing::{FrameSink, Framer};
use super::params::ParameterValues;
use super::scan::KeywordScanner;
use super::server_error::{ErrorFieldsReader, ServerError};
use super::snapshot::{SessionSnapshot, UnnamedReparse};
use super::statements::{NameReader, StatementName, Statements, TrackedStatement};

/// Bounds on what the tracker copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerLimits {
    /// The largest single message (a Parse, a ParameterStatus) the tracker
    /// copies. A larger Parse is still tracked by name and size, without
    /// its bytes: the session cannot move while it exists, and
    /// [`SessionTracker::state_bytes`] counts its full size. Set it to the
    /// session-state cap (or a little more).
    pub max_capture: usize,
    /// The most custom setting names kept; past it the names are unknown.
    pub max_custom_settings: usize,
}

impl Default for TrackerLimits {
    fn default() -> Self {
        Self {
            max_capture: 256 * 1024 + 1,
            max_custom_settings: 64,
        }
    }
}

label_set! {
    /// Why the session's tracked state may differ from the backend's: what
    /// made it dirty since the last [`SessionTracker::mark_clean`].
    pub struct DirtyReasons {
        /// A CommandComplete tag of [`CommandClass::StateChanging`].
        COMMAND_TAG = 1 => "command_tag",
        /// The backend sent ParameterStatus while relaying.
        PARAMETER_STATUS = 2 => "parameter_status",
        /// The keyword scan of a Query or Parse text found `set_config`,
        /// `pg_advisory*`, a temporary table, or a custom setting name.
        KEYWORD = 4 => "keyword",
        /// A Bind of a statement whose text the keyword scan flagged.
        STATEMENT_BOUND = 8 => "statement_bound",
        /// A FunctionCall: its function (by OID) is unknowable here.
        FUNCTION_CALL = 16 => "function_call",
    }
}

/// Why the tracker stopped following the session's requests and
/// statements. Once set it stays: the session can never be at an idle
/// point again (it keeps working, relayed as bytes; it just never moves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesyncCause {
    /// A client message header had an impossible length.
    ClientFraming,
    /// A backend message header had an impossible length.
    ServerFraming,
    /// ReadyForQuery with no request outstanding.
    UnexpectedReadyForQuery,
    /// ReadyForQuery whose body is not one of `I`, `T`, `E`.
    MalformedReadyForQuery,
    /// ParseComplete or CloseComplete matching no queued Parse or Close.
    UnexpectedCompletion,
    /// ReadyForQuery while Parse/Close of its group were unanswered and no
    /// error had been seen.
    UnansweredWithoutError,
    /// An ErrorResponse in a group that mixes extended-protocol messages
    /// with a simple Query or FunctionCall before its Sync: whether the
    /// server skipped that Query is unknowable.
    ErrorInMixedGroup,
    /// COPY FROM STDIN started while the client had already pipelined
    /// other messages after the COPY's request (the server reads them as
    /// COPY data and fails).
    PipelinedIntoCopy,
    /// During COPY FROM STDIN the client sent a message COPY does not
    /// accept.
    UnexpectedDuringCopy,
}

impl DesyncCause {
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientFraming => "client_framing",
            Self::ServerFraming => "server_framing",
            Self::UnexpectedReadyForQuery => "unexpected_ready_for_query",
            Self::MalformedReadyForQuery => "malformed_ready_for_query",
            Self::UnexpectedCompletion => "unexpected_completion",
            Self::UnansweredWithoutError => "unanswered_without_error",
            Self::ErrorInMixedGroup => "error_in_mixed_group",
            Self::PipelinedIntoCopy => "pipelined_into_copy",
            Self::UnexpectedDuringCopy => "unexpected_during_copy",
        }
    }
}

/// A COPY in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    None,
    /// COPY FROM STDIN (CopyInResponse `G`).
    In,
    /// COPY TO STDOUT (CopyOutResponse `H`).
    Out,
    /// Replication's COPY BOTH (CopyBothResponse `W`).
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminator {
    Sync,
    Query,
    FunctionCall,
}

/// What the client sent since its last request terminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Since {
    Nothing,
    CopyDataOnly,
    Other,
}

#[derive(Debug, Clone, Copy)]
struct LastGroup {
    terminator: Terminator,
    extended: bool,
}

#[derive(Debug, Clone, Copy)]
enum ClientBody {
    Skip,
    Query,
    Parse { name: NameReader, query_done: bool },
    Bind { portal_done: bool, name: NameReader },
    Close { kind: Option<u8>, name: NameReader },
}

#[derive(Debug, Clone, Copy)]
enum ServerBody {
    Skip,
    Tag,
    Error,
    Ready,
    Parameter,
}

/// Everything but the two framers, so each direction's sink can borrow it.
#[derive(Debug, Clone)]
struct State {
    limits: TrackerLimits,
    desync: Option<DesyncCause>,
    terminated: bool,

    // Requests: every client request terminator (Query, Sync,
    // FunctionCall) opens a group the backend closes with ReadyForQuery.
    sent: u64,
    answered: u64,
    group_extended: bool,
    open_batch: bool,
    after_other: bool,
    since: Since,
    last_group: LastGroup,
    mixed_through: Option<u64>,
    error_in_group: bool,
    status: u8,

    server_copy: CopyState,
    client_copy: bool,

    statements: Statements,
    parameters: ParameterValues,
    custom_settings: Vec<u8>,
    custom_setting_count: usize,
    custom_settings_unknown: bool,
    overflow_bytes: usize,

    dirty: DirtyReasons,
    last_error: Option<ServerError>,
    errors: u64,
    last_command: CommandClass,
    commands: u64,
    transaction_controls: u64,

    // Per-message parsing.
    client_body: ClientBody,
    server_body: ServerBody,
    scanner: KeywordScanner,
    error_reader: ErrorFieldsReader,
    tag: [u8; TAG_PREFIX],
    tag_len: usize,
    ready_status: u8,
    scratch: Vec<u8>,
}

/// The message-level view of one session, from the bytes relayed in both
/// directions. See the [module documentation](super) for what each
/// observable means and when it is valid.
#[derive(Debug, Clone)]
pub struct SessionTracker {
    client: Framer,
    server: Framer,
    state: State,
}

/// Result of [`SessionTracker::reconcile_statements`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reconciled {
    /// Tracked statements the server no longer has (SQL `DEALLOCATE`,
    /// `DISCARD ALL`): now dropped from the tracker too.
    pub removed: usize,
    /// Statements the server has that the tracker never saw confirmed:
    /// their bytes are unknown, so the session cannot move.
    pub unknown: usize,
}

impl SessionTracker {
    /// A tracker for a session whose startup just ended: the client saw
    /// `startup_parameters` and a ReadyForQuery `I`.
    pub fn new(limits: TrackerLimits, startup_parameters: ParameterValues) -> Self {
        Self {
            client: Framer::default(),
            server: Framer::default(),
            state: State {
                limits,
                desync: None,
                terminated: false,
                sent: 0,
                answered: 0,
                group_extended: false,
                open_batch: false,
                after_other: false,
                since: Since::Nothing,
                last_group: LastGroup {
                    terminator: Terminator::Sync,
                    extended: false,
                },
                mixed_through: None,
                error_in_group: false,
                status: b'I',
                server_copy: CopyState::None,
                client_copy: false,
                statements: Statements::default(),
                parameters: startup_parameters,
                custom_settings: Vec::new(),
                custom_setting_count: 0,
                custom_settings_unknown: false,
                overflow_bytes: 0,
                dirty: DirtyReasons::default(),
                last_error: None,
                errors: 0,
                last_command: CommandClass::Other,
                commands: 0,
                transaction_controls: 0,
                client_body: ClientBody::Skip,
                server_body: ServerBody::Skip,
                scanner: KeywordScanner::default(),
                error_reader: ErrorFieldsReader::default(),
                tag: [0; TAG_PREFIX],
                tag_len: 0,
                ready_status: b'I',
                scratch: Vec::new(),
            },
        }
    }

    /// Feeds bytes forwarded from the client to the backend, in order, in
    /// any split.
    #[inline]
    pub fn observe_client(&mut self, bytes: &[u8]) {
        self.client.feed(bytes, &mut ClientSide(&mut self.state));
        if self.client.is_broken() {
            self.state.desync(DesyncCause::ClientFraming);
        }
    }

    /// Feeds bytes forwarded from the backend to the client, in order, in
    /// any split.
    #[inline]
    pub fn observe_server(&mut self, bytes: &[u8]) {
        self.server.feed(bytes, &mut ServerSide(&mut self.state));
        if self.server.is_broken() {
            self.state.desync(DesyncCause::ServerFraming);
        }
    }

    // --- Framing -------------------------------------------------------

    /// The client stream stopped between two messages.
    pub fn client_at_boundary(&self) -> bool {
        self.client.at_boundary()
    }

    /// The backend stream stopped between two messages.
    pub fn server_at_boundary(&self) -> bool {
        self.server.at_boundary()
    }

    /// Bytes that surely belong to the client's current message (0 at a
    /// boundary or when its framing is broken).
    pub fn client_bytes_to_boundary(&self) -> usize {
        self.client.bytes_to_boundary()
    }

    /// Bytes that surely belong to the backend's current message (0 at a
    /// boundary or when its framing is broken).
    pub fn server_bytes_to_boundary(&self) -> usize {
        self.server.bytes_to_boundary()
    }

    /// Client messages whose header has passed.
    pub fn client_messages(&self) -> u64 {
        self.client.messages()
    }

    /// Backend messages whose header has passed.
    pub fn server_messages(&self) -> u64 {
        self.server.messages()
    }

    /// Type byte of the client's last message (0 if none).
    pub fn last_client_tag(&self) -> u8 {
        self.client.last_tag()
    }

    /// Type byte of the backend's last message (0 if none).
    pub fn last_server_tag(&self) -> u8 {
        self.server.last_tag()
    }

    /// Either direction could not be framed (a message length below 4).
    pub fn is_broken(&self) -> bool {
        self.client.is_broken() || self.server.is_broken()
    }

    // --- Requests --------------------------------------------------------

    /// Requests sent (simple Query, Sync, FunctionCall) that the backend
    /// has not yet answered with ReadyForQuery.
    pub fn requests_pending(&self) -> u64 {
        self.state.sent - self.state.answered
    }

    /// An extended-protocol message (Parse, Bind, Describe, Execute, Close,
    /// Flush) was sent since the last Sync.
    pub fn batch_open(&self) -> bool {
        self.state.open_batch
    }

    /// The COPY in progress, from either side's point of view: a COPY FROM
    /// STDIN counts until both the backend finished it and the client sent
    /// CopyDone or CopyFail.
    pub fn copy_state(&self) -> CopyState {
        match (self.state.server_copy, self.state.client_copy) {
            (CopyState::None, true) => CopyState::In,
            (state, _) => state,
        }
    }

    /// Transaction status of the last ReadyForQuery (`I`, `T` or `E`; `I`
    /// before the first one, as the startup ended with `I`).
    pub fn transaction_status(&self) -> u8 {
        self.state.status
    }

    /// The client sent Terminate.
    pub fn terminate_seen(&self) -> bool {
        self.state.terminated
    }

    /// Why the tracker lost track of the session, if it did (framing
    /// included). A desynchronized session is never at an idle point.
    pub fn desync(&self) -> Option<DesyncCause> {
        self.state.desync
    }

    /// Both streams rest between messages, every request has been answered,
    /// no batch is open, no COPY runs, the last ReadyForQuery said `I`, the
    /// client did not send Terminate, and the tracker is in sync. The relay
    /// must also hold no unwritten bytes for this to be an idle point.
    pub fn at_idle_point(&self) -> bool {
        let s = &self.state;
        s.desync.is_none()
            && self.client.at_boundary()
            && self.server.at_boundary()
            && !s.terminated
            && s.sent == s.answered
            && !s.open_batch
            && s.server_copy == CopyState::None
            && !s.client_copy
            && s.status == b'I'
            && s.statements.pending_is_empty()
    }

    // --- Prepared statements ---------------------------------------------

    /// The unnamed statement, if one exists (valid at an idle point).
    pub fn unnamed_statement(&self) -> Option<TrackedStatement<'_>> {
        self.state.statements.unnamed()
    }

    /// Named protocol-level statements the server confirmed, in no
    /// particular order (valid at an idle point).
    pub fn named_statements(&self) -> impl Iterator<Item = (&[u8], TrackedStatement<'_>)> {
        self.state
            .statements
            .named()
            .map(|(name, statement)| (name.as_bytes(), statement))
    }

    pub fn named_statement_count(&self) -> usize {
        self.state.statements.named_count()
    }

    /// Whether the named statement exists (names compare as the server
    /// keys them: the first 63 bytes).
    pub fn has_named_statement(&self, name: &[u8]) -> bool {
        self.state.statements.contains(&StatementName::new(name))
    }

    /// Aligns the named statements with the protocol-level names a snapshot
    /// found on the server (`pg_prepared_statements` where `from_sql` is
    /// false). Call it only with a snapshot taken at an idle point.
    pub fn reconcile_statements<'a>(
        &mut self,
        server_names: impl IntoIterator<Item = &'a [u8]>,
    ) -> Reconciled {
        let on_server: Vec<StatementName> =
            server_names.into_iter().map(StatementName::new).collect();
        let removed = self
            .state
            .statements
            .retain_named(|name| on_server.contains(name));
        let unknown = on_server
            .iter()
            .filter(|name| !self.state.statements.contains(name))
            .count();
        Reconciled { removed, unknown }
    }

    /// Brings the tracker in line with a snapshot taken at an idle point
    /// and marks it clean: drops statements the server no longer has, and
    /// the unnamed statement if its re-Parse failed. The returned
    /// `unknown` count feeds [`super::snapshot::session_pins`].
    pub fn apply_snapshot(&mut self, snapshot: &SessionSnapshot) -> Reconciled {
        let reconciled =
            self.reconcile_statements(snapshot.protocol_statements.iter().map(Vec::as_slice));
        if let UnnamedReparse::Failed(_) = snapshot.unnamed {
            self.state.statements.drop_unnamed();
        }
        self.mark_clean();
        reconciled
    }

    // --- Parameters --------------------------------------------------------

    /// The ParameterStatus values the client has seen: its startup answer
    /// and every ParameterStatus relayed since.
    pub fn parameters(&self) -> &ParameterValues {
        &self.state.parameters
    }

    /// Records a ParameterStatus the proxy itself sent the client (not
    /// relayed through [`SessionTracker::observe_server`]), without making
    /// the session dirty.
    pub fn record_parameter_status(&mut self, name: &[u8], value: &[u8]) {
        self.state.parameters.set(name, value);
    }

    /// Appends to `out` a ParameterStatus for every value `backend` reports
    /// differently from what the client has seen, and records them as seen.
    /// Send `out` to the client before anything else after a move. Returns
    /// how many.
    pub fn sync_parameters(&mut self, backend: &ParameterValues, out: &mut BytesMut) -> usize {
        let count = backend.encode_differences(&self.state.parameters, out);
        for (name, value) in backend.iter() {
            self.state.parameters.set(name, value);
        }
        count
    }

    // --- Dirty -------------------------------------------------------------

    /// Something may have changed session state since the last
    /// [`SessionTracker::mark_clean`]: a snapshot is due at the next idle
    /// point.
    pub fn is_dirty(&self) -> bool {
        !self.state.dirty.is_empty()
    }

    pub fn dirty_reasons(&self) -> DirtyReasons {
        self.state.dirty
    }

    /// The session took a snapshot at an idle point: nothing is unknown
    /// any more.
    pub fn mark_clean(&mut self) {
        self.state.dirty = DirtyReasons::default();
    }

    /// Custom (dotted, placeholder) setting names seen in `SET`, `RESET`
    /// or `set_config` texts, lower-cased, for the snapshot to read with
    /// `current_setting(name, true)`: PostgreSQL 15 lists placeholders in
    /// no catalog view.
    pub fn custom_settings(&self) -> impl Iterator<Item = &[u8]> + Clone {
        self.state
            .custom_settings
            .split(|b| *b == 0)
            .filter(|name| !name.is_empty())
    }

    /// A `set_config` with a non-literal name, or more custom setting names
    /// than [`TrackerLimits::max_custom_settings`], was seen: the session's
    /// custom settings cannot all be known (the session is unclassifiable).
    pub fn custom_settings_unknown(&self) -> bool {
        self.state.custom_settings_unknown
    }

    // --- Errors and commands ---------------------------------------------

    /// Severity and SQLSTATE of the last ErrorResponse relayed.
    pub fn last_error(&self) -> Option<ServerError> {
        self.state.last_error
    }

    /// ErrorResponses relayed so far.
    pub fn errors_seen(&self) -> u64 {
        self.state.errors
    }

    /// Class of the last CommandComplete tag.
    pub fn last_command(&self) -> CommandClass {
        self.state.last_command
    }

    /// CommandCompletes relayed so far.
    pub fn commands_completed(&self) -> u64 {
        self.state.commands
    }

    /// CommandCompletes of [`CommandClass::TransactionControl`] so far:
    /// compare two readings to know whether any passed in between.
    pub fn transaction_control_commands(&self) -> u64 {
        self.state.transaction_controls
    }

    // --- Size --------------------------------------------------------------

    /// Bytes of tracked state: statement names and Parse messages (full
    /// size even when too large to keep), ParameterStatus names and
    /// values, custom setting names. Compare it with the session-state cap.
    pub fn state_bytes(&self) -> usize {
        let s = &self.state;
        s.statements.bytes() + s.parameters.byte_len() + s.custom_settings.len() + s.overflow_bytes
    }
}

struct ClientSide<'a>(&'a mut State);
struct ServerSide<'a>(&'a mut State);

impl FrameSink for ClientSide<'_> {
    #[inline]
    fn start(&mut self, tag: u8, body_len: usize) -> bool {
        self.0.client_start(tag, body_len)
    }
    #[inline]
    fn body(&mut self, piece: &[u8]) {
        self.0.client_body(piece)
    }
    #[inline]
    fn end(&mut self, _tag: u8) {
        self.0.client_end()
    }
}

impl FrameSink for ServerSide<'_> {
    #[inline]
    fn start(&mut self, tag: u8, body_len: usize) -> bool {
        self.0.server_start(tag, body_len)
    }
    #[inline]
    fn body(&mut self, piece: &[u8]) {
        self.0.server_body(piece)
    }
    #[inline]
    fn end(&mut self, _tag: u8) {
        self.0.server_end()
    }
}

impl State {
    fn desync(&mut self, cause: DesyncCause) {
        if self.desync.is_none() {
            self.desync = Some(cause);
        }
    }

    // --- Client to backend ------------------------------------------------

    #[inline]
    fn client_start(&mut self, tag: u8, body_len: usize) -> bool {
        self.client_body = ClientBody::Skip;
        if tag == b'X' {
            self.terminated = true;
            return false;
        }
        if self.desync.is_some() || self.terminated {
            return false;
        }
        if self.client_copy {
            match tag {
                b'd' => {}
                b'c' | b'f' => {
                    self.client_copy = false;
                    self.copy_data_sent();
                }
                // COPY FROM STDIN ignores them, for clients that send them
                // without noticing that the command was a COPY.
                b'S' | b'H' => {}
                _ => self.desync(DesyncCause::UnexpectedDuringCopy),
            }
            return false;
        }
        match tag {
            b'Q' => {
                self.statements.query(self.sent);
                self.terminator(Terminator::Query);
                self.scanner.reset();
                self.client_body = ClientBody::Query;
                true
            }
            b'S' => {
                self.terminator(Terminator::Sync);
                false
            }
            b'B' => {
                self.extended();
                self.after_other = true;
                if self.statements.state_changing_count() > 0 {
                    self.client_body = ClientBody::Bind {
                        portal_done: false,
                        name: NameReader::default(),
                    };
                    true
                } else {
                    false
                }
            }
            b'E' | b'D' => {
                self.extended();
                self.after_other = true;
                false
            }
            b'P' => {
                self.extended();
                self.statements
                    .parse_started(body_len, self.limits.max_capture);
                self.scanner.reset();
                self.client_body = ClientBody::Parse {
                    name: NameReader::default(),
                    query_done: false,
                };
                true
            }
            b'C' => {
                self.extended();
                self.client_body = ClientBody::Close {
                    kind: None,
                    name: NameReader::default(),
                };
                true
            }
            b'H' => {
                self.extended();
                false
            }
            b'F' => {
                self.terminator(Terminator::FunctionCall);
                self.dirty |= DirtyReasons::FUNCTION_CALL;
                false
            }
            // Outside COPY the server ignores them (after a failed COPY the
            // client may still be sending).
            b'd' | b'c' | b'f' => {
                self.copy_data_sent();
                false
            }
            _ => {
                self.since = Since::Other;
                false
            }
        }
    }

    fn copy_data_sent(&mut self) {
        if self.since == Since::Nothing {
            self.since = Since::CopyDataOnly;
        }
    }

    fn extended(&mut self) {
        self.open_batch = true;
        self.group_extended = true;
        self.since = Since::Other;
    }

    fn terminator(&mut self, terminator: Terminator) {
        let group = self.sent;
        if self.group_extended && terminator != Terminator::Sync {
            if self.error_in_group && self.answered == group {
                self.desync(DesyncCause::ErrorInMixedGroup);
            }
            self.mixed_through = Some(group);
        }
        if terminator == Terminator::Sync {
            self.open_batch = false;
        }
        self.last_group = LastGroup {
            terminator,
            extended: self.group_extended,
        };
        self.group_extended = false;
        self.after_other = false;
        self.since = Since::Nothing;
        self.sent += 1;
    }

    #[inline]
    fn client_body(&mut self, piece: &[u8]) {
        match &mut self.client_body {
            ClientBody::Skip => {}
            ClientBody::Query => self.scanner.feed(piece),
            ClientBody::Parse { name, query_done } => {
                self.statements.parse_piece(piece);
                let mut rest = piece;
                if !name.done {
                    rest = &rest[name.feed(rest)..];
                }
                if name.done && !*query_done && !rest.is_empty() {
                    match rest.iter().position(|b| *b == 0) {
                        Some(nul) => {
                            self.scanner.feed(&rest[..nul]);
                            *query_done = true;
                        }
                        None => self.scanner.feed(rest),
                    }
                }
            }
            ClientBody::Bind { portal_done, name } => {
                let mut rest = piece;
                if !*portal_done {
                    match rest.iter().position(|b| *b == 0) {
                        Some(nul) => {
                            *portal_done = true;
                            rest = &rest[nul + 1..];
                        }
                        None => return,
                    }
                }
                name.feed(rest);
            }
            ClientBody::Close { kind, name } => {
                let mut rest = piece;
                if kind.is_none() {
                    *kind = Some(rest[0]);
                    rest = &rest[1..];
                }
                name.feed(rest);
            }
        }
    }

    fn client_end(&mut self) {
        // Copy out only what each case needs: the body state is large.
        match self.client_body {
            ClientBody::Skip => return,
            ClientBody::Query => {
                self.scanner.finish();
                self.apply_scan();
            }
            ClientBody::Parse { name, .. } => {
                self.scanner.finish();
                self.apply_scan();
                self.statements.parse_finished(
                    self.sent,
                    self.after_other,
                    name.name,
                    self.scanner.hit,
                );
                self.after_other = false;
            }
            ClientBody::Bind { name, .. } => {
                if name.done && self.statements.binds_state_changing(&name.name) {
                    self.dirty |= DirtyReasons::STATEMENT_BOUND;
                }
            }
            ClientBody::Close { kind, name } => {
                let statement = (kind == Some(b'S')).then_some(name.name);
                self.statements
                    .close(self.sent, self.after_other, statement);
                self.after_other = false;
            }
        }
        self.client_body = ClientBody::Skip;
    }

    fn apply_scan(&mut self) {
        if self.scanner.hit {
            self.dirty |= DirtyReasons::KEYWORD;
        }
        if self.scanner.unknown_setting {
            self.custom_settings_unknown = true;
            self.dirty |= DirtyReasons::KEYWORD;
        }
        if self.scanner.settings.is_empty() {
            return;
        }
        self.dirty |= DirtyReasons::KEYWORD;
        for name in self.scanner.settings.split(|b| *b == 0) {
            if name.is_empty()
                || self
                    .custom_settings
                    .split(|b| *b == 0)
                    .any(|known| known == name)
            {
                continue;
            }
            if self.custom_setting_count >= self.limits.max_custom_settings {
                self.custom_settings_unknown = true;
                continue;
            }
            self.custom_settings.extend_from_slice(name);
            self.custom_settings.push(0);
            self.custom_setting_count += 1;
        }
    }

    // --- Backend to client ------------------------------------------------

    #[inline]
    fn server_start(&mut self, tag: u8, body_len: usize) -> bool {
        self.server_body = ServerBody::Skip;
        if self.desync.is_some() {
            // Keep the transaction status: it is a fact of the stream.
            if tag == b'Z' && body_len == 1 {
                self.server_body = ServerBody::Ready;
                return true;
            }
            return false;
        }
        match tag {
            b'C' => {
                self.tag_len = 0;
                self.server_body = ServerBody::Tag;
                true
            }
            b'Z' => {
                if body_len == 1 {
                    self.server_body = ServerBody::Ready;
                    true
                } else {
                    self.desync(DesyncCause::MalformedReadyForQuery);
                    false
                }
            }
            b'1' => {
                if self.statements.parse_complete().is_err() {
                    self.desync(DesyncCause::UnexpectedCompletion);
                }
                false
            }
            b'3' => {
                if self.statements.close_complete().is_err() {
                    self.desync(DesyncCause::UnexpectedCompletion);
                }
                false
            }
            b'E' => {
                self.error_reader.reset();
                self.server_body = ServerBody::Error;
                true
            }
            b'S' => {
                self.dirty |= DirtyReasons::PARAMETER_STATUS;
                if body_len > self.limits.max_capture {
                    self.overflow_bytes = self.overflow_bytes.saturating_add(body_len);
                    false
                } else {
                    self.scratch.clear();
                    self.server_body = ServerBody::Parameter;
                    true
                }
            }
            b'G' => {
                self.copy_in_started(CopyState::In);
                false
            }
            b'W' => {
                self.copy_in_started(CopyState::Both);
                false
            }
            b'H' => {
                self.server_copy = CopyState::Out;
                false
            }
            // CopyDone from the server: its side of the COPY is over.
            b'c' => {
                self.server_copy = CopyState::None;
                false
            }
            _ => false,
        }
    }

    #[inline]
    fn server_body(&mut self, piece: &[u8]) {
        match self.server_body {
            ServerBody::Skip => {}
            ServerBody::Tag => {
                let n = piece.len().min(TAG_PREFIX - self.tag_len);
                self.tag[self.tag_len..self.tag_len + n].copy_from_slice(&piece[..n]);
                self.tag_len += n;
            }
            ServerBody::Ready => self.ready_status = piece[0],
            ServerBody::Error => self.error_reader.feed(piece),
            ServerBody::Parameter => self.scratch.extend_from_slice(piece),
        }
    }

    fn server_end(&mut self) {
        match std::mem::replace(&mut self.server_body, ServerBody::Skip) {
            ServerBody::Skip => {}
            ServerBody::Tag => {
                let class = classify_tag(&self.tag[..self.tag_len]);
                self.commands += 1;
                match class {
                    CommandClass::StateChanging => self.dirty |= DirtyReasons::COMMAND_TAG,
                    CommandClass::TransactionControl => self.transaction_controls += 1,
                    CommandClass::Other => {}
                }
                self.last_command = class;
                self.server_copy = CopyState::None;
            }
            ServerBody::Ready => self.ready_for_query(self.ready_status),
            ServerBody::Error => {
                self.last_error = Some(self.error_reader.finish());
                self.errors += 1;
                self.server_copy = CopyState::None;
                self.error();
            }
            ServerBody::Parameter => {
                self.parameters.apply_message_body(&self.scratch);
                if self.scratch.capacity() > 4096 {
                    self.scratch = Vec::new();
                }
            }
        }
    }

    fn error(&mut self) {
        // An error with no request in progress (a FATAL at idle: shutdown,
        // idle_session_timeout) answers no group.
        let in_progress = self.sent > self.answered || self.group_extended;
        if !in_progress {
            return;
        }
        if self
            .mixed_through
            .is_some_and(|group| group >= self.answered)
        {
            self.desync(DesyncCause::ErrorInMixedGroup);
            return;
        }
        self.error_in_group = true;
        self.statements.error(self.answered);
    }

    fn ready_for_query(&mut self, status: u8) {
        if !matches!(status, b'I' | b'T' | b'E') {
            self.desync(DesyncCause::MalformedReadyForQuery);
            return;
        }
        self.status = status;
        if self.desync.is_some() {
            return;
        }
        if self.sent == self.answered {
            self.desync(DesyncCause::UnexpectedReadyForQuery);
            return;
        }
        let unanswered = self.statements.group_answered(self.answered);
        if unanswered && !self.error_in_group {
            self.desync(DesyncCause::UnansweredWithoutError);
        }
        self.answered += 1;
        self.error_in_group = false;
        self.server_copy = CopyState::None;
    }

    /// CopyInResponse or CopyBothResponse: from now on the server reads
    /// COPY data from the client, and ignores Sync and Flush until the
    /// client's CopyDone or CopyFail. When the COPY came from an Execute
    /// whose Sync the client already sent, that Sync is swallowed: the
    /// group stays open until the Sync the client sends after the COPY.
    fn copy_in_started(&mut self, state: CopyState) {
        self.server_copy = state;
        let group = self.answered;
        let clean = if self.sent == group + 1 {
            match (
                self.last_group.terminator,
                self.last_group.extended,
                self.since,
            ) {
                (Terminator::Sync, true, Since::Nothing) => {
                    self.sent -= 1;
                    self.open_batch = true;
                    self.group_extended = true;
                    self.after_other = true;
                    self.since = Since::Other;
                    true
                }
                (Terminator::Query, false, Since::Nothing | Since::CopyDataOnly) => true,
                _ => false,
            }
        } else {
            // An Execute answered before its Sync (after a Flush).
            self.sent == group && self.group_extended
        };
        if clean {
            self.client_copy = true;
        } else {
            self.desync(DesyncCause::PipelinedIntoCopy);
        }
    }
}
