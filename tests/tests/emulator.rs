//! End-to-end tests of `dsql-emulator` on its own: a real PostgreSQL behind
//! it, raw-socket and rustls clients in front, tokens from the emulator's
//! own independent SigV4 signer.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dsql_proxy_tests::emulator::{
    sign_token, ConflictKind, SessionEnd, ACCESS_KEY_ID, ACTION_CONNECT, SECRET_ACCESS_KEY,
};
use dsql_proxy_tests::wire::{self, BackendMessage, ErrorFields, StartupResponse};
use dsql_proxy_tests::{
    connect_with, AuthMethod, EmulatorOptions, EmulatorProcess, PgOptions, PgServer, TestPki,
    ADMIN_USER, APP_USER,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Generous bound for any single exchange.
const T: Duration = Duration::from_secs(15);

fn upstream() -> PgServer {
    PgServer::start(PgOptions {
        tls: true,
        ..PgOptions::default()
    })
}

fn password_message(token: &str) -> Vec<u8> {
    let mut body = token.as_bytes().to_vec();
    body.push(0);
    wire::typed(b'p', &body)
}

/// Sends a StartupMessage for `role`, answers the cleartext password
/// request with `token`, and returns the startup response (up to
/// ReadyForQuery) or the ErrorResponse.
async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    role: &str,
    token: &str,
) -> Result<StartupResponse, ErrorFields> {
    wire::send(stream, &wire::startup_v3(role, "postgres"))
        .await
        .expect("send startup");
    let first = wire::read_message(stream, T)
        .await
        .expect("answer to startup");
    if let Some(e) = first.error_fields() {
        return Err(e);
    }
    assert_eq!(
        first.auth_code(),
        Some(3),
        "expected AuthenticationCleartextPassword, got {first:?}"
    );
    wire::send(stream, &password_message(token))
        .await
        .expect("send password");
    let mut messages = Vec::new();
    loop {
        let msg = wire::read_message(stream, T)
            .await
            .unwrap_or_else(|e| panic!("during startup: {e}; so far {messages:?}"));
        if let Some(e) = msg.error_fields().filter(|_| msg.tag == b'E') {
            return Err(e);
        }
        let done = msg.tag == b'Z';
        messages.push(msg);
        if done {
            return Ok(StartupResponse { messages });
        }
    }
}

/// Like [`login`] but for an expected refusal: the FATAL's fields, and the
/// stream must end after it.
async fn login_refused<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    role: &str,
    token: &str,
) -> ErrorFields {
    wire::send(stream, &wire::startup_v3(role, "postgres"))
        .await
        .expect("send startup");
    let first = wire::read_message(stream, T)
        .await
        .expect("answer to startup");
    let msgs = if first.tag == b'E' {
        vec![first]
    } else {
        assert_eq!(first.auth_code(), Some(3), "{first:?}");
        wire::send(stream, &password_message(token))
            .await
            .expect("send password");
        let (msgs, _) = wire::read_to_close(stream, T).await;
        msgs
    };
    fatal_then_close(stream, msgs).await
}

/// The one FATAL ErrorResponse in `msgs`, after checking the peer closed.
async fn fatal_then_close<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut msgs: Vec<BackendMessage>,
) -> ErrorFields {
    let (rest, _) = wire::read_to_close(stream, T).await;
    msgs.extend(rest);
    let err = msgs
        .iter()
        .find_map(BackendMessage::error_fields)
        .unwrap_or_else(|| panic!("no ErrorResponse in {msgs:?}"));
    assert_eq!(err.severity_v(), Some("FATAL"), "{err:?}");
    assert!(
        msgs.iter()
            .all(|m| m.tag != b'R' || m.auth_code() == Some(3)),
        "authentication must not succeed: {msgs:?}"
    );
    err
}

async fn tls_stream(
    emu: &EmulatorProcess,
    pki: &TestPki,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    emu.tls_connect(pki.rustls_client_config(), emu.cluster_host())
        .await
        .unwrap_or_else(|e| panic!("TLS connect: {e}\n--- emulator log ---\n{}", emu.logs()))
}

async fn current_user<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> String {
    let msgs = wire::simple_query(stream, "select current_user", T)
        .await
        .expect("simple query");
    let rows = wire::rows(&msgs);
    assert_eq!(rows.len(), 1, "{msgs:?}");
    rows[0][0].clone().expect("current_user is not null")
}

fn assert_auth_failed(err: &ErrorFields, role: &str, detail_has: &str) {
    assert_eq!(err.code(), Some("28P01"), "{err:?}");
    let msg = err.message().unwrap_or_default();
    assert!(
        msg.starts_with(&format!(
            "password authentication failed for user \"{role}\""
        )),
        "{err:?}"
    );
    let detail = err.get(b'D').unwrap_or_default();
    assert!(
        detail.contains(detail_has),
        "detail {detail:?} lacks {detail_has:?}"
    );
}

#[tokio::test]
async fn admin_token_opens_a_relayed_session() {
    let pg = upstream();
    let pki = TestPki::new();
    let emu = EmulatorProcess::start(EmulatorOptions::new(&pg, &pki));

    let token = emu.token(ADMIN_USER);
    let mut s = tls_stream(&emu, &pki).await;
    let startup = login(&mut s, ADMIN_USER, &token)
        .await
        .unwrap_or_else(|e| panic!("admin login refused: {e:?}\n{}", emu.logs()));
    assert_eq!(startup.messages[0].auth_code(), Some(0), "{startup:?}");
    assert!(startup.parameters().contains_key("server_version"));
    assert!(startup.backend_key().is_some(), "{startup:?}");
    assert_eq!(startup.ready_status(), Some(b'I'));
    assert_eq!(current_user(&mut s).await, ADMIN_USER);

    // The upstream session is the real thing, over TLS to PostgreSQL.
    let msgs = wire::simple_query(
        &mut s,
        "select ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
        T,
    )
    .await
    .expect("query pg_stat_ssl");
    assert_eq!(wire::rows(&msgs), vec![vec![Some("true".to_owned())]]);

    wire::send(&mut s, &wire::terminate())
        .await
        .expect("send Terminate");
    let (rest, _) = wire::read_to_close(&mut s, T).await;
    assert!(rest.is_empty(), "{rest:?}");

    // The token itself is never logged.
    assert!(emu.wait_for_log("session closed", T), "{}", emu.logs());
    let signature = token.rsplit_once("X-Amz-Signature=").expect("signature").1;
    let logs = emu.logs();
    assert!(
        !logs.contains(signature),
        "token leaked into the log:\n{logs}"
    );
    assert!(logs.contains("session started"), "{logs}");
}

#[tokio::test]
async fn real_driver_connects_with_a_dbconnect_token() {
    let pg = upstream();
    let pki = TestPki::new();
    let emu = EmulatorProcess::start(EmulatorOptions::new(&pg, &pki));

    // tokio-postgres verifies the certificate for the cluster host and sends
    // it as SNI.
    let cfg = emu.client_config(APP_USER, &emu.token(APP_USER), "postgres");
    let client = connect_with(&cfg, Some(&pki))
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", emu.logs()));
    let row = client
        .query_one("select current_user::text, $1::int + 1", &[&41i32])
        .await
        .expect("extended-protocol query");
    assert_eq!(row.get::<_, String>(0), APP_USER);
    assert_eq!(row.get::<_, i32>(1), 42);

    // A DbConnect token is not good for admin, with the same driver.
    let cfg = emu.client_config(ADMIN_USER, &emu.token(APP_USER), "postgres");
    let err = connect_with(&cfg, Some(&pki))
        .await
        .expect_err("DbConnect token for admin");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "28P01");
}

#[tokio::test]
async fn an_upstream_asking_for_a_cleartext_password_gets_the_role_password() {
    // The emulator is test support in front of the tester's own server: the
    // proxy's auth-downgrade guard does not apply to its upstream login.
    let pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::Password,
        ..PgOptions::default()
    });
    let pki = TestPki::new();
    let emu = EmulatorProcess::start(EmulatorOptions::new(&pg, &pki));
    let cfg = emu.client_config(APP_USER, &emu.token(APP_USER), "postgres");
    let client = connect_with(&cfg, Some(&pki))
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", emu.logs()));
    let row = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), APP_USER);
}

#[tokio::test]
async fn wrong_action_and_expired_tokens_are_refused() {
    let pg = upstream();
    let pki = TestPki::new();
    let emu = EmulatorProcess::start(EmulatorOptions::new(&pg, &pki));

    // DbConnect is not enough for admin.
    let mut s = tls_stream(&emu, &pki).await;
    let err = login_refused(&mut s, ADMIN_USER, &emu.token(APP_USER)).await;
    assert_auth_failed(&err, ADMIN_USER, "wrong action for role");

    // Expired: signed 20 minutes ago for 15.
    let expired = emu.token_with(
        ACTION_CONNECT,
        SystemTime::now() - Duration::from_secs(1200),
        900,
    );
    let mut s = tls_stream(&emu, &pki).await;
    let err = login_refused(&mut s, APP_USER, &expired).await;
    assert_auth_failed(&err, APP_USER, "expired");

    // Dated beyond the allowed clock skew.
    let future = emu.token_with(
        ACTION_CONNECT,
        SystemTime::now() + Duration::from_secs(3600),
        900,
    );
    let mut s = tls_stream(&emu, &pki).await;
    let err = login_refused(&mut s, APP_USER, &future).await;
    assert_auth_failed(&err, APP_USER, "clock skew");

    // Signed with a key the emulator does not know.
    let unknown = sign_token(
        emu.cluster_host(),
        emu.region(),
        ACTION_CONNECT,
        "AKIDUNKNOWN",
        SECRET_ACCESS_KEY,
        None,
        SystemTime::now(),
        900,
    );
    let mut s = tls_stream(&emu, &pki).await;
    let err = login_refused(&mut s, APP_USER, &unknown).await;
    assert_auth_failed(&err, APP_USER, "unknown access key");

    // Tampered signature.
    let good = emu.token(APP_USER);
    let mut tampered = good.clone();
    let last = tampered.pop().expect("non-empty");
    tampered.push(if last == 'a' { 'b' } else { 'a' });
    let mut s = tls_stream(&emu, &pki).await;
    let err = login_refused(&mut s, APP_USER, &tampered).await;
    assert_auth_failed(&err, APP_USER, "signature mismatch");

    // Signed for another cluster.
    let other_host = sign_token(
        "zyxwvutsrqponmlkjihgfedcba.dsql.us-east-1.on.aws",
        emu.region(),
        ACTION_CONNECT,
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY,
        None,
        SystemTime::now(),
        900,
    );
    let mut s = tls_stream(&emu, &pki).await;
    let err = login_refused(&mut s, APP_USER, &other_host).await;
    assert_auth_failed(&err, APP_USER, "wrong host");

    // A plain password is a malformed token.
    let mut s = tls_stream(&emu, &pki).await;
    let err = login_refused(&mut s, APP_USER, "app-secret").await;
    assert_auth_failed(&err, APP_USER, "malformed");

    // With session credentials and parameters shuffled, still fine.
    let with_session = sign_token(
        emu.cluster_host(),
        emu.region(),
        ACTION_CONNECT,
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY,
        Some("FwoGZXIvYXdzEXAMPLE//session+token="),
        SystemTime::now(),
        900,
    );
    let (host, query) = with_session.split_once("/?").expect("token shape");
    let mut parts: Vec<&str> = query.split('&').collect();
    parts.rotate_left(3);
    let shuffled = format!("{host}/?{}", parts.join("&"));
    let mut s = tls_stream(&emu, &pki).await;
    login(&mut s, APP_USER, &shuffled)
        .await
        .unwrap_or_else(|e| panic!("session-token login refused: {e:?}"));
    assert_eq!(current_user(&mut s).await, APP_USER);

    let logs = emu.logs();
    assert!(
        logs.contains("reason=\"wrong_action\"") || logs.contains("reason=wrong_action"),
        "{logs}"
    );
    assert!(
        !logs.contains(good.rsplit_once('=').expect("sig").1),
        "{logs}"
    );
}

#[tokio::test]
async fn tls_is_required_and_needs_sni() {
    let pg = upstream();
    let pki = TestPki::new();
    let emu = EmulatorProcess::start(EmulatorOptions::new(&pg, &pki));

    // Plaintext StartupMessage: FATAL 08P01, then close.
    let mut tcp = TcpStream::connect(emu.addr()).await.expect("connect");
    wire::send(&mut tcp, &wire::startup_v3(APP_USER, "postgres"))
        .await
        .expect("send startup");
    let err = fatal_then_close(&mut tcp, Vec::new()).await;
    assert_eq!(err.code(), Some("08P01"), "{err:?}");
    assert!(
        err.message()
            .unwrap_or_default()
            .contains("SSL/TLS is required"),
        "{err:?}"
    );

    // A ClientHello without SNI fails the handshake.
    let mut no_sni = (*pki.rustls_client_config()).clone();
    no_sni.enable_sni = false;
    let res = emu.tls_connect(Arc::new(no_sni), emu.cluster_host()).await;
    assert!(res.is_err(), "handshake without SNI must fail");
    assert!(emu.wait_for_log("no SNI", T), "{}", emu.logs());

    // GSSENCRequest is declined, then SSLRequest works as usual.
    let mut tcp = TcpStream::connect(emu.addr()).await.expect("connect");
    wire::send(&mut tcp, &wire::gssenc_request())
        .await
        .expect("send");
    assert_eq!(
        wire::read_byte(&mut tcp, T).await.expect("answer"),
        Some(b'N')
    );
    wire::send(&mut tcp, &wire::ssl_request())
        .await
        .expect("send");
    assert_eq!(
        wire::read_byte(&mut tcp, T).await.expect("answer"),
        Some(b'S')
    );
    let name = ServerName::try_from(emu.cluster_host().to_owned()).expect("name");
    let mut s = TlsConnector::from(pki.rustls_client_config())
        .connect(name, tcp)
        .await
        .expect("TLS after GSSENC refusal");
    login(&mut s, APP_USER, &emu.token(APP_USER))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));

    // PostgreSQL 17 direct TLS with ALPN "postgresql".
    let mut direct = (*pki.rustls_client_config()).clone();
    direct.alpn_protocols = vec![b"postgresql".to_vec()];
    let tcp = TcpStream::connect(emu.addr()).await.expect("connect");
    let name = ServerName::try_from(emu.cluster_host().to_owned()).expect("name");
    let mut s = TlsConnector::from(Arc::new(direct))
        .connect(name, tcp)
        .await
        .expect("direct TLS");
    login(&mut s, ADMIN_USER, &emu.token(ADMIN_USER))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(current_user(&mut s).await, ADMIN_USER);

    // Direct TLS without ALPN is refused after the handshake.
    let tcp = TcpStream::connect(emu.addr()).await.expect("connect");
    let name = ServerName::try_from(emu.cluster_host().to_owned()).expect("name");
    let mut s = TlsConnector::from(pki.rustls_client_config())
        .connect(name, tcp)
        .await
        .expect("direct TLS handshake");
    let err = fatal_then_close(&mut s, Vec::new()).await;
    assert_eq!(err.code(), Some("08P01"), "{err:?}");
    assert!(
        err.message().unwrap_or_default().contains("ALPN"),
        "{err:?}"
    );
}

#[tokio::test]
async fn refused_startup_parameter_is_an_error() {
    let pg = upstream();
    let pki = TestPki::new();
    let emu = EmulatorProcess::start(EmulatorOptions::new(&pg, &pki));

    let mut s = tls_stream(&emu, &pki).await;
    let startup = wire::startup_message(
        wire::PROTOCOL_3_0,
        &[
            ("user", APP_USER),
            ("database", "postgres"),
            ("default_transaction_read_only", "on"),
        ],
    );
    wire::send(&mut s, &startup).await.expect("send startup");
    let err = fatal_then_close(&mut s, Vec::new()).await;
    assert_eq!(err.code(), Some("08P01"), "{err:?}");
    assert_eq!(
        err.message(),
        Some("unsupported startup parameter: default_transaction_read_only")
    );

    // Other parameters are forwarded to the upstream.
    let mut s = tls_stream(&emu, &pki).await;
    let startup = wire::startup_message(
        wire::PROTOCOL_3_0,
        &[
            ("user", APP_USER),
            ("database", "postgres"),
            ("application_name", "emulator-test"),
        ],
    );
    wire::send(&mut s, &startup).await.expect("send startup");
    let r = wire::read_message(&mut s, T).await.expect("auth request");
    assert_eq!(r.auth_code(), Some(3), "{r:?}");
    wire::send(&mut s, &password_message(&emu.token(APP_USER)))
        .await
        .expect("send token");
    let startup = wire::read_startup_response(&mut s, T)
        .await
        .expect("startup");
    assert_eq!(
        startup
            .parameters()
            .get("application_name")
            .map(String::as_str),
        Some("emulator-test")
    );
}

#[tokio::test]
async fn connection_rate_limit_refuses_with_53400() {
    let pg = upstream();
    let pki = TestPki::new();
    let emu = EmulatorProcess::start(EmulatorOptions {
        rate_limit: Some((1.0, 2)),
        ..EmulatorOptions::new(&pg, &pki)
    });

    // Three connections back to back: admission is decided at accept time,
    // so the third finds the bucket empty.
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(tls_stream(&emu, &pki).await);
    }
    let mut third = conns.pop().expect("three connections");
    wire::send(&mut third, &wire::startup_v3(APP_USER, "postgres"))
        .await
        .expect("send startup");
    let err = fatal_then_close(&mut third, Vec::new()).await;
    assert_eq!(err.code(), Some("53400"), "{err:?}");

    for mut c in conns {
        login(&mut c, APP_USER, &emu.token(APP_USER))
            .await
            .unwrap_or_else(|e| panic!("admitted connection refused: {e:?}"));
    }

    // The bucket refills at one per second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut again = tls_stream(&emu, &pki).await;
    login(&mut again, APP_USER, &emu.token(APP_USER))
        .await
        .unwrap_or_else(|e| panic!("after refill: {e:?}"));
}

#[tokio::test]
async fn connection_limit_refuses_with_53300() {
    let pg = upstream();
    let pki = TestPki::new();
    let emu = EmulatorProcess::start(EmulatorOptions {
        max_connections: Some(1),
        ..EmulatorOptions::new(&pg, &pki)
    });
    let mut first = tls_stream(&emu, &pki).await;
    login(&mut first, APP_USER, &emu.token(APP_USER))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let mut second = tls_stream(&emu, &pki).await;
    wire::send(&mut second, &wire::startup_v3(APP_USER, "postgres"))
        .await
        .expect("send startup");
    let err = fatal_then_close(&mut second, Vec::new()).await;
    assert_eq!(err.code(), Some("53300"), "{err:?}");
}

/// Runs `sql` and checks it succeeded; its messages up to ReadyForQuery.
async fn query_ok<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    sql: &str,
    emu: &EmulatorProcess,
) -> Vec<BackendMessage> {
    let msgs = wire::simple_query(stream, sql, T)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}\n--- emulator log ---\n{}", emu.logs()));
    assert!(wire::first_error(&msgs).is_none(), "{sql}: {msgs:?}");
    msgs
}

/// The stream ends cleanly (TLS close_notify) with no message at all: how
/// DSQL ends a session at its maximum duration.
async fn closed_without_a_message<S: AsyncRead + Unpin>(stream: &mut S, emu: &EmulatorProcess) {
    let (msgs, err) = wire::read_to_close(stream, T).await;
    assert!(
        msgs.iter().all(|m| m.tag != b'E'),
        "ErrorResponse before close: {msgs:?}\n{}",
        emu.logs()
    );
    assert!(msgs.is_empty(), "{msgs:?}");
    assert!(err.is_none(), "not a clean close: {err:?}\n{}", emu.logs());
}

/// How long the sessions of [`short_session`]'s emulator last.
const MAX_SESSION: Duration = Duration::from_secs(2);

/// An emulator whose sessions last [`MAX_SESSION`] (ended as
/// `session_end`, the default when `None`), and a session logged in on it
/// as [`APP_USER`], with the instant its connection was opened.
async fn short_session(
    pg: &PgServer,
    pki: &TestPki,
    session_end: Option<SessionEnd>,
) -> (
    EmulatorProcess,
    tokio_rustls::client::TlsStream<TcpStream>,
    Instant,
) {
    let emu = EmulatorProcess::start(EmulatorOptions {
        max_session_duration: Some(MAX_SESSION),
        session_end,
        ..EmulatorOptions::new(pg, pki)
    });
    let started = Instant::now();
    let mut s = tls_stream(&emu, pki).await;
    login(&mut s, APP_USER, &emu.token(APP_USER))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    (emu, s, started)
}

#[tokio::test]
async fn session_is_closed_without_a_message_at_the_maximum_duration() {
    let pg = upstream();
    let pki = TestPki::new();
    let (emu, mut s, started) = short_session(&pg, &pki, None).await;
    assert_eq!(current_user(&mut s).await, APP_USER);

    // Idle until the emulator ends the session.
    closed_without_a_message(&mut s, &emu).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(10),
        "closed after {elapsed:?}"
    );
    assert!(emu.wait_for_log("fatal_sent=false", T), "{}", emu.logs());
    assert!(
        emu.logs().contains("max_session_duration"),
        "{}",
        emu.logs()
    );
}

#[tokio::test]
async fn session_end_fatal_sends_57p01_at_the_maximum_duration() {
    let pg = upstream();
    let pki = TestPki::new();
    let (emu, mut s, started) = short_session(&pg, &pki, Some(SessionEnd::Fatal)).await;
    assert_eq!(current_user(&mut s).await, APP_USER);

    // Idle until the emulator ends the session.
    let (msgs, _) = wire::read_to_close(&mut s, T).await;
    let elapsed = started.elapsed();
    let err = msgs
        .iter()
        .find_map(BackendMessage::error_fields)
        .unwrap_or_else(|| panic!("no FATAL before close: {msgs:?}\n{}", emu.logs()));
    assert_eq!(err.severity_v(), Some("FATAL"), "{err:?}");
    assert!(
        matches!(err.code(), Some("57P01") | Some("08006")),
        "{err:?}"
    );
    assert!(
        err.message()
            .unwrap_or_default()
            .contains("maximum session duration"),
        "{err:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(1900) && elapsed < Duration::from_secs(10),
        "closed after {elapsed:?}"
    );
    assert!(emu.wait_for_log("fatal_sent=true", T), "{}", emu.logs());
    assert!(
        emu.logs().contains("max_session_duration"),
        "{}",
        emu.logs()
    );
}

#[tokio::test]
async fn transaction_running_at_the_maximum_duration_finishes_first() {
    let pg = upstream();
    pg.superuser_sql(&format!(
        "create table session_end (n int); grant all on session_end to {APP_USER}"
    ));
    let pki = TestPki::new();
    let (emu, mut s, started) = short_session(&pg, &pki, None).await;
    query_ok(&mut s, "begin", &emu).await;
    query_ok(&mut s, "insert into session_end values (1)", &emu).await;

    // Idle in the transaction past the deadline: the session stays open.
    tokio::time::sleep((MAX_SESSION + Duration::from_secs(1)).saturating_sub(started.elapsed()))
        .await;
    query_ok(&mut s, "insert into session_end values (2)", &emu).await;
    let commit = query_ok(&mut s, "commit", &emu).await;
    let tag = commit.iter().find_map(BackendMessage::command_tag);
    assert_eq!(tag.as_deref(), Some("COMMIT"), "{commit:?}");
    assert_eq!(
        commit.last().and_then(BackendMessage::ready_status),
        Some(b'I')
    );

    // Back outside the transaction, the session ends right away.
    let committed = Instant::now();
    closed_without_a_message(&mut s, &emu).await;
    assert!(
        committed.elapsed() < Duration::from_secs(5),
        "closed {:?} after COMMIT",
        committed.elapsed()
    );
    assert!(
        emu.wait_for_log("waited_for_transaction=true", T),
        "{}",
        emu.logs()
    );

    // The commit is visible to a new session.
    let mut v = tls_stream(&emu, &pki).await;
    login(&mut v, APP_USER, &emu.token(APP_USER))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let msgs = query_ok(&mut v, "select count(*) from session_end", &emu).await;
    assert_eq!(wire::rows(&msgs), vec![vec![Some("2".to_owned())]]);
}

#[tokio::test]
async fn statement_running_at_the_maximum_duration_is_answered_first() {
    let pg = upstream();
    let pki = TestPki::new();
    let (emu, mut s, started) = short_session(&pg, &pki, None).await;

    // In flight from before the deadline until a second after it.
    let sleep = (MAX_SESSION + Duration::from_secs(1)).saturating_sub(started.elapsed());
    let msgs = query_ok(
        &mut s,
        &format!("select pg_sleep({})", sleep.as_secs_f64()),
        &emu,
    )
    .await;
    assert_eq!(wire::rows(&msgs).len(), 1, "{msgs:?}");
    closed_without_a_message(&mut s, &emu).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        started.elapsed()
    );
}

/// The message Aurora DSQL sends with SQLSTATE 40001 for a data conflict.
const OC000: &str = "change conflicts with another transaction, please retry: (OC000)";
/// ... and for a catalog conflict.
const OC001: &str = "schema has been updated by another transaction, please retry: (OC001)";

/// A one-row counter table `occ` the app role may update, and an emulator
/// injecting a conflict at every `every`th commit point (`kind`, or the
/// default OC000).
fn conflict_setup(
    pg: &PgServer,
    pki: &TestPki,
    every: u32,
    kind: Option<ConflictKind>,
) -> EmulatorProcess {
    pg.superuser_sql(&format!(
        "create table occ (id int primary key, n int not null); \
         insert into occ values (1, 0); \
         grant all on occ to {APP_USER}"
    ));
    EmulatorProcess::start(EmulatorOptions {
        conflict_every: Some(every),
        conflict_code: kind,
        ..EmulatorOptions::new(pg, pki)
    })
}

/// The counter as the upstream has it (straight from PostgreSQL, not
/// through the emulator: reads would be commit points too).
fn counter(pg: &PgServer) -> i64 {
    let n = pg.superuser_sql("select n from occ where id = 1");
    n.parse().unwrap_or_else(|e| panic!("counter {n:?}: {e}"))
}

/// `result` is `Ok` on odd commit points and the injected OC000 conflict
/// on even ones.
fn check_alternation<T: std::fmt::Debug>(
    what: &str,
    point: u32,
    result: Result<T, tokio_postgres::Error>,
    emu: &EmulatorProcess,
) {
    if point % 2 == 1 {
        if let Err(e) = result {
            panic!(
                "{what}: commit point {point} should succeed: {e:?}\n{}",
                emu.logs()
            );
        }
        return;
    }
    let err = match result {
        Ok(v) => panic!(
            "{what}: commit point {point} should conflict, got {v:?}\n{}",
            emu.logs()
        ),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{what}: not a server error: {err:?}"));
    assert_eq!(db.code().code(), "40001", "{what}: {db:?}");
    assert_eq!(db.severity(), "ERROR", "{what}: {db:?}");
    assert_eq!(db.message(), OC000, "{what}: {db:?}");
    assert!(db.message().contains("(OC000)"), "{what}: {db:?}");
}

#[tokio::test]
async fn injected_conflicts_fail_every_second_autocommit_statement() {
    let pg = upstream();
    let pki = TestPki::new();
    let emu = conflict_setup(&pg, &pki, 2, None);
    let cfg = emu.client_config(APP_USER, &emu.token(APP_USER), "postgres");
    let client = connect_with(&cfg, Some(&pki))
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", emu.logs()));

    // Simple protocol: commit points 1..=6.
    let mut committed = 0;
    let mut point = 0;
    for _ in 0..6 {
        point += 1;
        let result = client
            .simple_query("update occ set n = n + 1 where id = 1")
            .await;
        if result.is_ok() {
            committed += 1;
        }
        check_alternation("simple_query", point, result, &emu);
        // A conflict leaves no trace upstream.
        assert_eq!(counter(&pg), committed, "after commit point {point}");
    }
    assert_eq!(committed, 3);

    // Extended protocol, on the same session (the count goes on): the
    // prepare (Parse/Describe/Sync) has no Execute, so only each
    // Bind/Execute/Sync is a commit point.
    for _ in 0..4 {
        point += 1;
        let result = client
            .execute("update occ set n = n + 1 where id = 1", &[])
            .await;
        if let Ok(rows) = &result {
            assert_eq!(*rows, 1);
            committed += 1;
        }
        check_alternation("execute", point, result, &emu);
        assert_eq!(counter(&pg), committed, "after commit point {point}");
    }
    let stmt = client
        .prepare("update occ set n = n + $1 where id = 1")
        .await
        .unwrap_or_else(|e| panic!("prepare: {e:?}\n{}", emu.logs()));
    for _ in 0..4 {
        point += 1;
        let result = client.execute(&stmt, &[&10i32]).await;
        if result.is_ok() {
            committed += 10;
        }
        check_alternation("execute prepared", point, result, &emu);
        assert_eq!(counter(&pg), committed, "after commit point {point}");
    }
    assert_eq!(committed, 3 + 2 + 20);

    // The session is still in good shape: nothing left open upstream.
    let open = pg.superuser_sql(&format!(
        "select count(*) from pg_stat_activity \
         where usename = '{APP_USER}' and state <> 'idle'"
    ));
    assert_eq!(open, "0");
    assert!(
        emu.wait_for_log("injected an optimistic-concurrency conflict", T),
        "{}",
        emu.logs()
    );
    assert_eq!(
        emu.logs()
            .matches("injected an optimistic-concurrency conflict")
            .count(),
        7,
        "{}",
        emu.logs()
    );
}

#[tokio::test]
async fn injected_conflict_on_commit_rolls_the_transaction_back() {
    let pg = upstream();
    let pki = TestPki::new();
    let emu = conflict_setup(&pg, &pki, 2, None);
    let cfg = emu.client_config(APP_USER, &emu.token(APP_USER), "postgres");
    let mut client = connect_with(&cfg, Some(&pki))
        .await
        .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", emu.logs()));

    let mut committed = 0;
    // BEGIN; UPDATE; COMMIT by hand: only the COMMIT is a commit point.
    for point in 1..=4 {
        client
            .batch_execute("BEGIN")
            .await
            .unwrap_or_else(|e| panic!("BEGIN: {e:?}\n{}", emu.logs()));
        for _ in 0..2 {
            let n = client
                .execute("update occ set n = n + 1 where id = 1", &[])
                .await
                .unwrap_or_else(|e| panic!("UPDATE in a transaction: {e:?}\n{}", emu.logs()));
            assert_eq!(n, 1);
        }
        let result = client.simple_query("COMMIT").await;
        if result.is_ok() {
            committed += 2;
        }
        check_alternation("COMMIT", point, result, &emu);
        assert_eq!(counter(&pg), committed, "after commit point {point}");
    }

    // The same through tokio-postgres's Transaction (COMMIT as sent by a
    // driver), commit points 5..=8.
    for point in 5..=8 {
        let tx = client
            .transaction()
            .await
            .unwrap_or_else(|e| panic!("BEGIN: {e:?}\n{}", emu.logs()));
        tx.execute("update occ set n = n + 100 where id = 1", &[])
            .await
            .unwrap_or_else(|e| panic!("UPDATE in a transaction: {e:?}\n{}", emu.logs()));
        let result = tx.commit().await;
        if result.is_ok() {
            committed += 100;
        }
        check_alternation("Transaction::commit", point, result, &emu);
        assert_eq!(counter(&pg), committed, "after commit point {point}");
    }
    assert_eq!(committed, 2 * 2 + 2 * 100);

    // After a conflicted COMMIT the session is outside a transaction block:
    // an autocommit statement (commit point 9) commits on its own.
    let n = client
        .execute("update occ set n = n + 1000 where id = 1", &[])
        .await
        .unwrap_or_else(|e| panic!("autocommit after conflicts: {e:?}\n{}", emu.logs()));
    assert_eq!(n, 1);
    assert_eq!(counter(&pg), committed + 1000);
}

#[tokio::test]
async fn injected_conflicts_are_exact_dsql_errors_on_the_wire() {
    let pg = upstream();
    let pki = TestPki::new();
    let emu = conflict_setup(&pg, &pki, 1, Some(ConflictKind::Oc001));
    let mut s = tls_stream(&emu, &pki).await;
    login(&mut s, APP_USER, &emu.token(APP_USER))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));

    // Every commit point conflicts: ErrorResponse with exactly DSQL's
    // fields, then ReadyForQuery 'I'.
    let check = |msgs: &[BackendMessage], what: &str| {
        assert_eq!(msgs.len(), 2, "{what}: {msgs:?}");
        let err = msgs[0]
            .error_fields()
            .unwrap_or_else(|| panic!("{what}: {msgs:?}"));
        assert_eq!(
            err.fields,
            vec![
                (b'S', "ERROR".to_owned()),
                (b'V', "ERROR".to_owned()),
                (b'C', "40001".to_owned()),
                (b'M', OC001.to_owned()),
            ],
            "{what}"
        );
        assert_eq!(msgs[1].ready_status(), Some(b'I'), "{what}: {msgs:?}");
    };
    let msgs = wire::simple_query(&mut s, "update occ set n = n + 1", T)
        .await
        .expect("simple query");
    check(&msgs, "simple query");

    let batch = [
        wire::parse("", "update occ set n = n + 1", &[]),
        wire::bind("", "", &[]),
        wire::execute("", 0),
        wire::sync(),
    ]
    .concat();
    wire::send(&mut s, &batch).await.expect("send batch");
    let msgs = wire::read_until(&mut s, b'Z', T).await.expect("batch");
    check(&msgs, "extended batch");
    assert_eq!(counter(&pg), 0);

    // A Flush before Sync takes the batch out of the count: it runs.
    let flushed = [
        wire::parse("", "update occ set n = n + 1", &[]),
        wire::bind("", "", &[]),
        wire::execute("", 0),
        wire::flush(),
    ]
    .concat();
    wire::send(&mut s, &flushed)
        .await
        .expect("send flushed batch");
    let msgs = wire::read_until(&mut s, b'C', T)
        .await
        .expect("answers before Sync");
    assert_eq!(
        msgs.last().and_then(BackendMessage::command_tag).as_deref(),
        Some("UPDATE 1"),
        "{msgs:?}"
    );
    wire::send(&mut s, &wire::sync()).await.expect("send Sync");
    let msgs = wire::read_until(&mut s, b'Z', T).await.expect("Sync");
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(counter(&pg), 1);

    // Transaction control is no commit point; the COMMIT is.
    query_ok(&mut s, "begin", &emu).await;
    let msgs = query_ok(&mut s, "update occ set n = n + 1", &emu).await;
    assert_eq!(
        msgs.last().and_then(BackendMessage::ready_status),
        Some(b'T')
    );
    let msgs = wire::simple_query(&mut s, "commit;", T)
        .await
        .expect("COMMIT");
    check(&msgs, "COMMIT");
    assert_eq!(counter(&pg), 1);
}
