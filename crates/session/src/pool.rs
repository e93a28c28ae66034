//! Backend connection reuse between client sessions (`[pool]`).
//!
//! A session whose client says Terminate while its backend is idle, not
//! pinned, healthy and within its lifetime hands the backend here after a
//! reset ([`reset`]); the connect loop asks [`Pool::take`] (through the
//! [`IdleConnections`] seam) before it fetches a credential, takes a
//! connect-rate token or dials. Connections are keyed by endpoint and the
//! exact startup parameters (user, database, options, application_name):
//! a client never gets a connection another login made.
//!
//! Not on the data path: one short lock per checkout and per return, and a
//! reaper task that closes what waited too long, outlived its lifetime, or
//! sits on an endpoint that went down, was drained or removed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use dsql_proxy_config::{BackendKind, PoolConfig};
use dsql_proxy_connector::{BackendConnection, BackendStream};
use dsql_proxy_metrics::Metrics;
use dsql_proxy_protocol::startup::StartupParam;
use dsql_proxy_protocol::tracking::ParameterValues;
use dsql_proxy_routing::{Endpoint, EndpointId, Router};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::time::Instant;
use tracing::debug;

use crate::connect::{self, IdleConnections, Login, Pooled};
use crate::io::send;

/// How often the reaper looks at idle connections.
const REAP_EVERY: Duration = Duration::from_millis(250);
/// The reset exchange's time limit: a backend slower than this is closed.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest message the reset exchange reads.
const MAX_RESET_MESSAGE: usize = 64 * 1024;

/// `[pool]`, resolved, with what the checks need.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_idle: usize,
    pub max_idle_total: usize,
    pub idle_timeout: Duration,
    /// `[backend] server_lifetime` (zero: none).
    pub server_lifetime: Duration,
    pub kind: BackendKind,
    /// Warm spares per endpoint, and whose (user, database).
    pub min_idle: usize,
    pub min_idle_login: Option<(String, String)>,
}

impl PoolSettings {
    /// `None` when reuse is off.
    pub fn from_config(
        pool: &PoolConfig,
        server_lifetime: Duration,
        kind: BackendKind,
    ) -> Option<Self> {
        pool.enabled.then(|| Self {
            max_idle: pool.max_idle as usize,
            max_idle_total: pool.max_idle_total as usize,
            idle_timeout: pool.idle_timeout.get(),
            server_lifetime,
            kind,
            min_idle: pool.min_idle as usize,
            min_idle_login: pool
                .min_idle_user
                .clone()
                .map(|user| (user, pool.min_idle_database.clone())),
        })
    }

    /// A connection this old is not handed out again: the session taking
    /// it would move (or, on DSQL, be cut) soon after. The lower bound of
    /// the lifetime jitter.
    fn too_old(&self, born: std::time::Instant) -> bool {
        !self.server_lifetime.is_zero() && born.elapsed() >= self.server_lifetime.mul_f64(0.9)
    }
}

/// Why a backend connection was closed instead of pooled or reused
/// (`pool_discards_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    ResetFailed,
    Pinned,
    Busy,
    Full,
    Lifetime,
    IdleTimeout,
    EndpointDown,
    Drained,
    Closed,
    Shutdown,
}

impl Discard {
    pub const ALL: [Self; 10] = [
        Self::ResetFailed,
        Self::Pinned,
        Self::Busy,
        Self::Full,
        Self::Lifetime,
        Self::IdleTimeout,
        Self::EndpointDown,
        Self::Drained,
        Self::Closed,
        Self::Shutdown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::ResetFailed => "reset_failed",
            Self::Pinned => "pinned",
            Self::Busy => "busy",
            Self::Full => "full",
            Self::Lifetime => "lifetime",
            Self::IdleTimeout => "idle_timeout",
            Self::EndpointDown => "endpoint_down",
            Self::Drained => "drained",
            Self::Closed => "closed",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Endpoint and the startup parameters as sent to the backend, in the
/// client's order, except `application_name` (set at checkout instead).
/// Order matters: a driver sends its parameters in one order, and a
/// lookup compares without building a key (no allocation per checkout).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolKey {
    endpoint: EndpointId,
    params: Vec<(String, Vec<u8>)>,
}

impl PoolKey {
    fn new(endpoint: EndpointId, params: &[StartupParam]) -> Self {
        let params = keyed(params)
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        Self { endpoint, params }
    }

    fn is_for(&self, endpoint: EndpointId, params: &[StartupParam]) -> bool {
        self.endpoint == endpoint
            && self
                .params
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_slice()))
                .eq(keyed(params))
    }
}

/// The startup parameters that key the pool.
fn keyed(params: &[StartupParam]) -> impl Iterator<Item = (&str, &[u8])> {
    params
        .iter()
        .filter(|p| p.name != APPLICATION_NAME)
        .map(|p| (p.name.as_str(), p.value.as_slice()))
}

const APPLICATION_NAME: &str = "application_name";

struct Parked {
    backend: BackendConnection,
    endpoint: Arc<Endpoint>,
    parked_at: Instant,
}

#[derive(Default)]
struct Idle {
    /// Few keys (users x databases x endpoints): a list, searched without
    /// building a key.
    by_key: Vec<(PoolKey, Vec<Parked>)>,
    total: usize,
    /// Idle connections per endpoint, for the gauge.
    per_endpoint: HashMap<EndpointId, (Arc<Endpoint>, usize)>,
    /// After shutdown began: nothing is parked any more.
    closed: bool,
    reaper_started: bool,
}

impl Idle {
    /// Where the list for `endpoint` and `params` sits in `by_key`.
    fn slot(&self, endpoint: EndpointId, params: &[StartupParam]) -> Option<usize> {
        self.by_key
            .iter()
            .position(|(key, _)| key.is_for(endpoint, params))
    }

    fn count_in(&mut self, endpoint: &Arc<Endpoint>) -> usize {
        let entry = self
            .per_endpoint
            .entry(endpoint.id)
            .or_insert_with(|| (Arc::clone(endpoint), 0));
        entry.1 += 1;
        entry.1
    }

    fn count_out(&mut self, endpoint: EndpointId, n: usize) -> usize {
        self.per_endpoint.get_mut(&endpoint).map_or(0, |entry| {
            entry.1 = entry.1.saturating_sub(n);
            entry.1
        })
    }
}

/// The idle backend connections of the whole proxy (one per process,
/// carried across reloads).
pub struct Pool {
    settings: PoolSettings,
    router: Arc<dyn Router>,
    metrics: Arc<Metrics>,
    idle: Mutex<Idle>,
    /// The startup parameters warm spares are made with: at first only
    /// user and database, then those of the last client of that login (a
    /// driver's own parameters, such as client_encoding, are part of the
    /// key, so spares must carry them to be taken).
    spare_template: Mutex<Option<Vec<StartupParam>>>,
}

impl Pool {
    pub fn new(settings: PoolSettings, router: Arc<dyn Router>, metrics: Arc<Metrics>) -> Self {
        Self {
            settings,
            router,
            metrics,
            idle: Mutex::new(Idle::default()),
            spare_template: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `endpoint` may keep or hand out idle connections now.
    fn endpoint_verdict(&self, endpoint: &Endpoint) -> Option<Discard> {
        if self.router.endpoint(endpoint.id).is_none() {
            return Some(Discard::EndpointDown);
        }
        if self.router.is_drained(endpoint.id) {
            return Some(Discard::Drained);
        }
        let Ok(table) = self.router.route() else {
            return Some(Discard::EndpointDown);
        };
        // aurora-global: a fenced stale writer takes no session at all.
        if table
            .roles
            .as_ref()
            .is_some_and(|roles| roles.is_fenced(endpoint.id))
        {
            return Some(Discard::EndpointDown);
        }
        let eligible = table
            .candidates()
            .find(|(e, _)| e.id == endpoint.id)
            .is_some_and(|(_, eligible)| eligible);
        (!eligible).then_some(Discard::EndpointDown)
    }

    /// Why a connection that waited in the pool must not be handed out.
    fn stale(&self, parked: &Parked, now: Instant) -> Option<Discard> {
        if now.duration_since(parked.parked_at) >= self.settings.idle_timeout {
            return Some(Discard::IdleTimeout);
        }
        if self.settings.too_old(parked.backend.connected_at) {
            return Some(Discard::Lifetime);
        }
        None
    }

    /// Keeps `backend` (reset, idle) for the next session of the same
    /// login on `endpoint`; or counts why not and closes it (Terminate, in
    /// the background).
    pub fn park(
        self: &Arc<Self>,
        endpoint: Arc<Endpoint>,
        params: &[StartupParam],
        backend: BackendConnection,
    ) -> Result<(), Discard> {
        let refused = self.try_park(endpoint, params, backend);
        if let Err((backend, reason)) = refused {
            self.discard_all(vec![(backend, reason)]);
            return Err(reason);
        }
        Ok(())
    }

    #[allow(clippy::result_large_err)] // private: the caller closes the connection
    fn try_park(
        self: &Arc<Self>,
        endpoint: Arc<Endpoint>,
        params: &[StartupParam],
        backend: BackendConnection,
    ) -> Result<(), (BackendConnection, Discard)> {
        if let Some(reason) = self.endpoint_verdict(&endpoint) {
            return Err((backend, reason));
        }
        if self.settings.too_old(backend.connected_at) {
            return Err((backend, Discard::Lifetime));
        }
        let start_reaper = {
            let mut idle = self.lock();
            if idle.closed {
                return Err((backend, Discard::Shutdown));
            }
            let slot = idle.slot(endpoint.id, params);
            let full = idle.total >= self.settings.max_idle_total
                || slot.is_some_and(|i| idle.by_key[i].1.len() >= self.settings.max_idle);
            if full {
                return Err((backend, Discard::Full));
            }
            let n = idle.count_in(&endpoint);
            self.set_idle_gauge(&endpoint, n);
            let parked = Parked {
                backend,
                endpoint: Arc::clone(&endpoint),
                parked_at: Instant::now(),
            };
            match slot {
                Some(i) => idle.by_key[i].1.push(parked),
                None => idle
                    .by_key
                    .push((PoolKey::new(endpoint.id, params), vec![parked])),
            }
            idle.total += 1;
            !std::mem::replace(&mut idle.reaper_started, true)
        };
        if start_reaper {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
        Ok(())
    }

    /// `pool_idle` of one endpoint that routing still knows (one that
    /// takes or gives a connection now).
    fn set_idle_gauge(&self, endpoint: &Endpoint, n: usize) {
        let labels = [
            endpoint.name.as_str(),
            endpoint.region.as_deref().unwrap_or(""),
        ];
        self.metrics
            .pool_idle
            .with_label_values(&labels)
            .set(n as i64);
    }

    /// Sets `pool_idle` from the counts of every endpoint (the reaper, and
    /// shutdown); an endpoint a reload removed has no series.
    fn publish(&self, idle: &mut Idle) {
        let router = &self.router;
        let gauge = &self.metrics.pool_idle;
        idle.per_endpoint.retain(|id, (endpoint, n)| {
            let labels = [
                endpoint.name.as_str(),
                endpoint.region.as_deref().unwrap_or(""),
            ];
            if router.endpoint(*id).is_none() {
                // Removed by a reload: no series for it (the reaper closes
                // what is left on it).
                let _ = gauge.remove_label_values(&labels);
                return *n > 0;
            }
            gauge.with_label_values(&labels).set(*n as i64);
            true
        });
    }

    /// Counts and closes (Terminate, in the background) connections that
    /// left the pool for `reason`.
    fn discard_all(&self, gone: Vec<(BackendConnection, Discard)>) {
        for (backend, reason) in gone {
            self.count_discard(reason);
            tokio::spawn(connect::terminate(backend));
        }
    }

    pub fn count_discard(&self, reason: Discard) {
        self.metrics
            .pool_discards_total
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// Removes every idle connection `verdict` condemns.
    fn sweep(&self, mut verdict: impl FnMut(&Parked) -> Option<Discard>) {
        let mut gone = Vec::new();
        {
            let mut idle = self.lock();
            let mut removed = 0;
            for (_, list) in idle.by_key.iter_mut() {
                let mut i = 0;
                while i < list.len() {
                    match verdict(&list[i]) {
                        Some(reason) => {
                            let parked = list.swap_remove(i);
                            gone.push((parked.endpoint, parked.backend, reason));
                            removed += 1;
                        }
                        None => i += 1,
                    }
                }
            }
            idle.by_key.retain(|(_, list)| !list.is_empty());
            idle.total -= removed;
            for (endpoint, _, _) in &gone {
                idle.count_out(endpoint.id, 1);
            }
            self.publish(&mut idle);
        }
        self.discard_all(gone.into_iter().map(|(_, b, r)| (b, r)).collect());
    }

    /// Closes every idle connection and parks no more (shutdown): each
    /// gets a Terminate, within a bounded time.
    pub async fn close(&self) {
        let parked: Vec<Parked> = {
            let mut idle = self.lock();
            idle.closed = true;
            idle.total = 0;
            let parked: Vec<Parked> = idle.by_key.drain(..).flat_map(|(_, list)| list).collect();
            for entry in idle.per_endpoint.values_mut() {
                entry.1 = 0;
            }
            self.publish(&mut idle);
            parked
        };
        let mut goodbyes = tokio::task::JoinSet::new();
        for p in parked {
            self.count_discard(Discard::Shutdown);
            goodbyes.spawn(connect::terminate(p.backend));
        }
        while goodbyes.join_next().await.is_some() {}
    }

    /// Idle connections in all.
    pub fn idle_total(&self) -> usize {
        self.lock().total
    }
}

impl Pool {
    /// Remembers the parameters of a client of the warm spares' login.
    fn learn(&self, login: &Login) {
        let Some((user, database)) = &self.settings.min_idle_login else {
            return;
        };
        if self.settings.min_idle == 0 || &login.user != user || &login.database != database {
            return;
        }
        let mut template = self
            .spare_template
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if template.as_deref() != Some(&login.params[..]) {
            *template = Some(login.params.clone());
        }
    }

    /// The login warm spares are made for, if any.
    fn spare_login(&self) -> Option<Login> {
        let (user, database) = self.settings.min_idle_login.clone()?;
        if self.settings.min_idle == 0 {
            return None;
        }
        let params = self
            .spare_template
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| {
                vec![
                    StartupParam::new("user", user.as_bytes()),
                    StartupParam::new("database", database.as_bytes()),
                ]
            });
        Some(Login {
            user,
            database,
            params,
            client_password: None,
        })
    }

    /// Idle connections on `endpoint` for `params`.
    fn idle_count(&self, endpoint: EndpointId, params: &[StartupParam]) -> usize {
        let idle = self.lock();
        idle.slot(endpoint, params)
            .map_or(0, |i| idle.by_key[i].1.len())
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// Keeps `[pool] min_idle` warm spares on every endpoint that takes
/// sessions now, for `min_idle_user` / `min_idle_database`: one connect at
/// a time, each through the connect-rate admission like any other. Runs
/// until the pool closes; the context is read anew each round, so a
/// reload's endpoints and credentials are used.
pub fn spawn_warmer(contexts: crate::SharedContext) {
    let has_spares = contexts
        .load()
        .pool
        .as_ref()
        .is_some_and(|pool| pool.spare_login().is_some());
    if !has_spares {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let ctx = contexts.load_full();
            let Some(pool) = ctx.pool.clone() else { return };
            if pool.is_closed() {
                return;
            }
            let Some(login) = pool.spare_login() else {
                return;
            };
            let Ok(table) = ctx.router.route() else {
                continue;
            };
            let endpoints: Vec<Arc<Endpoint>> = table
                .candidates()
                .filter(|(_, eligible)| *eligible)
                .map(|(endpoint, _)| Arc::clone(endpoint))
                .collect();
            for endpoint in endpoints {
                while pool.endpoint_verdict(&endpoint).is_none()
                    && pool.idle_count(endpoint.id, &login.params) < pool.settings.min_idle
                {
                    match connect::dial_spare(&ctx, &endpoint, &login).await {
                        Ok(backend) => {
                            if pool
                                .park(Arc::clone(&endpoint), &login.params, backend)
                                .is_err()
                            {
                                break;
                            }
                        }
                        Err(e) => {
                            debug!(endpoint = %endpoint.name, error = %e, "warm spare connect failed");
                            break;
                        }
                    }
                }
            }
        }
    });
}

impl IdleConnections for Pool {
    fn discarded(&self, reason: Discard) {
        self.count_discard(reason);
    }

    fn take(&self, endpoint: &Endpoint, login: &Login) -> Option<Pooled> {
        self.learn(login);
        if self.endpoint_verdict(endpoint).is_some() {
            // The reaper closes them; none is handed out meanwhile.
            self.count_checkout(false);
            return None;
        }
        let now = Instant::now();
        let mut gone = Vec::new();
        let found = {
            let mut idle = self.lock();
            let mut found = None;
            let mut taken = 0;
            if let Some(slot) = idle.slot(endpoint.id, &login.params) {
                let list = &mut idle.by_key[slot].1;
                // Newest first: the warmest connection, and the oldest
                // ones age out.
                while let Some(mut parked) = list.pop() {
                    taken += 1;
                    if let Some(reason) = self.stale(&parked, now) {
                        gone.push((parked.backend, reason));
                    } else if !still_open(&mut parked.backend.stream) {
                        gone.push((parked.backend, Discard::Closed));
                    } else {
                        found = Some(Pooled {
                            quiet_for: now.duration_since(parked.parked_at),
                            backend: parked.backend,
                        });
                        break;
                    }
                }
                if list.is_empty() {
                    idle.by_key.swap_remove(slot);
                }
            }
            if taken > 0 {
                // One key, one endpoint: `endpoint` is theirs.
                idle.total -= taken;
                let n = idle.count_out(endpoint.id, taken);
                self.set_idle_gauge(endpoint, n);
            }
            found
        };
        self.discard_all(gone);
        self.count_checkout(found.is_some());
        found
    }
}

impl Pool {
    fn count_checkout(&self, hit: bool) {
        self.metrics
            .pool_checkouts_total
            .with_label_values(&[if hit { "hit" } else { "miss" }])
            .inc();
    }
}

/// Closes idle connections as they expire or their endpoint goes; ends
/// with the pool.
async fn reap(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.lock().closed {
            return;
        }
        let now = Instant::now();
        let mut verdicts: HashMap<EndpointId, Option<Discard>> = HashMap::new();
        pool.sweep(|parked| {
            let endpoint = *verdicts
                .entry(parked.endpoint.id)
                .or_insert_with(|| pool.endpoint_verdict(&parked.endpoint));
            endpoint.or_else(|| pool.stale(parked, now))
        });
    }
}

/// Whether an idle backend's socket is still open with nothing to read: a
/// server that closed it, or sent anything (a FATAL) while it waited, has
/// made it unusable. Never blocks.
fn still_open(stream: &mut BackendStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

/// What a reset leaves: the backend's ParameterStatus values after it.
#[derive(Debug)]
pub enum ResetError {
    Refused(String),
    Broken(String),
}

impl std::fmt::Display for ResetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(m) => write!(f, "the backend refused the reset: {m}"),
            Self::Broken(m) => write!(f, "the reset failed: {m}"),
        }
    }
}

/// The reset statements. PostgreSQL and Aurora PostgreSQL: `DISCARD ALL`
/// (settings, role and session authorization, prepared statements,
/// cursors, temporary tables, advisory locks, LISTEN, cached plans and
/// sequence state). Aurora DSQL documents no DISCARD; the reset there is
/// what a session can change on DSQL: settings, statements, cursors.
fn reset_statements(kind: BackendKind) -> &'static [&'static str] {
    match kind {
        BackendKind::Dsql => &["RESET ALL", "DEALLOCATE ALL", "CLOSE ALL"],
        _ => &["DISCARD ALL"],
    }
}

/// Checks the reset worked: no setting set in the session, no prepared
/// statement, no open cursor, and the session's user is the login's
/// (`SET ROLE` and `SET SESSION AUTHORIZATION` undone). One row, `0`.
const VERIFY_QUERY: &str = "SELECT (SELECT count(*) FROM pg_catalog.pg_settings \
     WHERE source = 'session') + (SELECT count(*) FROM pg_catalog.pg_prepared_statements) \
     + (SELECT count(*) FROM pg_catalog.pg_cursors) \
     + CASE WHEN session_user = current_user AND session_user = $login$ THEN 0 ELSE 1 END";

/// Resets an idle backend to the state it had after its own startup, in
/// one round trip (each statement its own Query, so DISCARD ALL runs
/// outside a transaction block). `DISCARD ALL` is PostgreSQL's complete
/// reset and needs no check; the DSQL reset, which is not, is checked with
/// [`VERIFY_QUERY`] in the same round trip. On success, the ParameterStatus
/// values it reports afterwards (`parameters` updated).
pub async fn reset(
    stream: &mut BackendStream,
    kind: BackendKind,
    login_user: &str,
    parameters: &mut ParameterValues,
) -> Result<(), ResetError> {
    let mut out = BytesMut::new();
    let statements = reset_statements(kind);
    for statement in statements {
        query_message(&mut out, statement);
    }
    let checked = kind == BackendKind::Dsql;
    if checked {
        let verify = VERIFY_QUERY.replace("$login$", &quote_literal(login_user));
        query_message(&mut out, &verify);
    }
    let answers = statements.len() + usize::from(checked);
    let exchange = async {
        send(stream, &out)
            .await
            .map_err(|e| ResetError::Broken(e.to_string()))?;
        read_answers(stream, answers, parameters).await
    };
    let verified = tokio::time::timeout(RESET_TIMEOUT, exchange)
        .await
        .map_err(|_| ResetError::Broken(format!("no answer within {RESET_TIMEOUT:?}")))??;
    if checked && verified.as_deref() != Some("0") {
        return Err(ResetError::Refused(format!(
            "session state left after the reset (check returned {verified:?})"
        )));
    }
    Ok(())
}

/// A simple-protocol Query.
fn query_message(out: &mut BytesMut, sql: &str) {
    out.extend_from_slice(b"Q");
    out.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.extend_from_slice(&[0]);
}

/// Why a pooled connection was not handed out after all.
#[derive(Debug)]
pub enum CheckoutError {
    /// No answer within the attempt's limit: the server may hang.
    Timeout,
    /// Closed, broken, or it refused the client's application_name.
    Failed(String),
}

/// How recent the server's last answer on a pooled connection (its reset)
/// must be for the checkout to trust it without asking again (HikariCP's
/// "alive bypass window", 500 ms there). Short here, so it proves no less
/// than the check's own answer would by the time the client's first query
/// reaches the server: a server that hangs is found by the check, and new
/// sessions fail over, unless it hung within 2 ms of answering. Under a
/// stream of short sessions (a connection parked and taken again within
/// a millisecond) it saves the round trip.
pub const CHECK_AFTER: Duration = Duration::from_millis(2);

/// Readies a pooled connection for `login`. When the server answered on
/// it more than [`CHECK_AFTER`] ago, or the client's `application_name`
/// differs from the one the connection reports (the pool key leaves it
/// out), one round trip within `limit`: `SET application_name`, or an
/// empty query. Its answer proves the server is alive: a hung or dead
/// server is found here, not by the client's first query.
pub async fn checkout(
    backend: &mut BackendConnection,
    login: &Login,
    limit: Duration,
    quiet_for: Duration,
) -> Result<(), CheckoutError> {
    let wanted = login
        .params
        .iter()
        .find(|p| p.name == APPLICATION_NAME)
        .map_or(&[][..], |p| p.value.as_slice());
    let current = backend
        .parameters
        .get(APPLICATION_NAME.as_bytes())
        .unwrap_or_default();
    if wanted == current && quiet_for < CHECK_AFTER {
        return Ok(());
    }
    let mut out = BytesMut::new();
    if wanted == current {
        query_message(&mut out, "");
    } else {
        query_message(
            &mut out,
            &format!(
                "SET application_name = {}",
                quote_literal(&String::from_utf8_lossy(wanted))
            ),
        );
    }
    let exchange = async {
        send(&mut backend.stream, &out)
            .await
            .map_err(|e| CheckoutError::Failed(e.to_string()))?;
        read_answers(&mut backend.stream, 1, &mut backend.parameters)
            .await
            .map_err(|e| CheckoutError::Failed(e.to_string()))
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(CheckoutError::Timeout),
    }
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Reads `answers` ReadyForQuery-terminated answers; the first error fails
/// the reset (after the rest is read, so the connection stays framed is
/// not needed: it is closed). Returns the last answer's first column.
async fn read_answers(
    stream: &mut BackendStream,
    answers: usize,
    parameters: &mut ParameterValues,
) -> Result<Option<String>, ResetError> {
    let mut buf = BytesMut::with_capacity(1024);
    let mut ready = 0;
    let mut value = None;
    loop {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if !(4..=MAX_RESET_MESSAGE).contains(&len) {
                return Err(ResetError::Broken(format!("bad message length {len}")));
            }
            if buf.len() < 1 + len {
                break;
            }
            let message = buf.split_to(1 + len);
            let (tag, body) = (message[0], &message[5..]);
            match tag {
                b'E' => return Err(ResetError::Refused(error_message(body))),
                b'S' => {
                    parameters.apply_message_body(body);
                }
                b'D' => value = first_column(body),
                b'Z' => {
                    if body.first() != Some(&b'I') {
                        return Err(ResetError::Broken("not idle after the reset".into()));
                    }
                    ready += 1;
                    if ready == answers {
                        if !buf.is_empty() {
                            return Err(ResetError::Broken("more after the reset".into()));
                        }
                        return Ok(value);
                    }
                }
                // CommandComplete, RowDescription, notices, EmptyQuery.
                _ => {}
            }
        }
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| ResetError::Broken(e.to_string()))?;
        if n == 0 {
            return Err(ResetError::Broken(
                "the backend closed the connection".into(),
            ));
        }
    }
}

fn error_message(body: &[u8]) -> String {
    let mut code = "";
    let mut message = String::new();
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'C', v)) => code = std::str::from_utf8(v).unwrap_or(""),
            Some((b'M', v)) => message = String::from_utf8_lossy(v).into_owned(),
            _ => {}
        }
    }
    format!("{message} ({code})")
}

/// A DataRow's first column as text.
fn first_column(body: &[u8]) -> Option<String> {
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    let bytes = body.get(6..6 + len)?;
    Some(String::from_utf8_lossy(bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_crate_names_every_discard_reason() {
        let labels: Vec<&str> = Discard::ALL.iter().map(|d| d.label()).collect();
        assert_eq!(labels, dsql_proxy_metrics::POOL_DISCARD_REASONS);
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("o'brien"), "'o''brien'");
    }

    #[test]
    fn a_data_row_yields_its_first_column() {
        let mut row = vec![0, 1];
        row.extend_from_slice(&1i32.to_be_bytes());
        row.push(b'0');
        assert_eq!(first_column(&row).as_deref(), Some("0"));
        assert_eq!(first_column(&[0, 1, 255, 255, 255, 255]), None);
    }
}
