//! `dsql-emulator`: runs the Aurora DSQL endpoint emulator until SIGTERM or
//! SIGINT. Prints `listening on ADDR` on stdout once bound; logs go to
//! stderr.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use dsql_emulator::{
    parse_duration, parse_pair, ConflictKind, Emulator, EmulatorConfig, EmulatorError, RateLimit,
    Secret, SessionEnd, UpstreamTls,
};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "dsql-emulator",
    version,
    about = "Aurora DSQL endpoint emulator for tests: checks IAM auth tokens, relays to PostgreSQL"
)]
struct Cli {
    /// Listen address; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// PEM certificate (chain) for the cluster host name.
    #[arg(long)]
    tls_cert: PathBuf,
    /// PEM private key of the certificate.
    #[arg(long)]
    tls_key: PathBuf,
    /// The DSQL host name tokens must be signed for (and clients must send
    /// as SNI), e.g. abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws.
    #[arg(long)]
    cluster_host: String,
    /// The region tokens must be signed for.
    #[arg(long)]
    region: String,
    /// An accepted credential; repeat for more. Test credentials only: the
    /// value is visible in the process list.
    #[arg(long = "credential", value_name = "ACCESS_KEY_ID=SECRET_ACCESS_KEY", required = true, value_parser = parse_pair)]
    credentials: Vec<(String, String)>,
    /// Upstream PostgreSQL, HOST:PORT or IP:PORT.
    #[arg(long)]
    upstream: String,
    /// TLS towards the upstream.
    #[arg(long, value_enum, default_value = "require")]
    upstream_tls: TlsArg,
    /// Upstream password for a role; repeat for more roles.
    #[arg(long = "role-password", value_name = "ROLE=PASSWORD", value_parser = parse_pair)]
    role_passwords: Vec<(String, String)>,
    /// Sessions are ended after this long, e.g. 60m, 2s (a transaction
    /// still running may finish first, for up to 5 minutes).
    #[arg(long, default_value = "60m", value_parser = parse_duration)]
    max_session_duration: Duration,
    /// How a session ends at --max-session-duration.
    #[arg(long, value_enum, default_value = "close")]
    session_end: SessionEndArg,
    /// New connections per second (token bucket refill); 0 disables.
    #[arg(long, default_value_t = 100.0)]
    rate_limit: f64,
    /// Token bucket size of the connection rate limit.
    #[arg(long, default_value_t = 1000)]
    rate_burst: u32,
    /// Concurrent connections allowed.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Startup parameters refused with FATAL 08P01, comma-separated; pass
    /// an empty string to refuse none.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "default_transaction_read_only"
    )]
    refused_parameters: Vec<String>,
    /// How far in the future a token's X-Amz-Date may be.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    max_clock_skew: Duration,
    /// Time a client has from connecting to sending its token.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    startup_timeout: Duration,
    /// Time to open and authenticate the upstream session.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    upstream_connect_timeout: Duration,
    /// Inject Aurora DSQL optimistic-concurrency conflicts: per session,
    /// every Nth commit point (the Nth, 2Nth, ...) fails with SQLSTATE
    /// 40001 instead of committing. Commit points: a simple Query received
    /// while idle that is not transaction control (an autocommit
    /// statement); an extended-protocol batch started while idle that
    /// contains an Execute, through its Sync (a Flush before Sync takes the
    /// batch out); a simple COMMIT or END run in a transaction block, also
    /// when pipelined behind requests still in flight (a failing one is
    /// sent upstream as ROLLBACK). 0 turns injection off.
    #[arg(long, value_name = "N", default_value_t = 0)]
    conflict_every: u32,
    /// Which conflict the injected errors report: oc000 ("change conflicts
    /// with another transaction") or oc001 ("schema has been updated by
    /// another transaction").
    #[arg(long, value_enum, default_value = "oc000")]
    conflict_code: ConflictArg,
    /// Log filter, e.g. `info` or `dsql_emulator=debug`.
    #[arg(long, env = "DSQL_EMULATOR_LOG", default_value = "info")]
    log_level: String,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum TlsArg {
    Disable,
    Require,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ConflictArg {
    /// OC000: change conflicts with another transaction.
    Oc000,
    /// OC001: schema has been updated by another transaction.
    Oc001,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum SessionEndArg {
    /// Close the connection without a message, as Aurora DSQL does.
    Close,
    /// Send FATAL 57P01 (admin_shutdown) first, then close.
    Fatal,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let config = build_config(cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("dsql-emulator")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&EmulatorError::Io(e)),
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &EmulatorError) -> ExitCode {
    error!("{e}");
    eprintln!("dsql-emulator: {e}");
    ExitCode::FAILURE
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn build_config(cli: Cli) -> EmulatorConfig {
    let mut config = EmulatorConfig::new(
        cli.listen,
        cli.tls_cert,
        cli.tls_key,
        cli.cluster_host,
        cli.region,
        cli.upstream,
    );
    config.credentials = cli
        .credentials
        .into_iter()
        .map(|(k, v)| (k, Secret::new(v)))
        .collect();
    config.upstream.tls = match cli.upstream_tls {
        TlsArg::Disable => UpstreamTls::Disable,
        TlsArg::Require => UpstreamTls::Require,
    };
    config.upstream.role_passwords = cli
        .role_passwords
        .into_iter()
        .map(|(k, v)| (k, Secret::new(v)))
        .collect();
    config.upstream.connect_timeout = cli.upstream_connect_timeout;
    config.max_session_duration = cli.max_session_duration;
    config.session_end = match cli.session_end {
        SessionEndArg::Close => SessionEnd::Close,
        SessionEndArg::Fatal => SessionEnd::Fatal,
    };
    config.rate_limit = RateLimit {
        per_second: cli.rate_limit,
        burst: cli.rate_burst,
    };
    config.max_connections = cli.max_connections;
    config.refused_parameters = cli
        .refused_parameters
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    config.max_clock_skew = cli.max_clock_skew;
    config.startup_timeout = cli.startup_timeout;
    config.conflict_every = cli.conflict_every;
    config.conflict_kind = match cli.conflict_code {
        ConflictArg::Oc000 => ConflictKind::Oc000,
        ConflictArg::Oc001 => ConflictKind::Oc001,
    };
    config
}

async fn run(config: EmulatorConfig) -> Result<(), EmulatorError> {
    let cluster_host = config.cluster_host.clone();
    let region = config.region.clone();
    let upstream = config.upstream.address.clone();
    let conflict_every = config.conflict_every;
    let conflict_code = config.conflict_kind.code();
    let emulator = Emulator::bind(config).await?;
    let addr = emulator.local_addr();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {addr}")?;
        out.flush()?;
    }
    info!(address = %addr, %cluster_host, %region, %upstream, "dsql-emulator listening");
    if conflict_every > 0 {
        info!(
            conflict_every,
            conflict_code, "injecting an optimistic-concurrency conflict at every Nth commit point"
        );
    }
    emulator.serve(shutdown_signal()).await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop the emulator with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}
