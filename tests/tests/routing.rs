//! Regional routing end to end: real PostgreSQL servers as Regions behind
//! latency relays, the real proxy binary in front.
//!
//! Delays given to [`RegionsOptions`] are one way, so a Region's probe
//! round trip is about twice its delay. Timing-sensitive tests probe every
//! 250ms with a 1s probe timeout (the defaults for hysteresis: down after 3
//! failures, up after 3 successes, switch after 3 rounds).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsql_proxy_tests::fixture::client_config;
use dsql_proxy_tests::wire::{self, BackendMessage};
use dsql_proxy_tests::{
    RegionsOptions, RegionsStack, RelayMode, ADMIN_USER, APP_DB, APP_PASSWORD, APP_USER,
};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage};

const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// `[routing] up_after` / `switch_after` defaults.
const UP_AFTER: u32 = 3;

fn fast_probes() -> Vec<String> {
    vec![
        "probe_interval = \"250ms\"".into(),
        "probe_timeout = \"1s\"".into(),
    ]
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Two Regions, "fast" (3ms each way) and "slow" (30ms each way), listed
/// slow first so config order never favours the fast one.
fn fast_and_slow() -> RegionsOptions {
    RegionsOptions {
        regions: vec![("slow", ms(30)), ("fast", ms(3))],
        routing: fast_probes(),
        ..RegionsOptions::default()
    }
}

/// The lines of `logs` that contain every one of `needles`.
fn lines_with<'a>(logs: &'a str, needles: &[&str]) -> Vec<&'a str> {
    logs.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// The log from the moment the proxy serves clients: it starts to once
/// every endpoint's first probe is in.
fn serving(logs: &str) -> &str {
    let at = logs
        .find("dsql-proxy listening")
        .unwrap_or_else(|| panic!("the proxy never said it was listening\n{logs}"));
    &logs[at..]
}

/// The index of the first line of `logs` that contains every one of
/// `needles`.
fn first_line(logs: &str, needles: &[&str]) -> Option<usize> {
    logs.lines()
        .position(|l| needles.iter().all(|n| l.contains(n)))
}

/// A client error as text, with the SQLSTATE when the server sent one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => format!("{e}: {e:?}"),
    }
}

type ConnectionTask = JoinHandle<Result<(), tokio_postgres::Error>>;

/// Connects without TLS to the proxy and keeps the connection task's
/// result, so a test can see how (and why) the connection ended.
async fn open(cfg: &Config) -> Result<(Client, ConnectionTask), tokio_postgres::Error> {
    let (client, conn) = cfg.connect(NoTls).await?;
    Ok((client, tokio::spawn(conn)))
}

/// Runs `select 1` together with the server's port in one round trip.
async fn select_one_and_port(client: &Client) -> Result<u16, tokio_postgres::Error> {
    let messages = client
        .simple_query("select 1, current_setting('port')")
        .await?;
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row");
    assert_eq!(row.get(0), Some("1"));
    Ok(row.get(1).expect("port").parse().expect("port number"))
}

/// One session opened by a [`SessionLoop`].
#[derive(Debug, Clone)]
struct Attempt {
    started: Instant,
    finished: Instant,
    connect_time: Duration,
    /// `Err` when the connect failed.
    connect: Result<(), String>,
    /// Where `select 1` ran, or its error; `None` when the connect failed.
    query: Option<Result<String, String>>,
}

impl Attempt {
    fn landed(&self) -> Option<&str> {
        match &self.query {
            Some(Ok(region)) => Some(region),
            _ => None,
        }
    }
}

/// A client opening a new session every 50ms (20/s, each on its own task,
/// whether or not the previous one has finished): connect, `select 1`
/// (which also tells the Region), disconnect.
struct SessionLoop {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl SessionLoop {
    fn start(stack: &RegionsStack) -> SessionLoop {
        let cfg = client_config(stack.listen, APP_USER, APP_DB);
        let regions: Arc<Vec<(u16, String)>> = Arc::new(
            stack
                .regions
                .iter()
                .map(|r| (r.pg.port(), r.name.clone()))
                .collect(),
        );
        let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (attempts, stop) = (Arc::clone(&attempts), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut sessions = Vec::new();
                let mut tick = tokio::time::interval(ms(50));
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let (cfg, regions, attempts) =
                        (cfg.clone(), Arc::clone(&regions), Arc::clone(&attempts));
                    sessions.push(tokio::spawn(async move {
                        let attempt = one_session(&cfg, &regions).await;
                        attempts.lock().unwrap().push(attempt);
                    }));
                }
                for s in sessions {
                    let _ = s.await;
                }
            })
        };
        SessionLoop {
            attempts,
            stop,
            task,
        }
    }

    fn snapshot(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }

    /// Waits until a session started at or after `since` landed on
    /// `region`; returns that session.
    async fn wait_for_landing(
        &self,
        region: &str,
        since: Instant,
        within: Duration,
    ) -> Option<Attempt> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let mut found: Vec<Attempt> = self
                .snapshot()
                .into_iter()
                .filter(|a| a.started >= since && a.landed() == Some(region))
                .collect();
            found.sort_by_key(|a| a.started);
            if let Some(first) = found.into_iter().next() {
                return Some(first);
            }
            tokio::time::sleep(ms(20)).await;
        }
        None
    }

    /// Waits until `n` sessions have run `select 1` on `region`, so a fault
    /// injected next hits a client in full swing (the proxy may still be
    /// finishing its first probe round when the stack is returned).
    async fn warm_up(&self, region: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .snapshot()
            .iter()
            .filter(|a| a.landed() == Some(region))
            .count()
            < n
        {
            assert!(Instant::now() < deadline, "{:#?}", self.snapshot());
            tokio::time::sleep(ms(20)).await;
        }
    }

    /// Stops opening sessions and returns every attempt, oldest first.
    async fn stop(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("session loop task");
        let mut all = self.attempts.lock().unwrap().clone();
        all.sort_by_key(|a| a.started);
        all
    }
}

async fn one_session(cfg: &Config, regions: &[(u16, String)]) -> Attempt {
    let started = Instant::now();
    let connected = tokio::time::timeout(Duration::from_secs(15), open(cfg)).await;
    let connect_time = started.elapsed();
    let (client, conn) = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Attempt {
                started,
                finished: Instant::now(),
                connect_time,
                connect: Err(describe(&e)),
                query: None,
            }
        }
        Err(_) => {
            return Attempt {
                started,
                finished: Instant::now(),
                connect_time,
                connect: Err("client timed out connecting".into()),
                query: None,
            }
        }
    };
    let query =
        match tokio::time::timeout(Duration::from_secs(15), select_one_and_port(&client)).await {
            Ok(Ok(port)) => Ok(regions
                .iter()
                .find(|(p, _)| *p == port)
                .map_or_else(|| format!("port {port}"), |(_, name)| name.clone())),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err("select 1 timed out".into()),
        };
    let finished = Instant::now();
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    Attempt {
        started,
        finished,
        connect_time,
        connect: Ok(()),
        query: Some(query),
    }
}

fn describe_attempts(attempts: &[Attempt], origin: Instant) -> String {
    let mut s = String::from("--- sessions (start relative to the fault) ---\n");
    for a in attempts {
        let at = if a.started >= origin {
            format!("+{:?}", a.started - origin)
        } else {
            format!("-{:?}", origin - a.started)
        };
        s.push_str(&format!(
            "{at:>14} connect {:?} {:?} -> {:?}\n",
            a.connect_time, a.connect, a.query
        ));
    }
    s
}

/// Checks a fault injected into `from` between `fault_start` and
/// `fault_done` while a [`SessionLoop`] ran:
/// * sessions completed before the fault landed on `from` (the fault hit
///   the selected Region);
/// * no connect failed, ever;
/// * every session started after the fault was in place ran `select 1`
///   on `to`. (A session already established on `from` when it failed may
///   lose its query: no proxy can save that one. Such casualties are only
///   accepted for sessions started before `fault_done`.)
///
/// Returns the time from `fault_start` to the first session that landed on
/// `to`, and the worst connect time.
fn check_failover(
    attempts: &[Attempt],
    fault_start: Instant,
    fault_done: Instant,
    from: &str,
    to: &str,
    logs: &str,
) -> (Duration, Duration) {
    let context = || {
        format!(
            "{}--- proxy log ---\n{logs}",
            describe_attempts(attempts, fault_start)
        )
    };
    let before: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.finished < fault_start)
        .collect();
    assert!(
        before.len() >= 5 && before.iter().all(|a| a.landed() == Some(from)),
        "sessions before the fault should all land on {from}\n{}",
        context()
    );
    let failed_connects = attempts.iter().filter(|a| a.connect.is_err()).count();
    assert_eq!(failed_connects, 0, "failed connects\n{}", context());
    let after: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started >= fault_done)
        .collect();
    assert!(
        after.len() >= 10,
        "too few sessions after the fault\n{}",
        context()
    );
    for a in &after {
        assert_eq!(
            a.landed(),
            Some(to),
            "a session started after the fault did not run select 1 on {to}\n{}",
            context()
        );
    }
    let casualties: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| matches!(a.query, Some(Err(_))))
        .collect();
    assert!(
        casualties.iter().all(|a| a.started < fault_done),
        "{}",
        context()
    );
    let switched = attempts
        .iter()
        .filter(|a| a.started >= fault_start && a.landed() == Some(to))
        .map(|a| a.started + a.connect_time - fault_start)
        .min()
        .unwrap_or_else(|| panic!("no session landed on {to}\n{}", context()));
    let worst = attempts
        .iter()
        .map(|a| a.connect_time)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{from} -> {to}: {} sessions, first on {to} {switched:?} after the fault, worst connect \
         {worst:?}, {} in-flight casualties {:?}",
        attempts.len(),
        casualties.len(),
        casualties.iter().map(|a| &a.query).collect::<Vec<_>>()
    );
    (switched, worst)
}

/// Lets blocking harness calls (kill, freeze, restart) run on a runtime
/// worker while the session loop keeps going on the other.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_faster_region_is_chosen() {
    let stack = RegionsStack::start(fast_and_slow());
    for _ in 0..5 {
        assert_eq!(
            stack.landing().await.unwrap(),
            "fast",
            "{}",
            stack.proxy.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_swap_moves_new_sessions_within_a_few_probe_intervals() {
    let stack = RegionsStack::start(RegionsOptions {
        regions: vec![("a", ms(3)), ("b", ms(30))],
        routing: fast_probes(),
        ..RegionsOptions::default()
    });
    assert_eq!(
        stack.landing().await.unwrap(),
        "a",
        "{}",
        stack.proxy.logs()
    );
    let swapped = Instant::now();
    stack.region("a").relay.set_delay(ms(30), ms(30));
    stack.region("b").relay.set_delay(ms(3), ms(3));
    let took = stack
        .wait_for_landing("b", Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no move to b within 5s\n{}", stack.proxy.logs()));
    eprintln!("latency swap: new sessions moved after {took:?}");
    // The median must flip and the new best win several rounds: not at once.
    assert!(
        swapped.elapsed() >= PROBE_INTERVAL,
        "moved after {took:?}, sooner than one probe interval\n{}",
        stack.proxy.logs()
    );
    for _ in 0..5 {
        assert_eq!(
            stack.landing().await.unwrap(),
            "b",
            "{}",
            stack.proxy.logs()
        );
    }
    let logs = stack.proxy.logs();
    assert_eq!(
        lines_with(&logs, &["route changed", "from=\"a\"", "to=\"b\""]).len(),
        1,
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latencies_within_tolerance_do_not_flap() {
    // Round trips of about 5ms and 7ms: within the 5ms tolerance.
    let (low, high) = (Duration::from_micros(2_500), Duration::from_micros(3_500));
    let stack = RegionsStack::start(RegionsOptions {
        regions: vec![("a", low), ("b", high)],
        routing: fast_probes(),
        ..RegionsOptions::default()
    });
    let first = stack.landing().await.unwrap();
    let started = Instant::now();
    let mut swapped = false;
    let mut next_toggle = started;
    while started.elapsed() < Duration::from_secs(3) {
        if Instant::now() >= next_toggle {
            // Jitter: the two Regions trade places every 400ms.
            swapped = !swapped;
            let (a, b) = if swapped { (high, low) } else { (low, high) };
            stack.region("a").relay.set_delay(a, a);
            stack.region("b").relay.set_delay(b, b);
            next_toggle += ms(400);
        }
        let landed = stack.landing().await.unwrap();
        assert_eq!(
            landed,
            first,
            "sessions moved between equally fast Regions\n{}",
            stack.proxy.logs()
        );
        tokio::time::sleep(ms(50)).await;
    }
    // Selections made while the first probes come in, before the proxy
    // serves, are not flapping; once it serves the route never changes.
    let logs = stack.proxy.logs();
    let changes = lines_with(serving(&logs), &["route changed"]);
    assert!(
        changes.is_empty(),
        "the route flapped: {changes:#?}\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_breaks_a_tie_within_tolerance() {
    // "quick" is about 2ms faster per round trip, well within tolerance;
    // "primary" has the better priority and wins from the first session.
    let stack = RegionsStack::start(RegionsOptions {
        regions: vec![
            ("quick", Duration::from_micros(2_500)),
            ("primary", Duration::from_micros(3_500)),
        ],
        routing: fast_probes(),
        endpoint_extra: vec![vec!["priority = 2".into()], vec!["priority = 1".into()]],
        ..RegionsOptions::default()
    });
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            stack.landing().await.unwrap(),
            "primary",
            "{}",
            stack.proxy.logs()
        );
        tokio::time::sleep(ms(100)).await;
    }
    let logs = stack.proxy.logs();
    let changes = lines_with(&logs, &["route changed"]);
    assert!(
        changes.last().is_some_and(|l| l.contains("to=\"primary\""))
            && lines_with(serving(&logs), &["route changed"]).is_empty(),
        "{changes:#?}\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_fails_over_without_errors_and_recovery_waits_for_hysteresis() {
    let mut stack = RegionsStack::start(fast_and_slow());
    let sessions = SessionLoop::start(&stack);
    sessions.warm_up("fast", 10).await;

    let fault_start = Instant::now();
    blocking(|| stack.region_mut("fast").pg.kill9());
    let fault_done = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Back, and faster: sessions return only once it was seen up
    // `up_after` times in a row and then won `switch_after` rounds.
    let restart_log_len = stack.proxy.logs().len();
    blocking(|| stack.region_mut("fast").pg.restart());
    let restarted = Instant::now();
    let back = sessions
        .wait_for_landing("fast", restarted, Duration::from_secs(6))
        .await;
    tokio::time::sleep(ms(300)).await;
    let attempts = sessions.stop().await;
    let logs = stack.proxy.logs();

    let during: Vec<Attempt> = attempts
        .iter()
        .filter(|a| a.started < restarted)
        .cloned()
        .collect();
    let (switched, _) = check_failover(&during, fault_start, fault_done, "fast", "slow", &logs);
    assert!(switched < Duration::from_secs(1), "{logs}");

    let back = back.unwrap_or_else(|| {
        panic!(
            "sessions did not return to fast within 6s of its restart\n{}--- proxy log ---\n{logs}",
            describe_attempts(&attempts, restarted)
        )
    });
    let took = back.started - restarted;
    eprintln!("restart: sessions back on fast after {took:?}");
    assert!(
        took >= PROBE_INTERVAL * (UP_AFTER - 1),
        "back on fast {took:?} after the restart: before {UP_AFTER} probes could succeed\n{logs}"
    );
    // No errors during the recovery either.
    for a in attempts.iter().filter(|a| a.started >= restarted) {
        assert!(
            a.connect.is_ok() && matches!(a.query, Some(Ok(_))),
            "{}--- proxy log ---\n{logs}",
            describe_attempts(&attempts, restarted)
        );
    }
    // Marked up first, then the route moved back.
    let since_restart = &logs[restart_log_len..];
    let up = first_line(since_restart, &["endpoint marked up", "endpoint=fast"])
        .unwrap_or_else(|| panic!("fast was not marked up\n{logs}"));
    let moved = first_line(since_restart, &["route changed", "to=\"fast\""])
        .unwrap_or_else(|| panic!("no route change back to fast\n{logs}"));
    assert!(
        up < moved,
        "route moved back before fast was marked up\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_fails_over_without_errors() {
    let stack = RegionsStack::start(fast_and_slow());
    let sessions = SessionLoop::start(&stack);
    sessions.warm_up("fast", 10).await;

    let fault_start = Instant::now();
    blocking(|| stack.region("fast").pg.freeze());
    let fault_done = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = sessions.stop().await;
    blocking(|| stack.region("fast").pg.thaw());

    let logs = stack.proxy.logs();
    let (switched, worst) =
        check_failover(&attempts, fault_start, fault_done, "fast", "slow", &logs);
    // The first connect that hangs on it gives up after its per-attempt
    // limit (500 ms here) and demotes it; the probes confirm (and close its
    // sessions) a little later. Connects that hung meanwhile move on after
    // their own 500 ms and still need a TLS + SCRAM handshake with slow
    // (about 6 round trips of 60ms). The worst connect is one of those
    // that hung: it must be well short of the 5s connect_timeout (a debug
    // build doing ~30 TLS + SCRAM handshakes at once on a small CI box is
    // slow, hence the margin).
    assert!(switched < Duration::from_secs(3), "{logs}");
    assert!(worst < Duration::from_secs(4), "{logs}");
    assert!(
        !lines_with(&logs, &["endpoint marked down", "endpoint=fast"]).is_empty(),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_partition_fails_over_without_errors() {
    let stack = RegionsStack::start(fast_and_slow());
    let sessions = SessionLoop::start(&stack);
    sessions.warm_up("fast", 10).await;

    let fault_start = Instant::now();
    stack.region("fast").relay.set_mode(RelayMode::Hang);
    let fault_done = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = sessions.stop().await;
    stack.region("fast").relay.set_mode(RelayMode::Pass);

    let logs = stack.proxy.logs();
    let (switched, worst) =
        check_failover(&attempts, fault_start, fault_done, "fast", "slow", &logs);
    // The first connect that hangs on it gives up after its per-attempt
    // limit (500 ms here) and demotes it; the probes confirm (and close its
    // sessions) a little later. Connects that hung meanwhile move on after
    // their own 500 ms and still need a TLS + SCRAM handshake with slow
    // (about 6 round trips of 60ms). The worst connect is one of those
    // that hung: it must be well short of the 5s connect_timeout (a debug
    // build doing ~30 TLS + SCRAM handshakes at once on a small CI box is
    // slow, hence the margin).
    assert!(switched < Duration::from_secs(3), "{logs}");
    assert!(worst < Duration::from_secs(4), "{logs}");
    assert!(
        !lines_with(&logs, &["endpoint marked down", "endpoint=fast"]).is_empty(),
        "{logs}"
    );
}

/// A session spoken on the wire (no TLS to the proxy), so the test sees
/// exactly what the proxy sends when it ends one.
struct RawSession {
    stream: TcpStream,
    region: String,
}

impl RawSession {
    async fn open(stack: &RegionsStack) -> RawSession {
        let mut stream = TcpStream::connect(stack.listen).await.unwrap();
        wire::send(&mut stream, &wire::startup_v3(APP_USER, APP_DB))
            .await
            .unwrap();
        wire::read_until(&mut stream, b'Z', Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", stack.proxy.logs()));
        let port = Self::port(&mut stream).await.expect("port query");
        let region = stack
            .regions
            .iter()
            .find(|r| r.pg.port() == port)
            .map(|r| r.name.clone())
            .unwrap();
        RawSession { stream, region }
    }

    async fn port(stream: &mut TcpStream) -> std::io::Result<u16> {
        wire::send(stream, &wire::query("select current_setting('port')")).await?;
        let messages = wire::read_until(stream, b'Z', Duration::from_secs(10)).await?;
        let row = messages
            .iter()
            .find_map(|m| m.data_row())
            .ok_or_else(|| std::io::Error::other(format!("no row: {messages:?}")))?;
        Ok(row[0].as_deref().unwrap().parse().unwrap())
    }

    /// What arrives before the connection ends, within `within`; `None` if
    /// it is still open then (nothing at all arrived).
    async fn ending(&mut self, within: Duration) -> Option<Vec<BackendMessage>> {
        match wire::read_to_close(&mut self.stream, within).await {
            (msgs, Some(e)) if msgs.is_empty() && e.kind() == std::io::ErrorKind::TimedOut => None,
            (msgs, _) => Some(msgs),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_endpoint_down_close_ends_idle_sessions_with_57p01() {
    let mut opts = fast_and_slow();
    opts.routing.push("on_endpoint_down = \"close\"".into());
    let mut stack = RegionsStack::start(opts);

    // A partition: the server cannot say anything, so what the client gets
    // comes from the proxy.
    let mut idle = RawSession::open(&stack).await;
    assert_eq!(idle.region, "fast");
    let t0 = Instant::now();
    stack.region("fast").relay.set_mode(RelayMode::Hang);
    let end = idle.ending(Duration::from_secs(3)).await;
    let took = t0.elapsed();
    let logs = stack.proxy.logs();
    let end =
        end.unwrap_or_else(|| panic!("idle session still open 3s into the partition\n{logs}"));
    eprintln!("partition: idle session ended after {took:?}: {end:?}");
    assert_eq!(end.len(), 1, "{end:?}\n{logs}");
    let fields = end[0].error_fields().expect("an ErrorResponse");
    assert_eq!(
        (fields.severity(), fields.code()),
        (Some("FATAL"), Some("57P01")),
        "{end:?}"
    );
    let message = fields.message().unwrap_or_default();
    assert!(
        message.contains("fast") && message.contains("unavailable"),
        "{message}"
    );
    assert_eq!(stack.landing().await.unwrap(), "slow", "{logs}");
    stack.region("fast").relay.set_mode(RelayMode::Pass);

    // kill -9 of the Region an idle session is on: it ends promptly too
    // (the dying backend may say so itself), and new sessions work.
    let mut idle = RawSession::open(&stack).await;
    assert_eq!(idle.region, "slow");
    let t0 = Instant::now();
    blocking(|| stack.region_mut("slow").pg.kill9());
    let end = idle.ending(Duration::from_secs(3)).await;
    let took = t0.elapsed();
    let logs = stack.proxy.logs();
    let end = end.unwrap_or_else(|| panic!("idle session still open 3s after kill -9\n{logs}"));
    eprintln!("kill -9: idle session ended after {took:?}: {end:?}");
    for m in &end {
        assert_eq!(m.sqlstate().as_deref(), Some("57P01"), "{end:?}");
    }
    assert_eq!(
        stack.landing().await.unwrap(),
        "fast",
        "{}",
        stack.proxy.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_endpoint_down_keep_leaves_sessions_to_their_backend() {
    let mut opts = fast_and_slow();
    opts.routing.push("on_endpoint_down = \"keep\"".into());
    let stack = RegionsStack::start(opts);
    let mut idle = RawSession::open(&stack).await;
    assert_eq!(idle.region, "fast");

    stack.region("fast").relay.set_mode(RelayMode::Hang);
    assert!(
        stack
            .proxy
            .wait_for_log("endpoint marked down", Duration::from_secs(4)),
        "{}",
        stack.proxy.logs()
    );
    // Well after the down event the proxy has sent nothing...
    assert_eq!(
        idle.ending(Duration::from_secs(1)).await,
        None,
        "{}",
        stack.proxy.logs()
    );
    assert_eq!(stack.landing().await.unwrap(), "slow");
    // ...and once the partition heals the session carries on.
    stack.region("fast").relay.set_mode(RelayMode::Pass);
    let port = RawSession::port(&mut idle.stream)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.proxy.logs()));
    assert_eq!(port, stack.region("fast").pg.port());
    let logs = stack.proxy.logs();
    assert!(!logs.contains("reason=endpoint_down"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_regions_down_names_every_endpoint_then_recovers() {
    let mut stack = RegionsStack::start(fast_and_slow());
    assert_eq!(stack.landing().await.unwrap(), "fast");
    blocking(|| {
        stack.region_mut("fast").pg.kill9();
        stack.region_mut("slow").pg.kill9();
    });

    let t0 = Instant::now();
    let err = stack
        .try_connect()
        .await
        .expect_err("a session with every Region down");
    let took = t0.elapsed();
    let logs = stack.proxy.logs();
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("no ErrorResponse: {err:?}\n{logs}"));
    eprintln!(
        "all down after {took:?}: {} {}",
        db.code().code(),
        db.message()
    );
    assert_eq!(db.code().code(), "08001", "{db:?}");
    // connect_timeout is 5s.
    assert!(took < Duration::from_secs(5), "{took:?}");
    let message = db.message();
    for name in ["fast", "slow"] {
        let at = message
            .find(&format!("{name}: "))
            .unwrap_or_else(|| panic!("{name} not listed: {message}"));
        // Each endpoint comes with its own failure.
        let cause = message[at + name.len() + 2..]
            .split("; ")
            .next()
            .unwrap_or_default();
        assert!(cause.len() > 5, "no failure given for {name}: {message}");
    }

    // The proxy still tries endpoints it thinks are down: the first
    // session after a restart works.
    blocking(|| stack.region_mut("slow").pg.restart());
    assert_eq!(
        stack.landing().await.unwrap_or_else(|e| panic!(
            "{}\n{}",
            describe(&e),
            stack.proxy.logs()
        )),
        "slow"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_time_failover_without_probes_but_auth_failures_pass_through() {
    let stack = RegionsStack::start(RegionsOptions {
        routing: vec!["probe_interval = \"60s\"".into()],
        ..fast_and_slow()
    });
    assert_eq!(
        stack.landing().await.unwrap(),
        "fast",
        "{}",
        stack.proxy.logs()
    );

    // An authentication refusal would be the same anywhere: the client gets
    // it, and only one server ever saw the attempt. (The proxy presents the
    // configured password, which is not admin's.)
    let err = client_config(stack.listen, ADMIN_USER, APP_DB)
        .connect(NoTls)
        .await
        .err()
        .expect("admin must be refused with app's password");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(db.code().code(), "28P01", "{db:?}");
    tokio::time::sleep(ms(200)).await;
    let refusals: Vec<usize> = stack
        .regions
        .iter()
        .map(|r| {
            r.pg.log_contents()
                .matches("password authentication failed")
                .count()
        })
        .collect();
    let slow_then_fast = [
        stack.regions[0].name.as_str(),
        stack.regions[1].name.as_str(),
    ];
    assert_eq!(slow_then_fast, ["slow", "fast"]);
    assert_eq!(refusals, [0, 1], "refusals per server (slow, fast)");
    let logs = stack.proxy.logs();
    assert!(!logs.contains("connected after failing over"), "{logs}");
    assert!(!logs.contains("endpoint marked down"), "{logs}");

    // The selected Region refuses connections; no probe runs for a minute,
    // so only the connect path can notice.
    stack.region("fast").relay.set_mode(RelayMode::Refuse);
    let t0 = Instant::now();
    let client = stack.connect().await;
    let took = t0.elapsed();
    assert_eq!(stack.region_of(&client).await, "slow");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let logs = stack.proxy.logs();
    assert!(
        !lines_with(&logs, &["connected after failing over", "endpoint=slow"]).is_empty(),
        "{logs}"
    );
    // The failed attempt demoted fast at once: the next session goes
    // straight to slow.
    assert_eq!(stack.landing().await.unwrap(), "slow");
    assert_eq!(
        lines_with(&stack.proxy.logs(), &["connected after failing over"]).len(),
        1,
        "{}",
        stack.proxy.logs()
    );
    // The proxy answered the refused admin login without retrying it.
    assert_eq!(
        stack.regions[1]
            .pg
            .log_contents()
            .matches("password authentication failed")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_probe_login_does_not_move_traffic() {
    let stack = RegionsStack::start(RegionsOptions {
        probe_user: Some("prober".into()),
        ..fast_and_slow()
    });
    // The probe role does not exist yet: reported, but no Region is down
    // and sessions work.
    assert!(
        stack
            .proxy
            .wait_for_log("probe login refused", Duration::from_secs(3)),
        "{}",
        stack.proxy.logs()
    );
    stack.landing().await.unwrap();

    for r in &stack.regions {
        r.pg.superuser_sql(&format!(
            "create role prober login password '{APP_PASSWORD}'"
        ));
    }
    let took = stack.wait_for_landing("fast", Duration::from_secs(3)).await;
    assert!(took.is_some(), "{}", stack.proxy.logs());
    // fast was selected while its probe login was still refused (a refusal
    // is a latency sample): wait until the probe has logged in, so the
    // refusal below is a new one the monitor reports.
    let fast = &stack.region("fast").pg;
    let logged_in = Instant::now();
    while fast.superuser_sql(
        "select count(*) from pg_stat_activity \
         where application_name = 'dsql-proxy-probe' and usename = 'prober'",
    ) == "0"
    {
        assert!(
            logged_in.elapsed() < Duration::from_secs(5),
            "the probe never logged in as prober\n{}",
            stack.proxy.logs()
        );
        tokio::time::sleep(ms(50)).await;
    }

    // Now fast's probe login is refused: its probe connection is cut and
    // every reconnect fails authentication.
    let mark = stack.proxy.logs().len();
    fast.superuser_sql("alter role prober password 'no-longer-this'");
    fast.superuser_sql(
        "select pg_terminate_backend(pid) from pg_stat_activity \
         where application_name = 'dsql-proxy-probe'",
    );
    let refused = Instant::now();
    while stack.proxy.logs()[mark..]
        .matches("probe login refused")
        .count()
        == 0
    {
        assert!(
            refused.elapsed() < Duration::from_secs(3),
            "no refused probe login reported\n{}",
            stack.proxy.logs()
        );
        tokio::time::sleep(ms(50)).await;
    }
    // Many probe rounds later, sessions still land on fast.
    while refused.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            stack.landing().await.unwrap(),
            "fast",
            "{}",
            stack.proxy.logs()
        );
        tokio::time::sleep(ms(100)).await;
    }
    let logs = stack.proxy.logs();
    let after = &logs[mark..];
    assert!(
        lines_with(after, &["probe login refused", "endpoint=fast"]).len() == 1,
        "{logs}"
    );
    assert!(!after.contains("endpoint marked down"), "{logs}");
    assert!(!after.contains("route changed"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_region_pins_a_slower_region_while_it_is_healthy() {
    let mut opts = fast_and_slow();
    opts.routing.push("prefer_region = \"slow\"".into());
    let mut stack = RegionsStack::start(opts);
    for _ in 0..5 {
        assert_eq!(
            stack.landing().await.unwrap(),
            "slow",
            "{}",
            stack.proxy.logs()
        );
    }
    blocking(|| stack.region_mut("slow").pg.kill9());
    // The very next session fails over at connect time.
    for _ in 0..5 {
        assert_eq!(
            stack.landing().await.unwrap_or_else(|e| panic!(
                "{}\n{}",
                describe(&e),
                stack.proxy.logs()
            )),
            "fast",
            "{}",
            stack.proxy.logs()
        );
    }
}
