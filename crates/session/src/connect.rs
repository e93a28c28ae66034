//! The connect loop: the one way the data path gets a backend connection
//! for a login. It walks the routing table's candidates for the intent,
//! best first, within one time budget: for each, an idle connection from
//! the pool hook if there is one, else the credential, a connect-rate
//! token and a dial through the connector, each attempt bounded by the
//! per-attempt limit while other candidates remain. Every failure is
//! reported the same way (metrics, the router's health and busy signals,
//! a refused secret dropped from the credential cache).
//!
//! It needs no client: it takes a [`Login`] (user, database, startup
//! parameters, the client's password for passthrough) and an [`Intent`],
//! so a session that must leave its backend can be re-homed through the
//! same loop. It lives in the session crate because it is the data path's
//! policy (routing, admission, credentials); reaching one endpoint is the
//! connector's job.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dsql_proxy_config::{BackendKind, Secret};
use dsql_proxy_connector::{BackendConnection, ConnectError, StartupLogin};
use dsql_proxy_credentials::{CredentialError, CredentialRequest};
use dsql_proxy_metrics::IntGauge;
use dsql_proxy_protocol::startup::StartupParam;
use dsql_proxy_protocol::{messages, sqlstate, PgError};
use dsql_proxy_routing::{DownWatch, Endpoint, FailureKind, PassiveSignal, RouteError};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::admission::Refusal;
use crate::io::send;
use crate::pool::{self, Discard};
use crate::role::{self, Intent};
use crate::{ProxyContext, SessionError};

/// Who a backend connection is for. Owned, so a session keeps it and can
/// connect again without its client's startup packet.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: String,
    pub database: String,
    /// The backend StartupMessage's parameters, `user` and `database`
    /// included, already filtered for the backend.
    pub params: Vec<StartupParam>,
    /// The client's own password, for `auth = "passthrough"`.
    pub client_password: Option<Secret>,
}

impl Login {
    fn credential_request<'a>(&'a self, endpoint: &'a Endpoint) -> CredentialRequest<'a> {
        CredentialRequest {
            endpoint_host: &endpoint.host,
            endpoint_port: endpoint.port,
            region: endpoint.region.as_deref(),
            user: &self.user,
            client_password: self.client_password.as_ref(),
        }
    }
}

/// A backend connection the loop found.
pub struct Connected {
    pub endpoint: Arc<Endpoint>,
    pub backend: BackendConnection,
    /// `aurora-global`: fires when the endpoint's role no longer fits the
    /// intent (see `Router::watch_role`).
    pub role_watch: Option<DownWatch>,
}

/// A source of idle backend connections (a backend connection pool),
/// asked for each candidate before the loop fetches a credential, takes a
/// connect-rate token and dials. It must hand out only connections to
/// `endpoint`, logged in as `login` (user, database, parameters), at
/// ReadyForQuery `I`.
pub trait IdleConnections: Send + Sync + 'static {
    fn take(&self, endpoint: &Endpoint, login: &Login) -> Option<Pooled>;

    /// A connection `take` handed out failed its checkout and was closed.
    fn discarded(&self, _reason: Discard) {}
}

/// A connection from the pool, and how long ago the server last answered
/// on it.
pub struct Pooled {
    pub backend: BackendConnection,
    pub quiet_for: Duration,
}

/// An attempt that has taken this many times the endpoint's usual connect
/// time (as the probes measure it) is treated as hung.
const ATTEMPT_LIMIT_FACTOR: u32 = 4;
/// Never cut an attempt shorter than this: a cold server, a busy proxy or a
/// token refresh can make one connect several times slower than usual.
const ATTEMPT_LIMIT_FLOOR: Duration = Duration::from_millis(500);

/// How long one attempt may take while other endpoints remain: a few times
/// the probe-measured connect time, at least [`ATTEMPT_LIMIT_FLOOR`], at most
/// `attempt_timeout` (also the limit when the probes have not measured it).
/// A hung Region then costs a new session about half a second instead of
/// the full `attempt_timeout`.
fn attempt_limit(attempt_timeout: Duration, probed_connect: Option<Duration>) -> Duration {
    match probed_connect {
        Some(usual) => usual
            .saturating_mul(ATTEMPT_LIMIT_FACTOR)
            .max(ATTEMPT_LIMIT_FLOOR)
            .min(attempt_timeout),
        None => attempt_timeout,
    }
}

/// The loop's one time budget: `connect_timeout`, or under
/// `aurora-global` `writer_wait` when that is longer (a session may wait
/// for a writer).
fn budget(ctx: &ProxyContext) -> Duration {
    match &ctx.global {
        Some(global) => ctx.connect_timeout.max(global.writer_wait),
        None => ctx.connect_timeout,
    }
}

/// Connects `login` to the best endpoint for `intent`. A transport-level
/// failure moves on to the next candidate (and demotes the failed one at
/// once; a busy one is only tried last for a while); an answer that would
/// be the same anywhere, such as an authentication refusal, ends the loop
/// with that answer. Under `aurora-global` a round that found nothing
/// waits for the next routing table and tries again until the budget ends.
pub async fn connect(
    ctx: &ProxyContext,
    login: &Login,
    intent: Intent,
) -> Result<Connected, SessionError> {
    run(ctx, login, intent)
        .await
        .map_err(|e| explain_limits(ctx.kind, e))
}

async fn run(ctx: &ProxyContext, login: &Login, intent: Intent) -> Result<Connected, SessionError> {
    let deadline = Instant::now() + budget(ctx);
    // Only aurora-global waits for a table that names a fitting endpoint.
    let mut published = ctx.global.as_ref().and_then(|_| ctx.router.watch_table());
    let waits = published.is_some();
    let mut failures: Vec<(Arc<Endpoint>, SessionError)> = Vec::new();
    loop {
        if let Some(p) = published.as_mut() {
            p.mark_unchanged();
        }
        let table = ctx.router.route().map_err(no_route)?;
        let candidates = candidates(ctx, &table, intent);
        let total = candidates.len();
        for (tried, endpoint) in candidates.into_iter().enumerate() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let last = tried + 1 == total;
            // A hung endpoint must leave time for the next one; the last
            // of a round gets what is left, up to connect_timeout.
            let limit = if last {
                remaining.min(ctx.connect_timeout)
            } else {
                let probed = table.status(endpoint.id).and_then(|s| s.connect_time);
                remaining.min(attempt_limit(ctx.attempt_timeout, probed))
            };
            // Abandoning an attempt helps only when something else can
            // be tried: a later candidate, or a later round.
            let down = if last && !waits {
                None
            } else {
                ctx.router.watch_down(endpoint.id)
            };
            let role_watch = ctx.global.as_ref().and_then(|_| {
                ctx.router
                    .watch_role(endpoint.id, intent == Intent::ReadOnly)
            });
            let labels = [endpoint.name.as_str(), endpoint.region_label()];
            let attempt_started = Instant::now();
            match attempt(ctx, &endpoint, login, limit, remaining, down).await {
                Ok(backend) => {
                    ctx.router.report_connected(endpoint.id);
                    ctx.metrics
                        .backend_connect_seconds
                        .with_label_values(&labels)
                        .observe(attempt_started.elapsed().as_secs_f64());
                    if waits && role_changed(ctx, &endpoint, intent, role_watch.as_ref()) {
                        debug!(endpoint = %endpoint.name, "role changed during connect; routing again");
                        terminate(backend).await;
                        continue;
                    }
                    if !failures.is_empty() {
                        info!(endpoint = %endpoint.name, failed = failures.len(), "connected after failing over");
                    }
                    return Ok(Connected {
                        endpoint,
                        backend,
                        role_watch,
                    });
                }
                // The limit is the proxy's own and shared by every endpoint:
                // the next endpoint would be refused alike.
                Err(err @ SessionError::ConnectRateLimited(_)) => return Err(err),
                Err(err) => {
                    let reason = err
                        .failover_kind()
                        .map_or(err.reason(), FailureKind::as_str);
                    ctx.metrics
                        .backend_connect_failures_total
                        .with_label_values(&[labels[0], labels[1], reason])
                        .inc();
                    let Some(kind) = err.failover_kind() else {
                        if let SessionError::Backend(ConnectError::Refused { fields, .. }) = &err {
                            // An invalid-authorization answer means the
                            // secret itself was refused: never hand it out
                            // again.
                            if fields.code().starts_with("28") {
                                ctx.credentials
                                    .rejected(login.credential_request(&endpoint));
                            }
                        }
                        return Err(err);
                    };
                    debug!(endpoint = %endpoint.name, error = %err, "connect attempt failed; trying the next endpoint");
                    report_failure(ctx, &endpoint, kind, &err);
                    failures.push((endpoint, err));
                }
            }
        }
        let Some(published) = published.as_mut() else {
            return Err(all_failed(failures));
        };
        if Instant::now() >= deadline {
            let global = ctx
                .global
                .as_ref()
                .map_or(Duration::ZERO, |g| g.writer_wait);
            let last_error = failures.last().map(|(_, e)| e);
            return Err(role::nowhere(&table, intent, global, last_error));
        }
        // Wait for the next table (a probe round at the latest).
        if let Ok(Err(_closed)) = tokio::time::timeout_at(deadline, published.changed()).await {
            tokio::time::sleep_until(deadline).await;
        }
    }
}

fn no_route(e: RouteError) -> SessionError {
    SessionError::Rejected(PgError::fatal(
        sqlstate::CANNOT_CONNECT_NOW,
        format!("dsql-proxy has no endpoint to route to: {e}"),
    ))
}

/// The endpoints to try, best first: the table's connect order, or under
/// `aurora-global` those whose role fits the intent. Endpoints that just
/// refused a connect for load come after the others.
fn candidates(
    ctx: &ProxyContext,
    table: &dsql_proxy_routing::RoutingTable,
    intent: Intent,
) -> Vec<Arc<Endpoint>> {
    let busy = |id| ctx.router.is_busy(id);
    if ctx.global.is_none() {
        return table
            .connect_order(busy)
            .map(|(e, _)| Arc::clone(e))
            .collect();
    }
    let mut fitting = role::candidates(table, intent);
    // Stable: the role order stays within each group.
    fitting.sort_by_key(|e| busy(e.id));
    fitting
}

/// After connecting under `aurora-global`: whether the endpoint's role
/// changed meanwhile. The watch catches a signal sent after it was
/// subscribed; one sent before (between the table load and the
/// subscription) followed a publish, which the current table shows.
fn role_changed(
    ctx: &ProxyContext,
    endpoint: &Endpoint,
    intent: Intent,
    role_watch: Option<&DownWatch>,
) -> bool {
    let signalled = role_watch.is_some_and(|w| w.has_changed().unwrap_or(false));
    let still_fits = ctx
        .router
        .route()
        .is_ok_and(|now| role::fits(&now, endpoint.id, intent));
    signalled || !still_fits
}

/// Tells the router about a failed attempt. A server over its connection
/// limits is busy, not down: it is tried after the others for a while
/// (backpressure) without being demoted.
fn report_failure(ctx: &ProxyContext, endpoint: &Endpoint, kind: FailureKind, err: &SessionError) {
    if kind == FailureKind::Busy {
        if ctx.router.report_busy(endpoint.id) {
            info!(endpoint = %endpoint.name, error = %err, "endpoint refused a connect for load; trying it after the others for a while");
        }
    } else {
        ctx.router.report(
            endpoint.id,
            PassiveSignal::ConnectFailed {
                kind,
                detail: err.to_string(),
            },
        );
    }
}

/// One attempt on `endpoint` alone, within `attempt_timeout`: whether it
/// takes a connection for `login` now (no failover, no failure reports).
pub(crate) async fn connect_to(
    ctx: &ProxyContext,
    endpoint: &Endpoint,
    login: &Login,
) -> Result<BackendConnection, SessionError> {
    let limit = ctx.attempt_timeout.min(ctx.connect_timeout);
    attempt(ctx, endpoint, login, limit, limit, None).await
}

/// One attempt on one endpoint: an idle pooled connection, else the
/// secret, a connect-rate token, then dial, TLS and authentication within
/// `limit`; abandoned early if the probes mark the endpoint down. The
/// credential fetch and the rate-limit wait spend `remaining`, the loop's
/// budget.
async fn attempt(
    ctx: &ProxyContext,
    endpoint: &Endpoint,
    login: &Login,
    limit: Duration,
    remaining: Duration,
    down: Option<DownWatch>,
) -> Result<BackendConnection, SessionError> {
    if let Some(idle) = &ctx.idle_connections {
        if let Some(Pooled {
            backend: mut connection,
            quiet_for,
        }) = idle.take(endpoint, login)
        {
            match pool::checkout(&mut connection, login, limit, quiet_for).await {
                Ok(()) => return Ok(connection),
                // A server that does not answer would not take a new
                // connection either: this endpoint failed, the loop goes on.
                Err(pool::CheckoutError::Timeout) => {
                    idle.discarded(Discard::Closed);
                    tokio::spawn(terminate(connection));
                    return Err(SessionError::Backend(ConnectError::Timeout {
                        endpoint: endpoint.describe(),
                        cause: format!("an idle pooled connection did not answer within {limit:?}"),
                    }));
                }
                Err(pool::CheckoutError::Failed(cause)) => {
                    debug!(endpoint = %endpoint.name, %cause, "pooled connection unusable; dialing");
                    idle.discarded(Discard::Closed);
                    tokio::spawn(terminate(connection));
                }
            }
        }
    }
    dial(ctx, endpoint, login, limit, remaining, down).await
}

/// A new connection to `endpoint` for the pool's warm spares: the
/// credential, a connect-rate token (spares count against the rate like
/// any connect) and the dial, within `attempt_timeout`; the pool is not
/// asked.
pub(crate) async fn dial_spare(
    ctx: &ProxyContext,
    endpoint: &Endpoint,
    login: &Login,
) -> Result<BackendConnection, SessionError> {
    let limit = ctx.attempt_timeout.min(ctx.connect_timeout);
    dial(ctx, endpoint, login, limit, ctx.connect_timeout, None).await
}

/// The secret, a connect-rate token, then dial, TLS and authentication
/// within `limit`, abandoned early if the probes mark the endpoint down.
async fn dial(
    ctx: &ProxyContext,
    endpoint: &Endpoint,
    login: &Login,
    limit: Duration,
    remaining: Duration,
    down: Option<DownWatch>,
) -> Result<BackendConnection, SessionError> {
    let started = Instant::now();
    // Credential providers (STS, metadata) may be slow or down: the client
    // hears about it within the budget either way.
    let secret = match tokio::time::timeout(
        remaining,
        ctx.credentials.password(login.credential_request(endpoint)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(credential_error(e)),
        Err(_) => {
            return Err(credential_error(CredentialError::AwsProvider(format!(
            "no credentials within the connect budget ({remaining:?}; [backend] connect_timeout)"
        ))))
        }
    };
    // One token per dial; waiting for it counts against the budget but
    // not against the endpoint's attempt limit.
    let budget_left = remaining.saturating_sub(started.elapsed());
    let waited = admit(ctx, budget_left).await?;
    let limit = limit.min(budget_left.saturating_sub(waited));
    let startup = StartupLogin {
        user: &login.user,
        params: &login.params,
        password: Some(&secret),
    };
    let dial = ctx.connector.connect(endpoint, &startup, limit);
    let Some(mut down) = down else {
        return Ok(dial.await?);
    };
    tokio::select! {
        biased;
        result = dial => Ok(result?),
        Ok(()) = down.changed() => Err(SessionError::Backend(ConnectError::Timeout {
            endpoint: endpoint.describe(),
            cause: "abandoned: health checks marked the endpoint down during the attempt".into(),
        })),
    }
}

/// Waits for a backend connect token (`[backend] connect_rate`) for at
/// most `budget`; returns how long it waited. Refuses at once when the
/// queue is full or the slot is beyond the budget: sleeping for a connect
/// that cannot happen in time only delays the client's error.
async fn admit(ctx: &ProxyContext, budget: Duration) -> Result<Duration, SessionError> {
    let Some(limiter) = &ctx.connect_limiter else {
        return Ok(Duration::ZERO);
    };
    let refused = |reason: &str| {
        let limit = limiter.limit();
        SessionError::ConnectRateLimited(format!(
            "{reason} (connect_rate = {}/s, connect_burst = {}, connect_queue = {})",
            limit.rate, limit.burst, limit.queue
        ))
    };
    let reservation = match limiter.admit(budget) {
        Ok(r) => r,
        Err(Refusal::QueueFull { .. }) => {
            return Err(refused(
                "too many connections waiting for the backend connect rate limit",
            ))
        }
        Err(Refusal::OverBudget { wait }) => {
            return Err(refused(&format!(
                "backend connect rate limit: the next connect slot is {wait:.1?} away, beyond \
                 what is left of connect_timeout ({budget:.1?})"
            )))
        }
    };
    if reservation.wait.is_zero() {
        return Ok(Duration::ZERO);
    }
    let m = &ctx.metrics;
    m.backend_connect_rate_limited_total.inc();
    let _waiting = GaugeGuard::inc(&m.backend_connect_queue_waiting);
    tokio::time::sleep(reservation.wait).await;
    Ok(reservation.wait)
}

/// Holds a gauge up while alive, whichever way the holder ends.
struct GaugeGuard<'a>(&'a IntGauge);

impl<'a> GaugeGuard<'a> {
    fn inc(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Says goodbye to a backend connection that will not be used.
pub(crate) async fn terminate(backend: BackendConnection) {
    terminate_stream(backend.stream).await;
}

/// Sends Terminate on a backend stream between messages, then drops it.
/// Bounded: the server may be hung.
pub(crate) async fn terminate_stream(mut stream: dsql_proxy_connector::BackendStream) {
    let mut buf = BytesMut::new();
    messages::terminate(&mut buf);
    let _ = tokio::time::timeout(Duration::from_millis(500), send(&mut stream, &buf)).await;
}

/// The client's error when no endpoint took the session. With one endpoint
/// it is that endpoint's own error; with several, each is listed.
fn all_failed(mut failures: Vec<(Arc<Endpoint>, SessionError)>) -> SessionError {
    if failures.len() == 1 {
        if let Some((_, err)) = failures.pop() {
            return err;
        }
    }
    if failures.is_empty() {
        return SessionError::NoEndpointReachable {
            attempts: Vec::new(),
            code: None,
        };
    }
    let codes: Vec<Option<&str>> = failures
        .iter()
        .map(|(_, e)| match e {
            SessionError::Backend(ConnectError::Refused { fields, .. }) => Some(fields.code()),
            _ => None,
        })
        .collect();
    let code = match codes.first() {
        Some(Some(first)) if codes.iter().all(|c| *c == Some(*first)) => [
            sqlstate::TOO_MANY_CONNECTIONS,
            sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
            sqlstate::CANNOT_CONNECT_NOW,
        ]
        .into_iter()
        .find(|known| known == first),
        _ => None,
    };
    let mut attempts: Vec<(String, String)> = failures
        .iter()
        .map(|(endpoint, err)| (endpoint.name.clone(), short_cause(err)))
        .collect();
    attempts.dedup();
    SessionError::NoEndpointReachable { attempts, code }
}

/// An attempt's failure without the endpoint name repeated.
fn short_cause(err: &SessionError) -> String {
    match err {
        SessionError::Backend(e) => e.cause(),
        other => other.to_string(),
    }
}

fn credential_error(e: CredentialError) -> SessionError {
    let code = match e {
        CredentialError::MissingClientPassword => sqlstate::INVALID_PASSWORD,
        CredentialError::Unavailable(_)
        | CredentialError::NoAwsCredentials(_)
        | CredentialError::Signing(_) => sqlstate::INVALID_AUTHORIZATION,
        // A provider outage (STS, metadata service) is a connection
        // problem, not a wrong identity.
        CredentialError::AwsProvider(_) => sqlstate::UNABLE_TO_CONNECT,
    };
    SessionError::Rejected(PgError::fatal(code, format!("dsql-proxy: {e}")))
}

/// Aurora DSQL answers 53300/53400 when a cluster's connection limits are
/// hit; under `kind = "dsql"` say so, since the bare server message does
/// not tell an application developer what to change. Other servers' own
/// words go through unchanged.
fn explain_limits(kind: BackendKind, err: SessionError) -> SessionError {
    if kind != BackendKind::Dsql {
        return err;
    }
    match err {
        SessionError::Backend(ConnectError::Refused {
            endpoint,
            mut fields,
            round_trip,
        }) if matches!(
            fields.code(),
            sqlstate::TOO_MANY_CONNECTIONS | sqlstate::CONFIGURATION_LIMIT_EXCEEDED
        ) =>
        {
            if fields.get(b'H').is_none() {
                fields.fields.push((
                    b'H',
                    format!(
                        "endpoint {endpoint} is over its connection limits (Aurora DSQL allows 100 new \
                         connections per second per cluster, burst 1,000, and a maximum number of \
                         connections); retry with backoff or use fewer connections"
                    ),
                ));
            }
            SessionError::Backend(ConnectError::Refused {
                endpoint,
                fields,
                round_trip,
            })
        }
        other => other,
    }
}

#[cfg(test)]
mod tests;
