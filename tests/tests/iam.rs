//! The IAM path end to end: clients → proxy (`kind = "dsql"`,
//! `auth = "dsql-iam"`) → token-checking DSQL emulator (TLS with SNI, an
//! independent SigV4 check) → PostgreSQL.

use std::time::{Duration, Instant};

use dsql_proxy_tests::dsql_stack::{aws_env, isolated_aws_env, DsqlProxyOptions, DsqlStack};
use dsql_proxy_tests::emulator::{ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use dsql_proxy_tests::{wire, APP_DB, APP_USER};

async fn current_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_other_roles_connect_with_signed_tokens() {
    let stack = DsqlStack::start(DsqlProxyOptions::default());
    let admin = stack.connect("admin", "postgres").await;
    assert_eq!(current_user(&admin).await, "admin");
    let app = stack.connect(APP_USER, APP_DB).await;
    assert_eq!(current_user(&app).await, APP_USER);

    // psql, the simple protocol, through the same path.
    let out = stack
        .pg
        .psql_command()
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", stack.listen.port().to_string())
        .env("PGUSER", "admin")
        .env("PGDATABASE", "postgres")
        .env("PGSSLMODE", "disable")
        .args(["-qAt", "-c", "select 'iam-ok', current_user"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "iam-ok|admin",
        "{out:?}\n{}",
        stack.emulator.logs()
    );

    // One signature per (host, region, action), whatever the number of connects.
    assert_eq!(stack.signings(), 2, "{}", stack.proxy.logs());
    let emulator_log = stack.emulator.logs();
    assert!(
        emulator_log.contains("DbConnectAdmin") || emulator_log.contains("admin"),
        "{emulator_log}"
    );

    // Tokens never reach the proxy's log.
    let logs = stack.proxy.logs();
    assert!(
        !logs.contains("X-Amz-Signature") && !logs.contains(SECRET_ACCESS_KEY),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_share_one_signing() {
    let stack = DsqlStack::start(DsqlProxyOptions::default());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let cfg = stack.client_config(APP_USER, APP_DB);
        tasks.push(tokio::spawn(async move {
            let client = dsql_proxy_tests::connect_with(&cfg, None).await?;
            client.simple_query("select 1").await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e:?}\n{}", stack.emulator.logs()));
    }
    assert_eq!(stack.signings(), 1, "{}", stack.proxy.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_token_is_rejected_by_the_emulator_and_reported() {
    // The proxy signs with the right key id but a wrong secret: the emulator's
    // own SigV4 check refuses the signature.
    let stack = DsqlStack::start(DsqlProxyOptions {
        env: aws_env(ACCESS_KEY_ID, "not-the-secret"),
        ..DsqlProxyOptions::default()
    });
    let err = stack.try_connect("admin", "postgres").await.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28P01", "{db:?}");
    assert!(
        db.message().contains("password authentication failed"),
        "{db:?}"
    );
    assert!(
        db.detail().unwrap_or_default().contains("signature"),
        "{db:?}"
    );
    // A refused token is not handed out again: the next connect re-signs.
    let _ = stack.try_connect("admin", "postgres").await.unwrap_err();
    assert_eq!(stack.signings(), 2, "{}", stack.proxy.logs());
    assert!(!stack.proxy.logs().contains("not-the-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_fail_fast_with_a_clear_error() {
    let stack = DsqlStack::start(DsqlProxyOptions {
        env: isolated_aws_env(),
        ..DsqlProxyOptions::default()
    });
    let started = Instant::now();
    let err = stack.try_connect("admin", "postgres").await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert!(db.message().contains("no AWS credentials found"), "{db:?}");
    // The proxy is still up and says the same on the next try.
    let err = stack.try_connect(APP_USER, APP_DB).await.unwrap_err();
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("28000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_ahead_of_expiry() {
    // Every connect must reach the endpoint with a token: no reuse.
    let stack = DsqlStack::start(DsqlProxyOptions {
        token_expires_in: "6s".into(),
        pool: vec!["enabled = false".into()],
        ..DsqlProxyOptions::default()
    });
    stack.connect(APP_USER, APP_DB).await;
    assert_eq!(stack.signings(), 1);
    // Past 80% of the lifetime (4.8 s) the cached token is still used, and a
    // new one is signed in the background.
    tokio::time::sleep(Duration::from_millis(5200)).await;
    stack.connect(APP_USER, APP_DB).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while stack.signings() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stack.signings(), 2, "{}", stack.proxy.logs());
    // Well past the first token's expiry, connects keep working on the new one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = stack.connect(APP_USER, APP_DB).await;
    assert_eq!(current_user(&client).await, APP_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsql_refused_startup_parameters_are_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = DsqlStack::start(DsqlProxyOptions::default());
    // The emulator refuses default_transaction_read_only like DSQL; the
    // proxy's default drop list for kind = "dsql" keeps it away.
    let mut sock = tokio::net::TcpStream::connect(stack.listen).await.unwrap();
    sock.write_all(&wire::startup_message(
        196_608,
        &[
            ("user", "admin"),
            ("database", "postgres"),
            ("default_transaction_read_only", "on"),
        ],
    ))
    .await
    .unwrap();
    let mut seen_ready = false;
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut data = Vec::new();
    while !seen_ready && Instant::now() < deadline {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&data));
        data.extend_from_slice(&buf[..n]);
        assert!(
            !data.starts_with(b"E"),
            "{}",
            String::from_utf8_lossy(&data)
        );
        seen_ready = data.windows(6).any(|w| w == b"Z\0\0\0\x05I");
    }
    assert!(seen_ready, "{}", stack.emulator.logs());
}
