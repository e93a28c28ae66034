//! Transparent retry (`[retry]`): serialization conflicts of autocommit
//! requests are retried by the proxy, everything else reaches the client
//! as before. Real PostgreSQL (REPEATABLE READ conflicts), the DSQL
//! emulator's injected OCC conflicts, tokio-postgres and raw wire clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsql_proxy_tests::dsql_stack::{DsqlProxyOptions, DsqlStack};
use dsql_proxy_tests::fixture::{client_config, proxy_toml};
use dsql_proxy_tests::metrics::scrape;
use dsql_proxy_tests::wire;
use dsql_proxy_tests::{
    free_addr, AuthMethod, PgOptions, ProxyOptions, ProxyProcess, Stack, APP_DB, APP_USER,
};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

const CLIENTS: usize = 8;
const UPDATES: usize = 200;
const WAIT: Duration = Duration::from_secs(10);

/// Proxy options with `[retry]` lines (after the `[routing]` table the
/// fixture ends with).
fn options(retry: &[&str]) -> ProxyOptions {
    let mut opts = ProxyOptions::default();
    if !retry.is_empty() {
        opts.routing.push("[retry]".into());
        opts.routing.extend(retry.iter().map(|l| (*l).to_owned()));
    }
    opts
}

fn stack(retry: &[&str]) -> Stack {
    Stack::start_with(
        PgOptions {
            tls: true,
            auth: AuthMethod::ScramSha256,
            ..PgOptions::default()
        },
        options(retry),
    )
}

/// A second proxy on the same server, with other `[retry]` settings.
fn second_proxy(stack: &Stack, retry: &[&str]) -> (ProxyProcess, SocketAddr) {
    let listen = free_addr();
    let proxy = ProxyProcess::start_with(&proxy_toml(&stack.pg, listen, &options(retry)), listen);
    (proxy, listen)
}

async fn connect(listen: SocketAddr) -> Client {
    let (client, connection) = client_config(listen, APP_USER, APP_DB)
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    tokio::spawn(connection);
    client
}

fn metric(proxy: &ProxyProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(proxy.admin_addr()).sum(name, labels)
}

async fn setup_counter(listen: SocketAddr, table: &str) {
    let client = connect(listen).await;
    client
        .batch_execute(&format!(
            "drop table if exists {table}; \
             create table {table} (id int primary key, n int not null); \
             insert into {table} values (1, 0)"
        ))
        .await
        .expect("setup");
}

async fn counter(listen: SocketAddr, table: &str) -> i32 {
    let client = connect(listen).await;
    client
        .query_one(&format!("select n from {table} where id = 1"), &[])
        .await
        .expect("read counter")
        .get(0)
}

#[derive(Clone, Copy, Debug)]
enum Protocol {
    Simple,
    Extended,
}

/// `CLIENTS` sessions at REPEATABLE READ (set by the session), each running
/// `UPDATES` autocommit increments of one row; returns the errors the
/// clients saw.
async fn contend(
    listen: SocketAddr,
    table: &str,
    protocol: Protocol,
    in_transaction: bool,
) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let table = table.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = connect(listen).await;
            client
                .batch_execute("set default_transaction_isolation = 'repeatable read'")
                .await
                .expect("set isolation");
            let sql = format!("update {table} set n = n + 1 where id = 1");
            let statement = client.prepare(&sql).await.expect("prepare");
            let mut errors = 0;
            for _ in 0..UPDATES {
                let result = match (protocol, in_transaction) {
                    (Protocol::Simple, false) => client.simple_query(&sql).await.map(drop),
                    (Protocol::Extended, false) => client.execute(&statement, &[]).await.map(drop),
                    (Protocol::Simple, true) => {
                        let result = client
                            .simple_query(&format!("begin; {sql}; commit"))
                            .await
                            .map(drop);
                        if result.is_err() {
                            let _ = client.simple_query("rollback").await;
                        }
                        result
                    }
                    (Protocol::Extended, true) => {
                        let result = async {
                            client.simple_query("begin").await?;
                            client.execute(&statement, &[]).await?;
                            client.simple_query("commit").await.map(drop)
                        }
                        .await;
                        if result.is_err() {
                            let _ = client.simple_query("rollback").await;
                        }
                        result
                    }
                };
                if let Err(e) = result {
                    assert_eq!(
                        e.code(),
                        Some(&SqlState::T_R_SERIALIZATION_FAILURE),
                        "only conflicts are expected: {e}"
                    );
                    errors += 1;
                }
            }
            errors
        }));
    }
    let mut errors = 0;
    for task in tasks {
        errors += task.await.expect("client task");
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicting_autocommit_updates_are_retried_until_they_commit() {
    // Eight clients on one row conflict hard, more so on a slow machine:
    // with the default 100ms cap, a request lost all ten tries about once
    // in 20,000 on a loaded 2-core host. Wider jitter spreads the tries.
    let stack = stack(&[
        "max_attempts = 10",
        "base_delay = \"5ms\"",
        "max_delay = \"500ms\"",
    ]);
    let (off, off_listen) = second_proxy(&stack, &[]);
    for protocol in [Protocol::Simple, Protocol::Extended] {
        let table = format!("counter_{protocol:?}").to_lowercase();
        setup_counter(stack.listen, &table).await;
        let errors = contend(stack.listen, &table, protocol, false).await;
        let n = counter(stack.listen, &table).await;
        assert_eq!(
            (errors, n),
            (0, (CLIENTS * UPDATES) as i32),
            "{protocol:?}: no client-visible error, every increment committed\n{}",
            stack.proxy.logs()
        );
        // The same workload without retry: it really conflicts.
        setup_counter(off_listen, &table).await;
        let errors_off = contend(off_listen, &table, protocol, false).await;
        let n_off = counter(off_listen, &table).await;
        assert!(errors_off > 0, "{protocol:?}: the workload conflicts");
        assert_eq!(n_off as usize, CLIENTS * UPDATES - errors_off);
    }
    let succeeded = metric(
        &stack.proxy,
        "dsql_proxy_retries_total",
        &[("sqlstate", "40001"), ("outcome", "succeeded")],
    );
    let exhausted = metric(
        &stack.proxy,
        "dsql_proxy_retries_total",
        &[("sqlstate", "40001"), ("outcome", "exhausted")],
    );
    assert!(succeeded > 0.0, "conflicts were retried");
    assert_eq!(exhausted, 0.0);
    let tries = metric(&stack.proxy, "dsql_proxy_retry_tries_count", &[]);
    assert_eq!(tries, succeeded, "one histogram entry per retried request");
    assert_eq!(
        metric(&off, "dsql_proxy_retries_total", &[]),
        0.0,
        "retry is off by default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_inside_a_transaction_block_reach_the_client() {
    let stack = stack(&["max_attempts = 10"]);
    let mut errors = 0;
    for protocol in [Protocol::Simple, Protocol::Extended] {
        let table = format!("tx_counter_{protocol:?}").to_lowercase();
        setup_counter(stack.listen, &table).await;
        let seen = contend(stack.listen, &table, protocol, true).await;
        let n = counter(stack.listen, &table).await;
        assert_eq!(n as usize, CLIENTS * UPDATES - seen, "{protocol:?}");
        errors += seen;
    }
    assert!(errors > 0, "transactions conflict and the client is told");
    assert_eq!(metric(&stack.proxy, "dsql_proxy_retries_total", &[]), 0.0);
    let in_transaction = metric(
        &stack.proxy,
        "dsql_proxy_retry_not_eligible_total",
        &[("cause", "in_transaction")],
    );
    let transaction_control = metric(
        &stack.proxy,
        "dsql_proxy_retry_not_eligible_total",
        &[("cause", "transaction_control")],
    );
    assert!(
        in_transaction + transaction_control >= errors as f64,
        "every conflict the client saw is counted: {in_transaction} + {transaction_control} < {errors}"
    );
}

/// A function that fails with 40001 until a sequence (which no rollback
/// resets) reaches a multiple of `every`, and one that always fails.
async fn setup_flaky(listen: SocketAddr) {
    let client = connect(listen).await;
    client
        .batch_execute(
            "create sequence if not exists flaky_tries; \
             create or replace function flaky(every int) returns int language plpgsql as $$ \
             begin \
               if nextval('flaky_tries') % every <> 0 then \
                 raise exception 'could not serialize access (test)' using errcode = '40001'; \
               end if; \
               return 1; \
             end $$; \
             create or replace function conflict_with_notice(size int) returns int language plpgsql as $$ \
             begin \
               perform nextval('flaky_tries'); \
               raise notice '%', repeat('x', size); \
               raise exception 'could not serialize access (test)' using errcode = '40001'; \
             end $$; \
             select nextval('flaky_tries')",
        )
        .await
        .expect("setup flaky");
}

/// Read with a simple query: tokio-postgres closes the statement of a
/// `query(&str)` by pipelining Close and Sync ahead of the next request,
/// which would make that request not retryable.
async fn tries_so_far(client: &Client) -> i64 {
    let rows = client
        .simple_query("select last_value from flaky_tries")
        .await
        .expect("sequence");
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
            _ => None,
        })
        .expect("a value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_tried_until_it_succeeds_and_the_last_error_comes_with_a_notice() {
    let stack = stack(&[
        "max_attempts = 4",
        "base_delay = \"1ms\"",
        "max_delay = \"5ms\"",
    ]);
    setup_flaky(stack.listen).await;
    let client = connect(stack.listen).await;
    let start = tries_so_far(&client).await;
    // Fails twice, then succeeds (three tries), in both protocols.
    client
        .simple_query("select setval('flaky_tries', 3)")
        .await
        .unwrap();
    let rows = client
        .simple_query("select flaky(3)")
        .await
        .expect("retried");
    assert!(
        matches!(
            &rows[..],
            [
                tokio_postgres::SimpleQueryMessage::RowDescription(_),
                tokio_postgres::SimpleQueryMessage::Row(_),
                tokio_postgres::SimpleQueryMessage::CommandComplete(1)
            ]
        ),
        "one clean answer: {rows:?}"
    );
    assert_eq!(tries_so_far(&client).await, 6);
    let statement = client.prepare("select flaky($1)").await.unwrap();
    let row = client
        .query_one(&statement, &[&3i32])
        .await
        .expect("retried");
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(tries_so_far(&client).await, 9);
    let _ = start;
    // Never succeeds: four tries, then the last error, unchanged, after a
    // NOTICE saying so (seen raw, below).
    let err = client
        .simple_query("select flaky(1000000)")
        .await
        .expect_err("runs out of tries");
    assert_eq!(err.code(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
    assert_eq!(tries_so_far(&client).await, 13);
    let metrics = scrape(stack.proxy.admin_addr());
    assert_eq!(
        metrics.sum(
            "dsql_proxy_retries_total",
            &[("sqlstate", "40001"), ("outcome", "succeeded")]
        ),
        2.0
    );
    assert_eq!(
        metrics.sum(
            "dsql_proxy_retries_total",
            &[("sqlstate", "40001"), ("outcome", "exhausted")]
        ),
        1.0
    );
    assert_eq!(
        metrics.sum("dsql_proxy_retry_tries_sum", &[]),
        3.0 + 3.0 + 4.0
    );

    let mut raw = raw_session(stack.listen).await;
    let answer = wire::simple_query(&mut raw, "select flaky(1000000)", WAIT)
        .await
        .unwrap();
    let tags: Vec<u8> = answer.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"NTEZ", "{answer:?}");
    let notice = wire::ErrorFields::parse(&answer[0].body);
    assert!(
        notice
            .message()
            .is_some_and(|m| m.contains("tried this request 4 times")),
        "{notice:?}"
    );
    assert_eq!(first_error(&answer).unwrap().code(), Some("40001"));
    assert_eq!(answer[3].ready_status(), Some(b'I'));
}

/// The first ErrorResponse (not NoticeResponse) of an answer.
fn first_error(answer: &[wire::BackendMessage]) -> Option<wire::ErrorFields> {
    answer
        .iter()
        .find(|m| m.tag == b'E')
        .and_then(wire::BackendMessage::error_fields)
}

/// A raw wire session through the proxy, past startup.
async fn raw_session(listen: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(listen).await.unwrap();
    let response = wire::startup(&mut stream, &wire::startup_v3(APP_USER, APP_DB), WAIT)
        .await
        .unwrap();
    assert_eq!(response.ready_status(), Some(b'I'), "{}", response.tags());
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_and_pipelined_requests_are_relayed_unchanged() {
    let stack = stack(&["max_attempts = 5", "max_buffered = \"4KiB\""]);
    setup_flaky(stack.listen).await;
    let client = connect(stack.listen).await;

    // An answer larger than max_buffered: relayed as it comes, not retried.
    let before = tries_so_far(&client).await;
    let mut raw = raw_session(stack.listen).await;
    let answer = wire::simple_query(&mut raw, "select conflict_with_notice(10000)", WAIT)
        .await
        .unwrap();
    let tags: Vec<u8> = answer.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"TNEZ", "{answer:?}");
    assert_eq!(
        wire::ErrorFields::parse(&answer[1].body)
            .message()
            .map(str::len),
        Some(10000)
    );
    assert_eq!(tries_so_far(&client).await, before + 1, "tried once");
    // A small one is retried (the same function, five tries).
    let answer = wire::simple_query(&mut raw, "select conflict_with_notice(10)", WAIT)
        .await
        .unwrap();
    assert_eq!(tries_so_far(&client).await, before + 6, "tried five times");
    assert_eq!(first_error(&answer).unwrap().code(), Some("40001"));

    // Two requests in one write: the first one's conflict reaches the
    // client, in order, and nothing is sent twice.
    let before = tries_so_far(&client).await;
    let two = [
        wire::query("select flaky(1000000)"),
        wire::query("select 'second'"),
    ]
    .concat();
    wire::send(&mut raw, &two).await.unwrap();
    let first = wire::read_until(&mut raw, b'Z', WAIT).await.unwrap();
    let second = wire::read_until(&mut raw, b'Z', WAIT).await.unwrap();
    assert_eq!(first_error(&first).unwrap().code(), Some("40001"));
    assert_eq!(wire::rows(&second), vec![vec![Some("second".to_owned())]]);
    assert_eq!(tries_so_far(&client).await, before + 1, "tried once");

    // The same in the extended protocol: a batch, then a second Sync.
    let before = tries_so_far(&client).await;
    let batch = [
        wire::parse("", "select flaky(1000000)", &[]),
        wire::bind("", "", &[]),
        wire::execute("", 0),
        wire::sync(),
        wire::query("select 'after'"),
    ]
    .concat();
    wire::send(&mut raw, &batch).await.unwrap();
    let first = wire::read_until(&mut raw, b'Z', WAIT).await.unwrap();
    let second = wire::read_until(&mut raw, b'Z', WAIT).await.unwrap();
    assert_eq!(first_error(&first).unwrap().code(), Some("40001"));
    assert_eq!(wire::rows(&second), vec![vec![Some("after".to_owned())]]);
    assert_eq!(tries_so_far(&client).await, before + 1, "tried once");

    let metrics = scrape(stack.proxy.admin_addr());
    let not_eligible =
        |cause| metrics.sum("dsql_proxy_retry_not_eligible_total", &[("cause", cause)]);
    assert_eq!(not_eligible("too_large"), 1.0);
    assert_eq!(not_eligible("pipelined"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_named_statement_is_retried_whole() {
    // pgjdbc sends Parse of a named statement, Bind, Execute and Sync in
    // one batch: the statement the failed try created survives its
    // rollback, and the retry must not trip over it.
    let stack = stack(&[
        "max_attempts = 4",
        "base_delay = \"1ms\"",
        "max_delay = \"2ms\"",
    ]);
    setup_flaky(stack.listen).await;
    let client = connect(stack.listen).await;
    client
        .simple_query("select setval('flaky_tries', 3)")
        .await
        .unwrap();
    let mut raw = raw_session(stack.listen).await;
    let batch = [
        wire::parse("S_1", "select flaky($1::int)", &[]),
        wire::bind("", "S_1", &[Some("3")]),
        wire::execute("", 0),
        wire::sync(),
    ]
    .concat();
    wire::send(&mut raw, &batch).await.unwrap();
    let answer = wire::read_until(&mut raw, b'Z', WAIT).await.unwrap();
    let tags: Vec<u8> = answer.iter().map(|m| m.tag).collect();
    assert_eq!(
        tags, b"12DCZ",
        "exactly the answer to the batch: {answer:?}"
    );
    assert_eq!(tries_so_far(&client).await, 6, "three tries");
    // The statement exists once, and works.
    let again = [
        wire::bind("", "S_1", &[Some("1")]),
        wire::execute("", 0),
        wire::sync(),
    ]
    .concat();
    wire::send(&mut raw, &again).await.unwrap();
    let answer = wire::read_until(&mut raw, b'Z', WAIT).await.unwrap();
    assert_eq!(wire::rows(&answer), vec![vec![Some("1".to_owned())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_while_it_waits_for_a_retry_is_not_sent_again() {
    // Long backoffs, so the cancel lands in one.
    let stack = stack(&[
        "max_attempts = 50",
        "base_delay = \"2s\"",
        "max_delay = \"2s\"",
    ]);
    setup_flaky(stack.listen).await;
    let client = Arc::new(connect(stack.listen).await);
    let observer = connect(stack.listen).await;
    let cancel = client.cancel_token();
    let before = tries_so_far(&observer).await;
    let started = Instant::now();
    let running = {
        let client = Arc::clone(&client);
        tokio::spawn(async move { client.simple_query("select flaky(1000000)").await })
    };
    // Wait for the first failed try, then cancel during the backoff.
    while tries_so_far(&observer).await == before {
        assert!(started.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel_query(NoTls).await.expect("cancel");
    let err = running
        .await
        .unwrap()
        .expect_err("the cancelled request fails");
    let tries = tries_so_far(&observer).await - before;
    assert!(
        err.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE)
            || err.code() == Some(&SqlState::QUERY_CANCELED),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the cancel ended the wait: {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        tries_so_far(&observer).await - before,
        tries,
        "nothing was sent after the cancel"
    );
    // The session goes on.
    let rows = client.simple_query("select 1").await.expect("still usable");
    assert!(!rows.is_empty());
    assert!(
        metric(
            &stack.proxy,
            "dsql_proxy_retry_not_eligible_total",
            &[("cause", "cancelled")]
        ) >= 1.0
            || err.code() == Some(&SqlState::QUERY_CANCELED)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_dsql_conflicts_are_retried_and_counted() {
    let stack = DsqlStack::start_with(
        DsqlProxyOptions {
            retry: vec!["max_attempts = 5".into()],
            ..DsqlProxyOptions::default()
        },
        |emulator| emulator.conflict_every = Some(2),
    );
    let client = stack.connect(APP_USER, APP_DB).await;
    client
        .batch_execute(
            "create table if not exists occ (id int primary key, n int not null); \
             insert into occ values (1, 0) on conflict (id) do update set n = 0",
        )
        .await
        .ok();
    // Autocommit statements, simple and extended: every other one conflicts
    // at the emulator; the client sees none of it.
    let statement = client
        .prepare("update occ set n = n + 1 where id = 1")
        .await
        .expect("prepare");
    for _ in 0..10 {
        client
            .simple_query("update occ set n = n + 1 where id = 1")
            .await
            .expect("simple update retried");
        client
            .execute(&statement, &[])
            .await
            .expect("extended update retried");
    }
    let n: i32 = client
        .query_one("select n from occ where id = 1", &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(n, 20);
    let metrics = scrape(stack.proxy.admin_addr());
    assert!(
        metrics.sum(
            "dsql_proxy_retries_total",
            &[("sqlstate", "40001"), ("outcome", "succeeded")]
        ) >= 10.0,
        "{}",
        stack.proxy.logs()
    );
    // A COMMIT that conflicts is the client's to handle.
    let mut commit_conflicts = 0;
    for _ in 0..4 {
        client.simple_query("begin").await.unwrap();
        client
            .simple_query("update occ set n = n + 1 where id = 1")
            .await
            .unwrap();
        match client.simple_query("commit").await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Some(&SqlState::T_R_SERIALIZATION_FAILURE));
                let message = e.as_db_error().map(|db| db.message()).unwrap_or_default();
                assert!(message.contains("OC000"), "{e:?}");
                commit_conflicts += 1;
            }
        }
    }
    assert!(commit_conflicts > 0, "COMMIT conflicts reach the client");
}
