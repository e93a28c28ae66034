//! `dsql-proxy`: a local PostgreSQL endpoint for Aurora DSQL and Aurora
//! PostgreSQL Global Database. This file wires configuration, logging,
//! signals and the session layer together; the work lives in the crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use dsql_proxy_admin::{AdminServer, AdminState, MetricsRefresh};
use dsql_proxy_config::Config;
use dsql_proxy_credentials::CredentialSource;
use dsql_proxy_health::route53::{HealthCheckSource, SdkHealthChecks};
use dsql_proxy_health::{MonitorSettings, PgProbe};
use dsql_proxy_metrics::Metrics;
use dsql_proxy_routing::{RoutingTable, TableRouter};
use dsql_proxy_session::backend::BackendSettings;
use dsql_proxy_session::{BoundProxy, ProxyContext};
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;
use tracing::{error, info, warn};

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
    #[arg(long, env = "DSQL_PROXY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin HTTP address; overrides [admin] address.
    #[arg(long, env = "DSQL_PROXY_ADMIN")]
    admin: Option<SocketAddr>,
    /// Directory for the Unix socket; overrides [listen] unix_socket_dir.
    #[arg(long, env = "DSQL_PROXY_UNIX_SOCKET_DIR")]
    unix_socket_dir: Option<PathBuf>,
    /// Worker threads for client sessions; 1 runs everything on one thread
    /// (fewest context switches, like PgBouncer). Default: one per core.
    #[arg(long, env = "DSQL_PROXY_WORKER_THREADS", global = true)]
    worker_threads: Option<usize>,
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
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let result = match cli.command {
        Some(Command::Check) => check(&cli),
        Some(Command::Run) | None => run(&cli),
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
    let filter = secret_safe(
        tracing_subscriber::EnvFilter::try_new(&cli.log_level)
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

/// Loads the file, then applies `DSQL_PROXY__*` and command-line overrides.
fn load_config(cli: &Cli) -> Result<Config> {
    let mut config = Config::load(&cli.config, std::env::vars())?;
    if let Some(addr) = cli.listen {
        config.listen.address = addr;
    }
    if let Some(addr) = cli.admin {
        config.admin.address = addr;
    }
    if let Some(dir) = &cli.unix_socket_dir {
        config.listen.unix_socket_dir = Some(dir.clone());
    }
    config.validate()?;
    Ok(config)
}

fn check(cli: &Cli) -> Result<()> {
    let config = load_config(cli)?;
    print!("{}", config.to_redacted_toml());
    eprintln!("configuration OK: {}", cli.config.display());
    Ok(())
}

fn run(cli: &Cli) -> Result<()> {
    let config = load_config(cli)?;
    let runtime = match cli.worker_threads {
        Some(0) => anyhow::bail!("--worker-threads must be at least 1"),
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .thread_name("dsql-proxy")
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("dsql-proxy")
            .build(),
    }
    .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    let credentials = dsql_proxy_credentials::from_config(&config)
        .await
        .context("cannot set up backend credentials")?;
    let (reports_tx, reports_rx) = tokio::sync::mpsc::channel(1024);
    let table = TableRouter::new(RoutingTable::from_configs(&config.endpoints));
    // Without probes nothing could bring a demoted endpoint back, so the
    // data path's reports are not collected either.
    let router = Arc::new(if config.routing.probes {
        table.with_reports(reports_tx)
    } else {
        table
    });
    let metrics =
        Arc::new(Metrics::new(env!("CARGO_PKG_VERSION")).context("cannot set up metrics")?);
    let ctx = ProxyContext::from_config(
        &config,
        router.clone(),
        Arc::clone(&credentials),
        Arc::clone(&metrics),
    )?;
    let backend_settings = ctx.backend.clone();
    let proxy = BoundProxy::bind(ctx, &config).await?;
    let admin = AdminServer::bind(config.admin.address).await?;
    let admin_state = Arc::new(AdminState {
        metrics: Arc::clone(&metrics),
        router: Arc::clone(&router),
        started: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        quit: Notify::new(),
        policy: policy_json(&config),
        before_render: Some(token_counter_sync(Arc::clone(&credentials))),
    });
    info!(address = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin server listening");
    tokio::spawn(admin.serve(Arc::clone(&admin_state)));
    // Listeners are bound and the config is loaded: that is /startup.
    admin_state.started.store(true, Ordering::Release);
    // Clients queue in the listen backlog while the first probe round runs.
    let _monitor = if config.routing.probes {
        Some(
            start_monitor(
                &config,
                router,
                reports_rx,
                backend_settings,
                Arc::clone(&credentials),
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
    let quit = Arc::clone(&admin_state);
    proxy
        .serve(async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = quit.quit.notified() => {}
            }
            quit.draining.store(true, Ordering::Release);
        })
        .await;
    info!("shut down");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. SIGHUP is caught so it does not kill the
/// process; configuration reload comes with the operations work.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot install signal handlers; stop the proxy with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); return; }
            _ = int.recv() => { info!("SIGINT received"); return; }
            _ = hup.recv() => { warn!("SIGHUP received: configuration reload is not supported yet; keeping the current configuration"); }
        }
    }
}

/// The routing policy as `/status` shows it.
fn policy_json(config: &Config) -> serde_json::Value {
    let r = &config.routing;
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

/// One probe per endpoint, a Route 53 reader when any endpoint names a
/// health check, and the monitor task over them.
async fn start_monitor(
    config: &Config,
    router: Arc<TableRouter>,
    reports: tokio::sync::mpsc::Receiver<dsql_proxy_routing::Report>,
    backend: BackendSettings,
    credentials: Arc<dyn CredentialSource>,
    metrics: Arc<Metrics>,
) -> dsql_proxy_health::Monitor {
    let global = config.backend.kind == dsql_proxy_config::BackendKind::AuroraGlobal;
    let probes: Vec<Arc<PgProbe>> = router
        .snapshot()
        .endpoints()
        .iter()
        .map(|endpoint| {
            let probe = PgProbe::new(
                Arc::clone(endpoint),
                backend.clone(),
                Arc::clone(&credentials),
                &config.routing.probe_user,
                &config.routing.probe_database,
            );
            // aurora-global: every probe also learns the endpoint's role.
            Arc::new(if global { probe.with_roles() } else { probe })
        })
        .collect();
    let route53: Option<Arc<dyn HealthCheckSource>> = if config
        .endpoints
        .iter()
        .any(|e| e.route53_health_check_id.is_some())
    {
        let timeout = config
            .routing
            .route53_poll_interval
            .get()
            .min(std::time::Duration::from_secs(10));
        Some(Arc::new(SdkHealthChecks::from_env(timeout).await))
    } else {
        None
    };
    let mut settings = MonitorSettings::from_config(&config.routing);
    if global {
        settings.max_replica_lag = Some(config.routing.max_replica_lag.get());
        if let Some(id) = &config.routing.global_cluster_id {
            warn!(global_cluster_id = %id, "the RDS control-plane cross-check is not implemented yet; the writer is decided from probes alone");
        }
    }
    dsql_proxy_health::start(router, reports, probes, route53, settings, metrics).await
}
