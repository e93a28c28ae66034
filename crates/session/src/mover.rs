//! Moving a session to a new backend connection: when it must (its
//! backend's lifetime is over, its endpoint went down, was drained or
//! removed, its writer was demoted, its backend vanished while it was
//! idle) and whether it can (an idle point, state known, nothing pinned).
//!
//! A move is made only at an idle point: the client is between
//! transactions, nothing is in flight, no message is half-relayed. Moves
//! away from a backend that is gone or must not be used are *lazy*: the
//! session waits for the client's next message (held, not forwarded),
//! then connects through the connect loop (routing, connect-rate
//! admission, credentials), restores the state and forwards the message
//! to the new backend. A lifetime move is *make before break*: the new
//! connection is made in the background while the session keeps relaying,
//! and swapped in at the next idle point.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::BytesMut;
use dsql_proxy_config::OnEndpointDown;
use dsql_proxy_metrics::IntGauge;
use dsql_proxy_protocol::backend::ErrorFields;
use dsql_proxy_protocol::{messages, sqlstate, PgError};
use dsql_proxy_routing::{DownWatch, Endpoint, PassiveSignal};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::cancel::{CancelTarget, Registration};
use crate::connect::{self, Connected, Login};
use crate::continuity::{self, PinGauge, SessionState, SnapshotResult};
use crate::drain::CloseSignal;
use crate::io::send;
use crate::relay::{Relay, RelayEnd};
use crate::role::Intent;
use crate::session::Eviction;
use crate::stream::ClientStream;
use crate::{ProxyContext, SessionError};
use dsql_proxy_connector::{BackendKey, BackendStream};

/// Why a session moved (the `sessions_moved_total{reason}` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveReason {
    Lifetime,
    EndpointDown,
    Drained,
    WriterChanged,
    /// The backend closed or failed while the session was idle, before
    /// the probes said anything.
    BackendLost,
}

impl MoveReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Lifetime => "lifetime",
            Self::EndpointDown => "endpoint_down",
            Self::Drained => "drained",
            Self::WriterChanged => "writer_changed",
            Self::BackendLost => "backend_lost",
        }
    }
}

/// What a lazy move does when it cannot move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The old backend is alive and may be used: the held message goes to
    /// it, and the session stays.
    KeepOld,
    /// The old backend is gone or must not be used: the client is told
    /// (FATAL) and the session ends.
    Close,
}

/// Whether sessions track their state at all (they cost a token scan of
/// query texts): something must be able to move them.
pub fn continuity_enabled(ctx: &ProxyContext) -> bool {
    ctx.on_endpoint_down == OnEndpointDown::Move
        || !ctx.server_lifetime.is_zero()
        || ctx.global.is_some()
}

/// What woke the session's loop.
pub enum Wake {
    Relay(RelayEnd),
    /// The role watch fired (`true`) or closed (`false`).
    Role(bool),
    /// The down watch fired (`true`) or closed (`false`).
    Down(bool),
    Drains,
    Lifetime,
    Spare(Result<Connected, SessionError>),
    Shutdown,
}

/// What the session's loop does next.
pub enum Step {
    Continue,
    End(Result<RelayEnd, Eviction>),
}

impl Step {
    /// `Continue`, or the relay's own end when the move machinery did not
    /// end the session itself.
    pub fn or_end(self, end: RelayEnd) -> Step {
        match self {
            Step::Continue => Step::Continue,
            Step::End(Ok(RelayEnd::IdlePoint)) => Step::End(Ok(end)),
            other => other,
        }
    }
}

/// Where the session is relayed to now, and the watches that go with it.
pub struct Home {
    pub endpoint: Arc<Endpoint>,
    pub role: Option<DownWatch>,
    pub down: Option<DownWatch>,
    pub drains: Option<watch::Receiver<u64>>,
    active: IntGauge,
}

impl Home {
    pub fn new(ctx: &ProxyContext, endpoint: Arc<Endpoint>, role: Option<DownWatch>) -> Self {
        let active = ctx
            .metrics
            .sessions_active
            .with_label_values(&[endpoint.name.as_str(), endpoint.region_label()]);
        active.inc();
        let down = match ctx.on_endpoint_down {
            OnEndpointDown::Keep => None,
            _ => ctx.router.watch_down(endpoint.id),
        };
        let drains = match ctx.on_endpoint_down {
            OnEndpointDown::Move => ctx.router.watch_drains(),
            _ => None,
        };
        Self {
            endpoint,
            role,
            down,
            drains,
            active,
        }
    }

    /// The endpoint is still configured (a reload did not remove it).
    pub fn endpoint_exists(&self, ctx: &ProxyContext) -> bool {
        ctx.router.endpoint(self.endpoint.id).is_some()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// Resolves with `true` when `watch` fires, `false` (once; the watch is
/// then dropped) when its sender is gone; never without a watch.
pub async fn signal(watch: &mut Option<DownWatch>) -> bool {
    let Some(w) = watch.as_mut() else {
        return std::future::pending().await;
    };
    if w.changed().await.is_ok() {
        return true;
    }
    *watch = None;
    false
}

pub async fn drains_changed(drains: &mut Option<watch::Receiver<u64>>) {
    let Some(w) = drains.as_mut() else {
        return std::future::pending().await;
    };
    if w.changed().await.is_err() {
        *drains = None;
        std::future::pending::<()>().await;
    }
}

pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

pub type Connecting<'a> =
    Pin<Box<dyn Future<Output = Result<Connected, SessionError>> + Send + 'a>>;

pub async fn connecting(
    connecting: &mut Option<Connecting<'_>>,
) -> Result<Connected, SessionError> {
    let Some(future) = connecting.as_mut() else {
        return std::future::pending().await;
    };
    let result = future.await;
    *connecting = None;
    result
}

/// A session's move state.
pub struct Mover<'a> {
    ctx: &'a ProxyContext,
    login: &'a Login,
    intent: Intent,
    registration: Option<Registration>,
    pub state: SessionState,
    pins: PinGauge<'a>,
    /// When the backend's lifetime ends (a lifetime move starts).
    pub move_at: Option<Instant>,
    /// The lifetime move's new connection, being made.
    pub connecting: Option<Connecting<'a>>,
    /// The lifetime move's new connection, made: swapped in at the next
    /// idle point.
    pub spare: Option<Connected>,
    /// The endpoint was drained or removed by a reload: it is still
    /// alive, so the session moves at its next idle point, and stays if it
    /// cannot.
    pub leave_pending: Option<MoveReason>,
    /// The current backend's cancel key and login time (for the pool).
    pub backend_key: Option<BackendKey>,
    pub backend_born: Instant,
}

impl<'a> Mover<'a> {
    pub fn new(
        ctx: &'a ProxyContext,
        login: &'a Login,
        intent: Intent,
        registration: Option<Registration>,
        backend_key: Option<BackendKey>,
        backend_born: Instant,
    ) -> Self {
        let mut mover = Self {
            ctx,
            login,
            intent,
            registration,
            state: SessionState::default(),
            pins: PinGauge::new(&ctx.metrics),
            move_at: None,
            connecting: None,
            spare: None,
            leave_pending: None,
            backend_key,
            backend_born,
        };
        mover.arm_lifetime();
        mover
    }

    /// Counted from the backend's login, not the session's start: a
    /// reused connection keeps the age it has.
    fn arm_lifetime(&mut self) {
        self.move_at =
            (continuity_enabled(self.ctx) && !self.ctx.server_lifetime.is_zero()).then(|| {
                self.backend_born
                    + continuity::jittered_lifetime(self.ctx.server_lifetime, self.ctx.kind)
            });
    }

    /// Tries the lifetime move again later.
    pub fn retry_later(&mut self) {
        if !self.ctx.server_lifetime.is_zero() {
            self.move_at = Some(Instant::now() + continuity::retry_delay(self.ctx.server_lifetime));
        }
    }

    /// Whether the session's state is known and nothing pins it. Call at
    /// an idle point.
    pub fn movable(&self, relay: &SessionRelay<'_>) -> bool {
        self.state.pins.is_empty() && relay.session().is_some_and(|s| !s.is_dirty())
    }

    /// Counts a session that had to leave its backend and cannot move.
    pub fn refused(&self, relay: &SessionRelay<'_>) {
        let ctx = self.ctx;
        if relay.session().is_none() {
            return;
        }
        let cause = if !relay.at_idle_point() {
            "busy"
        } else if !self.state.pins.is_empty() {
            "pinned"
        } else {
            "state_unknown"
        };
        ctx.metrics
            .session_moves_failed_total
            .with_label_values(&[cause])
            .inc();
        debug!(cause, pins = ?self.state.pins.labels().collect::<Vec<_>>(), "session cannot move");
    }

    pub fn failed(&self, reason: MoveReason, cause: &str, detail: &str) {
        let ctx = self.ctx;
        ctx.metrics
            .session_moves_failed_total
            .with_label_values(&[cause])
            .inc();
        warn!(reason = %reason.label(), %cause, error = %detail, "session move failed");
    }

    fn set_pins(&mut self) {
        self.pins.set(self.state.pins);
    }
}

/// The session's relay, with the stream types it has.
pub type SessionRelay<'r> = Relay<'r, ClientStream, BackendStream>;

/// Why a move that was tried did not happen.
#[derive(Debug)]
pub enum MoveFailure {
    Connect(SessionError),
    Restore(continuity::RestoreError),
    /// The client closed or failed while the proxy wrote to it.
    Client,
}

impl MoveFailure {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Restore(_) | Self::Client => "restore",
        }
    }
}

impl std::fmt::Display for MoveFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "no new backend connection: {e}"),
            Self::Restore(e) => e.fmt(f),
            Self::Client => f.write_str("the client went away"),
        }
    }
}

/// The relay stopped at an idle point: take a snapshot if the state may
/// have changed, then make a move that is due.
pub async fn at_idle_point(
    relay: &mut SessionRelay<'_>,
    home: &mut Home,
    mover: &mut Mover<'_>,
    close: &mut CloseSignal,
) -> Step {
    if relay.session().is_some_and(|s| s.is_dirty()) {
        match continuity::take_snapshot(relay, &mut mover.state).await {
            SnapshotResult::Done => mover.set_pins(),
            SnapshotResult::ClientLost => {
                return Step::End(Ok(RelayEnd::ClientError(
                    std::io::ErrorKind::BrokenPipe.into(),
                )))
            }
            SnapshotResult::BackendLost(fatal) => {
                // The state is unknown: the session cannot move. The client
                // hears why (the server's FATAL, or the proxy's), between
                // messages: the exchange wrote only whole ones.
                mover.refused(relay);
                let message = match fatal {
                    Some(fields) => error_response(&fields),
                    None => {
                        let mut buf = BytesMut::new();
                        PgError::fatal(
                            sqlstate::CONNECTION_FAILURE,
                            "dsql-proxy: the backend stopped answering while the proxy read the session's state",
                        )
                        .encode(&mut buf);
                        buf
                    }
                };
                let _ = tokio::time::timeout(crate::EVICTION_FLUSH, relay.send_to_client(&message))
                    .await;
                return Step::End(Err(Eviction::MoveFailed));
            }
        }
    }
    if !relay.at_idle_point() {
        // The snapshot relayed something that is not idle (an idle
        // backend sends only asynchronous messages, so never in practice).
        return Step::Continue;
    }
    relay.pause_at_idle(false);
    if let Some(reason) = mover.leave_pending.take() {
        // A lifetime spare was made before the endpoint was drained or
        // removed, maybe on it: routing decides again.
        let lifetime_move_under_way = mover.connecting.take().is_some();
        let spare = mover.spare.take();
        if lifetime_move_under_way || spare.is_some() {
            // Tried again later, unless the move below restarts the
            // lifetime.
            mover.retry_later();
        }
        if let Some(spare) = spare {
            connect::terminate(spare.backend).await;
        }
        if mover.movable(relay) {
            return lazy_move(relay, home, mover, close, reason, Fallback::KeepOld).await;
        }
        mover.refused(relay);
        return Step::Continue;
    }
    if let Some(spare) = mover.spare.take() {
        if !mover.movable(relay) {
            // Pinned since the lifetime move began: try again later (not a
            // failed move, nothing forced one).
            connect::terminate(spare.backend).await;
            mover.retry_later();
            return Step::Continue;
        }
        let started = Instant::now();
        match swap_in(relay, home, mover, spare, true).await {
            Ok(()) => moved(mover, home, MoveReason::Lifetime, started),
            Err(failure) => {
                mover.failed(MoveReason::Lifetime, failure.label(), &failure.to_string());
                mover.retry_later();
            }
        }
        return Step::Continue;
    }
    Step::Continue
}

/// The backend failed while the session was idle: it sent an error
/// (`held`: the relay holds it back) or closed. A server going away moves
/// the session; anything else ends it as it always did.
pub async fn backend_failed_at_idle(
    relay: &mut SessionRelay<'_>,
    home: &mut Home,
    mover: &mut Mover<'_>,
    close: &mut CloseSignal,
    held: bool,
) -> Step {
    let ctx = mover.ctx;
    let error = if held {
        match continuity::held_error_fields(relay.held_bytes()) {
            Some(fields) if continuity::server_going_away(&fields) => Some(fields),
            // An error the client must see (an idle-session timeout, a
            // targeted kill it asked for by another code, half a message).
            _ => {
                relay.release_held();
                return Step::Continue;
            }
        }
    } else {
        None
    };
    // PostgreSQL ends one session with 57P01 for pg_terminate_backend and
    // every session for a shutdown alike. If the endpoint still takes a
    // connection now, this one was ended on purpose: the client hears it at
    // once, as it would without the proxy.
    if error
        .as_ref()
        .is_some_and(|f| f.code() == sqlstate::ADMIN_SHUTDOWN)
        && relay.session().is_some()
    {
        if let Ok(probe) = connect::connect_to(ctx, &home.endpoint, mover.login).await {
            debug!(endpoint = %home.endpoint.name, "the backend ended this session alone; passing its error on");
            connect::terminate(probe).await;
            relay.release_held();
            return Step::Continue;
        }
    }
    ctx.router.report(
        home.endpoint.id,
        PassiveSignal::SessionBroken {
            detail: match &error {
                Some(fields) => format!("backend ended an idle session: {}", fields.message()),
                None => "backend closed an idle session without an error".into(),
            },
        },
    );
    if !mover.movable(relay) {
        mover.refused(relay);
        if held {
            relay.release_held();
            return Step::Continue;
        }
        return Step::End(Ok(RelayEnd::IdlePoint));
    }
    lazy_move(
        relay,
        home,
        mover,
        close,
        MoveReason::BackendLost,
        Fallback::Close,
    )
    .await
}

/// Moves an idle session when the client sends its next message (held
/// until then, and forwarded to the new backend).
pub async fn lazy_move(
    relay: &mut SessionRelay<'_>,
    home: &mut Home,
    mover: &mut Mover<'_>,
    close: &mut CloseSignal,
    reason: MoveReason,
    fallback: Fallback,
) -> Step {
    let ctx = mover.ctx;
    // The client may still wait for the end of the last answer (TLS).
    let flushed = tokio::select! {
        biased;
        flushed = relay.flush_client() => flushed,
        () = close.closed() => return Step::End(Err(Eviction::Shutdown)),
    };
    if let Err(e) = flushed {
        return Step::End(Ok(RelayEnd::ClientError(e)));
    }
    let next = tokio::select! {
        biased;
        read = relay.read_client_ahead() => read,
        () = close.closed() => {
            relay.drop_held();
            return Step::End(Err(Eviction::Shutdown));
        }
    };
    match next {
        Ok(true) => {}
        Ok(false) => return Step::End(Ok(RelayEnd::ClientClosed)),
        Err(e) => return Step::End(Ok(RelayEnd::ClientError(e))),
    }
    let started = Instant::now();
    if relay.client_bytes_ahead().first() == Some(&b'X') {
        // A goodbye: nothing to move for.
        relay.drop_held();
        return match fallback {
            Fallback::KeepOld => Step::Continue,
            Fallback::Close => Step::End(Ok(RelayEnd::ClientClosed)),
        };
    }
    let connected = tokio::select! {
        biased;
        connected = connect::connect(ctx, mover.login, mover.intent) => connected,
        () = close.closed() => {
            // The held message was never sent anywhere: it is dropped, as
            // a shutdown drops a request that had not started.
            relay.discard_client_ahead();
            return Step::End(Err(Eviction::ShutdownDuringMove));
        }
    };
    let connected = match connected {
        Ok(connected) => connected,
        Err(err) => {
            return not_moved(relay, mover, reason, fallback, MoveFailure::Connect(err)).await
        }
    };
    relay.drop_held();
    match swap_in(relay, home, mover, connected, fallback == Fallback::KeepOld).await {
        Ok(()) => {
            moved(mover, home, reason, started);
            Step::Continue
        }
        Err(failure) => not_moved(relay, mover, reason, fallback, failure).await,
    }
}

/// A move that was tried failed: keep the old backend when it may be
/// used, else tell the client and end the session.
async fn not_moved(
    relay: &mut SessionRelay<'_>,
    mover: &mut Mover<'_>,
    reason: MoveReason,
    fallback: Fallback,
    failure: MoveFailure,
) -> Step {
    mover.failed(reason, failure.label(), &failure.to_string());
    if fallback == Fallback::KeepOld {
        // The held message goes to the old backend when relaying resumes.
        return Step::Continue;
    }
    let error = PgError::fatal(
        sqlstate::CONNECTION_FAILURE,
        format!("dsql-proxy: the session's backend connection was lost and the session could not move to a new one: {failure}"),
    );
    let mut buf = BytesMut::new();
    error.encode(&mut buf);
    let _ = tokio::time::timeout(crate::EVICTION_FLUSH, send(relay.client(), &buf)).await;
    Step::End(Err(Eviction::MoveFailed))
}

/// Restores the session on `connected` and puts it in place of the
/// current backend. `old_alive`: the old backend gets a Terminate.
async fn swap_in(
    relay: &mut SessionRelay<'_>,
    home: &mut Home,
    mover: &mut Mover<'_>,
    connected: Connected,
    old_alive: bool,
) -> Result<(), MoveFailure> {
    let Connected {
        endpoint,
        backend,
        role_watch,
    } = connected;
    let mut stream = backend.stream;
    let Some(tracker) = relay.session() else {
        connect::terminate_stream(stream).await;
        return Err(MoveFailure::Client);
    };
    let parameters = backend.parameters;
    let restored = continuity::restore(
        &mut stream,
        &mover.state,
        tracker,
        mover.login.user.as_bytes(),
        parameters,
    )
    .await;
    let parameters = match restored {
        Ok(parameters) => parameters,
        Err(e) => {
            connect::terminate_stream(stream).await;
            return Err(MoveFailure::Restore(e));
        }
    };
    // What the client has seen that the new backend reports otherwise
    // (server_version, a default the restore did not set): told first.
    let mut changed = BytesMut::new();
    if let Some(tracker) = relay.session_mut() {
        tracker.sync_parameters(&parameters, &mut changed);
    }
    if !changed.is_empty() && send(relay.client(), &changed).await.is_err() {
        connect::terminate_stream(stream).await;
        return Err(MoveFailure::Client);
    }
    if let (Some(registration), Some(backend_key)) = (&mover.registration, &backend.key) {
        registration.retarget(CancelTarget {
            backend_key: backend_key.clone(),
            endpoint: Arc::clone(&endpoint),
        });
    }
    mover.backend_key = backend.key;
    mover.backend_born = Instant::from_std(backend.connected_at);
    let old = relay.replace_backend(stream);
    if old_alive {
        connect::terminate_stream(old).await;
    }
    let ctx = mover.ctx;
    let previous = std::mem::replace(home, Home::new(ctx, endpoint, role_watch));
    drop(previous);
    // A lifetime move under way was for the old home (its spare may be on
    // the endpoint just left): the new backend starts a lifetime of its own.
    mover.connecting = None;
    if let Some(spare) = mover.spare.take() {
        connect::terminate(spare.backend).await;
    }
    relay.pause_at_idle(false);
    mover.arm_lifetime();
    Ok(())
}

fn moved(mover: &Mover<'_>, home: &Home, reason: MoveReason, started: Instant) {
    let ctx = mover.ctx;
    let took = started.elapsed();
    ctx.metrics
        .sessions_moved_total
        .with_label_values(&[reason.label()])
        .inc();
    ctx.metrics.session_move_seconds.observe(took.as_secs_f64());
    info!(
        reason = %reason.label(),
        endpoint = %home.endpoint.name,
        user = %mover.login.user,
        database = %mover.login.database,
        move_ms = took.as_secs_f64() * 1000.0,
        settings = mover.state.snapshot.settings.len(),
        statements = relay_statement_count(mover),
        "session moved to a new backend connection"
    );
}

fn relay_statement_count(mover: &Mover<'_>) -> usize {
    mover.state.snapshot.sql_prepared.len() + mover.state.snapshot.protocol_statements.len()
}

fn error_response(fields: &ErrorFields) -> BytesMut {
    let mut buf = BytesMut::new();
    messages::error_response(&mut buf, &fields.fields);
    buf
}
