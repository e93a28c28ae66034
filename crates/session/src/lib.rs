//! The session layer of `dsql-proxy`: listeners, the client handshake, the
//! backend connection and the relay between them.
//!
//! Control flow per connection (see docs/ARCHITECTURE.md): the accept loop
//! spawns one task per client; that task runs [`frontend`] (TLS, startup,
//! local auth), then the [`connect`] loop (candidates from the [`Router`],
//! a secret from the [`CredentialSource`], a connect-rate token, the
//! connector's dial, TLS, startup and auth), then hands both streams to
//! [`relay`] until either side closes.

pub mod admission;
pub mod busy_poll;
pub mod cancel;
pub mod connect;
mod continuity;
pub mod drain;
mod error;
pub mod frontend;
pub mod io;
mod limit;
pub mod listener;
mod mover;
pub mod pool;
pub mod relay;
pub mod retry;
mod role;
mod session;
pub mod stream;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
pub use error::{shutdown_error, SessionError};
pub use role::{GlobalSettings, Intent};
pub use session::EVICTION_FLUSH;

use dsql_proxy_config::{BackendAuth, BackendKind, ClientAuthMethod, Config, OnEndpointDown};
use dsql_proxy_connector::Connector;
use dsql_proxy_credentials::CredentialSource;
use dsql_proxy_metrics::Metrics;
use dsql_proxy_protocol::scram::{ScramVerifier, DEFAULT_ITERATIONS};
use dsql_proxy_routing::Router;
use tokio_rustls::TlsAcceptor;

use crate::admission::{ConnectLimiter, RateLimit};
use crate::busy_poll::BusyPoll;
use crate::cancel::CancelRegistry;
use crate::connect::IdleConnections;
use crate::drain::Drain;
use crate::frontend::FrontendSettings;
use crate::listener::Listeners;
use crate::pool::{Pool, PoolSettings};
use crate::retry::RetrySettings;

/// Connections served their startup phase at once (see
/// [`ProxyContext::startups`]): at most a startup packet (10,000 bytes), an
/// authentication message (64 KiB) and a TLS handshake's buffers each, so
/// a few tens of MiB in the worst case, whatever `max_client_connections`.
pub const MAX_CONCURRENT_STARTUPS: usize = 256;

/// Everything sessions share, built from the config. A reload builds a new
/// one with [`ProxyContext::reconfigured`]; each session keeps the context
/// it was accepted with.
pub struct ProxyContext {
    pub frontend: FrontendSettings,
    /// The same, minus authentication: used to answer over-limit clients.
    pub frontend_for_rejection: FrontendSettings,
    /// Reaches one backend (TLS, socket options, auth policy); the probes
    /// share it.
    pub connector: Arc<Connector>,
    pub kind: BackendKind,
    /// Credentials + TCP + TLS + startup + auth to the backend
    /// (`[backend] connect_timeout`).
    pub connect_timeout: Duration,
    pub startup_timeout: Duration,
    pub max_client_connections: usize,
    pub drop_parameters: Vec<String>,
    pub default_application_name: String,
    /// Longest a connect attempt to one endpoint may take while others
    /// remain to be tried.
    pub attempt_timeout: Duration,
    pub on_endpoint_down: OnEndpointDown,
    /// `[backend] server_lifetime` (zero: off), before jitter.
    pub server_lifetime: Duration,
    /// `[shutdown] request_grace`: how long a session closed at shutdown
    /// waits for the answer to a request in flight.
    pub request_grace: Duration,
    /// `[backend] connect_rate`; `None` when unlimited. Shared with the
    /// next context when a reload leaves its settings alone, so a reload
    /// does not hand out a fresh burst.
    pub connect_limiter: Option<Arc<ConnectLimiter>>,
    /// Set for `kind = "aurora-global"`: sessions are routed by role.
    pub global: Option<GlobalSettings>,
    /// `[retry]` when on (`max_attempts` above 1).
    pub retry: Option<Arc<RetrySettings>>,
    /// Idle backend connections the connect loop takes before dialing:
    /// the pool, seen through its seam.
    pub idle_connections: Option<Arc<dyn IdleConnections>>,
    /// `[pool]` when on: sessions park their backends here. One per
    /// process, carried over by a reload (restart to change `[pool]`).
    pub pool: Option<Arc<Pool>>,
    pub router: Arc<dyn Router>,
    pub credentials: Arc<dyn CredentialSource>,
    pub cancels: Arc<CancelRegistry>,
    /// Session count and the close-everything signal for shutdown; like
    /// `cancels`, one per process (carry it over if a context is rebuilt).
    pub drain: Arc<Drain>,
    /// Connections in their startup phase (TLS, startup packet, local
    /// authentication) at once: [`MAX_CONCURRENT_STARTUPS`]. Each may hold
    /// buffers for what its client sends; the rest wait their turn within
    /// `startup_timeout`. One per process, like `drain`.
    pub startups: Arc<tokio::sync::Semaphore>,
    pub metrics: Arc<Metrics>,
    /// `--busy-poll`: relays report activity to the poller. Set by the
    /// binary after building the context; carried over by a reload.
    pub busy_poll: Option<Arc<BusyPoll>>,
}

impl ProxyContext {
    pub fn from_config(
        config: &Config,
        router: Arc<dyn Router>,
        credentials: Arc<dyn CredentialSource>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SessionError> {
        let process = ProcessState {
            cancels: Arc::new(CancelRegistry::default()),
            drain: Arc::new(Drain::default()),
            startups: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_STARTUPS)),
            limiter: None,
        };
        Self::build(config, router, credentials, metrics, process)
    }

    /// A context for a reloaded `config`: settings, TLS files and the local
    /// password are read anew; the router, the cancel registry (so cancels
    /// for running sessions still find them) and the metrics carry over.
    /// State that must outlive a reload belongs here too.
    pub fn reconfigured(
        &self,
        config: &Config,
        credentials: Arc<dyn CredentialSource>,
    ) -> Result<Self, SessionError> {
        let process = ProcessState {
            cancels: Arc::clone(&self.cancels),
            drain: Arc::clone(&self.drain),
            startups: Arc::clone(&self.startups),
            limiter: self.connect_limiter.clone(),
        };
        let mut next = Self::build(
            config,
            Arc::clone(&self.router),
            credentials,
            Arc::clone(&self.metrics),
            process,
        )?;
        next.busy_poll = self.busy_poll.clone();
        next.idle_connections = self.idle_connections.clone();
        next.pool = self.pool.clone();
        Ok(next)
    }

    fn build(
        config: &Config,
        router: Arc<dyn Router>,
        credentials: Arc<dyn CredentialSource>,
        metrics: Arc<Metrics>,
        process: ProcessState,
    ) -> Result<Self, SessionError> {
        let ProcessState {
            cancels,
            drain,
            startups,
            limiter: previous_limiter,
        } = process;
        continuity::register_pin_metrics(&metrics);
        if config.retry.enabled() {
            metrics.register_retry_sqlstates(config.retry.sqlstates.iter().map(String::as_str));
        }
        let listen = &config.listen;
        let tls = match (&listen.tls_cert_file, &listen.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsAcceptor::from(tls::server_config(cert, key)?)),
            _ => None,
        };
        let verifier = match listen.auth {
            ClientAuthMethod::ScramSha256 => {
                let source = config
                    .client_password()
                    .map_err(|e| SessionError::Setup(e.to_string()))?
                    .ok_or_else(|| SessionError::Setup("[listen] password is required".into()))?;
                let password = source.read().map_err(SessionError::Setup)?;
                // A stored PostgreSQL verifier works as well as a plaintext
                // password, and keeps the plaintext out of the config.
                Some(match ScramVerifier::parse(password.expose()) {
                    Ok(v) => v,
                    Err(_) => ScramVerifier::from_password(password.expose(), DEFAULT_ITERATIONS),
                })
            }
            ClientAuthMethod::Trust => None,
        };
        let frontend = FrontendSettings {
            tls: tls.clone(),
            auth: listen.auth,
            verifier,
            ask_password: credentials.needs_client_password(),
            trust_remote: listen.trust_remote,
        };
        let frontend_for_rejection = FrontendSettings {
            tls,
            auth: ClientAuthMethod::Trust,
            verifier: None,
            ask_password: false,
            trust_remote: true,
        };
        let connector = Connector::from_config(&config.backend)
            .map_err(|e| SessionError::Setup(e.to_string()))?;
        let rate = config.backend.effective_connect_rate();
        let connect_limiter = (rate > 0.0).then(|| {
            let limit = RateLimit {
                rate,
                burst: config.backend.effective_connect_burst(),
                queue: config.backend.connect_queue as usize,
            };
            match previous_limiter {
                Some(previous) if previous.limit() == limit => previous,
                _ => Arc::new(ConnectLimiter::new(limit)),
            }
        });
        // With passthrough the backend checks each client's password: a
        // pooled connection would let a client in on another's login.
        let pool = PoolSettings::from_config(
            &config.pool,
            config.backend.effective_server_lifetime(),
            config.backend.kind,
        )
        .filter(|_| config.backend.auth != BackendAuth::Passthrough)
        .map(|settings| {
            Arc::new(Pool::new(
                settings,
                Arc::clone(&router),
                Arc::clone(&metrics),
            ))
        });
        Ok(Self {
            frontend,
            frontend_for_rejection,
            connector: Arc::new(connector),
            kind: config.backend.kind,
            connect_timeout: config.backend.connect_timeout.get(),
            startup_timeout: listen.startup_timeout.get(),
            max_client_connections: listen.max_client_connections as usize,
            drop_parameters: config.backend.effective_drop_parameters(),
            default_application_name: config.backend.default_application_name.clone(),
            attempt_timeout: config.routing.attempt_timeout.get(),
            on_endpoint_down: config.routing.on_endpoint_down,
            server_lifetime: config.backend.effective_server_lifetime(),
            request_grace: config.shutdown.request_grace.get(),
            connect_limiter,
            global: (config.backend.kind == BackendKind::AuroraGlobal).then(|| GlobalSettings {
                writer_wait: config.routing.writer_wait.get(),
            }),
            retry: RetrySettings::from_config(&config.retry).map(Arc::new),
            idle_connections: pool.clone().map(|pool| pool as Arc<dyn IdleConnections>),
            pool,
            router,
            credentials,
            cancels,
            drain,
            startups,
            metrics,
            busy_poll: None,
        })
    }
}

/// What a context hands on to the next one across a reload: one per
/// process (the connect limiter only while its settings stay the same).
struct ProcessState {
    cancels: Arc<CancelRegistry>,
    drain: Arc<Drain>,
    startups: Arc<tokio::sync::Semaphore>,
    limiter: Option<Arc<ConnectLimiter>>,
}

/// The context new sessions start with; a reload stores a new one.
pub type SharedContext = Arc<ArcSwap<ProxyContext>>;

/// A proxy with its sockets bound, ready to serve.
pub struct BoundProxy {
    ctx: SharedContext,
    listeners: Listeners,
}

impl BoundProxy {
    pub async fn bind(ctx: ProxyContext, config: &Config) -> Result<Self, SessionError> {
        let mut listeners = Listeners::bind(
            config.listen.address,
            config.listen.unix_socket_dir.as_deref(),
        )
        .await?;
        if let Some(address) = config.listen.read_only_address {
            listeners.bind_read_only(address).await?;
        }
        Ok(Self {
            ctx: Arc::new(ArcSwap::from_pointee(ctx)),
            listeners,
        })
    }

    /// Where a reload stores the context for sessions accepted after it.
    pub fn context(&self) -> SharedContext {
        Arc::clone(&self.ctx)
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listeners.local_addr()
    }

    /// The session count and close signal the shutdown sequence drives.
    pub fn drain(&self) -> Arc<Drain> {
        Arc::clone(&self.ctx.load().drain)
    }

    /// The read-only listener's address, when there is one.
    pub fn read_only_addr(&self) -> Option<SocketAddr> {
        self.listeners.read_only.as_ref()?.local_addr().ok()
    }

    pub fn unix_socket_path(&self) -> Option<&std::path::Path> {
        self.listeners.unix.as_ref().map(|(_, p)| p.as_path())
    }

    /// Serves until `shutdown` resolves, then stops accepting: the TCP
    /// listener is closed and the Unix socket file removed. Sessions already
    /// running keep going on their own tasks (see [`Drain`]).
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        listener::accept_loop(self.ctx, self.listeners, shutdown).await;
    }
}
