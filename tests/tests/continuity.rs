//! Session continuity: client sessions outlive their backend connection.
//! Real PostgreSQL servers, the real proxy binary, real drivers
//! (tokio-postgres here, psycopg in `tests/python/continuity_psycopg.py`).

use std::time::{Duration, Instant};

use dsql_proxy_tests::dsql_stack::{DsqlProxyOptions, DsqlStack};
use dsql_proxy_tests::fixture::{ProxyOptions, Stack};
use dsql_proxy_tests::metrics::{http, scrape};
use dsql_proxy_tests::{AuthMethod, PgOptions, RegionsOptions, RegionsStack, APP_DB, APP_USER};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

const MOVED: &str = "session moved to a new backend connection";

fn lifetime_stack(lifetime: &str) -> Stack {
    let mut opts = ProxyOptions::default();
    opts.backend_extra
        .push(format!("server_lifetime = \"{lifetime}\""));
    Stack::start_with(
        PgOptions {
            tls: true,
            auth: AuthMethod::ScramSha256,
            ..PgOptions::default()
        },
        opts,
    )
}

async fn connect(stack: &Stack) -> Client {
    let (client, connection) = stack
        .client_config(APP_USER, APP_DB)
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", stack.proxy.logs()));
    tokio::spawn(connection);
    client
}

fn moves(logs: &str) -> usize {
    logs.lines().filter(|l| l.contains(MOVED)).count()
}

async fn wait_for_moves(stack: &Stack, at_least: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while moves(&stack.proxy.logs()) < at_least {
        assert!(
            Instant::now() < deadline,
            "fewer than {at_least} moves within {within:?}\n{}",
            stack.proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn one(client: &Client, sql: &str) -> String {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_prepared_statements_survive_three_lifetime_moves() {
    let stack = lifetime_stack("1s");
    let client = connect(&stack).await;
    client
        .batch_execute(
            "create schema if not exists lifetime_s; \
             create table if not exists lifetime_s.t (id int primary key, v text); \
             insert into lifetime_s.t values (1, 'one') on conflict do nothing; \
             set search_path = lifetime_s, public; \
             set timezone = 'Asia/Tokyo'; \
             set statement_timeout = '4s'; \
             prepare sql_level (int) as select v from t where id = $1",
        )
        .await
        .unwrap_or_else(|e| panic!("setup: {e}\n{}", stack.proxy.logs()));
    let protocol_level = client
        .prepare("select v || '!' from t where id = $1")
        .await
        .unwrap();
    let mut pids = vec![one(&client, "select pg_backend_pid()").await];
    for round in 1..=3 {
        wait_for_moves(&stack, round, Duration::from_secs(10)).await;
        let pid = one(&client, "select pg_backend_pid()").await;
        assert!(!pids.contains(&pid), "round {round}: still on {pid}");
        pids.push(pid);
        assert_eq!(one(&client, "show search_path").await, "lifetime_s, public");
        assert_eq!(one(&client, "show timezone").await, "Asia/Tokyo");
        assert_eq!(one(&client, "show statement_timeout").await, "4s");
        assert_eq!(one(&client, "execute sql_level(1)").await, "one");
        let row = client.query_one(&protocol_level, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "one!");
    }
    let logs = stack.proxy.logs();
    assert!(logs.contains("reason=lifetime"), "{logs}");
}

// --- Two Regions: idle sessions move when theirs goes away --------------

/// One idle session with state: its own search_path, a SQL-level and a
/// protocol-level prepared statement.
struct StatefulSession {
    client: Client,
    index: usize,
    statement: tokio_postgres::Statement,
}

impl StatefulSession {
    async fn open(stack: &RegionsStack, index: usize) -> StatefulSession {
        let client = stack.connect().await;
        client
            .batch_execute(&format!(
                "set search_path = s{index}, public; set application_name = 'app{index}'; \
                 prepare twice (int) as select $1 * 2 + {index}"
            ))
            .await
            .unwrap_or_else(|e| panic!("session {index}: {e}\n{}", stack.proxy.logs()));
        let statement = client
            .prepare(&format!("select $1::int + {index}"))
            .await
            .unwrap();
        StatefulSession {
            client,
            index,
            statement,
        }
    }

    /// Its state is all there, on `region`.
    async fn check(&self, stack: &RegionsStack, region: &str) -> Result<(), String> {
        let i = self.index;
        let describe = |e: tokio_postgres::Error| format!("session {i}: {e:?}");
        let got = self
            .client
            .query_one("select current_setting('search_path')", &[])
            .await
            .map_err(describe)?;
        assert_eq!(got.get::<_, String>(0), format!("s{i}, public"));
        let rows = self
            .client
            .simple_query("execute twice(21)")
            .await
            .map_err(describe)?;
        let value = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(value, Some((42 + i).to_string()), "session {i}");
        let row = self
            .client
            .query_one(&self.statement, &[&1i32])
            .await
            .map_err(describe)?;
        assert_eq!(row.get::<_, i32>(0), 1 + i as i32, "session {i}");
        assert_eq!(stack.region_of(&self.client).await, region, "session {i}");
        Ok(())
    }
}

fn two_regions() -> RegionsStack {
    RegionsStack::start(RegionsOptions {
        regions: vec![
            ("slow", Duration::from_millis(20)),
            ("fast", Duration::from_millis(2)),
        ],
        routing: vec![
            "probe_interval = \"250ms\"".into(),
            "probe_timeout = \"1s\"".into(),
        ],
        ..RegionsOptions::default()
    })
}

#[derive(Clone, Copy, Debug)]
enum Loss {
    Kill9,
    Freeze,
    Drain,
}

async fn idle_sessions_move_when_their_region_goes(loss: Loss) {
    let mut stack = two_regions();
    assert!(stack
        .wait_for_landing("fast", Duration::from_secs(10))
        .await
        .is_some());
    let mut sessions = Vec::new();
    for i in 0..50 {
        let s = StatefulSession::open(&stack, i).await;
        assert_eq!(stack.region_of(&s.client).await, "fast");
        sessions.push(s);
    }
    // One inside a transaction, one listening: neither may move.
    let in_transaction = stack.connect().await;
    in_transaction
        .batch_execute("begin; select 1")
        .await
        .unwrap();
    let listening = stack.connect().await;
    listening.batch_execute("listen somewhere").await.unwrap();
    // A statement on a table only this Region has: it cannot be
    // re-created elsewhere, so the session cannot move.
    let doomed = stack.connect().await;
    doomed
        .batch_execute("create table if not exists only_here (id int)")
        .await
        .unwrap();
    let needs_table = doomed
        .prepare("select count(*) from only_here")
        .await
        .unwrap();
    // Let the proxy take the LISTEN session's snapshot.
    tokio::time::sleep(Duration::from_millis(200)).await;

    match loss {
        Loss::Kill9 => tokio::task::block_in_place(|| stack.region_mut("fast").pg.kill9()),
        Loss::Freeze => stack.region("fast").pg.freeze(),
        Loss::Drain => {
            let (code, body) = http(stack.admin_addr(), "POST", "/endpoints/fast/drain");
            assert_eq!(code, 200, "{body}");
        }
    }
    match loss {
        Loss::Kill9 => {}
        // A hang shows only through the probes; a request sent before
        // they confirm it would be in flight, and end with 57P01.
        Loss::Freeze => assert!(
            stack
                .proxy
                .wait_for_log("endpoint marked down", Duration::from_secs(10)),
            "{}",
            stack.proxy.logs()
        ),
        Loss::Drain => assert!(
            stack
                .wait_for_landing("slow", Duration::from_secs(10))
                .await
                .is_some(),
            "{}",
            stack.proxy.logs()
        ),
    }
    let mut failures = Vec::new();
    for s in &sessions {
        if let Err(e) = s.check(&stack, "slow").await {
            failures.push(e);
        }
    }
    let logs = stack.proxy.logs();
    assert!(
        failures.is_empty(),
        "{loss:?}: {} of 50 failed: {failures:#?}\n{logs}",
        failures.len()
    );
    if !matches!(loss, Loss::Drain) {
        // The transaction's backend is gone: an error, never a replay.
        let err = in_transaction
            .simple_query("select 2")
            .await
            .expect_err("a session inside a transaction does not move");
        eprintln!("{loss:?}: in transaction: {err:?}");
        let err = listening
            .simple_query("select 3")
            .await
            .expect_err("a LISTEN session does not move");
        eprintln!("{loss:?}: listening: {err:?}");
        // The replay failed: the client hears why, at once, never a
        // "prepared statement does not exist" later.
        let err = doomed
            .query_one(&needs_table, &[])
            .await
            .expect_err("its statement cannot be replayed");
        let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
        assert_eq!(db.code().code(), "08006", "{db:?}");
        assert!(db.message().contains("only_here"), "{db:?}");
    } else {
        // A drained endpoint is alive: the replay failed, the session
        // stays where it was.
        doomed.query_one(&needs_table, &[]).await.unwrap();
        assert_eq!(stack.region_of(&doomed).await, "fast");
        // A session that cannot move stays too.
        in_transaction.batch_execute("commit").await.unwrap();
        assert_eq!(stack.region_of(&listening).await, "fast");
    }
    let scrape = scrape(stack.admin_addr());
    let reason = match loss {
        Loss::Kill9 => None,
        Loss::Freeze => Some("endpoint_down"),
        Loss::Drain => Some("drained"),
    };
    let moved: f64 = [
        "lifetime",
        "endpoint_down",
        "drained",
        "writer_changed",
        "backend_lost",
    ]
    .iter()
    .map(|r| {
        scrape
            .value("dsql_proxy_sessions_moved_total", &[("reason", r)])
            .unwrap_or(0.0)
    })
    .sum();
    assert!(moved >= 50.0, "moved {moved}\n{logs}");
    if let Some(reason) = reason {
        let n = scrape
            .value("dsql_proxy_sessions_moved_total", &[("reason", reason)])
            .unwrap_or(0.0);
        assert!(n >= 50.0, "{reason}: {n}");
    }
    if matches!(loss, Loss::Freeze) {
        stack.region("fast").pg.thaw();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_idle_sessions_move_with_their_state_on_kill_9() {
    idle_sessions_move_when_their_region_goes(Loss::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_idle_sessions_move_with_their_state_when_their_server_hangs() {
    idle_sessions_move_when_their_region_goes(Loss::Freeze).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_idle_sessions_move_with_their_state_on_a_drain() {
    idle_sessions_move_when_their_region_goes(Loss::Drain).await;
}

// --- Cancel, half messages -----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_a_move_reaches_the_new_backend() {
    let stack = lifetime_stack("1s");
    let client = connect(&stack).await;
    let first = one(&client, "select pg_backend_pid()").await;
    wait_for_moves(&stack, 1, Duration::from_secs(10)).await;
    let now = one(&client, "select pg_backend_pid()").await;
    assert_ne!(first, now, "moved");
    let token = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await
    });
    let started = Instant::now();
    let err = client
        .simple_query("select pg_sleep(20)")
        .await
        .expect_err("cancelled");
    canceller.await.unwrap().unwrap();
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(db.code().code(), "57014", "{db:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // And the session goes on.
    assert_eq!(one(&client, "select 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_never_moved_in_the_middle_of_a_client_message() {
    use dsql_proxy_tests::wire;
    let stack = lifetime_stack("1s");
    let t = Duration::from_secs(15);
    let mut stream = tokio::net::TcpStream::connect(stack.listen).await.unwrap();
    let packet = wire::startup_message(
        wire::PROTOCOL_3_0,
        &[("user", APP_USER), ("database", APP_DB)],
    );
    wire::startup(&mut stream, &packet, t).await.unwrap();
    let msgs = wire::simple_query(&mut stream, "select pg_backend_pid()", t)
        .await
        .unwrap();
    let pid = wire::rows(&msgs)[0][0].clone().unwrap();
    // Half a Query, then a stall across several lifetimes.
    let query = wire::query("select pg_backend_pid()");
    wire::send(&mut stream, &query[..7]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(moves(&stack.proxy.logs()), 0, "{}", stack.proxy.logs());
    wire::send(&mut stream, &query[7..]).await.unwrap();
    let msgs = wire::read_until(&mut stream, b'Z', t).await.unwrap();
    assert_eq!(wire::first_error(&msgs), None, "{msgs:?}");
    assert_eq!(wire::rows(&msgs)[0][0].as_deref(), Some(pid.as_str()));
    // Once whole, the session moves at its next idle point.
    wait_for_moves(&stack, 1, Duration::from_secs(10)).await;
    let msgs = wire::simple_query(&mut stream, "select pg_backend_pid()", t)
        .await
        .unwrap();
    assert_ne!(wire::rows(&msgs)[0][0].as_deref(), Some(pid.as_str()));
}

// --- Aurora DSQL (the emulator): connections cut at the maximum duration --

/// The proxy (`kind = "dsql"`, `server_lifetime = lifetime`) in front of
/// the emulator, which cuts every connection after `cut` without a word,
/// as DSQL does after 60 minutes.
fn dsql_stack(lifetime: &str, cut: Duration) -> DsqlStack {
    DsqlStack::start_with(
        DsqlProxyOptions {
            backend_extra: vec![format!("server_lifetime = \"{lifetime}\"")],
            ..DsqlProxyOptions::default()
        },
        |emulator| emulator.max_session_duration = Some(cut),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dsql_session_outlives_the_maximum_connection_duration() {
    // The emulator cuts connections after 3 s without a word, as DSQL does
    // after 60 minutes; the proxy's lifetime is 1 s.
    let stack = dsql_stack("1s", Duration::from_secs(3));
    let client = stack.connect(APP_USER, APP_DB).await;
    client
        .batch_execute(
            "set search_path = dsql_s, public; set timezone = 'UTC'; \
             set statement_timeout = '7s'; prepare add_one (int) as select $1 + 1",
        )
        .await
        .unwrap();
    let statement = client.prepare("select $1::int * 3").await.unwrap();
    let started = Instant::now();
    let mut rounds = 0;
    // Well past three emulator cuts: every query must work.
    while started.elapsed() < Duration::from_secs(10) {
        assert_eq!(one(&client, "show search_path").await, "dsql_s, public");
        assert_eq!(one(&client, "show statement_timeout").await, "7s");
        assert_eq!(one(&client, "execute add_one(41)").await, "42");
        let row = client.query_one(&statement, &[&5i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 15);
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let logs = stack.proxy.logs();
    assert!(moves(&logs) >= 3 && rounds > 10, "{logs}");
    assert!(logs.contains("reason=lifetime"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_dsql_session_cut_without_a_message_moves_at_its_next_query() {
    // No lifetime: the emulator's silent cut is what the proxy sees.
    let stack = dsql_stack("0s", Duration::from_secs(2));
    let client = stack.connect(APP_USER, APP_DB).await;
    client
        .batch_execute("set search_path = cut_s, public; prepare p as select 7")
        .await
        .unwrap();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(2600)).await;
        assert_eq!(one(&client, "show search_path").await, "cut_s, public");
        assert_eq!(one(&client, "execute p").await, "7");
    }
    let logs = stack.proxy.logs();
    assert_eq!(moves(&logs), 2, "{logs}");
    assert!(logs.contains("reason=backend_lost"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psycopg_session_survives_three_lifetime_moves() {
    // As with tokio-postgres above: the emulator cuts connections after
    // 3 s, the proxy moves sessions after 1 s.
    let stack = dsql_stack("1s", Duration::from_secs(3));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/continuity_psycopg.py");
    let dsn = format!(
        "host={} port={} user={APP_USER} dbname={APP_DB} sslmode=disable",
        stack.listen.ip(),
        stack.listen.port()
    );
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .env("DSN", dsn)
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    let logs = stack.proxy.logs();
    assert!(
        output.status.success(),
        "psycopg: {}\n{}\n{logs}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(moves(&logs) >= 3, "{logs}");
}
