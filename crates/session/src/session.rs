//! One client session from accept to close: handshake, route, backend
//! startup, relay, and the close log line.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::BytesMut;
use dsql_proxy_config::OnEndpointDown;
use dsql_proxy_connector::BackendConnection;
use dsql_proxy_protocol::startup::{self, StartupParam};
use dsql_proxy_protocol::tracking::{ParameterValues, SessionTracker};
use dsql_proxy_protocol::{messages, sqlstate, PgError, StartupMessage};
use dsql_proxy_routing::PassiveSignal;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::cancel::{CancelTarget, Registration};
use crate::connect::{self, Connected, Login};
use crate::continuity;
use crate::frontend::{self, ClientHello, Opening, Peer};
use crate::io::{send, Deadline};
use crate::mover::{
    at_idle_point, backend_failed_at_idle, connecting, continuity_enabled, drains_changed,
    lazy_move, signal, sleep_until, Fallback, Home, MoveReason, Mover, Step, Wake,
};
use crate::pool::{self, Discard, Pool};
use crate::relay::{Relay, RelayEnd};
use crate::retry::Retry;
use crate::role::{self, Intent};
use crate::stream::Transport;
use crate::{ProxyContext, SessionError};

/// Runs one accepted connection to the end. Never panics on peer input and
/// always logs one line when a session (not a cancel) ends.
pub async fn run(ctx: Arc<ProxyContext>, transport: Transport, peer: Peer, intent: Intent) {
    let started = Instant::now();
    let mut close = ctx.drain.close_signal();
    let deadline = Deadline::after(ctx.startup_timeout).or_closed(close.clone());
    // Startup memory is bounded by how many run at once; waiting for a turn
    // counts against startup_timeout.
    let turn = deadline
        .run(async { Ok(Arc::clone(&ctx.startups).acquire_owned().await) })
        .await;
    let permit = match turn {
        Ok(Ok(permit)) => permit,
        Ok(Err(_closed)) => return,
        Err(err) => {
            ctx.metrics
                .client_connections_rejected_total
                .with_label_values(&[err.reason()])
                .inc();
            info!(client = %peer, reason = %err.reason(), error = %err, "client rejected while waiting for its startup turn");
            let _ = frontend::reject(frontend::Failure {
                stream: Some(crate::stream::ClientStream::Plain(transport)),
                error: err,
            })
            .await;
            return;
        }
    };
    let opened = frontend::open(transport, &peer, &ctx.frontend, &deadline).await;
    drop(permit);
    let hello = match opened {
        Ok(Opening::Session(hello)) => hello,
        Ok(Opening::Cancel(key)) => return cancel_request(&ctx, key).await,
        Err(failure) => {
            let err = frontend::reject(failure).await;
            match err {
                // A client that connects and leaves (health checks, port
                // scanners) is not worth more than a debug line.
                SessionError::ClientIo(_) => {
                    debug!(client = %peer, error = %err, "client left during startup")
                }
                _ => {
                    ctx.metrics
                        .client_connections_rejected_total
                        .with_label_values(&[err.reason()])
                        .inc();
                    info!(client = %peer, reason = %err.reason(), error = %err, "client rejected during startup")
                }
            }
            return;
        }
    };
    let ClientHello {
        mut stream,
        startup,
        version,
        password,
    } = *hello;
    let user = startup.param("user").unwrap_or_default().into_owned();
    let database = startup
        .param("database")
        .map(|d| d.into_owned())
        .unwrap_or_else(|| user.clone());
    let params = backend_parameters(&startup, &ctx);
    // A server drops an oversized startup packet without a word, which
    // would look like an endpoint failure: refuse it here instead, before
    // any endpoint is touched.
    let forwarded = startup::startup_len(&params);
    if forwarded > startup::MAX_STARTUP_PACKET_LEN {
        let err = SessionError::Rejected(
            PgError::fatal(
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!(
                    "startup packet too long: the parameters forwarded to the server take \
                     {forwarded} bytes; PostgreSQL accepts at most {}",
                    startup::MAX_STARTUP_PACKET_LEN
                ),
            )
            .with_hint("send fewer or shorter startup parameters (options, application_name)"),
        );
        ctx.metrics
            .client_connections_rejected_total
            .with_label_values(&[err.reason()])
            .inc();
        info!(client = %peer, %user, %database, forwarded, "startup packet too long to forward; client rejected");
        let _ = frontend::reject(frontend::Failure {
            stream: Some(stream),
            error: err,
        })
        .await;
        return;
    }
    let login = Login {
        params,
        user,
        database,
        client_password: password,
    };
    let (user, database) = (&login.user, &login.database);
    let intent = Intent::for_startup(intent, &startup);
    // A shutdown does not wait for a slow connect (or for a writer): the
    // client hears 57P01.
    let connected = tokio::select! {
        biased;
        connected = connect::connect(&ctx, &login, intent) => connected,
        () = close.closed() => Err(SessionError::Shutdown),
    };
    let Connected {
        endpoint,
        backend,
        role_watch,
    } = match connected {
        Ok(connected) => connected,
        Err(SessionError::Shutdown) => {
            ctx.metrics
                .client_connections_rejected_total
                .with_label_values(&[SessionError::Shutdown.reason()])
                .inc();
            info!(client = %peer, %user, %database, reason = "shutdown", "session closed before it started: dsql-proxy is shutting down");
            let _ = frontend::reject(frontend::Failure {
                stream: Some(stream),
                error: SessionError::Shutdown,
            })
            .await;
            return;
        }
        Err(err) => {
            ctx.metrics
                .client_connections_rejected_total
                .with_label_values(&[err.reason()])
                .inc();
            warn!(
                client = %peer, %user, %database,
                reason = %err.reason(), error = %err, "backend connection failed"
            );
            let _ = frontend::reject(frontend::Failure {
                stream: Some(stream),
                error: err,
            })
            .await;
            return;
        }
    };
    let BackendConnection {
        stream: mut backend_stream,
        parameters,
        notices,
        key,
        ready_status,
        connected_at,
    } = backend;
    let backend_key = key.clone();

    // The client sees the backend's startup results, with the backend's
    // real process id and a proxy-issued secret, all in one write.
    let (client_key, registration) = match key {
        Some(backend_key) => {
            let target = CancelTarget {
                backend_key,
                endpoint: Arc::clone(&endpoint),
            };
            let (k, r) = ctx.cancels.register(version.cancel_secret_len(), target);
            (Some(k), Some(r))
        }
        None => (None, None),
    };
    let mut buf = BytesMut::with_capacity(512);
    messages::startup_answer(
        &mut buf,
        &parameters,
        &notices,
        client_key.as_ref().map(|k| &k.0),
        ready_status,
    );
    if let Err(e) = send_greeting(&mut stream, &buf, ctx.startup_timeout).await {
        debug!(client = %peer, error = %e, "client left (or stopped reading) before the session started");
        let mut terminate = BytesMut::new();
        messages::terminate(&mut terminate);
        let _ = send(&mut backend_stream, &terminate).await;
        return;
    }
    drop(buf);

    let continuity = continuity_enabled(&ctx);
    let mut home = Home::new(&ctx, endpoint, role_watch);
    let mut relay =
        Relay::new(&mut stream, &mut backend_stream).with_busy_poll(ctx.busy_poll.clone());
    // Retry and the pool read the session through the same tracker as
    // continuity.
    if continuity || ctx.retry.is_some() || ctx.pool.is_some() {
        relay = relay
            .with_session_tracker(SessionTracker::new(
                continuity::tracker_limits(),
                parameters,
            ))
            .with_continuity(continuity);
    }
    if let Some(settings) = &ctx.retry {
        let cancels = registration
            .as_ref()
            .map_or_else(Default::default, Registration::cancel_signal);
        relay = relay.with_retry(Some(Retry::new(
            Arc::clone(settings),
            Arc::clone(&ctx.metrics),
            cancels,
        )));
    }
    relay = relay.with_park_on_terminate(ctx.pool.is_some());
    let mut mover = Mover::new(
        &ctx,
        &login,
        intent,
        registration,
        backend_key,
        tokio::time::Instant::from_std(connected_at),
    );
    let eviction_endpoint;
    let mut end: Result<RelayEnd, Eviction> = loop {
        let wake = tokio::select! {
            // A role change goes first: once a stale writer is fenced, not
            // one more client byte may reach it.
            biased;
            changed = signal(&mut home.role) => Wake::Role(changed),
            end = &mut relay => Wake::Relay(end),
            changed = signal(&mut home.down) => Wake::Down(changed),
            () = drains_changed(&mut home.drains) => Wake::Drains,
            () = sleep_until(mover.move_at) => Wake::Lifetime,
            connected = connecting(&mut mover.connecting) => Wake::Spare(connected),
            () = close.closed() => Wake::Shutdown,
        };
        let step = match wake {
            Wake::Relay(RelayEnd::IdlePoint) => {
                at_idle_point(&mut relay, &mut home, &mut mover, &mut close).await
            }
            Wake::Relay(RelayEnd::IdleError) => {
                backend_failed_at_idle(&mut relay, &mut home, &mut mover, &mut close, true).await
            }
            // Closed or broken while idle, with no last word: the backend
            // is lost. (After an error the client was given, it is not.)
            Wake::Relay(end)
                if continuity
                    && end.backend_gone()
                    && relay.at_idle_point()
                    && !relay.downstream.is_broken()
                    && relay.downstream.last_tag() != b'E' =>
            {
                backend_failed_at_idle(&mut relay, &mut home, &mut mover, &mut close, false)
                    .await
                    .or_end(end)
            }
            Wake::Relay(end) => Step::End(Ok(end)),
            // Drained, or removed by a reload: the endpoint is alive, so
            // the session leaves at its next idle point, or stays.
            Wake::Down(false) | Wake::Drains
                if continuity
                    && ctx.on_endpoint_down == OnEndpointDown::Move
                    && (!home.endpoint_exists(&ctx) || ctx.router.is_drained(home.endpoint.id)) =>
            {
                mover.leave_pending = Some(if home.endpoint_exists(&ctx) {
                    MoveReason::Drained
                } else {
                    MoveReason::EndpointDown
                });
                relay.pause_at_idle(true);
                Step::Continue
            }
            Wake::Drains => Step::Continue,
            Wake::Role(false) | Wake::Down(false) => Step::Continue,
            Wake::Role(true) => {
                if continuity && relay.at_idle_point() && mover.movable(&relay) {
                    lazy_move(
                        &mut relay,
                        &mut home,
                        &mut mover,
                        &mut close,
                        MoveReason::WriterChanged,
                        Fallback::Close,
                    )
                    .await
                } else {
                    mover.refused(&relay);
                    Step::End(Err(Eviction::Role))
                }
            }
            Wake::Down(_) => match ctx.on_endpoint_down {
                OnEndpointDown::Keep => Step::Continue,
                OnEndpointDown::Move
                    if continuity && relay.at_idle_point() && mover.movable(&relay) =>
                {
                    lazy_move(
                        &mut relay,
                        &mut home,
                        &mut mover,
                        &mut close,
                        MoveReason::EndpointDown,
                        Fallback::Close,
                    )
                    .await
                }
                OnEndpointDown::Move => {
                    mover.refused(&relay);
                    Step::End(Err(Eviction::EndpointDown))
                }
                OnEndpointDown::Close => Step::End(Err(Eviction::EndpointDown)),
            },
            Wake::Lifetime => {
                mover.move_at = None;
                if !mover.state.pins.is_empty() {
                    // No connection for a session that cannot move now (not
                    // counted as a failed move: nothing forced one).
                    mover.retry_later();
                } else if continuity {
                    mover.connecting = Some(Box::pin(connect::connect(&ctx, &login, intent)));
                }
                Step::Continue
            }
            Wake::Spare(Ok(connected)) => {
                mover.spare = Some(connected);
                relay.pause_at_idle(true);
                Step::Continue
            }
            Wake::Spare(Err(err)) => {
                mover.failed(MoveReason::Lifetime, "connect", &err.to_string());
                mover.retry_later();
                Step::Continue
            }
            Wake::Shutdown => Step::End(Err(Eviction::Shutdown)),
        };
        match step {
            Step::Continue => {}
            Step::End(end) => {
                eviction_endpoint = Arc::clone(&home.endpoint);
                break end;
            }
        }
    };
    if let Some(spare) = mover.spare.take() {
        connect::terminate(spare.backend).await;
    }
    mover.connecting = None;
    let endpoint = eviction_endpoint;
    let mut evicted_for = None;
    match &end {
        Ok(_) => {}
        Err(eviction @ (Eviction::EndpointDown | Eviction::Role)) => {
            // The endpoint went down or its role changed: end the session
            // the way PostgreSQL ends one on shutdown, so pools reconnect
            // (to a healthy endpoint, the new writer) at once instead of
            // waiting on a dead socket or writing to a stale writer. Only
            // what was already read can still reach the client.
            let message = if *eviction == Eviction::Role {
                let (message, reason) = role::eviction(&ctx, &endpoint);
                evicted_for = Some(reason);
                message
            } else {
                PgError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    format!(
                        "dsql-proxy: endpoint {} is unavailable; reconnect",
                        endpoint.name
                    ),
                )
            };
            let until = Instant::now() + EVICTION_FLUSH;
            let flushed = tokio::time::timeout_at(until, relay.flush_downstream()).await;
            if matches!(flushed, Ok(Ok(()))) && relay.downstream.at_boundary() {
                send_fatal(&mut relay, &message, until).await;
            }
        }
        Err(Eviction::Shutdown) => {
            if let Some(ended) = shutdown_goodbye(&mut relay, ctx.request_grace).await {
                end = Ok(ended);
            }
        }
        Err(Eviction::MoveFailed) => {}
        Err(Eviction::ShutdownDuringMove) => {
            let until = Instant::now() + EVICTION_FLUSH;
            send_fatal(&mut relay, &crate::shutdown_error(), until).await;
        }
    }
    if let Ok(ended) = &end {
        if let Some(detail) = backend_broke(ended, &relay) {
            ctx.router
                .report(endpoint.id, PassiveSignal::SessionBroken { detail });
        }
    }
    let stats = relay.stats();
    let reason = match &end {
        Ok(end) => end.reason(),
        Err(eviction) => evicted_for.unwrap_or(eviction.reason()),
    };
    // The client left while idle and its Terminate was kept from the
    // backend: pool the backend, or say goodbye to it.
    let parking = match (&end, &ctx.pool) {
        (Ok(RelayEnd::ClientTerminated), Some(pool)) => {
            let verdict = if !mover.state.pins.is_empty() {
                Err(Discard::Pinned)
            } else if !relay.at_idle_point() {
                Err(Discard::Busy)
            } else {
                Ok(relay
                    .session()
                    .map(|tracker| tracker.parameters().clone())
                    .unwrap_or_default())
            };
            Some((Arc::clone(pool), verdict))
        }
        _ => None,
    };
    drop(relay);
    if let Some((pool, verdict)) = parking {
        park(
            &ctx,
            &pool,
            verdict,
            backend_stream,
            &home,
            &login,
            mover.backend_key.clone(),
            mover.backend_born,
        )
        .await;
    }
    drop(home);
    let m = &ctx.metrics;
    m.sessions_closed_total.with_label_values(&[reason]).inc();
    m.session_duration_seconds
        .observe(started.elapsed().as_secs_f64());
    m.bytes_total
        .with_label_values(&["client_to_backend"])
        .inc_by(stats.client_to_backend);
    m.bytes_total
        .with_label_values(&["backend_to_client"])
        .inc_by(stats.backend_to_client);
    // A plain client that said Terminate has nothing left to hear: closing
    // the socket sends the FIN (one syscall less at high connect rates). A
    // TLS client still gets its close_notify.
    let client_said_goodbye =
        matches!(end, Ok(RelayEnd::ClientTerminated | RelayEnd::ClientClosed));
    if stream.is_tls() || !client_said_goodbye {
        let _ = tokio::time::timeout(EVICTION_FLUSH, stream.shutdown()).await;
    }
    info!(
        target: SESSION_LOG_TARGET,
        client = %peer,
        %user,
        %database,
        endpoint = %endpoint.name,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_from_client = stats.client_to_backend,
        bytes_to_client = stats.backend_to_client,
        reason = %reason,
        "session closed"
    );
}

/// The log target of the one line each ended session logs, so a filter
/// can drop it alone (`--log-level info,dsql_proxy::sessions=off`), as
/// PgBouncer's `log_disconnections = 0` does: at thousands of connections
/// per second it is most of what the proxy logs and a sizeable part of its
/// CPU per connection.
pub const SESSION_LOG_TARGET: &str = "dsql_proxy::sessions";

/// Writes the session's first answer (AuthenticationOk .. ReadyForQuery)
/// within `limit`: a client that stops reading right after its startup
/// must not hold a backend connection open.
async fn send_greeting<S>(stream: &mut S, greeting: &[u8], limit: Duration) -> std::io::Result<()>
where
    S: tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::time::timeout(limit, send(stream, greeting))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// How long the proxy spends telling a client its session is over (and,
/// separately, closing the client's stream): the binary's shutdown waits a
/// little longer than twice this for sessions to finish.
pub const EVICTION_FLUSH: Duration = Duration::from_secs(1);

/// Why the proxy ended a relayed session itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Eviction {
    /// The probes confirmed the session's endpoint down.
    EndpointDown,
    /// The endpoint stopped being the writer, or was fenced
    /// (`aurora-global`).
    Role,
    /// The proxy is shutting down and the drain time is over.
    Shutdown,
    /// The session had to leave its backend and could not move; the
    /// client was told why.
    MoveFailed,
    /// The proxy is shutting down while a move held the client's next
    /// message, which was never sent anywhere: the client only hears why.
    ShutdownDuringMove,
}

impl Eviction {
    /// The `sessions_closed_total{reason}` label (a role eviction names
    /// its cause instead, see `role::eviction`).
    fn reason(self) -> &'static str {
        match self {
            Self::EndpointDown => "endpoint_down",
            Self::Role => "role_changed",
            Self::Shutdown => "shutdown",
            Self::MoveFailed => "move_failed",
            Self::ShutdownDuringMove => "shutdown",
        }
    }
}

/// Ends a relayed session at shutdown without breaking a promise to either
/// side. A request in flight (a COMMIT forwarded, its ReadyForQuery not
/// back yet) may commit, so its answer is relayed first, for at most
/// `request_grace`. Then the client's message the backend has part of is
/// completed and the backend's current message too, so neither the FATAL
/// to the client nor the Terminate to the server lands inside a message;
/// the Terminate is sent only when the server has nothing but whole
/// messages (else the connection is just closed, which the server treats
/// as a client that vanished). Returns the relay's own end if the session
/// ended by itself meanwhile.
async fn shutdown_goodbye<C, B>(
    relay: &mut Relay<'_, C, B>,
    request_grace: Duration,
) -> Option<RelayEnd>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    let in_flight = relay.requests_in_flight();
    if in_flight > 0 {
        match tokio::time::timeout(request_grace, relay.settle()).await {
            Ok(Ok(())) => debug!("the request in flight was answered; closing the session"),
            Ok(Err(end)) => return Some(end),
            Err(_) => {
                info!(
                    requests = relay.requests_in_flight(),
                    request_grace = ?request_grace,
                    "requests still in flight after request_grace; closing the session anyway"
                )
            }
        }
    }
    let until = Instant::now() + EVICTION_FLUSH;
    let upstream = tokio::time::timeout_at(until, relay.finish_upstream_message()).await;
    let downstream = tokio::time::timeout_at(until, relay.finish_downstream_message()).await;
    if matches!(downstream, Ok(Ok(()))) && relay.downstream_settled() {
        send_fatal(relay, &crate::shutdown_error(), until).await;
    }
    // A clean goodbye to the server (an open transaction rolls back either
    // way).
    if matches!(upstream, Ok(Ok(()))) && relay.upstream_settled() {
        let mut buf = BytesMut::new();
        messages::terminate(&mut buf);
        let _ = tokio::time::timeout_at(until, send(relay.backend(), &buf)).await;
    }
    None
}

/// Tells the client its session is over, giving up at `until`.
async fn send_fatal<C, B>(relay: &mut Relay<'_, C, B>, message: &PgError, until: Instant)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    let mut buf = BytesMut::new();
    message.encode(&mut buf);
    let _ = tokio::time::timeout_at(until, send(relay.client(), &buf)).await;
}

/// A backend connection that broke without the server saying why: a reset,
/// or an EOF not preceded by an ErrorResponse. That is a passive health
/// signal; a FATAL (admin shutdown, idle timeout) is not, and neither is a
/// break the client caused: a PostgreSQL server closes, without an
/// ErrorResponse, on a client message it cannot frame or whose length is
/// over its limit for the type, so once the client's stream did that the
/// endpoint is not blamed.
fn backend_broke<C: ?Sized, B: ?Sized>(end: &RelayEnd, relay: &Relay<'_, C, B>) -> Option<String> {
    if relay.upstream.protocol_violation() {
        return None;
    }
    match end {
        RelayEnd::BackendError(e) => Some(format!("backend connection broke: {e}")),
        RelayEnd::BackendClosed if relay.downstream.last_tag() != b'E' => {
            Some("backend closed the connection without an error".into())
        }
        _ => None,
    }
}

/// The startup parameters forwarded to the backend: the client's, minus the
/// drop list, plus a default application_name.
fn backend_parameters(startup: &StartupMessage, ctx: &ProxyContext) -> Vec<StartupParam> {
    let mut params: Vec<StartupParam> = startup
        .params
        .iter()
        .filter(|p| {
            // target_session_attrs is a client-side setting (role routing
            // reads it), never a server parameter.
            !p.name.eq_ignore_ascii_case("target_session_attrs")
                && !ctx
                    .drop_parameters
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case(&p.name))
        })
        .cloned()
        .collect();
    let has_app_name = params
        .iter()
        .any(|p| p.name == "application_name" && !p.value.is_empty());
    if !has_app_name && !ctx.default_application_name.is_empty() {
        params.retain(|p| p.name != "application_name");
        params.push(StartupParam::new(
            "application_name",
            ctx.default_application_name.as_bytes(),
        ));
    }
    params
}

pub(crate) async fn cancel_request(ctx: &ProxyContext, key: dsql_proxy_protocol::CancelKey) {
    ctx.metrics.cancel_requests_total.inc();
    // Unknown keys are dropped without an answer, as PostgreSQL does, so a
    // scanner learns nothing.
    let Some(target) = ctx.cancels.lookup(&key) else {
        debug!(pid = key.pid, "cancel request with unknown key ignored");
        return;
    };
    match ctx
        .connector
        .cancel(&target.endpoint, &target.backend_key, ctx.connect_timeout)
        .await
    {
        Ok(()) => debug!(endpoint = %target.endpoint.name, "cancel request forwarded"),
        Err(e) => {
            warn!(endpoint = %target.endpoint.name, error = %e, "cancel request could not be forwarded")
        }
    }
}

/// Resets a backend whose client left while it was idle and hands it to
/// the pool; a backend that cannot be pooled gets Terminate.
#[allow(clippy::too_many_arguments)]
async fn park(
    ctx: &ProxyContext,
    pool: &Arc<Pool>,
    verdict: Result<ParameterValues, Discard>,
    mut stream: dsql_proxy_connector::BackendStream,
    home: &Home,
    login: &Login,
    key: Option<dsql_proxy_connector::BackendKey>,
    born: tokio::time::Instant,
) {
    let mut parameters = match verdict {
        Ok(parameters) => parameters,
        Err(reason) => {
            pool.count_discard(reason);
            connect::terminate_stream(stream).await;
            return;
        }
    };
    if let Err(e) = pool::reset(&mut stream, ctx.kind, &login.user, &mut parameters).await {
        debug!(endpoint = %home.endpoint.name, error = %e, "backend not pooled: its reset failed");
        pool.count_discard(Discard::ResetFailed);
        connect::terminate_stream(stream).await;
        return;
    }
    let backend = BackendConnection {
        stream,
        parameters,
        notices: Vec::new(),
        key,
        ready_status: b'I',
        connected_at: born.into_std(),
    };
    // Refused (full, its endpoint just went): closed by the pool.
    let _ = pool.park(Arc::clone(&home.endpoint), &login.params, backend);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_greeting_the_client_does_not_read_times_out() {
        // A client whose receive window is full: the greeting can never
        // be written.
        let (_client, mut proxy_side) = tokio::io::duplex(64);
        let greeting = vec![b'S'; 4096];
        let limit = Duration::from_millis(100);
        let written = tokio::time::timeout(
            Duration::from_secs(30),
            send_greeting(&mut proxy_side, &greeting, limit),
        )
        .await
        .expect("send_greeting gives up by itself");
        assert_eq!(written.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    }
}
