//! Backend connection reuse (`[pool]`): a client that leaves while idle
//! hands its backend, reset, to the next client of the same login. Real
//! PostgreSQL, the real proxy binary, tokio-postgres; reuse is shown by
//! the backend's own pid.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dsql_proxy_tests::dsql_stack::{DsqlProxyOptions, DsqlStack};
use dsql_proxy_tests::fixture::{ProxyOptions, Stack};
use dsql_proxy_tests::metrics::{http, scrape, status};
use dsql_proxy_tests::{
    AuthMethod, PgOptions, RegionsOptions, RegionsStack, ADMIN_USER, APP_DB, APP_PASSWORD, APP_USER,
};
use tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage};

const WAIT: Duration = Duration::from_secs(10);

fn stack_with(backend: &[&str], pool: &[&str], extra_conf: &[&str]) -> Stack {
    let mut opts = ProxyOptions::default();
    opts.backend_extra
        .extend(backend.iter().map(|l| (*l).to_owned()));
    if !pool.is_empty() {
        opts.routing.push("[pool]".into());
        opts.routing.extend(pool.iter().map(|l| (*l).to_owned()));
    }
    Stack::start_with(
        PgOptions {
            tls: true,
            auth: AuthMethod::ScramSha256,
            extra_conf: extra_conf.iter().map(|l| (*l).to_owned()).collect(),
            ..PgOptions::default()
        },
        opts,
    )
}

async fn connect_config(stack_logs: impl Fn() -> String, config: &Config) -> Client {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", stack_logs()));
    tokio::spawn(connection);
    client
}

async fn connect(stack: &Stack) -> Client {
    connect_config(
        || stack.proxy.logs(),
        &stack.client_config(APP_USER, APP_DB),
    )
    .await
}

async fn one(client: &Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default()
}

async fn pid(client: &Client) -> String {
    one(client, "select pg_backend_pid()").await
}

fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(admin).sum(name, labels)
}

/// Drops `client` (tokio-postgres sends Terminate) and waits until the
/// pool holds `idle` connections.
async fn leave_and_wait_idle(admin: SocketAddr, client: Client, idle: f64) {
    drop(client);
    wait_for(admin, "dsql_proxy_pool_idle", &[], idle).await;
}

async fn wait_for(admin: SocketAddr, name: &str, labels: &[(&str, &str)], at_least: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(admin, name, labels);
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} stayed at {value}, wanted {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn discards(admin: SocketAddr, reason: &str) -> f64 {
    metric(
        admin,
        "dsql_proxy_pool_discards_total",
        &[("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_backend_carries_no_state_from_its_last_client() {
    let stack = stack_with(&[], &[], &[]);
    let admin = stack.proxy.admin_addr();
    stack.pg.superuser_sql(&format!(
        "create role pool_other; grant pool_other to {APP_USER}; \
         create role pool_super superuser login password '{APP_PASSWORD}'"
    ));
    let first = connect(&stack).await;
    let first_pid = pid(&first).await;
    first
        .batch_execute(
            "set work_mem = '7MB'; \
             select set_config('search_path', 'leaked', false); \
             set application_name = 'leaked'; \
             prepare leaked_sql as select 1; \
             set role pool_other",
        )
        .await
        .unwrap();
    // A protocol-level named statement (tokio-postgres calls it s0, s1...).
    let statement = first.prepare("select 2").await.unwrap();
    first.query_one(&statement, &[]).await.unwrap();
    leave_and_wait_idle(admin, first, 1.0).await;

    let second = connect(&stack).await;
    assert_eq!(pid(&second).await, first_pid, "the backend was reused");
    assert_eq!(one(&second, "show work_mem").await, "4MB");
    assert_eq!(one(&second, "show search_path").await, "\"$user\", public");
    assert_eq!(one(&second, "show application_name").await, "");
    assert_eq!(one(&second, "select current_user").await, APP_USER);
    assert_eq!(
        one(&second, "select count(*) from pg_prepared_statements").await,
        "0"
    );
    // The same statement names are free again.
    let statement = second.prepare("select 3").await.unwrap();
    let three: i32 = second.query_one(&statement, &[]).await.unwrap().get(0);
    assert_eq!(three, 3);
    assert!(
        metric(
            admin,
            "dsql_proxy_pool_checkouts_total",
            &[("result", "hit")]
        ) >= 1.0
    );
    drop(second);

    // SET SESSION AUTHORIZATION needs a superuser login; it is undone too.
    // (The proxy logs in with its own configured password.)
    let config = stack.client_config("pool_super", APP_DB);
    let logs = || stack.proxy.logs();
    wait_for(admin, "dsql_proxy_pool_idle", &[], 1.0).await;
    let superuser = connect_config(logs, &config).await;
    let super_pid = pid(&superuser).await;
    assert_ne!(
        super_pid, first_pid,
        "another user never shares a connection"
    );
    superuser
        .batch_execute(&format!("set session authorization {APP_USER}"))
        .await
        .unwrap();
    assert_eq!(one(&superuser, "select session_user").await, APP_USER);
    leave_and_wait_idle(admin, superuser, 2.0).await;
    let again = connect_config(logs, &config).await;
    assert_eq!(pid(&again).await, super_pid);
    assert_eq!(one(&again, "select session_user").await, "pool_super");
    assert_eq!(one(&again, "select current_user").await, "pool_super");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_session_s_backend_is_closed_not_pooled() {
    let stack = stack_with(&[], &[], &[]);
    let admin = stack.proxy.admin_addr();
    let cases = [
        (
            "listen",
            "listen pool_channel",
            "select count(*) from pg_listening_channels()",
        ),
        (
            "hold cursor",
            "declare held cursor with hold for select 1",
            "select count(*) from pg_cursors",
        ),
        (
            "temp table",
            "create temp table pool_temp (id int)",
            "select count(*) from pg_class where relname = 'pool_temp'",
        ),
        (
            "advisory lock",
            "select pg_advisory_lock(4242)",
            "select count(*) from pg_locks where locktype = 'advisory' and objid = 4242",
        ),
    ];
    let mut pinned = discards(admin, "pinned");
    for (what, sql, check) in cases {
        let first = connect(&stack).await;
        let first_pid = pid(&first).await;
        first.batch_execute(sql).await.unwrap();
        // The proxy reads the session's state at its next idle point.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(first);
        wait_for(
            admin,
            "dsql_proxy_pool_discards_total",
            &[("reason", "pinned")],
            pinned + 1.0,
        )
        .await;
        pinned += 1.0;
        let second = connect(&stack).await;
        assert_ne!(pid(&second).await, first_pid, "{what}: not reused");
        assert_eq!(one(&second, check).await, "0", "{what}: nothing left");
        drop(second);
        wait_for(admin, "dsql_proxy_pool_idle", &[], 1.0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_logins_never_share_a_connection() {
    let stack = stack_with(&[], &[], &[]);
    let admin = stack.proxy.admin_addr();
    stack
        .pg
        .superuser_sql(&format!("create database pool_other_db owner {APP_USER}"));
    let first = connect(&stack).await;
    let first_pid = pid(&first).await;
    leave_and_wait_idle(admin, first, 1.0).await;
    let logs = || stack.proxy.logs();

    let other_db = connect_config(logs, &stack.client_config(APP_USER, "pool_other_db")).await;
    assert_ne!(pid(&other_db).await, first_pid, "another database");
    drop(other_db);
    let mut with_options = stack.client_config(APP_USER, APP_DB);
    with_options.options("-c work_mem=9MB");
    let optioned = connect_config(logs, &with_options).await;
    assert_ne!(pid(&optioned).await, first_pid, "other startup options");
    assert_eq!(one(&optioned, "show work_mem").await, "9MB");
    drop(optioned);
    // application_name is no part of the key: it is set at checkout.
    let mut named = stack.client_config(APP_USER, APP_DB);
    named.application_name("pool-app");
    let app = connect_config(logs, &named).await;
    assert_eq!(pid(&app).await, first_pid, "the same login, another name");
    assert_eq!(one(&app, "show application_name").await, "pool-app");
    // Three kept: the other database's, the other options', and this one.
    leave_and_wait_idle(admin, app, 3.0).await;
    // And put back for a client that sent none.
    let same = connect(&stack).await;
    assert_eq!(pid(&same).await, first_pid);
    assert_eq!(one(&same, "show application_name").await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_idle_timeout_and_at_their_lifetime() {
    let stack = stack_with(&[], &["idle_timeout = \"1s\""], &[]);
    let admin = stack.proxy.admin_addr();
    let first = connect(&stack).await;
    let first_pid = pid(&first).await;
    leave_and_wait_idle(admin, first, 1.0).await;
    wait_for(
        admin,
        "dsql_proxy_pool_discards_total",
        &[("reason", "idle_timeout")],
        1.0,
    )
    .await;
    assert_eq!(metric(admin, "dsql_proxy_pool_idle", &[]), 0.0);
    let second = connect(&stack).await;
    assert_ne!(pid(&second).await, first_pid);
    drop(second);

    let stack = stack_with(&["server_lifetime = \"2s\""], &[], &[]);
    let admin = stack.proxy.admin_addr();
    let first = connect(&stack).await;
    leave_and_wait_idle(admin, first, 1.0).await;
    // 90% of the lifetime: too old to hand out.
    wait_for(
        admin,
        "dsql_proxy_pool_discards_total",
        &[("reason", "lifetime")],
        1.0,
    )
    .await;
    assert_eq!(metric(admin, "dsql_proxy_pool_idle", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_are_terminated_at_shutdown() {
    // At debug1 a server logs a client that left without Terminate.
    let mut stack = stack_with(&[], &[], &["log_min_messages = debug1"]);
    let admin = stack.proxy.admin_addr();
    let first = connect(&stack).await;
    let first_pid = pid(&first).await;
    leave_and_wait_idle(admin, first, 1.0).await;
    let st = status(admin);
    assert_eq!(st["pool"]["checkouts"]["miss"], 1, "{st}");
    stack.proxy.send_signal(libc_sigterm());
    assert!(stack.proxy.wait_exit(WAIT).is_some(), "proxy exited");
    assert!(
        stack
            .proxy
            .logs()
            .contains("closed the idle pooled backend connections"),
        "{}",
        stack.proxy.logs()
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let log = stack.pg.log_contents();
        let gone = stack.pg.superuser_sql(&format!(
            "select count(*) from pg_stat_activity where pid = {first_pid}"
        ));
        if gone.trim() == "0" {
            // The default log_line_prefix names the pid: "... [1234] ".
            let tag = format!("[{first_pid}]");
            let eof: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(&tag) && l.contains("unexpected EOF on client connection"))
                .collect();
            assert!(eof.is_empty(), "a backend was not sent Terminate: {eof:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pooled backend is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn libc_sigterm() -> i32 {
    15
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

/// Two regions, and one connection on "fast" parked in the pool.
async fn one_parked_on_fast() -> (RegionsStack, SocketAddr) {
    let stack = two_regions();
    assert!(stack
        .wait_for_landing("fast", Duration::from_secs(10))
        .await
        .is_some());
    let admin = stack.admin_addr();
    let client = stack.connect().await;
    assert_eq!(stack.region_of(&client).await, "fast");
    drop(client);
    wait_for(admin, "dsql_proxy_pool_idle", &[("endpoint", "fast")], 1.0).await;
    (stack, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_follow_routing_drain_and_down() {
    let (stack, admin) = one_parked_on_fast().await;
    // Drained: its pooled connections go, new sessions land elsewhere.
    let (code, body) = http(admin, "POST", "/endpoints/fast/drain");
    assert_eq!(code, 200, "{body}");
    wait_for(
        admin,
        "dsql_proxy_pool_discards_total",
        &[("reason", "drained")],
        1.0,
    )
    .await;
    assert_eq!(
        metric(admin, "dsql_proxy_pool_idle", &[("endpoint", "fast")]),
        0.0
    );
    let client = stack.connect().await;
    assert_eq!(stack.region_of(&client).await, "slow");
    drop(client);
    wait_for(admin, "dsql_proxy_pool_idle", &[("endpoint", "slow")], 1.0).await;
    // Undrained and best again: a client gets a connection on fast, never
    // the idle one on slow.
    let (code, body) = http(admin, "POST", "/endpoints/fast/undrain");
    assert_eq!(code, 200, "{body}");
    assert!(stack
        .wait_for_landing("fast", Duration::from_secs(10))
        .await
        .is_some());
    let client = stack.connect().await;
    assert_eq!(stack.region_of(&client).await, "fast");
    drop(client);
    wait_for(admin, "dsql_proxy_pool_idle", &[("endpoint", "fast")], 1.0).await;
    // Down: frozen, the probes give up on it, its idle connections go.
    stack.region("fast").pg.freeze();
    wait_for(
        admin,
        "dsql_proxy_pool_discards_total",
        &[("reason", "endpoint_down")],
        1.0,
    )
    .await;
    let client = stack.connect().await;
    assert_eq!(stack.region_of(&client).await, "slow");
    stack.region("fast").pg.thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsql_iam_connections_are_reused_within_their_lifetime_and_rate() {
    // The emulator admits 2 connects, then 1 a second; so does the proxy's
    // own admission. Ten sessions in a row need one real connect.
    let stack = DsqlStack::start_with(
        DsqlProxyOptions {
            backend_extra: vec![
                "connect_rate = 1".into(),
                "connect_burst = 2".into(),
                "server_lifetime = \"3s\"".into(),
            ],
            ..DsqlProxyOptions::default()
        },
        |emulator| emulator.rate_limit = Some((1.0, 2)),
    );
    let admin = stack.proxy.admin_addr();
    let started = Instant::now();
    let mut pids = Vec::new();
    for _ in 0..10 {
        let client = stack.connect(APP_USER, APP_DB).await;
        pids.push(pid(&client).await);
        drop(client);
        wait_for(admin, "dsql_proxy_pool_idle", &[], 1.0).await;
    }
    assert!(
        pids.iter().all(|p| *p == pids[0]),
        "one backend for all: {pids:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        metric(admin, "dsql_proxy_backend_connect_rate_limited_total", &[]),
        0.0
    );
    assert_eq!(stack.signings(), 1, "one IAM login");
    assert!(
        metric(
            admin,
            "dsql_proxy_pool_checkouts_total",
            &[("result", "hit")]
        ) >= 9.0
    );
    // Past 90% of server_lifetime the pooled connection is closed.
    wait_for(
        admin,
        "dsql_proxy_pool_discards_total",
        &[("reason", "lifetime")],
        1.0,
    )
    .await;
    let client = stack.connect(APP_USER, APP_DB).await;
    assert_ne!(pid(&client).await, pids[0], "a fresh connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_whose_reset_fails_is_closed() {
    // On DSQL the reset is RESET ALL, DEALLOCATE ALL, CLOSE ALL and a check;
    // SET SESSION AUTHORIZATION survives RESET ALL, so the check fails.
    let stack = DsqlStack::start(DsqlProxyOptions::default());
    let admin = stack.proxy.admin_addr();
    let first = stack.connect(ADMIN_USER, APP_DB).await;
    let first_pid = pid(&first).await;
    first
        .batch_execute(&format!("set session authorization {APP_USER}"))
        .await
        .unwrap();
    drop(first);
    wait_for(
        admin,
        "dsql_proxy_pool_discards_total",
        &[("reason", "reset_failed")],
        1.0,
    )
    .await;
    assert_eq!(metric(admin, "dsql_proxy_pool_idle", &[]), 0.0);
    let second = stack.connect(ADMIN_USER, APP_DB).await;
    assert_ne!(pid(&second).await, first_pid);
    assert_eq!(one(&second, "select session_user").await, ADMIN_USER);
    // A clean session's backend is reset and pooled.
    drop(second);
    wait_for(admin, "dsql_proxy_pool_idle", &[], 1.0).await;
}

/// Backend pids of the app user's sessions (the probe's excluded).
fn app_backend_pids(stack: &Stack) -> Vec<String> {
    let sql = format!(
        "select pid from pg_stat_activity where usename = '{APP_USER}' \
         and backend_type = 'client backend' and application_name <> 'dsql-proxy-probe'"
    );
    tokio::task::block_in_place(|| stack.pg.superuser_sql(&sql))
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_spares_are_made_ahead_of_clients_through_the_rate_limit() {
    let stack = stack_with(
        &["connect_rate = 2", "connect_burst = 1"],
        &[
            "min_idle = 2",
            &format!("min_idle_user = \"{APP_USER}\""),
            &format!("min_idle_database = \"{APP_DB}\""),
        ],
        &[],
    );
    let admin = stack.proxy.admin_addr();
    // Two spares with no client at all; the second waited for its
    // connect-rate slot (burst 1).
    wait_for(admin, "dsql_proxy_pool_idle", &[], 2.0).await;
    assert!(metric(admin, "dsql_proxy_backend_connect_rate_limited_total", &[]) >= 1.0);
    let spares = app_backend_pids(&stack);
    assert_eq!(spares.len(), 2, "{spares:?}");

    // A client that sends just user and database gets a spare.
    let mut raw = tokio::net::TcpStream::connect(stack.listen).await.unwrap();
    dsql_proxy_tests::wire::startup(
        &mut raw,
        &dsql_proxy_tests::wire::startup_v3(APP_USER, APP_DB),
        WAIT,
    )
    .await
    .unwrap();
    dsql_proxy_tests::wire::send(
        &mut raw,
        &dsql_proxy_tests::wire::query("select pg_backend_pid()"),
    )
    .await
    .unwrap();
    let answer = dsql_proxy_tests::wire::read_until(&mut raw, b'Z', WAIT)
        .await
        .unwrap();
    let raw_pid = dsql_proxy_tests::wire::rows(&answer)[0][0].clone().unwrap();
    assert!(spares.contains(&raw_pid), "{raw_pid} is one of {spares:?}");
    assert_eq!(
        metric(
            admin,
            "dsql_proxy_pool_checkouts_total",
            &[("result", "hit")]
        ),
        1.0
    );

    // tokio-postgres also sends client_encoding: its first connect misses,
    // then the spares are made with its parameters, and the next two
    // clients (while the first stays) get them.
    let first = connect(&stack).await;
    let deadline = Instant::now() + WAIT;
    while metric(admin, "dsql_proxy_pool_idle", &[]) < 3.0 {
        assert!(
            Instant::now() < deadline,
            "spares for the learned parameters"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = connect(&stack).await;
    let third = connect(&stack).await;
    assert_eq!(
        metric(
            admin,
            "dsql_proxy_pool_checkouts_total",
            &[("result", "hit")]
        ),
        3.0
    );
    drop((first, second, third, raw));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_on_an_endpoint_a_reload_removes_are_closed() {
    let (stack, admin) = one_parked_on_fast().await;
    // The same file without fast's [[endpoints]] table, then SIGHUP.
    let toml = std::fs::read_to_string(stack.proxy.config_path()).expect("read config");
    let mut parts = toml.split("[[endpoints]]");
    let mut without_fast = parts.next().unwrap_or_default().to_owned();
    for table in parts {
        if !table.contains("name = \"fast\"") {
            without_fast.push_str("[[endpoints]]");
            without_fast.push_str(table);
        }
    }
    assert!(!without_fast.contains("\"fast\""), "{without_fast}");
    stack.proxy.write_config(&without_fast);
    stack.proxy.send_signal(dsql_proxy_tests::process::SIGHUP);
    wait_for(
        admin,
        "dsql_proxy_pool_discards_total",
        &[("reason", "endpoint_down")],
        1.0,
    )
    .await;
    let scrape = scrape(admin);
    assert!(
        scrape
            .value("dsql_proxy_pool_idle", &[("endpoint", "fast")])
            .is_none(),
        "no series for a removed endpoint"
    );
    let client = stack.connect().await;
    assert_eq!(stack.region_of(&client).await, "slow");
}
