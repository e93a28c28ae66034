//! The listener and one connection's life: TLS (SNI required), startup,
//! token check, upstream session, relay, and the session-duration cut-off.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use dsql_proxy_config::{Secret, TlsMode};
use dsql_proxy_connector::{BackendConnection, BackendKey, ConnectError, Connector, StartupLogin};
use dsql_proxy_protocol::startup::{StartupParam, TLS_HANDSHAKE_RECORD};
use dsql_proxy_protocol::{
    frontend, messages, sqlstate, CancelKey, InitialPacket, PgError, ProtocolVersion,
    StartupMessage,
};
use dsql_proxy_routing::{Endpoint, EndpointId};
use dsql_proxy_session::io::{read_initial, read_message, send};
use dsql_proxy_session::relay::{Relay, RelayEnd};
use dsql_proxy_session::stream::{ClientStream, Rewind, Transport};
use dsql_proxy_session::tls::POSTGRES_ALPN;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::{EmulatorConfig, SessionEnd, UpstreamTls, TRANSACTION_GRACE};
use crate::conflict::{ConflictInjector, Conflicts};
use crate::error::upstream_tls_error;
use crate::limits::{ConnectionLimit, ConnectionSlot, TokenBucket};
use crate::sigv4::{TokenVerifier, VerifiedToken};
use crate::EmulatorError;

/// Largest PasswordMessage body accepted (tokens with a session token are a
/// few KiB).
const MAX_PASSWORD_BODY: usize = 16 * 1024;
/// How long a refused client gets to read its error.
const REJECT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything connections share.
struct Shared {
    verifier: TokenVerifier,
    acceptor: TlsAcceptor,
    upstream: Connector,
    connect_timeout: Duration,
    endpoint: Arc<Endpoint>,
    role_passwords: HashMap<String, Secret>,
    rate: TokenBucket,
    connections: ConnectionLimit,
    refused_parameters: Vec<String>,
    max_session_duration: Duration,
    session_end: SessionEnd,
    startup_timeout: Duration,
    conflicts: Conflicts,
}

/// A bound emulator, ready to [`serve`](Emulator::serve).
pub struct Emulator {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("local_addr", &self.local_addr)
            .field("verifier", &self.shared.verifier)
            .field("upstream", &self.shared.endpoint.describe())
            .finish_non_exhaustive()
    }
}

/// The upstream as an endpoint for the connector: `IP:PORT` is dialled
/// directly, `HOST:PORT` is resolved.
fn upstream_endpoint(address: &str) -> Result<Endpoint, EmulatorError> {
    let endpoint = |host: String, port: u16, connect_address: Option<SocketAddr>| Endpoint {
        id: EndpointId(0),
        name: "upstream".to_owned(),
        region: None,
        host,
        port,
        connect_address,
        priority: 0,
        route53_health_check_id: None,
    };
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(endpoint(addr.ip().to_string(), addr.port(), Some(addr)));
    }
    let bad = || {
        EmulatorError::Config(format!(
            "upstream address {address:?} is not HOST:PORT or IP:PORT"
        ))
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok(endpoint(host.to_owned(), port, None))
}

impl Emulator {
    /// Validates the configuration, loads the TLS material and binds the
    /// listener.
    pub async fn bind(config: EmulatorConfig) -> Result<Self, EmulatorError> {
        config.validate()?;
        let tls = crate::tls::server_config(&config.tls_cert, &config.tls_key)?;
        let endpoint = upstream_endpoint(&config.upstream.address)?;
        let mode = match config.upstream.tls {
            UpstreamTls::Disable => TlsMode::Disable,
            UpstreamTls::Require => TlsMode::Require,
        };
        // The upstream is the tester's own local PostgreSQL, reached with
        // at most `require`: the proxy's auth-downgrade guard would make a
        // `password` pg_hba line unusable, so the emulator answers it.
        let upstream = Connector::new(mode, None)
            .map_err(upstream_tls_error)?
            .with_cleartext_password(true);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| EmulatorError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr()?;
        let shared = Shared {
            verifier: TokenVerifier {
                cluster_host: config.cluster_host,
                region: config.region,
                keys: config.credentials,
                max_clock_skew: config.max_clock_skew,
            },
            acceptor: TlsAcceptor::from(tls),
            upstream,
            connect_timeout: config.upstream.connect_timeout,
            endpoint: Arc::new(endpoint),
            role_passwords: config.upstream.role_passwords,
            rate: TokenBucket::new(config.rate_limit),
            connections: ConnectionLimit::new(config.max_connections),
            refused_parameters: config.refused_parameters,
            max_session_duration: config.max_session_duration,
            session_end: config.session_end,
            startup_timeout: config.startup_timeout,
            conflicts: Conflicts::new(config.conflict_every, config.conflict_kind),
        };
        Ok(Self {
            listener,
            local_addr,
            shared: Arc::new(shared),
        })
    }

    /// The bound address (with the real port when the config said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts connections until `shutdown` resolves. Sessions already
    /// running continue on their own tasks.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    info!("shutting down: no longer accepting connections");
                    return;
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        let admission = self.shared.admit();
                        tokio::spawn(connection(Arc::clone(&self.shared), tcp, peer, admission));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }
}

/// The limits' verdict on a new connection, taken at accept time and
/// reported after the client's StartupMessage (as PostgreSQL reports "too
/// many clients").
enum Admission {
    Admitted(ConnectionSlot),
    RateLimited,
    TooManyConnections,
}

impl Shared {
    fn admit(&self) -> Admission {
        if !self.rate.try_acquire() {
            return Admission::RateLimited;
        }
        match self.connections.try_acquire() {
            Some(slot) => Admission::Admitted(slot),
            None => Admission::TooManyConnections,
        }
    }
}

/// A client that passed TLS, startup and the token check.
struct Authenticated {
    stream: ClientStream,
    startup: StartupMessage,
    role: String,
    sni: String,
    token: VerifiedToken,
    _slot: ConnectionSlot,
}

async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, admission: Admission) {
    let started = Instant::now();
    let opened =
        tokio::time::timeout(shared.startup_timeout, open(&shared, tcp, peer, admission)).await;
    let auth = match opened {
        Ok(Some(auth)) => auth,
        Ok(None) => return,
        Err(_) => {
            info!(client = %peer, timeout = ?shared.startup_timeout, "client did not finish startup in time; closing");
            return;
        }
    };
    run_session(&shared, auth, peer, started).await;
}

/// Sends `err` (if the client still listens) and closes, all bounded.
async fn reject<S: AsyncWrite + Unpin>(mut stream: S, err: &PgError) {
    let mut buf = BytesMut::new();
    err.encode(&mut buf);
    let attempt = async {
        stream.write_all(&buf).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(REJECT_WRITE_TIMEOUT, attempt).await;
}

async fn accept_tls(
    shared: &Shared,
    transport: Rewind<Transport>,
    peer: SocketAddr,
    how: &'static str,
) -> Option<tokio_rustls::server::TlsStream<Rewind<Transport>>> {
    match shared.acceptor.accept(transport).await {
        Ok(tls) => Some(tls),
        Err(e) => {
            info!(client = %peer, negotiation = how, error = %e, "TLS handshake failed");
            None
        }
    }
}

fn protocol_violation(message: impl Into<String>) -> PgError {
    PgError::fatal(sqlstate::PROTOCOL_VIOLATION, message)
}

/// TLS, StartupMessage, admission, refused parameters and the token check.
/// Every refusal is sent to the client and logged here; `None` means the
/// connection is finished.
async fn open(
    shared: &Shared,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) -> Option<Authenticated> {
    let mut transport = Transport::Tcp(tcp);
    let mut first = [0u8; 1];
    if let Err(e) = transport.read_exact(&mut first).await {
        debug!(client = %peer, error = %e, "client left before sending anything");
        return None;
    }

    let mut stream = if first[0] == TLS_HANDSHAKE_RECORD {
        // PostgreSQL 17 sslnegotiation=direct: a ClientHello right away.
        let tls = accept_tls(
            shared,
            Rewind::new(first.to_vec(), transport),
            peer,
            "direct",
        )
        .await?;
        let alpn_ok = tls.get_ref().1.alpn_protocol() == Some(POSTGRES_ALPN);
        let stream = ClientStream::Tls(Box::new(tls));
        if !alpn_ok {
            info!(client = %peer, "direct TLS without ALPN \"postgresql\" refused");
            reject(
                stream,
                &protocol_violation("direct TLS connection requires ALPN protocol \"postgresql\""),
            )
            .await;
            return None;
        }
        stream
    } else {
        let mut pending = Some(first[0]);
        let mut gss_answered = false;
        loop {
            match read_initial(&mut transport, pending.take()).await {
                Err(e) => {
                    debug!(client = %peer, error = %e, "client left during negotiation");
                    return None;
                }
                Ok(Err(e)) => {
                    info!(client = %peer, error = %e, "invalid startup packet");
                    reject(transport, &protocol_violation(e.to_string())).await;
                    return None;
                }
                Ok(Ok(InitialPacket::SslRequest)) => {
                    if send(&mut transport, b"S").await.is_err() {
                        return None;
                    }
                    let tls = accept_tls(
                        shared,
                        Rewind::new(Vec::new(), transport),
                        peer,
                        "sslrequest",
                    )
                    .await?;
                    break ClientStream::Tls(Box::new(tls));
                }
                Ok(Ok(InitialPacket::GssEncRequest)) if !gss_answered => {
                    gss_answered = true;
                    if send(&mut transport, b"N").await.is_err() {
                        return None;
                    }
                }
                Ok(Ok(InitialPacket::GssEncRequest)) => {
                    reject(
                        transport,
                        &protocol_violation(
                            "unexpected encryption request: GSSENCRequest was already refused",
                        ),
                    )
                    .await;
                    return None;
                }
                Ok(Ok(InitialPacket::Cancel(key))) => {
                    forward_cancel(shared, key, peer).await;
                    return None;
                }
                Ok(Ok(InitialPacket::Startup(_))) => {
                    info!(client = %peer, "plaintext startup refused: TLS is required");
                    let err = protocol_violation(
                        "SSL/TLS is required: this server accepts only encrypted connections",
                    )
                    .with_hint("connect with sslmode=require (or stronger) and send the cluster's host name as SNI");
                    reject(transport, &err).await;
                    return None;
                }
            }
        }
    };

    let sni = match &stream {
        ClientStream::Tls(tls) => tls.get_ref().1.server_name().map(str::to_owned),
        ClientStream::Plain(_) => None,
    };
    let Some(sni) = sni else {
        // The certificate resolver already refuses these; a resumed session
        // must not slip past it either.
        info!(client = %peer, "TLS session without SNI refused");
        reject(
            stream,
            &protocol_violation("TLS server name indication (SNI) is required"),
        )
        .await;
        return None;
    };

    let startup = match read_initial(&mut stream, None).await {
        Err(e) => {
            debug!(client = %peer, error = %e, "client left after the TLS handshake");
            return None;
        }
        Ok(Err(e)) => {
            info!(client = %peer, error = %e, "invalid startup packet");
            reject(stream, &protocol_violation(e.to_string())).await;
            return None;
        }
        Ok(Ok(InitialPacket::Startup(s))) => s,
        Ok(Ok(InitialPacket::Cancel(key))) => {
            forward_cancel(shared, key, peer).await;
            return None;
        }
        Ok(Ok(InitialPacket::SslRequest | InitialPacket::GssEncRequest)) => {
            reject(
                stream,
                &protocol_violation(
                    "unexpected encryption request: encryption was already negotiated",
                ),
            )
            .await;
            return None;
        }
    };

    let Some(role) = startup
        .param("user")
        .filter(|u| !u.is_empty())
        .map(|u| u.into_owned())
    else {
        reject(
            stream,
            &PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
            ),
        )
        .await;
        return None;
    };

    if let Some(p) = startup.params.iter().find(|p| {
        shared
            .refused_parameters
            .iter()
            .any(|r| r.eq_ignore_ascii_case(&p.name))
    }) {
        info!(client = %peer, user = %role, parameter = %p.name, "refused startup parameter");
        reject(
            stream,
            &protocol_violation(format!("unsupported startup parameter: {}", p.name)),
        )
        .await;
        return None;
    }

    let slot = match admission {
        Admission::Admitted(slot) => slot,
        Admission::RateLimited => {
            info!(client = %peer, user = %role, "connection rate limit exceeded");
            reject(
                stream,
                &PgError::fatal(
                    sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                    "connection rate limit exceeded: too many new connections, retry later",
                ),
            )
            .await;
            return None;
        }
        Admission::TooManyConnections => {
            info!(client = %peer, user = %role, max = shared.connections.max(), "too many connections");
            reject(
                stream,
                &PgError::fatal(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!(
                        "sorry, too many clients already: the cluster allows {} connections",
                        shared.connections.max()
                    ),
                ),
            )
            .await;
            return None;
        }
    };

    // The upstream session is opened at 3.0, so that is what the client gets.
    let mut buf = BytesMut::with_capacity(64);
    if startup.requested != ProtocolVersion::V3_0 || !startup.protocol_options.is_empty() {
        messages::negotiate_protocol_version(
            &mut buf,
            ProtocolVersion::V3_0,
            &startup.protocol_options,
        );
    }
    messages::auth_cleartext(&mut buf);
    if send(&mut stream, &buf).await.is_err() {
        return None;
    }

    let raw = match read_message(&mut stream, MAX_PASSWORD_BODY).await {
        Err(e) => {
            debug!(client = %peer, user = %role, error = %e, "client left during authentication");
            return None;
        }
        Ok(Err(e)) => {
            reject(stream, &protocol_violation(e.to_string())).await;
            return None;
        }
        Ok(Ok(raw)) => raw,
    };
    if raw.tag == b'X' {
        debug!(client = %peer, user = %role, "client terminated during authentication");
        return None;
    }
    let token = match frontend::decode_password(&raw) {
        Ok(t) => t,
        Err(e) => {
            info!(client = %peer, user = %role, error = %e, "bad password message");
            reject(
                stream,
                &protocol_violation(format!("expected a password response: {e}")),
            )
            .await;
            return None;
        }
    };
    let verified = shared
        .verifier
        .verify(&token, &role, Some(&sni), SystemTime::now());
    drop(token);
    let token = match verified {
        Ok(t) => t,
        Err(reason) => {
            // The reason never contains the token; the token is never logged.
            info!(
                client = %peer, user = %role, sni = %sni,
                reason = reason.kind(), detail = %reason,
                "password authentication failed"
            );
            let err = PgError::fatal(
                sqlstate::INVALID_PASSWORD,
                format!("password authentication failed for user \"{role}\""),
            )
            .with_detail(reason.to_string());
            reject(stream, &err).await;
            return None;
        }
    };
    Some(Authenticated {
        stream,
        startup,
        role,
        sni,
        token,
        _slot: slot,
    })
}

/// Client startup parameters for the upstream: `user` is the role, the rest
/// as the client sent them.
fn upstream_params(startup: &StartupMessage, role: &str) -> Vec<StartupParam> {
    let mut params = vec![StartupParam::new("user", role)];
    params.extend(startup.params.iter().filter(|p| p.name != "user").cloned());
    params
}

fn upstream_error(err: &ConnectError) -> BytesMut {
    let mut buf = BytesMut::new();
    // The upstream's own refusal goes through verbatim.
    if let Some(fields) = err.refusal() {
        messages::error_response(&mut buf, &fields.fields);
        return buf;
    }
    PgError::fatal(
        sqlstate::CONNECTION_FAILURE,
        format!("dsql-emulator: cannot open the upstream PostgreSQL session: {err}"),
    )
    .encode(&mut buf);
    buf
}

async fn run_session(shared: &Shared, auth: Authenticated, peer: SocketAddr, started: Instant) {
    let Authenticated {
        stream: mut client,
        startup,
        role,
        sni,
        token,
        _slot,
    } = auth;
    let params = upstream_params(&startup, &role);
    let login = StartupLogin {
        user: &role,
        params: &params,
        password: shared.role_passwords.get(&role),
    };
    let upstream = match shared
        .upstream
        .connect(&shared.endpoint, &login, shared.connect_timeout)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!(client = %peer, user = %role, reason = e.reason(), error = %e, "upstream session failed");
            let buf = upstream_error(&e);
            let attempt = async {
                client.write_all(&buf).await?;
                client.flush().await?;
                client.shutdown().await
            };
            let _ = tokio::time::timeout(REJECT_WRITE_TIMEOUT, attempt).await;
            return;
        }
    };
    let BackendConnection {
        stream: mut upstream_stream,
        parameters,
        notices,
        key,
        ready_status,
        ..
    } = upstream;

    let mut buf = BytesMut::with_capacity(512);
    messages::startup_answer(
        &mut buf,
        &parameters,
        &notices,
        key.as_ref().map(|BackendKey(k)| k),
        ready_status,
    );
    if let Err(e) = send(&mut client, &buf).await {
        debug!(client = %peer, error = %e, "client left before the session started");
        let mut terminate = BytesMut::new();
        messages::terminate(&mut terminate);
        let _ = send(&mut upstream_stream, &terminate).await;
        return;
    }
    info!(
        client = %peer, user = %role, sni = %sni,
        access_key_id = %token.access_key_id, action = %token.action,
        session_token = token.has_session_token,
        "session started"
    );

    if shared.conflicts.enabled() {
        let mut upstream = ConflictInjector::new(
            upstream_stream,
            &shared.conflicts,
            ready_status,
            peer,
            &role,
        );
        relay_session(shared, &mut client, &mut upstream, peer, &role, started).await;
        let (commit_points, conflicts) = upstream.counts();
        debug!(client = %peer, user = %role, commit_points, conflicts, "conflict injection: session summary");
    } else {
        relay_session(
            shared,
            &mut client,
            &mut upstream_stream,
            peer,
            &role,
            started,
        )
        .await;
    }
}

/// Relays until the session ends, then closes it (see [`Ending`]).
async fn relay_session<B>(
    shared: &Shared,
    client: &mut ClientStream,
    upstream_stream: &mut B,
    peer: SocketAddr,
    role: &str,
    started: Instant,
) where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = started + shared.max_session_duration;
    let mut relay = Relay::new(client, upstream_stream);
    let ending = match tokio::time::timeout_at(deadline, &mut relay).await {
        Ok(end) => Ending::Relay(end),
        Err(_elapsed) => {
            // DSQL lets a transaction running at the limit finish, within
            // its own transaction limit.
            let in_transaction = !is_idle(&relay);
            if in_transaction {
                debug!(
                    client = %peer, user = %role,
                    transaction_status = %char::from(relay.downstream.transaction_status()),
                    requests_in_flight = relay.requests_in_flight(),
                    "maximum session duration reached while busy: letting the transaction finish"
                );
            }
            let grace = deadline + TRANSACTION_GRACE;
            match tokio::time::timeout_at(grace, relay_until_idle(&mut relay)).await {
                Ok(Some(end)) => Ending::Relay(end),
                Ok(None) => Ending::Deadline {
                    in_transaction,
                    grace_exceeded: false,
                },
                Err(_elapsed) => Ending::Deadline {
                    in_transaction,
                    grace_exceeded: true,
                },
            }
        }
    };
    let stats = relay.stats();
    // Idle, or the grace ran out: the session is ended at whatever point
    // each direction is, but a message is added only where none is cut.
    let client_clean = relay.downstream_settled();
    let upstream_clean = relay.upstream_settled();
    drop(relay);

    match ending {
        Ending::Relay(end) => {
            let _ = tokio::time::timeout(REJECT_WRITE_TIMEOUT, client.shutdown()).await;
            info!(
                client = %peer, user = %role,
                duration_ms = started.elapsed().as_millis() as u64,
                bytes_from_client = stats.client_to_backend,
                bytes_to_client = stats.backend_to_client,
                reason = end.reason(),
                "session closed"
            );
        }
        Ending::Deadline {
            in_transaction,
            grace_exceeded,
        } => {
            let fatal_sent = shared.session_end == SessionEnd::Fatal && client_clean;
            if fatal_sent {
                let err = PgError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    format!(
                        "terminating connection: the maximum session duration of {}s was reached",
                        shared.max_session_duration.as_secs_f64()
                    ),
                )
                .with_hint("open a new connection");
                reject(&mut *client, &err).await;
            } else {
                // DSQL's way: no message, just the end of the stream (a TLS
                // close_notify, so clients see a clean close).
                let _ = tokio::time::timeout(REJECT_WRITE_TIMEOUT, client.shutdown()).await;
            }
            if upstream_clean {
                let mut terminate = BytesMut::new();
                messages::terminate(&mut terminate);
                let _ =
                    tokio::time::timeout(REJECT_WRITE_TIMEOUT, send(upstream_stream, &terminate))
                        .await;
            }
            info!(
                client = %peer, user = %role,
                duration_ms = started.elapsed().as_millis() as u64,
                bytes_from_client = stats.client_to_backend,
                bytes_to_client = stats.backend_to_client,
                fatal_sent,
                waited_for_transaction = in_transaction,
                transaction_grace_exceeded = grace_exceeded,
                reason = "max_session_duration",
                "session closed"
            );
        }
    }
}

/// Why the relay stopped.
enum Ending {
    /// One side ended the session.
    Relay(RelayEnd),
    /// The maximum session duration: reached while idle, after the
    /// transaction running then finished (`in_transaction`), or when that
    /// took longer than [`TRANSACTION_GRACE`].
    Deadline {
        in_transaction: bool,
        grace_exceeded: bool,
    },
}

/// Outside a transaction block, no request in flight, and everything read
/// in either direction written, ending between two messages: the session
/// can end here without losing an answer or cutting a message.
fn is_idle<C, B>(relay: &Relay<'_, C, B>) -> bool
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    relay.downstream.transaction_status() == b'I'
        && relay.requests_in_flight() == 0
        && relay.upstream_settled()
        && relay.downstream_settled()
}

/// Relays as usual (the client's next statements in a transaction are new
/// requests, so not [`Relay::settle`]) until the session is idle (`None`)
/// or ends on its own. The state only changes while the relay is polled,
/// so checking after each poll catches the first idle moment without a
/// timer. Callers bound it in time.
async fn relay_until_idle<C, B>(relay: &mut Relay<'_, C, B>) -> Option<RelayEnd>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    std::future::poll_fn(|cx| {
        if is_idle(relay) {
            return Poll::Ready(None);
        }
        match Pin::new(&mut *relay).poll(cx) {
            Poll::Ready(end) => Poll::Ready(Some(end)),
            Poll::Pending if is_idle(relay) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

async fn forward_cancel(shared: &Shared, key: CancelKey, peer: SocketAddr) {
    let pid = key.pid;
    // Clients were given the upstream's own key: pass it on as it is.
    let key = BackendKey(key);
    match shared
        .upstream
        .cancel(&shared.endpoint, &key, shared.connect_timeout)
        .await
    {
        Ok(()) => debug!(client = %peer, pid, "cancel request forwarded upstream"),
        Err(e) => warn!(client = %peer, pid, error = %e, "cancel request could not be forwarded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_addresses() {
        let e = upstream_endpoint("127.0.0.1:5432").unwrap();
        assert_eq!(e.host, "127.0.0.1");
        assert_eq!(e.connect_address, Some("127.0.0.1:5432".parse().unwrap()));
        let e = upstream_endpoint("db.internal:6432").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("db.internal", 6432));
        assert_eq!(e.connect_address, None);
        for bad in ["db", ":5432", "db:x", "db:70000"] {
            assert!(upstream_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstream_params_replace_user() {
        let startup = StartupMessage {
            requested: ProtocolVersion::V3_0,
            params: vec![
                StartupParam::new("database", "postgres"),
                StartupParam::new("user", "admin"),
                StartupParam::new("application_name", "x"),
            ],
            protocol_options: vec![],
        };
        let p = upstream_params(&startup, "admin");
        let names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["user", "database", "application_name"]);
    }
}
