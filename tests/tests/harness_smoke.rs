//! Proves the harness's PostgreSQL and PKI parts work end to end. The proxy
//! side is exercised by the real proxy tests once the binary exists.

use std::sync::Arc;

use dsql_proxy_tests::process::process_alive;
use dsql_proxy_tests::{
    connect_with, AuthMethod, PgOptions, PgServer, TestPki, APP_DB, APP_PASSWORD, APP_USER,
    MD5_PASSWORD, MD5_USER,
};

#[tokio::test]
async fn tls_scram_server_accepts_verified_tls_connection() {
    let pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    });
    assert!(pg.ca_file().expect("TLS server has a CA file").is_file());

    let client = pg.connect_direct(APP_USER, APP_PASSWORD, APP_DB).await;
    let one: i32 = client
        .query_one("select 1", &[])
        .await
        .expect("select 1")
        .get(0);
    assert_eq!(one, 1);

    // The session really is encrypted, as the authenticated user.
    let row = client
        .query_one(
            "select ssl, current_user::text from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query pg_stat_ssl");
    assert!(row.get::<_, bool>(0), "connection is not using TLS");
    assert_eq!(row.get::<_, String>(1), APP_USER);

    // The other name in the certificate verifies too...
    let pki = pg.pki().expect("TLS server has a PKI");
    connect_with(&tls_config_for_name(&pg, "db.test.internal"), Some(pki))
        .await
        .expect("cert is valid for db.test.internal");

    // ...but a name outside it, or a different CA, is rejected.
    let err = connect_with(&tls_config_for_name(&pg, "wrong.example"), Some(pki))
        .await
        .expect_err("cert must not verify for wrong.example");
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");

    let other_ca = TestPki::new();
    connect_with(
        &pg.direct_config(APP_USER, APP_PASSWORD, APP_DB),
        Some(&other_ca),
    )
    .await
    .expect_err("cert must not verify against an unrelated CA");

    // hostssl-only: plaintext is refused.
    let mut plain = pg.direct_config(APP_USER, APP_PASSWORD, APP_DB);
    plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
    connect_with(&plain, None)
        .await
        .expect_err("plaintext must be refused by a TLS server");
}

/// Like `PgServer::direct_config`, but verifying the certificate for `name`
/// (`Config::host` appends, so the direct config can't be re-targeted).
fn tls_config_for_name(pg: &PgServer, name: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(name)
        .hostaddr(std::net::Ipv4Addr::LOCALHOST.into())
        .port(pg.port())
        .user(APP_USER)
        .password(APP_PASSWORD)
        .dbname(APP_DB)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    cfg
}

#[tokio::test]
async fn md5_server_accepts_md5_user() {
    let pg = PgServer::start(PgOptions {
        auth: AuthMethod::Md5,
        ..PgOptions::default()
    });
    assert!(pg.ca_file().is_none());

    let stored = pg.superuser_sql(&format!(
        "select rolpassword from pg_authid where rolname = '{MD5_USER}'"
    ));
    assert!(stored.starts_with("md5"), "stored hash: {stored:?}");

    let client = pg.connect_direct(MD5_USER, MD5_PASSWORD, "postgres").await;
    let one: i32 = client
        .query_one("select 1", &[])
        .await
        .expect("select 1")
        .get(0);
    assert_eq!(one, 1);

    pg.try_connect_direct(MD5_USER, "wrong", "postgres")
        .await
        .expect_err("wrong password must be rejected");
    assert!(pg.log_contents().contains("password authentication failed"));
}

#[test]
fn drop_stops_server_and_removes_data_dir() {
    let pki = Arc::new(TestPki::new());
    let pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::Trust,
        max_connections: 20,
        extra_conf: vec!["log_connections = on".into()],
        pki: Some(pki.clone()),
        ..PgOptions::default()
    });
    assert_eq!(pg.ca_file().as_deref(), Some(pki.ca_cert_path()));
    assert_eq!(pg.superuser_sql("show max_connections"), "20");
    assert_eq!(pg.superuser_sql("show log_connections"), "on");
    assert!(pg.pgbench_path().is_file());

    let data_dir = pg.data_dir().to_path_buf();
    let socket_dir = pg.socket_dir().to_path_buf();
    let pid = pg.postmaster_pid().expect("postmaster.pid exists");
    assert!(process_alive(pid));

    drop(pg);
    assert!(!process_alive(pid), "postmaster {pid} survived drop");
    assert!(!data_dir.exists(), "{} still exists", data_dir.display());
    assert!(
        !socket_dir.exists(),
        "{} still exists",
        socket_dir.display()
    );
    // The PKI outlives the server that borrowed it.
    assert!(pki.ca_cert_path().is_file());
}
