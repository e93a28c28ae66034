//! Accept loops for TCP and the Unix socket, with the client limit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dsql_proxy_protocol::{sqlstate, PgError};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::drain::next_session_id;
use crate::frontend::{self, Failure, Opening, Peer};
use crate::io::Deadline;
use crate::limit::ClientLimit;
use crate::stream::Transport;
use crate::{session, Intent, ProxyContext, SessionError, SharedContext};

/// Connections over the limit still get a proper 53300 answer, but only this
/// many at once; beyond that they are closed without reading.
const MAX_PENDING_REJECTIONS: usize = 256;

pub struct Listeners {
    pub tcp: TcpListener,
    pub unix: Option<(UnixListener, PathBuf)>,
    /// `[listen] read_only_address`: its sessions are read-only.
    pub read_only: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(address: SocketAddr, unix_dir: Option<&Path>) -> Result<Self, SessionError> {
        let tcp = TcpListener::bind(address)
            .await
            .map_err(|e| SessionError::Setup(format!("cannot listen on {address}: {e}")))?;
        let unix = match unix_dir {
            Some(dir) => {
                let port = tcp.local_addr().map(|a| a.port()).unwrap_or(address.port());
                let path = dir.join(format!(".s.PGSQL.{port}"));
                // A socket file left by a previous run would make bind fail.
                if path.exists() {
                    let _ = std::fs::remove_file(&path);
                }
                let listener = UnixListener::bind(&path).map_err(|e| {
                    SessionError::Setup(format!("cannot listen on {}: {e}", path.display()))
                })?;
                // Like PostgreSQL's default unix_socket_permissions = 0777;
                // the directory's permissions are the access control.
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777));
                Some((listener, path))
            }
            None => None,
        };
        Ok(Self {
            tcp,
            unix,
            read_only: None,
        })
    }

    pub async fn bind_read_only(&mut self, address: SocketAddr) -> Result<(), SessionError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| SessionError::Setup(format!("cannot listen on {address}: {e}")))?;
        self.read_only = Some(listener);
        Ok(())
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.local_addr().ok()
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Accepts until `shutdown` resolves. Each connection gets the context
/// current when it was accepted.
pub async fn accept_loop(
    contexts: SharedContext,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = Arc::new(ClientLimit::default());
    let rejections = Arc::new(Semaphore::new(MAX_PENDING_REJECTIONS));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            r = listeners.tcp.accept() => r.map(|(s, a)| {
                tune_client_socket(&s);
                (Transport::Tcp(s), Peer::Tcp(a), Intent::ReadWrite)
            }),
            r = accept_unix(&listeners.unix) => r.map(|s| (Transport::Unix(s), Peer::Unix, Intent::ReadWrite)),
            r = accept_read_only(&listeners.read_only) => r.map(|(s, a)| {
                tune_client_socket(&s);
                (Transport::Tcp(s), Peer::Tcp(a), Intent::ReadOnly)
            }),
        };
        let (transport, peer, intent) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = contexts.load_full();
        ctx.metrics.client_connections_total.inc();
        // Every line a connection's task logs carries this id.
        let span = info_span!("session", session = next_session_id());
        match limit.try_acquire(ctx.max_client_connections) {
            Some(permit) => {
                // Counted from accept, so a drain never misses a session
                // whose task has not run yet.
                let guard = ctx.drain.enter();
                tokio::spawn(
                    async move {
                        ctx.metrics.client_connections_active.inc();
                        // Boxed: the session's state (several KiB) is
                        // allocated once instead of being copied through
                        // the task's construction.
                        Box::pin(session::run(Arc::clone(&ctx), transport, peer, intent)).await;
                        ctx.metrics.client_connections_active.dec();
                        drop(permit);
                        drop(guard);
                    }
                    .instrument(span),
                );
            }
            None => match Arc::clone(&rejections).try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(
                        async move {
                            reject_over_limit(&ctx, transport, peer).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
                Err(_) => {
                    ctx.metrics
                        .client_connections_rejected_total
                        .with_label_values(&["too_many_clients"])
                        .inc();
                    debug!(parent: &span, client = %peer, "over the client limit and the rejection queue; closed")
                }
            },
        }
    }
    drop(listeners);
    info!("stopped accepting connections");
}

/// TCP keepalive on client sockets: idle time before the first probe.
pub const CLIENT_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Between unanswered keepalive probes (the kernel gives up after its
/// retry count, 9 by default): a vanished client is noticed in about
/// `idle + 9 * interval`, and its session and backend connection end.
pub const CLIENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// NODELAY (latency over packet count) and keepalive, so a client host
/// that vanishes without a FIN does not hold its session, its slot under
/// `max_client_connections` and a backend connection for ever.
fn tune_client_socket(s: &tokio::net::TcpStream) {
    let _ = s.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(CLIENT_KEEPALIVE_IDLE)
        .with_interval(CLIENT_KEEPALIVE_INTERVAL);
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&keepalive);
}

async fn accept_read_only(
    listener: &Option<TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_unix(
    unix: &Option<(UnixListener, PathBuf)>,
) -> std::io::Result<tokio::net::UnixStream> {
    match unix {
        Some((l, _)) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Reads the client's startup (so the client is in a state to read an
/// ErrorResponse, as PostgreSQL does) and answers 53300. Cancel requests are
/// still served: they are how a client gets out of an overload.
async fn reject_over_limit(ctx: &Arc<ProxyContext>, transport: Transport, peer: Peer) {
    let deadline = Deadline::after(ctx.startup_timeout.min(Duration::from_secs(5)));
    let settings = &ctx.frontend_for_rejection;
    let stream = match frontend::open(transport, &peer, settings, &deadline).await {
        Ok(Opening::Session(hello)) => Some(hello.stream),
        Ok(Opening::Cancel(key)) => {
            return session::cancel_request(ctx, key).await;
        }
        Err(failure) => failure.stream,
    };
    let err = SessionError::Rejected(PgError::fatal(
        sqlstate::TOO_MANY_CONNECTIONS,
        format!(
            "sorry, too many clients already: dsql-proxy max_client_connections ({}) reached",
            ctx.max_client_connections
        ),
    ));
    let _ = frontend::reject(Failure { stream, error: err }).await;
    ctx.metrics
        .client_connections_rejected_total
        .with_label_values(&["too_many_clients"])
        .inc();
    info!(client = %peer, reason = %"too_many_clients", "client rejected");
}
