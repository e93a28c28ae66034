//! Admission control through the real binary in front of real PostgreSQL
//! servers: the backend connect rate limit (burst, steady rate, bounded
//! queue, the connect_timeout budget), `max_client_connections`, and
//! backpressure from a server that answers 53300.
//!
//! Metrics are read by parsing `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsql_proxy_tests::fixture::client_config;
use dsql_proxy_tests::metrics::{scrape, status};
use dsql_proxy_tests::{
    connect_with, free_addr, probe_login, proxy_toml, AuthMethod, PgOptions, PgServer,
    ProxyOptions, ProxyProcess, TestPki, APP_DB, APP_PASSWORD, APP_USER,
};
use tokio_postgres::Client;

const RATE_LIMITED: &str = "dsql_proxy_backend_connect_rate_limited_total";
const WAITING: &str = "dsql_proxy_backend_connect_queue_waiting";
const REJECTED: &str = "dsql_proxy_client_connections_rejected_total";

fn tls_server() -> PgServer {
    PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    })
}

/// A proxy for `pg` without probes, with its admin server on a known
/// address, `connect_timeout` replaced and `backend` lines added.
fn start(
    pg: &PgServer,
    connect_timeout: &str,
    listen_extra: &[&str],
    backend: &[&str],
) -> (ProxyProcess, SocketAddr, SocketAddr) {
    let listen = free_addr();
    let admin = free_addr();
    let opts = ProxyOptions {
        listen_extra: listen_extra.iter().map(|l| l.to_string()).collect(),
        backend_extra: backend.iter().map(|l| l.to_string()).collect(),
        ..ProxyOptions::default()
    };
    let mut toml = proxy_toml(pg, listen, &opts).replace(
        "connect_timeout = \"2s\"",
        &format!("connect_timeout = \"{connect_timeout}\""),
    );
    let at = toml.find("[admin]").expect("fixture has [admin]");
    let end = at + toml[at..].find("[backend]").expect("fixture has [backend]");
    toml.replace_range(at..end, &format!("[admin]\naddress = \"{admin}\"\n"));
    // The fixture ends in its [routing] table.
    toml.push_str("probes = false\n");
    let proxy = ProxyProcess::start_with(&toml, listen);
    (proxy, listen, admin)
}

async fn try_connect(listen: SocketAddr) -> Result<Client, tokio_postgres::Error> {
    connect_with(&client_config(listen, APP_USER, APP_DB), None).await
}

/// The server's error for a refused connect: SQLSTATE and message.
fn refusal(result: Result<Client, tokio_postgres::Error>, logs: &str) -> (String, String) {
    match result {
        Ok(_) => panic!("the connect was expected to be refused\n{logs}"),
        Err(e) => match e.as_db_error() {
            Some(db) => (db.code().code().to_owned(), db.message().to_owned()),
            None => panic!("refused without an ErrorResponse: {e:?}\n{logs}"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connects_is_paced_by_the_rate_limit() {
    let pg = tls_server();
    let (proxy, listen, admin) =
        start(&pg, "20s", &[], &["connect_rate = 20", "connect_burst = 5"]);
    const CLIENTS: usize = 25;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(async move {
                let client = try_connect(listen).await?;
                client.simple_query("select 1").await?;
                Ok::<_, tokio_postgres::Error>(client)
            })
        })
        .collect();
    let mut clients = Vec::new();
    for t in tasks {
        match t.await.expect("client task") {
            Ok(c) => clients.push(c),
            Err(e) => panic!("a paced connect failed: {e:?}\n{}", proxy.logs()),
        }
    }
    let elapsed = started.elapsed();
    // 25 dials at 20/s after a burst of 5: the last dial is at least
    // (25 - 5) / 20 = 1s after the first. A correctness bound, with slack
    // for rounding only; there is no upper bound.
    assert!(
        elapsed >= Duration::from_millis(950),
        "25 connects took {elapsed:?}; the limiter let them through too fast\n{}",
        proxy.logs()
    );
    let m = scrape(admin);
    let waited = m.value(RATE_LIMITED, &[]).expect("rate-limited counter");
    assert!(
        (1.0..=20.0).contains(&waited),
        "{waited} connects waited; at least one and at most 25 - burst must"
    );
    assert_eq!(m.value(WAITING, &[]), Some(0.0), "nobody waits any more");
    assert_eq!(m.sum(REJECTED, &[("reason", "connect_rate_limit")]), 0.0);
    assert_eq!(
        m.value("dsql_proxy_sessions_active", &[("endpoint", "local-1")]),
        Some(CLIENTS as f64)
    );
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_connect_queue_refuses_at_once_with_53300() {
    let pg = tls_server();
    // One connect per 50s after the first, at most 2 waiting, and a
    // connect_timeout long enough that the waiting ones stay queued.
    let (proxy, listen, admin) = start(
        &pg,
        "300s",
        &[],
        &[
            "connect_rate = 0.02",
            "connect_burst = 1",
            "connect_queue = 2",
        ],
    );
    let first = try_connect(listen)
        .await
        .unwrap_or_else(|e| panic!("the burst connect failed: {e:?}\n{}", proxy.logs()));

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(try_connect(listen).await);
            })
        })
        .collect();
    // Three of five are refused at once; two wait for slots 50s and 100s
    // away. A generous bound, far below the first slot.
    let mut refused = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while refused.len() < 3 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(result)) => refused.push(refusal(result, &proxy.logs())),
            _ => break,
        }
    }
    assert_eq!(
        refused.len(),
        3,
        "refusals within 30s: {refused:?}\n{}",
        proxy.logs()
    );
    for (code, message) in &refused {
        assert_eq!(code, "53300", "{message}");
        assert!(
            message.contains("too many connections waiting for the backend connect rate limit")
                && message.contains("connect_queue = 2"),
            "{message}"
        );
    }
    let m = scrape(admin);
    assert_eq!(m.value(WAITING, &[]), Some(2.0), "two connects queued");
    assert_eq!(m.value(RATE_LIMITED, &[]), Some(2.0));
    assert_eq!(
        m.sum(REJECTED, &[("reason", "connect_rate_limit")]),
        3.0,
        "refusals are counted"
    );
    first.simple_query("select 1").await.expect("first session");
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_beyond_connect_timeout_is_refused_promptly() {
    let pg = tls_server();
    let (proxy, listen, admin) = start(
        &pg,
        "30s",
        &[],
        &["connect_rate = 0.02", "connect_burst = 1"],
    );
    let first = try_connect(listen)
        .await
        .unwrap_or_else(|e| panic!("the burst connect failed: {e:?}\n{}", proxy.logs()));
    // The next slot is 50s away, past the 30s connect_timeout: the client
    // hears so at once instead of after 30s of waiting.
    let started = Instant::now();
    let (code, message) = refusal(try_connect(listen).await, &proxy.logs());
    let elapsed = started.elapsed();
    assert_eq!(code, "53300", "{message}");
    assert!(
        message.contains("backend connect rate limit") && message.contains("connect_timeout"),
        "{message}"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "refused only after {elapsed:?}; it must not wait for a slot it cannot use"
    );
    let m = scrape(admin);
    assert_eq!(m.sum(REJECTED, &[("reason", "connect_rate_limit")]), 1.0);
    assert_eq!(m.value(WAITING, &[]), Some(0.0));
    assert_eq!(
        m.value(RATE_LIMITED, &[]),
        Some(0.0),
        "a refused connect did not wait"
    );
    first.simple_query("select 1").await.expect("first session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_client_connections_get_53300_and_are_counted() {
    let pg = tls_server();
    let (proxy, listen, admin) = start(&pg, "5s", &["max_client_connections = 2"], &[]);
    let held = [
        try_connect(listen).await.expect("first client"),
        try_connect(listen).await.expect("second client"),
    ];
    let (code, message) = refusal(try_connect(listen).await, &proxy.logs());
    assert_eq!(code, "53300", "{message}");
    assert!(
        message.contains("too many clients already")
            && message.contains("max_client_connections (2)"),
        "{message}"
    );
    let m = scrape(admin);
    assert_eq!(m.sum(REJECTED, &[("reason", "too_many_clients")]), 1.0);
    assert_eq!(
        m.value("dsql_proxy_client_connections_active", &[]),
        Some(2.0)
    );
    for c in &held {
        c.simple_query("select 1")
            .await
            .expect("held sessions work");
    }
}

/// A role limited to one connection on the preferred server: its second
/// connect there is refused with 53300, like DSQL over its limits.
const BUSY_ROLE: &str = "busy_role";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_endpoint_is_tried_last_without_being_marked_down() {
    let pki = Arc::new(TestPki::new());
    let (a, b) = (
        PgServer::start_tls_scram(&pki),
        PgServer::start_tls_scram(&pki),
    );
    a.superuser_sql(&format!(
        "create role {BUSY_ROLE} login connection limit 1 password '{APP_PASSWORD}'"
    ));
    b.superuser_sql(&format!(
        "create role {BUSY_ROLE} login password '{APP_PASSWORD}'"
    ));
    let listen = free_addr();
    let admin = free_addr();
    let mut toml = format!(
        "[listen]\naddress = \"{listen}\"\n\
         [admin]\naddress = \"{admin}\"\n\
         [backend]\nkind = \"postgres\"\nauth = \"password\"\npassword = \"{APP_PASSWORD}\"\n\
         tls = \"verify-full\"\nca_file = \"{}\"\nconnect_timeout = \"10s\"\n\
         [routing]\nprobe_user = \"{APP_USER}\"\nprobe_database = \"{APP_DB}\"\n\
         probe_interval = \"250ms\"\n\
         # Both servers are local: priority alone decides.\n\
         latency_tolerance = \"1s\"\nbusy_cooldown = \"60s\"\n",
        pki.ca_cert_path().display()
    );
    for (name, pg, priority) in [("a", &a, 1), ("b", &b, 2)] {
        toml.push_str(&format!(
            "[[endpoints]]\nname = \"{name}\"\nregion = \"r-{name}\"\nhost = \"db.test.internal\"\n\
             port = {}\nconnect_address = \"{}\"\npriority = {priority}\n",
            pg.port(),
            pg.addr()
        ));
    }
    let proxy = ProxyProcess::start_with(&toml, listen);
    let connect = || async {
        let client = connect_with(&client_config(listen, BUSY_ROLE, APP_DB), None)
            .await
            .unwrap_or_else(|e| panic!("connect as {BUSY_ROLE}: {e:?}\n{}", proxy.logs()));
        let row = client
            .query_one("select current_setting('port')", &[])
            .await
            .expect("port");
        let port: u16 = row.get::<_, String>(0).parse().expect("port number");
        let landed = if port == a.port() { "a" } else { "b" };
        (client, landed)
    };
    let failures = |m: &dsql_proxy_tests::Scrape| {
        m.sum(
            "dsql_proxy_backend_connect_failures_total",
            &[("endpoint", "a"), ("reason", "busy")],
        )
    };

    let (first, landed) = connect().await;
    assert_eq!(
        landed, "a",
        "the preferred endpoint takes the first session"
    );
    // a refuses the role's second connection with 53300: the client lands
    // on b without an error.
    let (second, landed) = connect().await;
    assert_eq!(landed, "b", "{}", proxy.logs());
    let m = scrape(admin);
    assert_eq!(failures(&m), 1.0, "a's refusal is counted as busy");
    let labels_a = [("endpoint", "a")];
    assert_eq!(
        m.value("dsql_proxy_endpoint_backpressure", &labels_a),
        Some(1.0)
    );
    assert_eq!(
        m.value("dsql_proxy_endpoint_backpressure", &[("endpoint", "b")]),
        Some(0.0)
    );
    assert_eq!(
        m.value("dsql_proxy_endpoint_up", &labels_a),
        Some(1.0),
        "busy is not down"
    );

    // a is not down and keeps its session; /status shows the cooldown.
    first
        .simple_query("select 1")
        .await
        .expect("a's session stays");
    let s = status(admin);
    let a_status = &s["endpoints"][0];
    assert_eq!(a_status["name"], "a");
    assert_eq!(a_status["state"], "up", "{s:#}");
    assert_eq!(a_status["sessions_active"], 1, "{s:#}");
    let left = a_status["busy"]["remaining_ms"].as_f64();
    assert!(
        left.is_some_and(|ms| ms > 0.0 && ms <= 60_000.0),
        "a's cooldown in /status: {s:#}"
    );
    assert!(s["endpoints"][1]["busy"].is_null(), "{s:#}");
    assert_eq!(
        s["selected"], "a",
        "backpressure does not move the selection"
    );

    // During the cooldown new sessions go to b first: a is not even tried.
    let (third, landed) = connect().await;
    assert_eq!(landed, "b");
    assert_eq!(failures(&scrape(admin)), 1.0, "a was not tried again");
    drop((second, third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_postgres_refusal_reaches_the_client_without_the_dsql_hint() {
    let pg = tls_server();
    pg.superuser_sql(&format!(
        "create role {BUSY_ROLE} login connection limit 1 password '{APP_PASSWORD}'"
    ));
    let (proxy, listen, _admin) = start(&pg, "2s", &[], &[]);
    let cfg = client_config(listen, BUSY_ROLE, APP_DB);
    let held = connect_with(&cfg, None)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", proxy.logs()));
    let err = connect_with(&cfg, None)
        .await
        .expect_err("the role's second connection is refused");
    let db = err.as_db_error().expect("the server's ErrorResponse");
    assert_eq!(db.code().code(), "53300", "{db:?}");
    assert!(db.message().contains("too many connections"), "{db:?}");
    // Aurora DSQL's quota is no advice for a PostgreSQL server.
    assert_eq!(db.hint(), None, "{db:?}");
    held.simple_query("select 1").await.unwrap();
}

/// A proxy for `pg` whose probes log in as `probe_user` every 100 ms.
fn probed(pg: &PgServer, probe_user: &str) -> (ProxyProcess, SocketAddr, SocketAddr) {
    let (listen, admin) = (free_addr(), free_addr());
    let opts = ProxyOptions {
        routing: probe_login(probe_user),
        ..ProxyOptions::default()
    };
    let mut toml = proxy_toml(pg, listen, &opts);
    let at = toml.find("[admin]").expect("fixture has [admin]");
    let end = at + toml[at..].find("[backend]").expect("fixture has [backend]");
    toml.replace_range(at..end, &format!("[admin]\naddress = \"{admin}\"\n"));
    // The fixture ends in its [routing] table.
    toml.push_str("probe_interval = \"100ms\"\ndown_after = 2\n");
    (ProxyProcess::start_with(&toml, listen), listen, admin)
}

/// Polls `/status` until `ready` holds for the first endpoint; returns it.
fn wait_for_endpoint(
    admin: SocketAddr,
    proxy: &ProxyProcess,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let endpoint = status(admin)["endpoints"][0].clone();
        if ready(&endpoint) {
            return endpoint;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {endpoint:#}\n{}",
            proxy.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_refused_for_load_never_mark_the_endpoint_down() {
    let pg = tls_server();
    // Every login of this role is refused with 53300.
    pg.superuser_sql(&format!(
        "create role {BUSY_ROLE} login connection limit 0 password '{APP_PASSWORD}'"
    ));
    let (proxy, listen, admin) = probed(&pg, BUSY_ROLE);
    // Well past down_after = 2 busy answers.
    let endpoint = wait_for_endpoint(admin, &proxy, "busy probes", |_| {
        scrape(admin).sum(
            "dsql_proxy_probe_failures_total",
            &[("endpoint", "local-1"), ("reason", "busy")],
        ) >= 6.0
    });
    assert_ne!(endpoint["state"], "down", "{endpoint:#}");
    assert!(
        endpoint["eligible"].as_bool().unwrap_or(false),
        "{endpoint:#}"
    );
    // The refusal's round trip is a latency sample.
    assert!(endpoint["latency_ms"].is_number(), "{endpoint:#}");
    // Sessions of other roles are served.
    let client = try_connect(listen).await.expect("connect");
    client.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_probe_login_still_yields_a_latency_sample() {
    let pg = tls_server();
    let (proxy, _listen, admin) = probed(&pg, "no_such_probe_role");
    let endpoint = wait_for_endpoint(admin, &proxy, "a timed refusal", |e| {
        e["auth_failure"].is_string() && e["latency_ms"].is_number()
    });
    assert!(
        endpoint["auth_failure"]
            .as_str()
            .is_some_and(|a| a.contains("28P01")),
        "{endpoint:#}"
    );
    assert_ne!(endpoint["state"], "down", "{endpoint:#}");
}
