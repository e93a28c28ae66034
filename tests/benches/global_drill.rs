//! Global Database drill (issue 6, "Measured"): write unavailability
//! through the proxy when a standby is promoted while the old primary keeps
//! running, and how many writes reached the old primary after the proxy saw
//! the promotion.
//!
//! A real PostgreSQL primary ("east") and a streaming standby ("west",
//! pg_basebackup -R), the real proxy binary in front with `kind =
//! "aurora-global"`, `probe_interval = "250ms"`. One client writes
//! continuously through the proxy (an insert every ~5 ms on one session,
//! reconnecting at once when the session is closed). At T0 the standby is
//! promoted (`pg_promote()`); the old primary is left running and writable.
//!
//! Figures per run:
//! * unavailability: T0 to the first write committed on the new writer;
//! * detection: T0 until the proxy's `writer` metric names the new writer
//!   (polled every 10 ms, so an upper bound);
//! * writes on the old primary after detection (server clock, rows with
//!   `at` later than the detection instant): must be 0;
//! * writes on the old primary between T0 and detection (the window before
//!   the proxy's next probe; not an error: the old primary still is the
//!   writer as far as anyone can prove).
//!
//! Run with `benches/global_drill.sh` or
//! `cargo bench -p dsql-proxy-tests --bench global_drill`. `DRILL_RUNS`
//! (default 3) sets the number of runs. A missed target prints FAIL; the
//! exit status stays 0 (a measurement), a panic exits non-zero.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dsql_proxy_tests::fixture::client_config;
use dsql_proxy_tests::global::{sql_in, GlobalOptions, GlobalStack};
use dsql_proxy_tests::{Replication, APP_DB, APP_USER};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const TARGET: Duration = Duration::from_secs(1);
const WARMUP: Duration = Duration::from_secs(1);
const AFTER: Duration = Duration::from_secs(2);

struct Write {
    done: Instant,
    port: Option<u16>,
}

async fn insert(client: &Client) -> Option<u16> {
    let messages = client
        .simple_query("insert into writes (note) values ('drill') returning port")
        .await
        .ok()?;
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0)?.parse().ok(),
        _ => None,
    })
}

struct RunResult {
    unavailable: Option<Duration>,
    detection: Duration,
    after_detection: u64,
    before_detection: u64,
    failed_writes: usize,
}

fn run_once(rt: &tokio::runtime::Runtime) -> RunResult {
    let stack = GlobalStack::start(GlobalOptions::default());
    let (old, new) = (stack.servers[0].port(), stack.servers[1].port());
    assert!(
        stack.wait_for_writer("east", Duration::from_secs(10)),
        "{}",
        stack.proxy.logs()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = client_config(stack.listen, APP_USER, APP_DB);
    let writer = {
        let stop = Arc::clone(&stop);
        rt.spawn(async move {
            let mut writes = Vec::new();
            let mut session: Option<Client> = None;
            while !stop.load(Ordering::SeqCst) {
                if session.is_none() {
                    if let Ok((c, conn)) = cfg.connect(NoTls).await {
                        tokio::spawn(conn);
                        session = Some(c);
                    }
                }
                let port = match &session {
                    Some(c) => insert(c).await,
                    None => None,
                };
                if port.is_none() {
                    session = None;
                }
                writes.push(Write {
                    done: Instant::now(),
                    port,
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            writes
        })
    };
    std::thread::sleep(WARMUP);
    let t0_wall = SystemTime::now();
    let t0 = Instant::now();
    stack.servers[1].promote();
    assert!(
        stack.wait_for_writer("west", Duration::from_secs(10)),
        "{}",
        stack.proxy.logs()
    );
    let detection = t0.elapsed();
    let detected_wall = SystemTime::now();
    std::thread::sleep(AFTER);
    stop.store(true, Ordering::SeqCst);
    let writes = rt.block_on(writer).expect("writer task");
    let epoch = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    let count = |sql: String| -> u64 {
        sql_in(&stack.servers[0], APP_DB, &sql)
            .parse()
            .unwrap_or(u64::MAX)
    };
    let after_detection = count(format!(
        "select count(*) from writes where at > to_timestamp({})",
        epoch(detected_wall)
    ));
    let before_detection = count(format!(
        "select count(*) from writes where at > to_timestamp({}) and at <= to_timestamp({})",
        epoch(t0_wall),
        epoch(detected_wall)
    ));
    let unavailable = writes
        .iter()
        .find(|w| w.done > t0 && w.port == Some(new))
        .map(|w| w.done - t0);
    let failed_writes = writes
        .iter()
        .filter(|w| w.done > t0 && w.port.is_none())
        .count();
    let _ = old;
    RunResult {
        unavailable,
        detection,
        after_detection,
        before_detection,
        failed_writes,
    }
}

fn main() {
    let runs: usize = std::env::var("DRILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("global drill: promote the standby while the old primary keeps running; {runs} run(s), probe_interval 250ms");
    let mut worst = Duration::ZERO;
    let mut leaked = 0;
    for run in 1..=runs {
        let r = run_once(&rt);
        let unavailable = r.unavailable.unwrap_or(Duration::MAX);
        worst = worst.max(unavailable);
        leaked += r.after_detection;
        println!(
            "run {run}: write unavailability {} ms (promotion to first write on the new writer); \
             proxy saw the new writer after <= {} ms; writes on the old primary: {} before detection, \
             {} after; failed writes during the switch: {}",
            r.unavailable.map_or("never".into(), |d| d.as_millis().to_string()),
            r.detection.as_millis(),
            r.before_detection,
            r.after_detection,
            r.failed_writes
        );
    }
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!(
        "{} worst write unavailability {} ms (target <= {} ms)",
        verdict(worst <= TARGET),
        worst.as_millis(),
        TARGET.as_millis()
    );
    println!(
        "{} writes on the old primary after detection: {leaked} (target 0)",
        verdict(leaked == 0)
    );
}
