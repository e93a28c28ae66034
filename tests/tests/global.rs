//! `kind = "aurora-global"` end to end: a real PostgreSQL primary and
//! streaming standbys (pg_basebackup -R) as Regions, the real proxy binary
//! in front, real clients. Probes run every 250ms.

use std::time::{Duration, Instant, SystemTime};

use dsql_proxy_tests::dsql_stack::aws_env;
use dsql_proxy_tests::fixture::client_config;
use dsql_proxy_tests::global::{
    global_toml, http_get, sql_in, GlobalOptions, GlobalStack, FAKE_AURORA_FUNCTIONS,
};
use dsql_proxy_tests::rds::{GlobalClusterState, RdsServer};
use dsql_proxy_tests::{
    free_addr, PgOptions, PgServer, ProxyProcess, Replication, ADMIN_USER, APP_DB, APP_PASSWORD,
    APP_USER,
};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

type ConnectionTask = JoinHandle<Result<(), tokio_postgres::Error>>;

async fn open(
    addr: std::net::SocketAddr,
) -> Result<(Client, ConnectionTask), tokio_postgres::Error> {
    let (client, conn) = client_config(addr, APP_USER, APP_DB).connect(NoTls).await?;
    Ok((client, tokio::spawn(conn)))
}

/// The first column of the first row of `sql`.
async fn one(client: &Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    let messages = client.simple_query(sql).await?;
    Ok(messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row"))
}

/// Inserts a row through `client`; the port of the server that took it.
async fn write(client: &Client, note: &str) -> Result<u16, tokio_postgres::Error> {
    let port = one(
        client,
        &format!("insert into writes (note) values ('{note}') returning port"),
    )
    .await?;
    Ok(port.parse().expect("port"))
}

async fn port_of(client: &Client) -> u16 {
    one(client, "select current_setting('port')")
        .await
        .expect("select port")
        .parse()
        .expect("port")
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => format!("{e}: {e:?}"),
    }
}

/// Seconds since the epoch, as PostgreSQL's `to_timestamp` takes it.
fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promotion_and_the_old_primary_is_fenced() {
    let stack = GlobalStack::start(GlobalOptions::default());
    let (primary, standby) = (&stack.servers[0], &stack.servers[1]);
    assert!(
        stack.wait_for_writer("east", Duration::from_secs(10)),
        "{}",
        stack.proxy.logs()
    );

    let (client, _) = open(stack.listen).await.expect("connect");
    assert_eq!(write(&client, "before").await.unwrap(), primary.port());
    // Sessions left open on the old primary, one idle with state and one
    // inside a transaction, and a read-only one on the replica.
    let (stale, _) = open(stack.listen).await.expect("connect");
    assert_eq!(port_of(&stale).await, primary.port());
    stale
        .batch_execute("set application_name = 'stale-idle'; prepare w (text) as insert into writes (note) values ($1)")
        .await
        .expect("state");
    let (in_transaction, in_transaction_task) = open(stack.listen).await.expect("connect");
    in_transaction.batch_execute("begin").await.expect("begin");
    assert_eq!(port_of(&in_transaction).await, primary.port());
    let (reader, _) = open(stack.read_only).await.expect("connect read-only");
    assert_eq!(port_of(&reader).await, standby.port());

    // A writer that keeps going through the promotion, reconnecting when
    // its session is closed.
    let listen = stack.listen;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer: JoinHandle<Vec<Result<u16, String>>> = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            let mut session: Option<Client> = None;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if session.is_none() {
                    match open(listen).await {
                        Ok((c, _)) => session = Some(c),
                        Err(e) => results.push(Err(describe(&e))),
                    }
                }
                if let Some(c) = &session {
                    match write(c, "during").await {
                        Ok(port) => results.push(Ok(port)),
                        Err(e) => {
                            results.push(Err(describe(&e)));
                            session = None;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            results
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    standby.promote();
    let promoted = Instant::now();
    assert!(
        stack.wait_for_writer("west", Duration::from_secs(10)),
        "the proxy never moved writes to the promoted standby\n{}",
        stack.proxy.logs()
    );
    let detected = SystemTime::now();
    let detection = promoted.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let results = writer.await.expect("writer task");

    // The old primary still runs and accepts writes, but the proxy sends
    // it none after it saw the promotion.
    assert!(!primary.in_recovery());
    let late = sql_in(
        primary,
        APP_DB,
        &format!(
            "select count(*) from writes where at > to_timestamp({})",
            epoch(detected)
        ),
    );
    assert_eq!(late, "0", "writes reached the old primary after detection");
    let on_new: Vec<_> = results
        .iter()
        .filter(|r| *r == &Ok(standby.port()))
        .collect();
    assert!(
        !on_new.is_empty(),
        "no write reached the new writer: {results:?}"
    );
    // Once a write landed on the new writer, none went back.
    let first_new = results
        .iter()
        .position(|r| *r == Ok(standby.port()))
        .unwrap();
    assert!(
        results[first_new..]
            .iter()
            .all(|r| *r != Ok(primary.port())),
        "{results:?}"
    );

    // The idle session left on the old primary moved to the new writer
    // with its state: its next write lands there.
    stale
        .batch_execute("execute w('stale')")
        .await
        .unwrap_or_else(|e| panic!("{}\n{}", describe(&e), stack.proxy.logs()));
    assert_eq!(port_of(&stale).await, standby.port());
    assert_eq!(
        one(&stale, "show application_name").await.unwrap(),
        "stale-idle"
    );
    assert!(stack.proxy.logs().contains("reason=writer_changed"));
    // The one inside a transaction was closed with a clear error.
    let ended = tokio::time::timeout(Duration::from_secs(5), in_transaction_task)
        .await
        .expect("the session in a transaction was not closed")
        .expect("connection task");
    let err = ended.expect_err("the session ended without an error");
    let text = describe(&err);
    assert!(text.starts_with("57P01"), "{text}");
    assert!(text.contains("fenced") && text.contains("west"), "{text}");
    assert!(in_transaction.simple_query("select 1").await.is_err());

    // New sessions write to the new writer; the read-only one on the
    // promoted replica was left alone.
    let (client, _) = open(stack.listen).await.expect("connect");
    assert_eq!(write(&client, "after").await.unwrap(), standby.port());
    assert_eq!(port_of(&reader).await, standby.port());

    let east = "endpoint=\"east\",region=\"east\"";
    let west = "endpoint=\"west\",region=\"west\"";
    assert_eq!(stack.metric("endpoint_fenced", east), Some(1.0));
    assert_eq!(stack.metric("writer", west), Some(1.0));
    assert_eq!(stack.metric("writer", east), Some(0.0));
    assert_eq!(stack.metric("writer_changes_total", ""), Some(1.0));
    let status = stack.admin_get("/status");
    assert!(status.contains("\"fenced\": true"), "{status}");
    eprintln!(
        "promotion seen by the test after {detection:?}; writes during the switch: {} ok on the new writer, {} errors",
        on_new.len(),
        results.iter().filter(|r| r.is_err()).count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_sessions_leave_a_replica_that_lags_too_far() {
    let stack = GlobalStack::start(GlobalOptions {
        routing: vec!["max_replica_lag = \"1s\"".into()],
        ..GlobalOptions::default()
    });
    let (primary, standby) = (&stack.servers[0], &stack.servers[1]);
    assert!(
        stack.wait_for_writer("east", Duration::from_secs(10)),
        "{}",
        stack.proxy.logs()
    );
    let read_port = || async {
        let (c, _) = open(stack.read_only).await.expect("connect read-only");
        port_of(&c).await
    };
    assert_eq!(read_port().await, standby.port());

    // A replica of a working primary has replayed a transaction: its lag is
    // then measured from that transaction's commit time. (A standby that has
    // replayed none since it started has no such time: its lag is unknown,
    // which also keeps read-only sessions off it, but is not what this test
    // is about.)
    let (client, _) = open(stack.listen).await.expect("connect");
    assert_eq!(write(&client, "replayed").await.unwrap(), primary.port());
    standby.wait_replayed(&primary.current_lsn(), Duration::from_secs(10));
    standby.pause_replay();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut moved = false;
    while Instant::now() < deadline {
        write(&client, "lagging").await.expect("write");
        if read_port().await == primary.port() {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        moved,
        "read-only sessions stayed on a paused replica\n{}",
        stack.proxy.logs()
    );
    let lag = stack
        .metric("replica_lag_seconds", "endpoint=\"west\",region=\"west\"")
        .expect("lag metric");
    assert!(lag > 1.0, "lag {lag}");

    standby.resume_replay();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut back = false;
    while Instant::now() < deadline {
        if read_port().await == standby.port() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        back,
        "read-only sessions did not return to the caught-up replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_writer_sessions_wait_then_fail_clearly() {
    // Two standbys of a primary the proxy does not know: both read-only.
    let stack = GlobalStack::start(GlobalOptions {
        standbys: 2,
        primary_in_proxy: false,
        routing: vec!["writer_wait = \"2s\"".into()],
        ..GlobalOptions::default()
    });
    let (west, south) = (&stack.servers[1], &stack.servers[2]);

    let started = Instant::now();
    let Err(err) = open(stack.listen).await else {
        panic!("a session was served without a writer");
    };
    let waited = started.elapsed();
    let text = describe(&err);
    assert!(text.starts_with("57P03"), "{text}");
    assert!(text.contains("no writer within writer_wait"), "{text}");
    assert!(text.contains("no endpoint accepts writes"), "{text}");
    assert!(
        waited >= Duration::from_millis(1800),
        "failed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(15), "failed after {waited:?}");

    // Reads still work, on a replica.
    let (reader, _) = open(stack.read_only).await.expect("read-only session");
    let port = port_of(&reader).await;
    assert!(port == west.port() || port == south.port());

    // A session that starts waiting is served once a writer appears.
    let listen = stack.listen;
    let pending = tokio::spawn(async move {
        let started = Instant::now();
        let (c, _) = open(listen).await?;
        Ok::<_, tokio_postgres::Error>((write(&c, "waited").await?, started.elapsed()))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    west.promote();
    let (port, waited) = pending
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{}\n{}", describe(&e), stack.proxy.logs()));
    assert_eq!(port, west.port());
    assert!(
        waited >= Duration::from_millis(400),
        "served after {waited:?}"
    );
    assert!(stack.metric("no_writer_seconds_total", "").unwrap_or(0.0) > 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_packet_asking_for_a_standby_gets_a_replica_on_the_main_listener() {
    use dsql_proxy_tests::wire;
    const T: Duration = Duration::from_secs(10);
    let stack = GlobalStack::start(GlobalOptions::default());
    let (primary, standby) = (&stack.servers[0], &stack.servers[1]);
    assert!(
        stack.wait_for_writer("east", Duration::from_secs(10)),
        "{}",
        stack.proxy.logs()
    );
    // libpq evaluates target_session_attrs itself and never sends it; a
    // client that does put it in the startup packet is routed by it (and
    // the server never sees it: it is not a server parameter).
    let stack = &stack;
    let session_port = |attrs: Option<&'static str>| async move {
        let mut s = tokio::net::TcpStream::connect(stack.listen)
            .await
            .expect("connect");
        let mut params = vec![("user", APP_USER), ("database", APP_DB)];
        params.extend(attrs.map(|a| ("target_session_attrs", a)));
        let packet = wire::startup_message(0x0003_0000, &params);
        let resp = wire::startup(&mut s, &packet, T)
            .await
            .unwrap_or_else(|e| panic!("startup with {attrs:?}: {e}\n{}", stack.proxy.logs()));
        let hot_standby = resp.parameters().get("in_hot_standby").cloned();
        let msgs = wire::simple_query(&mut s, "select current_setting('port')", T)
            .await
            .expect("query");
        let port: u16 = wire::rows(&msgs)[0][0]
            .as_deref()
            .expect("port")
            .parse()
            .expect("port");
        (port, hot_standby)
    };
    for attrs in ["read-only", "standby", "prefer-standby"] {
        assert_eq!(
            session_port(Some(attrs)).await,
            (standby.port(), Some("on".to_owned())),
            "target_session_attrs={attrs}"
        );
    }
    assert_eq!(
        session_port(Some("read-write")).await,
        (primary.port(), Some("off".to_owned()))
    );
    assert_eq!(
        session_port(None).await,
        (primary.port(), Some("off".to_owned()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aurora_endpoints_are_detected_and_their_lag_is_aurora_s() {
    let stack = GlobalStack::start(GlobalOptions {
        routing: vec!["max_replica_lag = \"2s\"".into()],
        primary_setup: vec![FAKE_AURORA_FUNCTIONS.into()],
        ..GlobalOptions::default()
    });
    let (primary, standby) = (&stack.servers[0], &stack.servers[1]);
    assert!(
        stack.wait_for_writer("east", Duration::from_secs(10)),
        "{}",
        stack.proxy.logs()
    );
    // Each endpoint's first role report may come a probe round apart.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status: serde_json::Value =
            serde_json::from_str(&stack.admin_get("/status")).expect("status JSON");
        let seen = status["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .all(|e| !e["role"]["aurora"].is_null());
        if seen || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let aurora_of = |name: &str| {
        status["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["role"]["aurora"].clone())
            .expect("endpoint")
    };
    assert_eq!(aurora_of("east")["region"], "us-east-1", "{status}");
    assert_eq!(aurora_of("east")["writer_region"], "us-east-1");
    assert_eq!(aurora_of("east")["rpo_lag_ms"], serde_json::Value::Null);
    assert_eq!(aurora_of("west")["region"], "us-west-2");
    assert_eq!(aurora_of("west")["writer_region"], "us-east-1");

    let read_port = || async {
        let (c, _) = open(stack.read_only).await.expect("connect read-only");
        port_of(&c).await
    };
    assert_eq!(read_port().await, standby.port());

    // Aurora says the replica is 5 s behind (its replay is not: plain
    // PostgreSQL's view would be 0); read-only sessions leave it.
    sql_in(
        primary,
        APP_DB,
        "update aurora_fake set visibility_lag_in_msec = 5000 where server_id = 'west-1'",
    );
    let west = "endpoint=\"west\",region=\"west\"";
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && read_port().await != primary.port() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read_port().await, primary.port(), "{}", stack.proxy.logs());
    assert_eq!(stack.metric("replica_lag_seconds", west), Some(5.0));

    // Caught up by Aurora's account: back to the replica.
    sql_in(
        primary,
        APP_DB,
        "update aurora_fake set visibility_lag_in_msec = 20 where server_id = 'west-1'",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && read_port().await != standby.port() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read_port().await, standby.port());
    assert_eq!(stack.metric("replica_lag_seconds", west), Some(0.02));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_decides_between_two_writable_aurora_endpoints() {
    let rds = RdsServer::start(GlobalClusterState {
        id: "app-global".into(),
        members: vec![
            (GlobalClusterState::arn("east"), true),
            (GlobalClusterState::arn("west"), false),
        ],
        failover: None,
    });
    let mut env = aws_env("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
    env.push(rds.env());
    let stack = GlobalStack::start(GlobalOptions {
        routing: vec![
            "global_cluster_id = \"app-global\"".into(),
            "global_cluster_poll_interval = \"1s\"".into(),
            "writer_wait = \"15s\"".into(),
        ],
        primary_setup: vec![FAKE_AURORA_FUNCTIONS.into()],
        proxy_env: env,
        ..GlobalOptions::default()
    });
    let (primary, standby) = (&stack.servers[0], &stack.servers[1]);
    assert!(
        stack.wait_for_writer("east", Duration::from_secs(10)),
        "{}",
        stack.proxy.logs()
    );

    // The control plane starts a failover: no writer, new sessions wait.
    rds.set(|s| s.failover = Some("failing-over".into()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && stack.metric("writer", "endpoint=\"east\",region=\"east\"") != Some(0.0)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = stack.admin_get("/status");
    assert!(
        status.contains("FailoverState failing-over"),
        "{status}\n{}",
        stack.proxy.logs()
    );
    let listen = stack.listen;
    let pending = tokio::spawn(async move {
        let (c, _) = open(listen).await?;
        write(&c, "after failover").await
    });

    // The standby is promoted while the old primary keeps accepting
    // writes. Aurora has no timeline to compare: only the control plane
    // can tell which is newer, and it names west once the failover is done.
    standby.promote();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !pending.is_finished(),
        "a session was served during the failover window"
    );
    rds.set_writer("west");
    rds.set(|s| s.failover = None);
    assert!(
        stack.wait_for_writer("west", Duration::from_secs(10)),
        "{}",
        stack.proxy.logs()
    );
    let port = pending
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("{}\n{}", describe(&e), stack.proxy.logs()));
    assert_eq!(port, standby.port());
    assert!(
        !primary.in_recovery(),
        "the old primary still accepts writes"
    );
    assert_eq!(
        stack.metric("endpoint_fenced", "endpoint=\"east\",region=\"east\""),
        Some(1.0)
    );
    let status: serde_json::Value =
        serde_json::from_str(&stack.admin_get("/status")).expect("status JSON");
    assert_eq!(status["control_plane"]["writer_region"], "west", "{status}");
    assert_eq!(status["control_plane"]["fresh"], true);
    let requests = rds.http.requests();
    assert!(requests
        .iter()
        .all(|r| r.form_value("GlobalClusterIdentifier").as_deref() == Some("app-global")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_iam_token_is_dropped_on_the_role_path_too() {
    let pg = PgServer::start(PgOptions::default());
    // The probes log in without a password (so the writer is known); the
    // app role needs one, and no RDS IAM token is it.
    std::fs::write(
        pg.data_dir().join("pg_hba.conf"),
        format!(
            "local all all trust\n\
             host all {ADMIN_USER} 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        ),
    )
    .expect("write pg_hba.conf");
    pg.superuser_sql("select pg_reload_conf()");
    let (listen, read_only, admin) = (free_addr(), free_addr(), free_addr());
    let toml = global_toml(listen, read_only, admin, &[("east", &pg)], &[])
        .replace("auth = \"password\"", "auth = \"rds-iam\"")
        .replace(&format!("password = \"{APP_PASSWORD}\"\n"), "")
        .replace(
            &format!("probe_user = \"{APP_USER}\"\nprobe_database = \"{APP_DB}\""),
            &format!("probe_user = \"{ADMIN_USER}\"\nprobe_database = \"postgres\""),
        );
    assert!(
        toml.contains("rds-iam") && toml.contains("probe_user = \"admin\""),
        "{toml}"
    );
    let env = aws_env("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
    let mut proxy = ProxyProcess::spawn_with_env(&toml, &[], &env);
    proxy.wait_ready(listen, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http_get(admin, "/metrics")
        .contains("dsql_proxy_writer{endpoint=\"east\",region=\"east\"} 1")
    {
        assert!(Instant::now() < deadline, "no writer\n{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for _ in 0..2 {
        let Err(err) = open(listen).await else {
            panic!("the token must be refused\n{}", proxy.logs());
        };
        let db = err.as_db_error().expect("the server's ErrorResponse");
        assert_eq!(db.code().code(), "28P01", "{db:?}\n{}", proxy.logs());
    }
    // Each refused token was dropped, so each connect signed a new one.
    let logs = proxy.logs();
    let count = |needle: &str| {
        logs.lines()
            .filter(|l| l.contains(needle) && l.contains("principal=app"))
            .count()
    };
    assert_eq!(count("the server refused an IAM token"), 2, "{logs}");
    assert_eq!(count("signed a new IAM token"), 2, "{logs}");
}
