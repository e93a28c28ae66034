//! The backend leg: TLS modes, SNI and certificate names with
//! connect_address, unreachable and hung endpoints, parameters.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use dsql_proxy_tests::{AuthMethod, PgOptions, ProxyOptions, Stack, APP_DB, APP_USER};

fn tls_server() -> PgOptions {
    PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    }
}

async fn connect_error(stack: &Stack) -> tokio_postgres::Error {
    dsql_proxy_tests::connect_with(&stack.client_config(APP_USER, APP_DB), None)
        .await
        .expect_err("connection must fail")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_certificate_name() {
    // The certificate names localhost and db.test.internal; connect_address
    // dials 127.0.0.1 while SNI and the check use `host`.
    let good = Stack::start_with(tls_server(), ProxyOptions::default());
    good.connect(APP_USER, APP_DB).await;

    let wrong_name = Stack::start_with(
        tls_server(),
        ProxyOptions {
            host: "other.test.internal".into(),
            ..ProxyOptions::default()
        },
    );
    let err = connect_error(&wrong_name).await;
    let db = err.as_db_error().expect("ErrorResponse");
    assert_eq!(db.code().code(), "08001");
    assert!(
        db.message().contains("local-1"),
        "names the endpoint: {db:?}"
    );
    assert!(
        db.message().contains("TLS") || db.message().contains("certificate"),
        "{db:?}"
    );

    // verify-ca accepts the same certificate: chain checked, name not.
    let ca_only = Stack::start_with(
        tls_server(),
        ProxyOptions {
            host: "other.test.internal".into(),
            tls: "verify-ca",
            ..ProxyOptions::default()
        },
    );
    ca_only.connect(APP_USER, APP_DB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_is_the_only_trust_anchor_as_libpq_sslrootcert() {
    // The server's CA stands in for the system store (rustls-native-certs
    // reads SSL_CERT_FILE); ca_file names an unrelated CA.
    let pg = dsql_proxy_tests::PgServer::start(tls_server());
    let server_ca = pg.ca_file().expect("a TLS server").display().to_string();
    let unrelated = dsql_proxy_tests::TestPki::new();
    let unrelated_ca = unrelated.ca_cert_path().display().to_string();
    let env = [("SSL_CERT_FILE".to_owned(), server_ca.clone())];
    let ca_line = format!("ca_file = \"{server_ca}\"\n");
    for (tls, ca_file, trusted) in [
        ("verify-ca", Some(&unrelated_ca), false),
        ("verify-full", Some(&unrelated_ca), false),
        // Without a ca_file the system store is trusted.
        ("verify-ca", None, true),
        ("verify-full", None, true),
    ] {
        let listen = dsql_proxy_tests::free_addr();
        let opts = ProxyOptions {
            tls,
            ..ProxyOptions::default()
        };
        let toml = dsql_proxy_tests::proxy_toml(&pg, listen, &opts);
        assert!(toml.contains(&ca_line), "fixture changed:\n{toml}");
        let replacement = ca_file.map_or(String::new(), |f| format!("ca_file = \"{f}\"\n"));
        let toml = toml.replace(&ca_line, &replacement);
        let mut proxy = dsql_proxy_tests::ProxyProcess::spawn_with_env(&toml, &[], &env);
        proxy.wait_ready(listen, Duration::from_secs(20));
        let cfg = dsql_proxy_tests::fixture::client_config(listen, APP_USER, APP_DB);
        let result = dsql_proxy_tests::connect_with(&cfg, None).await;
        let case = format!("tls = {tls}, ca_file = {ca_file:?}");
        match (trusted, result) {
            (true, Ok(client)) => {
                client.simple_query("select 1").await.unwrap();
            }
            (false, Err(err)) => {
                let db = err.as_db_error().expect("an ErrorResponse");
                assert_eq!(db.code().code(), "08001", "{case}: {db:?}");
                assert!(db.message().contains("TLS"), "{case}: {db:?}");
            }
            (true, Err(err)) => panic!("{case}: {err:?}\n{}", proxy.logs()),
            (false, Ok(_)) => panic!("{case}: the system store was trusted besides ca_file"),
        }
    }
}

/// `toml` with the `[admin]` section's address replaced by a free one.
fn with_fresh_admin_address(toml: &str) -> String {
    let mut in_admin = false;
    let mut out = String::with_capacity(toml.len());
    for line in toml.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_admin = trimmed == "[admin]";
        }
        if in_admin && trimmed.starts_with("address") {
            out.push_str(&format!("address = \"{}\"", dsql_proxy_tests::free_addr()));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    assert!(
        out.contains("[admin]"),
        "the fixture config has an [admin] section"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_without_trusting_and_verify_rejects_unknown_cas() {
    // A proxy with an unrelated CA: verify-full must refuse, require must not.
    let unrelated = dsql_proxy_tests::TestPki::new();
    let ca = unrelated.ca_cert_path().display().to_string();
    let strict = Stack::start_with(
        tls_server(),
        ProxyOptions {
            backend_extra: vec![],
            ..ProxyOptions::default()
        },
    );
    // Re-point ca_file at the unrelated CA by rewriting the config.
    let toml = std::fs::read_to_string(strict.proxy.config_path()).unwrap();
    let pg_ca = strict.pg.ca_file().unwrap().display().to_string();
    let listen = dsql_proxy_tests::free_addr();
    let toml = toml
        .replace(&pg_ca, &ca)
        .replace(&strict.listen.to_string(), &listen.to_string());
    // Each copy needs its own admin port: the original proxy keeps running.
    let toml = with_fresh_admin_address(&toml);
    let proxy = dsql_proxy_tests::ProxyProcess::start_with(&toml, listen);
    let cfg = dsql_proxy_tests::fixture::client_config(listen, APP_USER, APP_DB);
    let err = dsql_proxy_tests::connect_with(&cfg, None)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("08001"),
        "{err:?}\n{}",
        proxy.logs()
    );

    let lax_toml = toml.replace("tls = \"verify-full\"", "tls = \"require\"");
    let listen2 = dsql_proxy_tests::free_addr();
    let lax_toml =
        with_fresh_admin_address(&lax_toml.replace(&listen.to_string(), &listen2.to_string()));
    let _lax = dsql_proxy_tests::ProxyProcess::start_with(&lax_toml, listen2);
    let cfg = dsql_proxy_tests::fixture::client_config(listen2, APP_USER, APP_DB);
    let client = dsql_proxy_tests::connect_with(&cfg, None).await.unwrap();
    let ssl: bool = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_disable_talks_plaintext_and_passes_hba_errors_through() {
    // A server that accepts plaintext: disable works.
    let plain = Stack::start_with(
        PgOptions {
            tls: false,
            auth: AuthMethod::ScramSha256,
            ..PgOptions::default()
        },
        ProxyOptions {
            tls: "disable",
            ..ProxyOptions::default()
        },
    );
    let client = plain.connect(APP_USER, APP_DB).await;
    let ssl: bool = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ssl);

    // A hostssl-only server refuses plaintext with its own FATAL 28000.
    let hostssl = Stack::start_with(
        tls_server(),
        ProxyOptions {
            tls: "disable",
            ..ProxyOptions::default()
        },
    );
    let err = connect_error(&hostssl).await;
    let db = err.as_db_error().expect("the server's ErrorResponse");
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert!(db.message().contains("pg_hba.conf"), "{db:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_and_hung_endpoints_fail_within_connect_timeout() {
    // Nothing listens on a fresh free port.
    let closed = dsql_proxy_tests::free_addr();
    let stack = Stack::start_with(
        tls_server(),
        ProxyOptions {
            connect_address: Some(closed),
            ..ProxyOptions::default()
        },
    );
    let started = Instant::now();
    let err = connect_error(&stack).await;
    let db = err.as_db_error().expect("ErrorResponse");
    assert_eq!(db.code().code(), "08001");
    assert!(db.message().contains("local-1"), "{db:?}");
    assert!(db.message().to_lowercase().contains("refused"), "{db:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A listener that accepts and never answers: bounded by connect_timeout (2s).
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let stack = Stack::start_with(
        tls_server(),
        ProxyOptions {
            connect_address: Some(hung_addr),
            ..ProxyOptions::default()
        },
    );
    let started = Instant::now();
    let err = connect_error(&stack).await;
    let elapsed = started.elapsed();
    let db = err.as_db_error().expect("ErrorResponse");
    assert_eq!(db.code().code(), "08001");
    assert!(db.message().contains("timed out"), "{db:?}");
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    drop(hung);
    // The proxy itself is fine.
    assert!(stack.proxy.logs().contains("backend connection failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_are_forwarded_dropped_and_defaulted() {
    let stack = Stack::start_with(
        tls_server(),
        ProxyOptions {
            backend_extra: vec![
                "drop_parameters = [\"default_transaction_read_only\"]".into(),
                "default_application_name = \"from-proxy\"".into(),
            ],
            ..ProxyOptions::default()
        },
    );
    let mut cfg = stack.client_config(APP_USER, APP_DB);
    cfg.application_name("my-app")
        .options("-c statement_timeout=1234 -c default_transaction_read_only=on");
    let client = dsql_proxy_tests::connect_with(&cfg, None).await.unwrap();
    let row = client
        .query_one(
            "select current_setting('application_name'), current_setting('statement_timeout'), current_database()::text",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "my-app");
    assert_eq!(row.get::<_, String>(1), "1234ms");
    assert_eq!(row.get::<_, String>(2), APP_DB);

    // A dropped parameter sent as its own startup parameter never arrives.
    let ro = raw_show(
        &stack,
        &[("default_transaction_read_only", "on")],
        "show default_transaction_read_only",
    )
    .await;
    assert_eq!(ro, "off");

    let client = stack.connect(APP_USER, APP_DB).await;
    let app: String = client
        .query_one("select current_setting('application_name')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, "from-proxy");
}

/// Starts a session with exactly `params` (plus user and database) and
/// returns the first column of the first row of `query`.
async fn raw_show(stack: &Stack, params: &[(&str, &str)], query: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(stack.listen).await.unwrap();
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", APP_USER), ("database", APP_DB)]
        .iter()
        .chain(params)
    {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    sock.write_all(&packet).await.unwrap();
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((query.len() + 5) as u32).to_be_bytes());
    q.extend_from_slice(query.as_bytes());
    q.push(0);
    let mut sent_query = false;
    let mut value = None;
    loop {
        let mut header = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), sock.read_exact(&mut header))
            .await
            .expect("backend message in time")
            .unwrap();
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize - 4;
        let mut body = vec![0u8; len];
        sock.read_exact(&mut body).await.unwrap();
        match header[0] {
            b'E' => panic!("error: {}", String::from_utf8_lossy(&body)),
            b'D' if value.is_none() => {
                let n = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                value = Some(String::from_utf8_lossy(&body[6..6 + n]).into_owned());
            }
            b'Z' if !sent_query => {
                sock.write_all(&q).await.unwrap();
                sent_query = true;
            }
            b'Z' => break,
            _ => {}
        }
    }
    let _ = sock.write_all(&[b'X', 0, 0, 0, 4]).await;
    value.expect("a row")
}
