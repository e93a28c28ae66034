use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{ByteSize, ConfigError, DurationStr, PasswordSource, Secret};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub backend: BackendConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
}

/// The client-facing side.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    pub address: SocketAddr,
    /// Directory for a Unix socket named `.s.PGSQL.<port>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_socket_dir: Option<PathBuf>,
    pub max_client_connections: u32,
    /// Certificate chain and key for TLS towards local clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Time a client has to finish startup and authentication.
    pub startup_timeout: DurationStr,
    /// How local clients authenticate to the proxy.
    pub auth: ClientAuthMethod,
    /// With `auth = "trust"`, also trust clients from non-loopback addresses
    /// (for example through a container port mapping). Off by default.
    pub trust_remote: bool,
    /// Local password for `auth = "scram-sha-256"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// A second client listener whose sessions are read-only: they go to
    /// the nearest replica within `[routing] max_replica_lag`, else to the
    /// writer (`kind = "aurora-global"` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only_address: Option<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 5432)),
            unix_socket_dir: None,
            max_client_connections: 10_000,
            tls_cert_file: None,
            tls_key_file: None,
            startup_timeout: DurationStr::from_secs(10),
            auth: ClientAuthMethod::Trust,
            trust_remote: false,
            password: None,
            password_env: None,
            password_file: None,
            read_only_address: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuthMethod {
    /// Accept local clients without a password, like Cloud SQL Auth Proxy.
    Trust,
    /// Require the local password, checked with SCRAM-SHA-256.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// The admin HTTP server. Read-only routes are served to anyone who can
/// reach `address`; mutating ones (`POST /quitquitquit`,
/// `/endpoints/<name>/drain|undrain`, `/demo/...`) only to loopback peers
/// or with the bearer token from `token_file`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// A file holding the bearer token (`Authorization: Bearer <token>`)
    /// that authorizes mutating routes for non-loopback peers. Re-read on
    /// each such request, so a rotated Secret applies without a restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Serve `POST /quitquitquit` (off by default, like Cloud SQL Auth
    /// Proxy's `--quitquitquit`): for batch Jobs with a classic sidecar.
    pub quitquitquit: bool,
    /// Admin connections served at once; more are closed at once.
    pub max_connections: u32,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 9090)),
            token_file: None,
            quitquitquit: false,
            max_connections: 32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Dsql,
    AuroraGlobal,
    Postgres,
}

impl BackendKind {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dsql => "dsql",
            Self::AuroraGlobal => "aurora-global",
            Self::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendAuth {
    DsqlIam,
    RdsIam,
    Password,
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Disable,
    Require,
    VerifyCa,
    VerifyFull,
}

/// How the proxy reaches and authenticates to the database.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    pub kind: BackendKind,
    pub auth: BackendAuth,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    pub tls: TlsMode,
    /// Trusted roots (PEM) for `verify-ca` and `verify-full`, instead of the
    /// system roots (libpq's `sslrootcert`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Answer a server's cleartext password request with the password or
    /// IAM token even when `tls` is not `verify-full` (libpq's
    /// `require_auth` guard, relaxed).
    pub allow_cleartext_password: bool,
    pub connect_timeout: DurationStr,
    /// Lifetime of IAM tokens (`dsql-iam`: up to 7 days; `rds-iam`: up to 15m).
    pub token_expires_in: DurationStr,
    /// TCP keepalive idle time on backend connections.
    pub keepalive: DurationStr,
    /// Startup parameters never forwarded to the backend (added to
    /// [`DSQL_REFUSED_PARAMETERS`] for `kind = "dsql"`).
    pub drop_parameters: Vec<String>,
    /// `application_name` sent when the client sent none; empty (the
    /// default) sends none, so clients see what they asked for.
    pub default_application_name: String,
    /// New backend connections per second, shared by all endpoints (one
    /// token per dial, failover attempts included). Unset: 100 for
    /// `kind = "dsql"` (Aurora DSQL's per-cluster quota), unlimited
    /// otherwise; 0 is unlimited. See [`Self::effective_connect_rate`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_rate: Option<f64>,
    /// Connects allowed at once before `connect_rate` applies. Unset: 1,000
    /// for `kind = "dsql"`, one second's worth of `connect_rate` otherwise.
    /// See [`Self::effective_connect_burst`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_burst: Option<u32>,
    /// Connects that may wait for the rate limit at once; beyond it a client
    /// gets 53300 at once.
    pub connect_queue: u32,
    /// How long a backend connection serves a session before the session
    /// moves to a fresh one (at an idle point, make before break; with
    /// about ±10% jitter). `0s` is off. Unset: 55 minutes for
    /// `kind = "dsql"` (Aurora DSQL closes connections at 60 minutes
    /// without a message), off otherwise. See
    /// [`Self::effective_server_lifetime`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_lifetime: Option<DurationStr>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            kind: BackendKind::Dsql,
            auth: BackendAuth::DsqlIam,
            password: None,
            password_env: None,
            password_file: None,
            tls: TlsMode::VerifyFull,
            ca_file: None,
            allow_cleartext_password: false,
            connect_timeout: DurationStr::from_secs(5),
            token_expires_in: DurationStr::from_secs(15 * 60),
            keepalive: DurationStr::from_secs(30),
            drop_parameters: Vec::new(),
            default_application_name: String::new(),
            connect_rate: None,
            connect_burst: None,
            connect_queue: 1_000,
            server_lifetime: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// DNS name: used for SNI and certificate checks, and dialled unless
    /// `connect_address` is set.
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Where to dial instead of `host:port` (PrivateLink, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_address: Option<SocketAddr>,
    /// Breaks ties between endpoints of equal latency; lower is preferred.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// A Route 53 health check that also decides this endpoint's health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route53_health_check_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route53Policy {
    /// An endpoint Route 53 calls unhealthy is not chosen, even if local
    /// probes pass.
    Veto,
    /// Route 53's view is reported, never acted on.
    Advisory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnEndpointDown {
    /// Sessions between transactions move, with their state, to another
    /// endpoint when they send their next message; the others (inside a
    /// transaction, a request in flight, pinned) are closed as with `close`.
    /// Drained endpoints and endpoints a reload removes count as down.
    Move,
    /// Sessions on an endpoint that goes down get a FATAL 57P01 and are
    /// closed, so pools reconnect to a healthy endpoint at once.
    Close,
    /// Sessions are left to fail (or survive) on their own.
    Keep,
}

/// How endpoints are watched and chosen.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Probe endpoints in the background. Off: endpoints are used by
    /// `priority` alone, with connect-time failover (probes cost a query per
    /// interval, which Aurora DSQL bills).
    pub probes: bool,
    /// Time between health/latency probes of each endpoint.
    pub probe_interval: DurationStr,
    /// An endpoint that has not answered a probe for this long counts a
    /// failed probe every interval until it answers.
    pub probe_timeout: DurationStr,
    /// The database user probes log in as (with the backend's credential
    /// source). Unset means [`DEFAULT_PROBE_USER`], which only
    /// `kind = "dsql"` accepts: other kinds must name a role that exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_user: Option<String>,
    /// The database probes connect to.
    pub probe_database: String,
    /// Consecutive failed probes before an endpoint is marked down.
    pub down_after: u32,
    /// Consecutive successful probes before a down endpoint is marked up.
    pub up_after: u32,
    /// Endpoints whose smoothed latency is within this of the best count as
    /// equally fast; `priority` decides among them.
    pub latency_tolerance: DurationStr,
    /// Consecutive probe rounds a new best endpoint must win before new
    /// sessions move to it (a down endpoint is left at once).
    pub switch_after: u32,
    /// Pin this Region while it has a healthy endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefer_region: Option<String>,
    pub route53: Route53Policy,
    pub route53_poll_interval: DurationStr,
    /// A Route 53 status older than this (because the API keeps failing) no
    /// longer influences routing.
    pub route53_max_staleness: DurationStr,
    pub on_endpoint_down: OnEndpointDown,
    /// Longest one connect attempt may take before the next endpoint is
    /// tried; the last candidate gets whatever remains of connect_timeout.
    pub attempt_timeout: DurationStr,
    /// How long an endpoint that answered a connect with 53300/53400 is
    /// tried after the other eligible endpoints (it is busy, not down).
    /// `0s` turns this off.
    pub busy_cooldown: DurationStr,
    /// `kind = "aurora-global"`: how long a new read-write session waits
    /// for a writer while none is known (a failover window) before it is
    /// refused.
    pub writer_wait: DurationStr,
    /// `kind = "aurora-global"`: replicas lagging more than this take no
    /// new read-only sessions.
    pub max_replica_lag: DurationStr,
    /// `kind = "aurora-global"`: the global cluster, for the control-plane
    /// cross-check (RDS `DescribeGlobalClusters`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_cluster_id: Option<String>,
    /// How often the control plane is asked (with `global_cluster_id`).
    pub global_cluster_poll_interval: DurationStr,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            probes: true,
            probe_interval: DurationStr::from_secs(1),
            probe_timeout: DurationStr::from_secs(1),
            probe_user: None,
            probe_database: "postgres".to_owned(),
            down_after: 3,
            up_after: 3,
            latency_tolerance: DurationStr::from_millis(5),
            switch_after: 3,
            prefer_region: None,
            route53: Route53Policy::Veto,
            route53_poll_interval: DurationStr::from_secs(30),
            route53_max_staleness: DurationStr::from_secs(120),
            on_endpoint_down: OnEndpointDown::Move,
            attempt_timeout: DurationStr::from_secs(2),
            busy_cooldown: DurationStr::from_secs(5),
            writer_wait: DurationStr::from_secs(30),
            max_replica_lag: DurationStr::from_secs(5),
            global_cluster_id: None,
            global_cluster_poll_interval: DurationStr::from_secs(5),
        }
    }
}

/// Default `server_lifetime` for `kind = "dsql"`: under the service's
/// 60-minute connection limit with room for the jitter, as AWS's own
/// connectors advise.
pub const DSQL_SERVER_LIFETIME: std::time::Duration = std::time::Duration::from_secs(55 * 60);

/// Aurora DSQL closes every connection at this age, without a message.
pub const DSQL_MAX_CONNECTION_AGE: std::time::Duration = std::time::Duration::from_secs(60 * 60);

fn humantime_secs(d: std::time::Duration) -> String {
    format!("{}s", d.as_secs())
}

/// Aurora DSQL's built-in role, the probes' login when `probe_user` is unset.
pub const DEFAULT_PROBE_USER: &str = "admin";

impl RoutingConfig {
    /// The probes' login: `probe_user`, else [`DEFAULT_PROBE_USER`].
    pub fn probe_user(&self) -> &str {
        self.probe_user.as_deref().unwrap_or(DEFAULT_PROBE_USER)
    }
}

/// Graceful shutdown on SIGTERM/SIGINT or `POST /quitquitquit`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After the signal, keep accepting new sessions this long (for pods
    /// whose application stops after the proxy got its signal). `/readyz`
    /// answers 503 from the signal on.
    pub min_accept: DurationStr,
    /// Longest time sessions get to end by themselves, counted from the
    /// signal; then every remaining session gets FATAL 57P01. With
    /// `request_grace` and the goodbyes the default fits inside
    /// Kubernetes' default 30 s grace period.
    pub max_drain: DurationStr,
    /// After `max_drain`, a session with a request in flight (forwarded,
    /// its ReadyForQuery not back yet) gets at most this long for the
    /// answer to be relayed before its FATAL, so a COMMIT the server
    /// carries out is not reported to the client as terminated.
    pub request_grace: DurationStr,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            min_accept: DurationStr::from_secs(0),
            max_drain: DurationStr::from_secs(20),
            request_grace: DurationStr::from_secs(5),
        }
    }
}

/// Backend connection reuse between client sessions (`[pool]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Off: every client session gets a backend connection of its own,
    /// closed when it ends.
    pub enabled: bool,
    /// Idle connections kept per endpoint, user, database and startup
    /// parameters.
    pub max_idle: u32,
    /// Idle connections kept in all.
    pub max_idle_total: u32,
    /// An idle connection unused this long is closed.
    pub idle_timeout: DurationStr,
    /// Warm spares kept idle per endpoint for `min_idle_user` and
    /// `min_idle_database`, made ahead of any client (0: none).
    pub min_idle: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_idle_user: Option<String>,
    pub min_idle_database: String,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_idle: 20,
            max_idle_total: 100,
            idle_timeout: DurationStr::from_secs(60),
            min_idle: 0,
            min_idle_user: None,
            min_idle_database: "postgres".into(),
        }
    }
}

impl PoolConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.max_idle == 0 || self.max_idle > self.max_idle_total {
            return invalid(format!(
                "[pool] max_idle must be at least 1 and at most max_idle_total ({} > {}); \
                 turn reuse off with enabled = false",
                self.max_idle, self.max_idle_total
            ));
        }
        if self.max_idle_total > 10_000 {
            return invalid(format!(
                "[pool] max_idle_total must be at most 10000, not {}",
                self.max_idle_total
            ));
        }
        if self.idle_timeout.get().is_zero() {
            return invalid("[pool] idle_timeout must be above 0".into());
        }
        if self.min_idle > self.max_idle {
            return invalid(format!(
                "[pool] min_idle ({}) must be at most max_idle ({})",
                self.min_idle, self.max_idle
            ));
        }
        if self.min_idle > 0 {
            if !self.enabled {
                return invalid("[pool] min_idle needs enabled = true".into());
            }
            if self.min_idle_user.as_deref().is_none_or(str::is_empty) {
                return invalid(
                    "[pool] min_idle needs min_idle_user: the role the warm spares log in as"
                        .into(),
                );
            }
            if self.min_idle_database.is_empty() {
                return invalid("[pool] min_idle_database must not be empty".into());
            }
        }
        Ok(())
    }
}

/// Transparent retry of serialization conflicts for autocommit requests
/// (off unless `max_attempts` is above 1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries per request, the first included; 1 is off.
    pub max_attempts: u32,
    /// Backoff before the second try; it doubles per try up to
    /// `max_delay`, and each wait is drawn uniformly below it (full jitter).
    pub base_delay: DurationStr,
    pub max_delay: DurationStr,
    /// The most bytes of a request, and of its response, kept to retry it;
    /// larger ones are relayed as they come and not retried.
    pub max_buffered: ByteSize,
    /// SQLSTATEs a request is retried on.
    pub sqlstates: Vec<String>,
}

/// SQLSTATEs retried by default: serialization failure (Aurora DSQL's
/// optimistic-concurrency conflicts, PostgreSQL's REPEATABLE READ and
/// SERIALIZABLE) and deadlock.
pub const DEFAULT_RETRY_SQLSTATES: [&str; 2] = ["40001", "40P01"];

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            base_delay: DurationStr::from_millis(2),
            max_delay: DurationStr::from_millis(100),
            max_buffered: ByteSize::kib(256),
            sqlstates: DEFAULT_RETRY_SQLSTATES.map(str::to_owned).to_vec(),
        }
    }
}

impl RetryConfig {
    pub fn enabled(&self) -> bool {
        self.max_attempts > 1
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if !(1..=100).contains(&self.max_attempts) {
            return invalid(format!(
                "[retry] max_attempts must be between 1 (off) and 100, not {}",
                self.max_attempts
            ));
        }
        if self.base_delay.get().is_zero() || self.base_delay > self.max_delay {
            return invalid(format!(
                "[retry] base_delay must be above 0 and at most max_delay ({} > {})",
                self.base_delay, self.max_delay
            ));
        }
        if self.max_delay.get() > std::time::Duration::from_secs(10) {
            return invalid(format!(
                "[retry] max_delay must be at most 10s (a client waits through every backoff), \
                 not {}",
                self.max_delay
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_buffered.get()) {
            return invalid(format!(
                "[retry] max_buffered must be between 1KiB and 64MiB, not {}",
                self.max_buffered
            ));
        }
        if self.enabled() && self.sqlstates.is_empty() {
            return invalid("[retry] sqlstates must not be empty when max_attempts > 1".into());
        }
        for code in &self.sqlstates {
            let valid = code.len() == 5
                && code
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
            if !valid {
                return invalid(format!(
                    "[retry] sqlstates: {code:?} is not a SQLSTATE (five digits or upper-case \
                     letters, such as \"40001\")"
                ));
            }
            if code == "57014" || code.starts_with("08") || code.starts_with("57P") {
                return invalid(format!(
                    "[retry] sqlstates: {code} cannot be retried (a cancelled request, a lost \
                     connection or a server shutting down is never sent again)"
                ));
            }
        }
        Ok(())
    }
}

/// Startup parameters Aurora DSQL refuses; never forwarded to a DSQL
/// endpoint so clients that set them (some drivers do) still connect.
pub const DSQL_REFUSED_PARAMETERS: &[&str] = &["default_transaction_read_only"];

impl BackendConfig {
    /// The backend connection lifetime; zero is off.
    pub fn effective_server_lifetime(&self) -> std::time::Duration {
        match (self.server_lifetime, self.kind) {
            (Some(lifetime), _) => lifetime.get(),
            (None, BackendKind::Dsql) => DSQL_SERVER_LIFETIME,
            (None, _) => std::time::Duration::ZERO,
        }
    }

    /// The configured drop list plus the kind's own.
    pub fn effective_drop_parameters(&self) -> Vec<String> {
        let mut list = self.drop_parameters.clone();
        if self.kind == BackendKind::Dsql {
            for p in DSQL_REFUSED_PARAMETERS {
                if !list.iter().any(|d| d.eq_ignore_ascii_case(p)) {
                    list.push((*p).to_owned());
                }
            }
        }
        list
    }
}

/// Aurora DSQL's connection-rate quota per cluster: 100 new connections
/// per second with a burst of 1,000.
pub const DSQL_CONNECT_RATE: f64 = 100.0;
pub const DSQL_CONNECT_BURST: u32 = 1_000;

impl BackendConfig {
    /// Connects per second the proxy allows itself; 0 means unlimited.
    pub fn effective_connect_rate(&self) -> f64 {
        match (self.connect_rate, self.kind) {
            (Some(rate), _) => rate,
            (None, BackendKind::Dsql) => DSQL_CONNECT_RATE,
            (None, _) => 0.0,
        }
    }

    /// Connects allowed at once on top of the rate.
    pub fn effective_connect_burst(&self) -> u32 {
        match (self.connect_burst, self.kind, self.connect_rate) {
            (Some(burst), _, _) => burst,
            (None, BackendKind::Dsql, _) => DSQL_CONNECT_BURST,
            // One second's worth, and at least one connect.
            (None, _, _) => (self.effective_connect_rate().ceil() as u32).max(1),
        }
    }
}

impl Config {
    /// Rules for `kind = "aurora-global"` and the keys only it uses.
    fn validate_global(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.backend.kind != BackendKind::AuroraGlobal {
            if self.listen.read_only_address.is_some() {
                return invalid(
                    "[listen] read_only_address needs [backend] kind = \"aurora-global\"",
                );
            }
            if self.routing.global_cluster_id.is_some() {
                return invalid(
                    "[routing] global_cluster_id needs [backend] kind = \"aurora-global\"",
                );
            }
            return Ok(());
        }
        if !matches!(
            self.backend.auth,
            BackendAuth::RdsIam | BackendAuth::Password
        ) {
            return invalid(
                "[backend] kind = \"aurora-global\" needs auth = \"rds-iam\" or \"password\": \
                 probes must log in to learn each endpoint's role",
            );
        }
        if !self.routing.probes {
            return invalid(
                "[backend] kind = \"aurora-global\" needs [routing] probes = true: the writer is \
                 found by probing every endpoint",
            );
        }
        if self.listen.read_only_address == Some(self.listen.address) {
            return invalid("[listen] read_only_address must differ from address");
        }
        if self.routing.global_cluster_id.as_deref() == Some("") {
            return invalid("[routing] global_cluster_id must not be empty");
        }
        if self.routing.global_cluster_poll_interval.get() < std::time::Duration::from_secs(1) {
            return invalid("[routing] global_cluster_poll_interval must be at least 1s");
        }
        Ok(())
    }
}

fn default_port() -> u16 {
    5432
}
fn default_priority() -> u32 {
    1
}

impl EndpointConfig {
    /// `host:port`, for messages.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl Config {
    /// The backend password source, when `auth = "password"`.
    pub fn backend_password(&self) -> Result<Option<PasswordSource>, ConfigError> {
        let b = &self.backend;
        PasswordSource::from_keys("backend", &b.password, &b.password_env, &b.password_file)
            .map_err(ConfigError::Invalid)
    }

    /// The local password source, when `[listen] auth = "scram-sha-256"`.
    pub fn client_password(&self) -> Result<Option<PasswordSource>, ConfigError> {
        let l = &self.listen;
        PasswordSource::from_keys("listen", &l.password, &l.password_env, &l.password_file)
            .map_err(ConfigError::Invalid)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.endpoints.is_empty() {
            return invalid("at least one [[endpoints]] entry is required".into());
        }
        self.retry.validate()?;
        self.pool.validate()?;
        if self.pool.min_idle > 0 && self.backend.auth == BackendAuth::Passthrough {
            return invalid(
                "[pool] min_idle cannot be used with auth = \"passthrough\": warm spares have no \
                 client password to log in with"
                    .into(),
            );
        }
        let mut names = HashSet::new();
        for e in &self.endpoints {
            if e.name.is_empty() || e.host.is_empty() {
                return invalid("every [[endpoints]] entry needs a name and a host".into());
            }
            if !names.insert(e.name.as_str()) {
                return invalid(format!("endpoint name {:?} is used twice", e.name));
            }
            if e.port == 0 {
                return invalid(format!("endpoint {:?}: port must not be 0", e.name));
            }
            if e.route53_health_check_id
                .as_deref()
                .is_some_and(|id| id.trim().is_empty())
            {
                return invalid(format!(
                    "endpoint {:?}: route53_health_check_id is empty; remove the key to use no \
                     Route 53 health check",
                    e.name
                ));
            }
        }
        if self.listen.max_client_connections == 0 {
            return invalid("[listen] max_client_connections must be at least 1".into());
        }
        if self.listen.tls_cert_file.is_some() != self.listen.tls_key_file.is_some() {
            return invalid("[listen] tls_cert_file and tls_key_file go together".into());
        }
        if self.listen.startup_timeout.get().is_zero()
            || self.backend.connect_timeout.get().is_zero()
        {
            return invalid("timeouts must be greater than zero".into());
        }
        if self.backend.kind == BackendKind::Dsql
            && self.backend.effective_server_lifetime() >= DSQL_MAX_CONNECTION_AGE
        {
            return invalid(format!(
                "[backend] server_lifetime must be under 60m for kind = \"dsql\": Aurora DSQL \
                 closes every connection at 60 minutes (got {})",
                humantime_secs(self.backend.effective_server_lifetime())
            ));
        }
        let backend_password = self.backend_password()?;
        match (self.backend.auth, &backend_password) {
            (BackendAuth::Password, None) => {
                return invalid(
                    "[backend] auth = \"password\" needs password, password_env or password_file"
                        .into(),
                )
            }
            (BackendAuth::Password, Some(_)) => {}
            (_, Some(_)) => {
                return invalid(format!(
                    "[backend] password settings only apply to auth = \"password\", not {:?}",
                    self.backend.auth
                ))
            }
            _ => {}
        }
        let client_password = self.client_password()?;
        match (self.listen.auth, &client_password) {
            (ClientAuthMethod::ScramSha256, None) => return invalid(
                "[listen] auth = \"scram-sha-256\" needs password, password_env or password_file"
                    .into(),
            ),
            (ClientAuthMethod::Trust, Some(_)) => {
                return invalid(
                    "[listen] password settings only apply to auth = \"scram-sha-256\"".into(),
                )
            }
            _ => {}
        }
        if self.backend.auth == BackendAuth::Passthrough
            && self.listen.auth == ClientAuthMethod::ScramSha256
        {
            return invalid(
                "[backend] auth = \"passthrough\" asks each client for its own database password, \
                 so [listen] auth must stay \"trust\""
                    .into(),
            );
        }
        let b = &self.backend;
        if let Some(rate) = b.connect_rate {
            if !rate.is_finite() || rate < 0.0 {
                return invalid(format!(
                    "[backend] connect_rate must be a number of connects per second, 0 or more \
                     (0 = unlimited), not {rate}"
                ));
            }
        }
        if b.effective_connect_rate() > 0.0 && b.effective_connect_burst() == 0 {
            return invalid(
                "[backend] connect_burst must be at least 1 when connect_rate is set (a burst of \
                 0 would admit no connect at all)"
                    .into(),
            );
        }
        let r = &self.routing;
        if r.probe_interval.get() < std::time::Duration::from_millis(10)
            || r.probe_timeout.get() < std::time::Duration::from_millis(10)
            || r.attempt_timeout.get() < std::time::Duration::from_millis(10)
        {
            return invalid(
                "[routing] probe_interval, probe_timeout and attempt_timeout must be at least 10ms"
                    .into(),
            );
        }
        if r.route53_poll_interval.get() < std::time::Duration::from_secs(1) {
            return invalid(
                "[routing] route53_poll_interval must be at least 1s (the API is not meant for \
                 high-rate polling)"
                    .into(),
            );
        }
        if r.probe_user.as_deref().is_some_and(str::is_empty) {
            return invalid("[routing] probe_user must not be empty".into());
        }
        if r.probes && r.probe_user.is_none() && self.backend.kind != BackendKind::Dsql {
            return invalid(format!(
                "[routing] probe_user is required for [backend] kind = \"{}\": the default \
                 ({DEFAULT_PROBE_USER:?}) is Aurora DSQL's role, and probes that cannot log in \
                 never learn an endpoint's health{}; name a role that exists on the server",
                self.backend.kind.as_str(),
                if self.backend.kind == BackendKind::AuroraGlobal {
                    " or which endpoint is the writer"
                } else {
                    ""
                }
            ));
        }
        if self.admin.max_connections == 0 {
            return invalid("[admin] max_connections must be at least 1".into());
        }
        if self
            .admin
            .token_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return invalid("[admin] token_file must not be empty".into());
        }
        if r.down_after == 0 || r.up_after == 0 || r.switch_after == 0 {
            return invalid(
                "[routing] down_after, up_after and switch_after must be at least 1".into(),
            );
        }
        if let Some(region) = &r.prefer_region {
            if !self
                .endpoints
                .iter()
                .any(|e| e.region.as_deref() == Some(region.as_str()))
            {
                return invalid(format!(
                    "[routing] prefer_region = {region:?} matches no endpoint's region"
                ));
            }
        }
        if self.shutdown.min_accept > self.shutdown.max_drain {
            return invalid(format!(
                "[shutdown] min_accept ({}) must not exceed max_drain ({}): max_drain counts from \
                 the signal and includes the time spent still accepting",
                self.shutdown.min_accept, self.shutdown.max_drain
            ));
        }
        let token_life = self.backend.token_expires_in.get();
        let max_life = match self.backend.auth {
            BackendAuth::RdsIam => std::time::Duration::from_secs(15 * 60),
            _ => std::time::Duration::from_secs(7 * 24 * 3600),
        };
        if token_life < std::time::Duration::from_secs(1) || token_life > max_life {
            return invalid(format!(
                "[backend] token_expires_in must be between 1s and {} for auth = {:?}",
                crate::DurationStr(max_life),
                self.backend.auth
            ));
        }
        self.validate_global()?;
        if self.backend.kind == BackendKind::Dsql && self.backend.tls != TlsMode::VerifyFull {
            return invalid(
                "[backend] kind = \"dsql\" requires tls = \"verify-full\": Aurora DSQL refuses \
                 connections without TLS and SNI"
                    .into(),
            );
        }
        Ok(())
    }
}
