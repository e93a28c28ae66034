//! Authentication on both legs: what the proxy answers to the backend
//! (cleartext, MD5, SCRAM; configured or passed-through password) and what
//! it asks of local clients (trust, SCRAM-SHA-256).

use dsql_proxy_tests::{
    probe_login, AuthMethod, PgOptions, ProxyOptions, Stack, APP_DB, APP_PASSWORD, APP_USER,
    MD5_PASSWORD, MD5_USER,
};

fn pg(auth: AuthMethod) -> PgOptions {
    PgOptions {
        tls: true,
        auth,
        ..PgOptions::default()
    }
}

async fn current_user(stack: &Stack, user: &str) -> String {
    let client = stack.connect(user, APP_DB).await;
    client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_scram_md5_and_cleartext_challenges() {
    let scram = Stack::start_with(pg(AuthMethod::ScramSha256), ProxyOptions::default());
    assert_eq!(current_user(&scram, APP_USER).await, APP_USER);

    let md5 = Stack::start_with(
        pg(AuthMethod::Md5),
        ProxyOptions {
            password: Some(MD5_PASSWORD.into()),
            routing: probe_login(MD5_USER),
            ..ProxyOptions::default()
        },
    );
    assert_eq!(current_user(&md5, MD5_USER).await, MD5_USER);

    let cleartext = Stack::start_with(pg(AuthMethod::Password), ProxyOptions::default());
    assert_eq!(current_user(&cleartext, APP_USER).await, APP_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_auth_failure_passes_the_server_error_through() {
    let stack = Stack::start_with(
        pg(AuthMethod::ScramSha256),
        ProxyOptions {
            password: Some("wrong-password".into()),
            ..ProxyOptions::default()
        },
    );
    let err = dsql_proxy_tests::connect_with(&stack.client_config(APP_USER, APP_DB), None)
        .await
        .expect_err("wrong backend password must fail");
    let db = err
        .as_db_error()
        .expect("an ErrorResponse, not a bare close");
    assert_eq!(db.code().code(), "28P01");
    assert!(
        db.message().contains("password authentication failed"),
        "{db:?}"
    );
    assert_eq!(db.severity(), "FATAL");
    let logs = stack.proxy.logs();
    assert!(
        !logs.contains("wrong-password"),
        "password leaked into the log:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_forwards_the_client_password() {
    let stack = Stack::start_with(
        pg(AuthMethod::ScramSha256),
        ProxyOptions {
            auth: "passthrough",
            password: None,
            ..ProxyOptions::default()
        },
    );
    let mut cfg = stack.client_config(APP_USER, APP_DB);
    cfg.password(APP_PASSWORD);
    let client = dsql_proxy_tests::connect_with(&cfg, None).await.unwrap();
    let user: String = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, APP_USER);
    // The backend checks every client's password: a connection the first
    // client left behind is never handed to the next (no reuse here).
    drop(client);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    cfg.password("not-the-password");
    let err = dsql_proxy_tests::connect_with(&cfg, None)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("28P01"),
        "{err:?}"
    );

    // No password at all: libpq-style clients are asked and must answer.
    let no_pw = stack.client_config(APP_USER, APP_DB);
    let err = dsql_proxy_tests::connect_with(&no_pw, None)
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("password"), "{err:?}");
    let out = stack
        .psql(APP_USER, APP_DB)
        .args(["-c", "select 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no password supplied"),
        "{out:?}"
    );
    let logs = stack.proxy.logs();
    assert!(
        !logs.contains(APP_PASSWORD) && !logs.contains("not-the-password"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_scram_protects_the_listener() {
    let stack = Stack::start_with(
        pg(AuthMethod::ScramSha256),
        ProxyOptions {
            listen_extra: vec![
                "auth = \"scram-sha-256\"".into(),
                "password = \"local-secret\"".into(),
            ],
            ..ProxyOptions::default()
        },
    );
    let mut cfg = stack.client_config(APP_USER, APP_DB);
    cfg.password("local-secret");
    let client = dsql_proxy_tests::connect_with(&cfg, None).await.unwrap();
    assert_eq!(
        client
            .query_one("select 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );

    cfg.password("guess");
    let err = dsql_proxy_tests::connect_with(&cfg, None)
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("ErrorResponse");
    assert_eq!(db.code().code(), "28P01");

    // psql, too, with the password from the environment.
    let out = stack
        .psql(APP_USER, APP_DB)
        .env("PGPASSWORD", "local-secret")
        .args(["-qAt", "-c", "select 'psql-ok'"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "psql-ok",
        "{out:?}"
    );
    let logs = stack.proxy.logs();
    assert!(!logs.contains("local-secret"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleartext_password_request_is_answered_only_over_verify_full_or_when_allowed() {
    // tls = "require" encrypts but trusts any certificate: a server (or an
    // impostor) asking for the password in cleartext does not get it.
    let guarded = Stack::start_with(
        pg(AuthMethod::Password),
        ProxyOptions {
            tls: "require",
            ..ProxyOptions::default()
        },
    );
    let err = dsql_proxy_tests::connect_with(&guarded.client_config(APP_USER, APP_DB), None)
        .await
        .expect_err("the proxy must not send the password");
    let db = err.as_db_error().expect("a clear ErrorResponse");
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert!(
        db.message().contains("cleartext password")
            && db.message().contains("allow_cleartext_password"),
        "{db:?}"
    );
    let logs = guarded.proxy.logs();
    assert!(
        logs.contains("backend connection failed") && logs.contains("cleartext password"),
        "the refusal is logged:\n{logs}"
    );
    assert!(
        !logs.contains(APP_PASSWORD),
        "no secret in the log:\n{logs}"
    );
    assert!(
        !guarded
            .pg
            .log_contents()
            .contains("password authentication failed"),
        "nothing was sent to the server"
    );
    // Not an endpoint failure: the endpoint is not demoted, the next client
    // hears the same.
    let again = dsql_proxy_tests::connect_with(&guarded.client_config(APP_USER, APP_DB), None)
        .await
        .expect_err("refused again");
    assert_eq!(again.as_db_error().map(|e| e.code().code()), Some("28000"));

    // Opting in restores it; MD5 and SCRAM never needed it.
    let allowed = Stack::start_with(
        pg(AuthMethod::Password),
        ProxyOptions {
            tls: "require",
            backend_extra: vec!["allow_cleartext_password = true".into()],
            ..ProxyOptions::default()
        },
    );
    assert_eq!(current_user(&allowed, APP_USER).await, APP_USER);
    let scram = Stack::start_with(
        pg(AuthMethod::ScramSha256),
        ProxyOptions {
            tls: "require",
            ..ProxyOptions::default()
        },
    );
    assert_eq!(current_user(&scram, APP_USER).await, APP_USER);
}

/// Passthrough asks the client for its real database password, so it asks
/// only where that cannot cross a network in the clear: a remote client
/// over plain TCP is refused before any password is requested; over TLS, or
/// from loopback, it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_never_asks_a_remote_plain_client_for_its_password() {
    use dsql_proxy_tests::{proxy_toml, PgServer, ProxyProcess, TestPki};
    use std::net::SocketAddr;
    use tokio_postgres::config::SslMode;

    let pg = PgServer::start(pg(AuthMethod::ScramSha256));
    let pki = std::sync::Arc::new(TestPki::new());
    let cert = pki.issue_server(&["localhost"]);
    let port = dsql_proxy_tests::free_port();
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let toml = proxy_toml(
        &pg,
        local,
        &ProxyOptions {
            auth: "passthrough",
            password: None,
            listen_extra: vec![
                format!("tls_cert_file = \"{}\"", cert.cert_path.display()),
                format!("tls_key_file = \"{}\"", cert.key_path.display()),
            ],
            ..ProxyOptions::default()
        },
    )
    .replace(
        &format!("address = \"{local}\""),
        &format!("address = \"0.0.0.0:{port}\""),
    );
    let proxy = ProxyProcess::start_with(&toml, local);
    let remote = dsql_proxy_tests::net::non_loopback_ip();
    let config = |ssl: SslMode| {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("localhost")
            .hostaddr(remote)
            .port(port)
            .user(APP_USER)
            .dbname(APP_DB)
            .password(APP_PASSWORD)
            .ssl_mode(ssl)
            .connect_timeout(std::time::Duration::from_secs(10));
        cfg
    };

    let err = dsql_proxy_tests::connect_with(&config(SslMode::Disable), None)
        .await
        .expect_err("a remote plain-TCP client must not be asked for its password");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert!(db.message().contains("passthrough"), "{db:?}");

    let client = dsql_proxy_tests::connect_with(&config(SslMode::Require), Some(&pki))
        .await
        .unwrap_or_else(|e| panic!("over TLS: {e:?}\n{}", proxy.logs()));
    assert_eq!(
        client
            .query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        APP_USER
    );
    let mut loopback = dsql_proxy_tests::fixture::client_config(local, APP_USER, APP_DB);
    loopback.password(APP_PASSWORD);
    let client = dsql_proxy_tests::connect_with(&loopback, None)
        .await
        .unwrap();
    client.simple_query("select 1").await.unwrap();
    assert!(!proxy.logs().contains(APP_PASSWORD));
}
