//! `dsql-proxy`: a local PostgreSQL endpoint for Aurora DSQL and Aurora
//! PostgreSQL Global Database. This file wires configuration, logging,
//! signals and the session layer together; the work lives in the crates.

mod admin_client;
#[cfg(feature = "demo")]
mod demo;
mod drill;
mod route53_cli;
mod shutdown;
mod status_cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod monitor;
mod reload;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use clap::{Parser, Subcommand, ValueEnum};
use dsql_proxy_admin::{AdminAccess, AdminServer, AdminState, MetricsRefresh};
use dsql_proxy_config::Config;
use dsql_proxy_credentials::CredentialSource;
use dsql_proxy_metrics::Metrics;
use dsql_proxy_routing::{RoutingTable, TableRouter};
use dsql_proxy_session::busy_poll::BusyPoll;
use dsql_proxy_session::{BoundProxy, ProxyContext};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::reload::{ConfigSource, Reloader};

#[derive(Parser, Debug)]
#[command(
    name = "dsql-proxy",
    version,
    about = "Local PostgreSQL endpoint for Aurora DSQL and Aurora Global Database"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(
        long,
        short = 'c',
        env = "DSQL_PROXY_CONFIG",
        default_value = "proxy.toml",
        global = true
    )]
    config: PathBuf,
    /// Client listen address; overrides [listen] address.
    #[arg(long, env = "DSQL_PROXY_LISTEN", global = true)]
    listen: Option<SocketAddr>,
    /// Admin HTTP address; overrides [admin] address. For `status` and
    /// `healthcheck`: the running proxy's admin server to ask.
    #[arg(long, env = "DSQL_PROXY_ADMIN", global = true)]
    admin: Option<SocketAddr>,
    /// Directory for the Unix socket; overrides [listen] unix_socket_dir.
    #[arg(long, env = "DSQL_PROXY_UNIX_SOCKET_DIR")]
    unix_socket_dir: Option<PathBuf>,
    /// Worker threads for client sessions. The default, 1, runs everything
    /// on one thread like PgBouncer: fewest context switches and least CPU
    /// per query, which matters for a sidecar sharing cores with its
    /// application. Raise it when one core is not enough.
    #[arg(long, env = "DSQL_PROXY_WORKER_THREADS", global = true)]
    worker_threads: Option<usize>,
    /// Adaptive busy polling (off by default): after relay activity, keep
    /// checking the sockets for up to this long (e.g. `200us`, at most
    /// `1ms`) instead of sleeping, when idle spells have lately been that
    /// short. Saves a wake-up per hop when the database is close (same
    /// host or AZ) at the price of CPU; with a database milliseconds away
    /// it stays idle. Single worker thread only.
    #[arg(long, env = "DSQL_PROXY_BUSY_POLL", value_parser = parse_busy_poll)]
    busy_poll: Option<Duration>,
    /// Log format.
    #[arg(
        long,
        value_enum,
        env = "DSQL_PROXY_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `dsql_proxy_session=debug`.
    #[arg(long, env = "DSQL_PROXY_LOG", default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration and print it resolved, secrets redacted.
    Check,
    /// Run the proxy (the default).
    Run,
    /// Try it out locally: three simulated Regions (PostgreSQL behind the
    /// DSQL endpoint emulator, IAM tokens checked, added latency) behind
    /// the proxy, a live table of Regions, and commands (fail, hang, heal,
    /// slow) on stdin or the admin API. Needs the PostgreSQL server
    /// binaries; --listen and --admin default to 127.0.0.1:5432 and :9090.
    /// (Not in the container image, which is built without the `demo`
    /// feature.)
    #[cfg(feature = "demo")]
    Demo,
    /// Show a running proxy's endpoints and routing (its /status) as a table.
    Status,
    /// Exit 0 if a running proxy's /healthz answers 200, else 1 (for
    /// container HEALTHCHECKs; no curl needed).
    Healthcheck,
    /// Failover drill against a running proxy (--admin): drain the endpoint
    /// new sessions use, check that they move and how fast, undrain it,
    /// check that they come back; prints a timeline, exits non-zero
    /// naming the failed step. The endpoint is always restored.
    Drill(drill::DrillArgs),
    /// Create, delete or inspect the Route 53 health checks of the config's
    /// endpoints (AWS credentials from the SDK's default chain).
    Route53 {
        #[command(subcommand)]
        action: route53_cli::Action,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Client commands print their own results and errors.
    match cli.command {
        Some(Command::Status) => {
            return status_cli::status(status_cli::admin_target(cli.admin, &cli.config))
        }
        Some(Command::Healthcheck) => {
            return status_cli::healthcheck(status_cli::admin_target(cli.admin, &cli.config))
        }
        Some(Command::Drill(ref args)) => {
            return drill::run(
                status_cli::admin_target(cli.admin, &cli.config),
                &cli.config,
                args,
            )
        }
        _ => {}
    }
    init_logging(&cli);
    let result = match &cli.command {
        Some(Command::Check) => check(&cli),
        Some(Command::Run) | None => run(&cli),
        #[cfg(feature = "demo")]
        Some(Command::Demo) => demo::run(demo::DemoOptions {
            listen: cli
                .listen
                .unwrap_or(dsql_proxy_config::ListenConfig::default().address),
            admin: cli
                .admin
                .unwrap_or(dsql_proxy_config::AdminConfig::default().address),
            worker_threads: cli.worker_threads,
        }),
        Some(Command::Route53 { action }) => {
            load_config(&cli).and_then(|config| route53_cli::run(action, &cli.config, &config))
        }
        Some(Command::Status | Command::Healthcheck | Command::Drill(_)) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line.
            error!("{e:#}");
            eprintln!("dsql-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cli: &Cli) {
    // aws-sigv4 logs canonical requests, which hold session tokens, at
    // TRACE: cap it whatever the user asks for, so secrets never reach logs.
    let secret_safe = |f: tracing_subscriber::EnvFilter| match "aws_sigv4=debug".parse() {
        Ok(directive) => f.add_directive(directive),
        Err(_) => f,
    };
    // The route53 commands print their own progress: only warnings log,
    // unless a filter was asked for.
    let level = match cli.command {
        Some(Command::Route53 { .. }) if cli.log_level == "info" => "warn",
        // The demo's table is redrawn on the terminal; info lines would
        // scroll it away.
        #[cfg(feature = "demo")]
        Some(Command::Demo)
            if cli.log_level == "info" && std::io::IsTerminal::is_terminal(&std::io::stdout()) =>
        {
            "warn"
        }
        _ => cli.log_level.as_str(),
    };
    let filter = secret_safe(
        tracing_subscriber::EnvFilter::try_new(level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The config file with the command-line overrides, as startup and every
/// reload read it.
fn config_source(cli: &Cli) -> ConfigSource {
    ConfigSource {
        path: cli.config.clone(),
        listen: cli.listen,
        admin: cli.admin,
        unix_socket_dir: cli.unix_socket_dir.clone(),
    }
}

/// Loads the file, then applies `DSQL_PROXY__*` and command-line overrides.
fn load_config(cli: &Cli) -> Result<Config> {
    config_source(cli).load()
}

fn check(cli: &Cli) -> Result<()> {
    let config = load_config(cli)?;
    print!("{}", config.to_redacted_toml());
    eprintln!("configuration OK: {}", cli.config.display());
    Ok(())
}

/// `--busy-poll`: `off`, `0`, microseconds (`200us`) or a config-style
/// duration (`1ms`).
fn parse_busy_poll(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "off" || s == "0" {
        return Ok(Duration::ZERO);
    }
    if let Some(us) = s.strip_suffix("us") {
        return us
            .parse::<u64>()
            .map(Duration::from_micros)
            .map_err(|_| format!("busy-poll {s:?}: expected e.g. 200us, 1ms or off"));
    }
    s.parse::<dsql_proxy_config::DurationStr>()
        .map(|d| d.get())
        .map_err(|e| format!("busy-poll: {e}; expected e.g. 200us, 1ms or off"))
}

fn run(cli: &Cli) -> Result<()> {
    let config = load_config(cli)?;
    let busy_poll = match cli.busy_poll {
        Some(window) if !window.is_zero() => {
            if cli.worker_threads.is_some_and(|n| n > 1) {
                anyhow::bail!("--busy-poll needs the single worker thread (drop --worker-threads)");
            }
            let poller = BusyPoll::new(window).map_err(anyhow::Error::msg)?;
            info!(
                max_window_us = window.as_micros(),
                "adaptive busy polling on"
            );
            Some(poller)
        }
        _ => None,
    };
    let runtime = match cli.worker_threads {
        Some(0) => anyhow::bail!("--worker-threads must be at least 1"),
        None | Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .thread_name("dsql-proxy")
            .build(),
    }
    .context("cannot start the async runtime")?;
    if let Some(poller) = &busy_poll {
        runtime.spawn(Arc::clone(poller).run());
    }
    let hooks = ServeHooks {
        busy_poll,
        ..ServeHooks::default()
    };
    let result = runtime.block_on(serve(config, config_source(cli), hooks));
    // Sessions were told to close and given time to; whatever is still
    // stuck (a peer that stopped reading, a blocking task) must not keep
    // the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// What `dsql-proxy demo` adds to a normal run; `run` passes the default.
#[derive(Default)]
pub(crate) struct ServeHooks {
    /// Serves `POST /demo/...` on the admin server.
    pub demo_control: Option<Arc<dyn dsql_proxy_admin::DemoControl>>,
    /// Gets the admin state once the admin server is up.
    pub admin_ready: Option<tokio::sync::oneshot::Sender<Arc<AdminState>>>,
    /// `--busy-poll`: the poller already runs on the runtime.
    pub busy_poll: Option<Arc<BusyPoll>>,
}

pub(crate) async fn serve(config: Config, source: ConfigSource, hooks: ServeHooks) -> Result<()> {
    // Before anything slow, so an early SIGHUP does not kill the process.
    let hangups = reload::hangups();
    // One line in either log format; secrets are redacted by the model.
    info!(
        config = %serde_json::to_string(&config).unwrap_or_default(),
        "resolved configuration (secrets redacted)"
    );
    let credentials = dsql_proxy_credentials::from_config(&config)
        .await
        .context("cannot set up backend credentials")?;
    let (reports_tx, reports_rx) = tokio::sync::mpsc::channel(1024);
    let table = TableRouter::new(RoutingTable::from_configs(&config.endpoints))
        .with_busy_cooldown(config.routing.busy_cooldown.get());
    // Without probes nothing could bring a demoted endpoint back, so the
    // data path's reports are not collected either.
    let router = Arc::new(if config.routing.probes {
        table.with_reports(reports_tx)
    } else {
        table
    });
    let metrics =
        Arc::new(Metrics::new(env!("CARGO_PKG_VERSION")).context("cannot set up metrics")?);
    monitor::sync_endpoint_series(&metrics, &[], router.snapshot().endpoints());
    let mut ctx = ProxyContext::from_config(
        &config,
        router.clone(),
        Arc::clone(&credentials),
        Arc::clone(&metrics),
    )?;
    ctx.busy_poll = hooks.busy_poll;
    let connector = Arc::clone(&ctx.connector);
    let proxy = BoundProxy::bind(ctx, &config).await?;
    let route53 = match config.routing.probes {
        true => monitor::route53_reader(&config, None).await,
        false => None,
    };
    let control_plane = monitor::control_plane(&config).await;
    if let Some(file) = &config.admin.token_file {
        // Read on each request that presents a token; checked once here so
        // a missing or empty file is a startup error, not a surprise later.
        dsql_proxy_admin::access::read_token(file).map_err(anyhow::Error::msg)?;
    }
    let admin = AdminServer::bind(config.admin.address).await?;
    let admin_state = Arc::new(AdminState {
        metrics: Arc::clone(&metrics),
        router: Arc::clone(&router),
        started: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        client_limit: AtomicUsize::new(config.listen.max_client_connections as usize),
        quit: Notify::new(),
        policy: ArcSwap::from_pointee(policy_json(&config)),
        before_render: Some(token_counter_sync(Arc::clone(&credentials))),
        demo: hooks.demo_control,
        access: AdminAccess {
            token_file: config.admin.token_file.clone(),
            quitquitquit: config.admin.quitquitquit,
            max_connections: config.admin.max_connections as usize,
        },
    });
    if let Some(ready) = hooks.admin_ready {
        // The demo drives the proxy through the same state the admin
        // server reads (its live table, `quit`).
        let _ = ready.send(Arc::clone(&admin_state));
    }
    info!(
        address = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        token = config.admin.token_file.is_some(),
        quitquitquit = config.admin.quitquitquit,
        "admin server listening (mutating routes: loopback clients{})",
        if config.admin.token_file.is_some() { " or the bearer token" } else { " only" }
    );
    tokio::spawn(admin.serve(Arc::clone(&admin_state)));
    // From here a SIGTERM/SIGINT starts a graceful shutdown, even one that
    // arrives during the first probe round.
    let stops = shutdown::StopRequests::install(Arc::clone(&admin_state));
    // Listeners are bound and the config is loaded: that is /startup.
    admin_state.started.store(true, Ordering::Release);
    // Clients queue in the listen backlog while the first probe round runs.
    let monitor = if config.routing.probes {
        Some(
            monitor::start(
                &config,
                Arc::clone(&router),
                reports_rx,
                &connector,
                &credentials,
                monitor::Pollers {
                    route53: route53.as_ref(),
                    control_plane: control_plane.as_ref(),
                },
                Arc::clone(&metrics),
            )
            .await,
        )
    } else {
        info!(
            "endpoint probes are off: endpoints are used by priority, with connect-time failover"
        );
        None
    };
    if !config.listen.address.ip().is_loopback()
        && config.listen.auth == dsql_proxy_config::ClientAuthMethod::Trust
        && !config.listen.trust_remote
    {
        warn!(
            address = %config.listen.address,
            "listening beyond loopback with auth = trust: only loopback clients will be accepted"
        );
    }
    info!(
        address = %proxy.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        unix_socket = %proxy.unix_socket_path().map(|p| p.display().to_string()).unwrap_or_default(),
        read_only = %proxy.read_only_addr().map(|a| a.to_string()).unwrap_or_default(),
        endpoints = config.endpoints.len(),
        backend_tls = ?config.backend.tls,
        "dsql-proxy listening"
    );
    // [shutdown] is restart-only (see reload), so the startup values hold.
    let shutdown_settings = config.shutdown.clone();
    let contexts = proxy.context();
    // [pool] min_idle: warm spares on every endpoint that takes sessions.
    dsql_proxy_session::pool::spawn_warmer(Arc::clone(&contexts));
    let _reloads = Reloader {
        source,
        current: config,
        contexts: proxy.context(),
        router,
        monitor,
        route53,
        control_plane,
        admin: Arc::clone(&admin_state),
        metrics,
    }
    .spawn(hangups);
    shutdown::serve_until_stopped(proxy, &shutdown_settings, stops, &admin_state).await;
    // Idle pooled backends get a Terminate, like every session's.
    if let Some(pool) = contexts.load().pool.clone() {
        let idle = pool.idle_total();
        pool.close().await;
        if idle > 0 {
            info!(
                connections = idle,
                "closed the idle pooled backend connections"
            );
        }
    }
    info!("shut down");
    Ok(())
}

/// The routing policy as `/status` shows it.
pub(crate) fn policy_json(config: &Config) -> serde_json::Value {
    let r = &config.routing;
    let b = &config.backend;
    let rate = b.effective_connect_rate();
    let connect_rate = if rate > 0.0 {
        serde_json::json!({
            "per_second": rate,
            "burst": b.effective_connect_burst(),
            "queue": b.connect_queue,
        })
    } else {
        serde_json::json!("unlimited")
    };
    serde_json::json!({
        "rule": "healthy endpoints only; lowest median probe latency; within latency_tolerance the lowest priority, then the current selection; a new best must win switch_after rounds",
        "probe_interval": r.probe_interval.to_string(),
        "probe_timeout": r.probe_timeout.to_string(),
        "down_after": r.down_after,
        "up_after": r.up_after,
        "latency_tolerance": r.latency_tolerance.to_string(),
        "switch_after": r.switch_after,
        "prefer_region": r.prefer_region,
        "route53": format!("{:?}", r.route53).to_lowercase(),
        "on_endpoint_down": format!("{:?}", r.on_endpoint_down).to_lowercase(),
        "attempt_timeout": r.attempt_timeout.to_string(),
        "busy_cooldown": r.busy_cooldown.to_string(),
        "connect_rate": connect_rate,
    })
}

/// Copies the IAM token cache's counters into their metric families.
fn token_counter_sync(credentials: Arc<dyn CredentialSource>) -> MetricsRefresh {
    Box::new(move |m: &Metrics| {
        let Some(c) = credentials.token_counts() else {
            return;
        };
        for (counter, value) in [
            (&m.token_generations_total, c.generations),
            (&m.token_generation_failures_total, c.failures),
            (&m.token_cache_hits_total, c.cache_hits),
        ] {
            counter.inc_by(value.saturating_sub(counter.get()));
        }
    })
}
