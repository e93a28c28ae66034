//! Backend connection reuse, measured where it matters: a client's
//! connect-to-first-row time when the proxy's backend is 40 ms away.
//!
//! The DSQL endpoint emulator (TLS with SNI, SigV4 token check) in front of
//! a real PostgreSQL server, a latency relay adding 20 ms each way between
//! the proxy and the emulator, the real proxy binary (`kind = "dsql"`,
//! `auth = "dsql-iam"`). A client on loopback opens a session with
//! tokio-postgres, runs `select 1`, and leaves; the time from the start of
//! its connect to the row is recorded. With `[pool] enabled = true` each
//! client starts once the previous one's backend is back in the pool (a
//! hit); with `enabled = false` every client makes a new backend connection
//! (a miss). p50 and p99 of each.
//!
//! Run with `benches/pool_connect.sh` or
//! `cargo bench -p dsql-proxy-tests --bench pool_connect`. Settings
//! (environment): `POOL_SESSIONS` (200 per leg), `POOL_DELAY_MS` (20, one
//! way). A panic (a stack that does not start) exits non-zero.

use std::time::{Duration, Instant};

use dsql_proxy_tests::dsql_stack::{DsqlProxyOptions, DsqlStack};
use dsql_proxy_tests::metrics::scrape;
use dsql_proxy_tests::{free_addr, LatencyRelay, ProxyProcess, APP_DB, APP_USER};
use tokio::runtime::Runtime;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Config, NoTls};

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct Leg {
    name: &'static str,
    times: Vec<Duration>,
    hits: f64,
    misses: f64,
}

fn run_leg(
    rt: &Runtime,
    stack: &DsqlStack,
    relay: &LatencyRelay,
    pool: bool,
    sessions: usize,
) -> Leg {
    let listen = free_addr();
    let opts = DsqlProxyOptions::default();
    let mut toml = DsqlStack::proxy_toml(&stack.emulator, &stack.pki, listen, &opts).replace(
        &format!("connect_address = \"{}\"", stack.emulator.addr()),
        &format!("connect_address = \"{}\"", relay.addr()),
    );
    toml.push_str(&format!("[pool]\nenabled = {pool}\n"));
    let mut proxy = ProxyProcess::spawn_with_env(&toml, &[], &opts.env);
    proxy.wait_ready(listen, Duration::from_secs(20));
    let admin = proxy.admin_addr();
    let mut config = Config::new();
    config
        .host("127.0.0.1")
        .port(listen.port())
        .user(APP_USER)
        .dbname(APP_DB)
        .ssl_mode(SslMode::Disable)
        .connect_timeout(Duration::from_secs(10));
    let idle = || scrape(admin).sum("dsql_proxy_pool_idle", &[]);
    let mut times = Vec::with_capacity(sessions);
    rt.block_on(async {
        // One unmeasured session: the IAM token is signed, the pool filled.
        for i in 0..=sessions {
            if pool && i > 0 {
                let deadline = Instant::now() + Duration::from_secs(5);
                while idle() < 1.0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let started = Instant::now();
            let (client, connection) = config
                .connect(NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect through the proxy: {e}\n{}", proxy.logs()));
            let task = tokio::spawn(connection);
            client.simple_query("select 1").await.expect("select 1");
            if i > 0 {
                times.push(started.elapsed());
            }
            drop(client);
            let _ = task.await;
        }
    });
    let metrics = scrape(admin);
    let leg = Leg {
        name: if pool { "pool hit" } else { "pool off (miss)" },
        times,
        hits: metrics.sum("dsql_proxy_pool_checkouts_total", &[("result", "hit")]),
        misses: metrics.sum("dsql_proxy_pool_checkouts_total", &[("result", "miss")]),
    };
    drop(proxy);
    leg
}

fn main() {
    // `cargo bench` passes --bench; nothing else is read.
    let sessions = env_number("POOL_SESSIONS", 200) as usize;
    let delay = Duration::from_millis(env_number("POOL_DELAY_MS", 20));
    let rt = Runtime::new().expect("tokio runtime");
    let stack = DsqlStack::start_with(DsqlProxyOptions::default(), |emulator| {
        // Never the bottleneck.
        emulator.rate_limit = Some((100_000.0, 100_000));
    });
    let relay = LatencyRelay::start(stack.emulator.addr(), delay);
    println!(
        "== connect-to-first-row through dsql-proxy, backend RTT {} ms (kind = \"dsql\", dsql-iam), \
         {sessions} sessions per leg, one after another",
        delay.as_millis() * 2
    );
    println!(
        "{:<18}{:>10}{:>10}{:>10}{:>8}{:>8}",
        "leg", "p50 ms", "p99 ms", "max ms", "hits", "misses"
    );
    for pool in [true, false] {
        let mut leg = run_leg(&rt, &stack, &relay, pool, sessions);
        leg.times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<18}{:>10.2}{:>10.2}{:>10.2}{:>8}{:>8}",
            leg.name,
            ms(percentile(&leg.times, 0.50)),
            ms(percentile(&leg.times, 0.99)),
            ms(*leg.times.last().expect("sessions")),
            leg.hits,
            leg.misses
        );
    }
}
