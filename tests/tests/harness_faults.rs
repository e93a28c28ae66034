//! The harness's fault-injection parts: the latency relay's delays and
//! modes, and crashing / freezing a PostgreSQL server.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use dsql_proxy_tests::process::{process_alive, process_state};
use dsql_proxy_tests::{
    AuthMethod, LatencyRelay, PgOptions, PgServer, RelayMode, APP_DB, APP_PASSWORD, APP_USER,
};
use tokio::time::timeout;
use tokio_postgres::{Client, SimpleQueryMessage};

/// Plain TCP keeps the round-trip counts simple; TLS has its own test.
fn plain_server() -> PgServer {
    PgServer::start(PgOptions {
        max_connections: 20,
        ..PgOptions::default()
    })
}

async fn connect_via(pg: &PgServer, relay: &LatencyRelay) -> Client {
    pg.try_connect_via(relay.addr(), APP_USER, APP_PASSWORD, APP_DB)
        .await
        .expect("connect through the relay")
}

async fn select_one(client: &Client) -> i32 {
    client
        .query_one("select 1", &[])
        .await
        .expect("select 1")
        .get(0)
}

/// Time of a `select 1` that takes exactly one round trip: a simple query
/// (`query_one` with a string would prepare first, costing two).
async fn timed_select(client: &Client) -> Duration {
    let start = Instant::now();
    let messages = client.simple_query("select 1").await.expect("select 1");
    let elapsed = start.elapsed();
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("a row");
    assert_eq!(row.get(0), Some("1"));
    elapsed
}

/// The `io::ErrorKind` somewhere in `err`'s source chain.
fn io_kind(err: &tokio_postgres::Error) -> Option<ErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

/// Polls `cond` for up to 5 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn relay_delays_each_direction() {
    let pg = plain_server();
    let relay = LatencyRelay::start(pg.addr(), Duration::from_millis(50));
    let client = connect_via(&pg, &relay).await;
    assert_eq!((relay.accepted(), relay.connections()), (1, 1));

    let rtt = timed_select(&client).await;
    assert!(
        rtt >= Duration::from_millis(100),
        "50 ms each way, got {rtt:?}"
    );
    assert!(rtt < Duration::from_secs(1), "{rtt:?}");

    // Pipelined queries share the delay instead of queueing behind it.
    let stmt = client.prepare("select 1").await.expect("prepare");
    let start = Instant::now();
    let queries = (0..10).map(|_| client.query_one(&stmt, &[]));
    for row in futures_util::future::join_all(queries).await {
        assert_eq!(row.expect("pipelined select 1").get::<_, i32>(0), 1);
    }
    let pipelined = start.elapsed();
    assert!(
        pipelined >= Duration::from_millis(100) && pipelined < Duration::from_millis(600),
        "10 pipelined queries at a 100 ms RTT took {pipelined:?}"
    );

    relay.set_delay(Duration::from_millis(150), Duration::from_millis(150));
    let rtt = timed_select(&client).await;
    assert!(
        rtt >= Duration::from_millis(300),
        "150 ms each way, got {rtt:?}"
    );

    relay.set_delay(Duration::from_millis(200), Duration::ZERO);
    let rtt = timed_select(&client).await;
    assert!(rtt >= Duration::from_millis(200), "200 ms up, got {rtt:?}");
    assert!(
        rtt < Duration::from_millis(400),
        "nothing down, got {rtt:?}"
    );

    relay.set_delay(Duration::ZERO, Duration::ZERO);
    let mut best = Duration::MAX;
    for _ in 0..3 {
        best = best.min(timed_select(&client).await);
    }
    assert!(best < Duration::from_millis(100), "no delay, got {best:?}");

    drop(client);
    eventually("the relay to notice the client left", || {
        relay.connections() == 0
    })
    .await;

    // Dropping the relay closes what runs through it.
    let client = connect_via(&pg, &relay).await;
    drop(relay);
    client
        .query_one("select 1", &[])
        .await
        .expect_err("the relay is gone");
    assert!(client.is_closed());
}

#[tokio::test]
async fn relay_passes_tls_through() {
    let pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        max_connections: 20,
        ..PgOptions::default()
    });
    let relay = LatencyRelay::start(pg.addr(), Duration::from_millis(20));
    let client = connect_via(&pg, &relay).await;
    let ssl: bool = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query pg_stat_ssl")
        .get(0);
    assert!(ssl, "the relayed connection is not TLS");
    assert!(timed_select(&client).await >= Duration::from_millis(40));
}

#[tokio::test]
async fn relay_hang_holds_traffic_until_pass() {
    let pg = plain_server();
    let relay = LatencyRelay::start(pg.addr(), Duration::ZERO);
    let client = connect_via(&pg, &relay).await;
    assert_eq!(select_one(&client).await, 1);

    relay.set_mode(RelayMode::Hang);
    let held = client.query_one("select 2", &[]);
    tokio::pin!(held);
    timeout(Duration::from_secs(1), &mut held)
        .await
        .expect_err("a query must hang while the relay does");

    // New connections are accepted but never answered.
    timeout(
        Duration::from_secs(1),
        pg.try_connect_via(relay.addr(), APP_USER, APP_PASSWORD, APP_DB),
    )
    .await
    .expect_err("connecting must hang while the relay does");
    assert_eq!(relay.accepted(), 2);

    // The held bytes flow again: the same query completes.
    relay.set_mode(RelayMode::Pass);
    let two: i32 = timeout(Duration::from_secs(5), held)
        .await
        .expect("held query completes after Pass")
        .expect("select 2")
        .get(0);
    assert_eq!(two, 2);
    let client2 = connect_via(&pg, &relay).await;
    assert_eq!(select_one(&client2).await, 1);
}

#[tokio::test]
async fn relay_refuse_resets_connections() {
    let pg = plain_server();
    let relay = LatencyRelay::start(pg.addr(), Duration::ZERO);
    let client = connect_via(&pg, &relay).await;
    assert_eq!(select_one(&client).await, 1);

    relay.set_mode(RelayMode::Refuse);
    // The open connection is reset...
    let err = timeout(Duration::from_secs(2), client.query_one("select 1", &[]))
        .await
        .expect("a reset connection fails fast")
        .expect_err("the connection was reset");
    eventually("the relay to drop the connection", || {
        relay.connections() == 0
    })
    .await;
    assert!(client.is_closed(), "{err:?}");

    // ...and a new one fails at once.
    let start = Instant::now();
    let err = pg
        .try_connect_via(relay.addr(), APP_USER, APP_PASSWORD, APP_DB)
        .await
        .expect_err("connect must fail while refusing");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(io_kind(&err), Some(ErrorKind::ConnectionReset), "{err:?}");

    relay.set_mode(RelayMode::Pass);
    let client = connect_via(&pg, &relay).await;
    assert_eq!(select_one(&client).await, 1);
    assert_eq!(relay.accepted(), 3);
}

#[tokio::test]
async fn pg_kill9_then_restart() {
    let mut pg = plain_server();
    let client = pg.connect_direct(APP_USER, APP_PASSWORD, APP_DB).await;
    let backend: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid")
        .get(0);
    let backend = backend as u32;
    assert_eq!(pg.backend_pids(), vec![backend]);
    let pids = pg.server_pids();
    let postmaster = pg.postmaster_pid().expect("running");
    assert!(
        pids.contains(&postmaster) && pids.contains(&backend),
        "{pids:?}"
    );

    pg.kill9();
    for pid in &pids {
        assert!(!process_alive(*pid), "server process {pid} survived kill9");
    }
    client
        .query_one("select 1", &[])
        .await
        .expect_err("the backend is gone");
    let err = pg
        .try_connect_direct(APP_USER, APP_PASSWORD, APP_DB)
        .await
        .expect_err("nothing listens after kill9");
    assert_eq!(io_kind(&err), Some(ErrorKind::ConnectionRefused), "{err:?}");

    pg.restart();
    let new_postmaster = pg.postmaster_pid().expect("running again");
    assert_ne!(new_postmaster, postmaster);
    let client = pg.connect_direct(APP_USER, APP_PASSWORD, APP_DB).await;
    assert_eq!(select_one(&client).await, 1);
}

#[tokio::test]
async fn pg_freeze_thaw_and_drop_while_frozen() {
    let pg = plain_server();
    let client = pg.connect_direct(APP_USER, APP_PASSWORD, APP_DB).await;
    assert_eq!(select_one(&client).await, 1);

    pg.freeze();
    assert!(pg.is_frozen());
    let pids = pg.server_pids();
    assert!(pids.len() > 2, "postmaster, backend and helpers: {pids:?}");
    for pid in &pids {
        assert_eq!(
            process_state(*pid),
            Some('T'),
            "process {pid} is not stopped"
        );
    }
    let held = client.query_one("select 2", &[]);
    tokio::pin!(held);
    timeout(Duration::from_secs(1), &mut held)
        .await
        .expect_err("a query must hang on a frozen server");
    timeout(
        Duration::from_secs(1),
        pg.try_connect_direct(APP_USER, APP_PASSWORD, APP_DB),
    )
    .await
    .expect_err("connecting must hang on a frozen server");

    pg.thaw();
    assert!(!pg.is_frozen());
    let two: i32 = timeout(Duration::from_secs(5), held)
        .await
        .expect("held query completes after thaw")
        .expect("select 2")
        .get(0);
    assert_eq!(two, 2);
    let client2 = pg.connect_direct(APP_USER, APP_PASSWORD, APP_DB).await;
    assert_eq!(select_one(&client2).await, 1);

    // Dropping a frozen server still stops every process and cleans up.
    pg.freeze();
    let pids = pg.server_pids();
    let dir = pg.socket_dir().to_path_buf();
    let start = Instant::now();
    drop(pg);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    for pid in &pids {
        assert!(!process_alive(*pid), "server process {pid} survived drop");
    }
    assert!(!dir.exists(), "{} still exists", dir.display());
}
