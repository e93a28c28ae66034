//! The proxy's client-facing protocol edges, driven with raw sockets: the
//! startup-phase packets (SSLRequest, GSSENCRequest, CancelRequest,
//! StartupMessage in its many malformed shapes), protocol version
//! negotiation, startup timeouts, the client limit, local TLS (including
//! PostgreSQL 17 direct TLS) and byte-exact passthrough after startup.
//!
//! Expected behaviour is PostgreSQL's unless a comment says otherwise.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsql_proxy_tests::process::process_alive;
use dsql_proxy_tests::wire::{
    self, BackendMessage, ErrorFields, NegotiateProtocolVersion, StartupResponse, XorShift,
    PROTOCOL_3_0, PROTOCOL_3_2,
};
use dsql_proxy_tests::{
    connect_with, free_addr, proxy_toml, AuthMethod, PgOptions, PgServer, ProxyOptions,
    ProxyProcess, Stack, TestPki, APP_DB, APP_USER,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::{SslMode, SslNegotiation};

/// Generous bound for any single exchange with the proxy.
const T: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Helpers.

fn pg_options() -> PgOptions {
    PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    }
}

/// A stack whose proxy has `listen_extra` in `[listen]` and, if given, a
/// different `startup_timeout` than the fixture's 3s.
fn stack_with(listen_extra: Vec<String>, startup_timeout: Option<&str>) -> Stack {
    let pg = PgServer::start(pg_options());
    let listen = free_addr();
    let opts = ProxyOptions {
        listen_extra,
        ..ProxyOptions::default()
    };
    let mut toml = proxy_toml(&pg, listen, &opts);
    if let Some(t) = startup_timeout {
        let default = "startup_timeout = \"3s\"";
        assert!(toml.contains(default), "fixture changed:\n{toml}");
        toml = toml.replace(default, &format!("startup_timeout = \"{t}\""));
    }
    let proxy = ProxyProcess::start_with(&toml, listen);
    Stack { proxy, listen, pg }
}

/// A stack with local TLS on the proxy's listener, certificate for
/// `localhost` from the returned CA.
fn tls_stack() -> (Stack, Arc<TestPki>) {
    tls_stack_with(None)
}

fn tls_stack_with(startup_timeout: Option<&str>) -> (Stack, Arc<TestPki>) {
    let pki = Arc::new(TestPki::new());
    let cert = pki.issue_server(&["localhost"]);
    let stack = stack_with(
        vec![
            format!("tls_cert_file = \"{}\"", cert.cert_path.display()),
            format!("tls_key_file = \"{}\"", cert.key_path.display()),
        ],
        startup_timeout,
    );
    (stack, pki)
}

async fn tcp(stack: &Stack) -> TcpStream {
    let s = tokio::time::timeout(T, TcpStream::connect(stack.listen))
        .await
        .expect("connect to proxy timed out")
        .unwrap_or_else(|e| panic!("connect to proxy: {e}\n{}", logs(stack)));
    s.set_nodelay(true).unwrap();
    s
}

fn logs(stack: &Stack) -> String {
    format!("--- proxy log ---\n{}", stack.proxy.logs())
}

/// Starts a raw session with a StartupMessage of `version` for app/appdb.
async fn raw_session(stack: &Stack, version: u32) -> (TcpStream, StartupResponse) {
    let mut s = tcp(stack).await;
    let packet = wire::startup_message(version, &[("user", APP_USER), ("database", APP_DB)]);
    let resp = wire::startup(&mut s, &packet, T)
        .await
        .unwrap_or_else(|e| panic!("raw startup (version {version:#x}): {e}\n{}", logs(stack)));
    (s, resp)
}

/// Checks a complete 3.x startup response: AuthenticationOk first, then
/// ParameterStatus (with server_version and client_encoding), exactly one
/// BackendKeyData with a secret of `secret_len` bytes, ReadyForQuery 'I'
/// last. NegotiateProtocolVersion, if `negotiate` is set, must come first.
fn check_startup(resp: &StartupResponse, negotiate: bool, secret_len: usize, stack: &Stack) {
    let msgs = &resp.messages;
    let mut i = 0;
    if negotiate {
        assert_eq!(
            msgs[0].tag,
            b'v',
            "NegotiateProtocolVersion must be the first message: {msgs:?}\n{}",
            logs(stack)
        );
        i = 1;
    } else {
        assert!(
            resp.negotiate().is_none(),
            "no NegotiateProtocolVersion expected: {msgs:?}\n{}",
            logs(stack)
        );
    }
    assert_eq!(
        msgs[i].auth_code(),
        Some(0),
        "AuthenticationOk expected after {i} message(s): {msgs:?}\n{}",
        logs(stack)
    );
    let allowed_middle = [b'S', b'K', b'N'];
    for m in &msgs[i + 1..msgs.len() - 1] {
        assert!(
            allowed_middle.contains(&m.tag),
            "unexpected message between AuthenticationOk and ReadyForQuery: {m:?} in {msgs:?}"
        );
    }
    let params = resp.parameters();
    for p in ["server_version", "client_encoding"] {
        assert!(
            params.contains_key(p),
            "ParameterStatus {p} missing: {params:?}"
        );
    }
    assert_eq!(params["client_encoding"], "UTF8");
    let keys: Vec<_> = msgs.iter().filter(|m| m.tag == b'K').collect();
    assert_eq!(keys.len(), 1, "exactly one BackendKeyData: {msgs:?}");
    let (pid, secret) = keys[0].backend_key().expect("BackendKeyData body");
    assert_eq!(
        secret.len(),
        secret_len,
        "cancel secret length (pid {pid}): {msgs:?}"
    );
    assert_eq!(resp.ready_status(), Some(b'I'), "ReadyForQuery 'I' last");
}

/// `select 1` over the simple protocol returns exactly one row "1" with the
/// usual message sequence.
async fn check_select_one<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, stack: &Stack) {
    let msgs = wire::simple_query(s, "select 1", T)
        .await
        .unwrap_or_else(|e| panic!("select 1: {e}\n{}", logs(stack)));
    let tags: String = msgs.iter().map(|m| char::from(m.tag)).collect();
    assert_eq!(tags, "TDCZ", "select 1 messages: {msgs:?}");
    assert_eq!(wire::rows(&msgs), vec![vec![Some("1".to_string())]]);
    assert_eq!(msgs[2].command_tag().as_deref(), Some("SELECT 1"));
    assert_eq!(msgs[3].ready_status(), Some(b'I'));
}

/// Expects the proxy to close `s` cleanly without sending anything (more).
/// The only tolerated error is a TLS close without close_notify
/// (`UnexpectedEof`, which a plain TCP read never returns); a reset or a
/// timeout fails.
async fn expect_silent_close<S: AsyncRead + Unpin>(s: &mut S, what: &str, stack: &Stack) {
    let (bytes, err) = wire::read_raw_to_close(s, T).await;
    assert!(
        bytes.is_empty(),
        "{what}: expected a close without an answer, got {:?} ({bytes:?})\n{}",
        wire::split_messages(&bytes),
        logs(stack)
    );
    if let Some(e) = err {
        assert!(
            e.kind() == std::io::ErrorKind::UnexpectedEof,
            "{what}: expected a clean close, got {e} ({:?})\n{}",
            e.kind(),
            logs(stack)
        );
        eprintln!("{what}: closed with {e}");
    }
}

/// Sends Terminate and expects the proxy to close the connection without
/// sending anything more.
async fn terminate<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, stack: &Stack) {
    wire::send(&mut s, &wire::terminate()).await.unwrap();
    expect_silent_close(&mut s, "after Terminate", stack).await;
}

/// The first message must be a FATAL ErrorResponse with one of `codes`;
/// returns its fields.
fn expect_fatal(msgs: &[BackendMessage], codes: &[&str], what: &str, stack: &Stack) -> ErrorFields {
    let first = msgs.first().unwrap_or_else(|| {
        panic!(
            "{what}: expected an ErrorResponse {codes:?}, the proxy closed without one\n{}",
            logs(stack)
        )
    });
    let fields = first.error_fields().filter(|_| first.tag == b'E');
    let fields = fields.unwrap_or_else(|| {
        panic!(
            "{what}: expected an ErrorResponse {codes:?}, got {msgs:?}\n{}",
            logs(stack)
        )
    });
    assert!(
        fields.code().is_some_and(|c| codes.contains(&c)),
        "{what}: SQLSTATE {:?} not in {codes:?}: {fields:?}\n{}",
        fields.code(),
        logs(stack)
    );
    assert_eq!(fields.severity(), Some("FATAL"), "{what}: {fields:?}");
    assert_eq!(fields.severity_v(), Some("FATAL"), "{what}: {fields:?}");
    assert!(
        fields.message().is_some_and(|m| !m.is_empty()),
        "{what}: message: {fields:?}"
    );
    assert!(
        msgs.iter().all(|m| m.tag == b'E' || m.tag == b'N'),
        "{what}: nothing but the error expected: {msgs:?}"
    );
    fields
}

/// Sends `bytes` on a fresh connection and collects what comes back until
/// the proxy closes.
async fn exchange(stack: &Stack, bytes: &[u8]) -> (Vec<BackendMessage>, Option<std::io::Error>) {
    let mut s = tcp(stack).await;
    wire::send(&mut s, bytes).await.unwrap();
    wire::read_to_close(&mut s, T).await
}

/// Whether a read ended because our own timeout ran out.
fn timed_out(err: &Option<std::io::Error>) -> bool {
    err.as_ref()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
}

fn assert_proxy_alive(stack: &Stack) {
    assert!(
        process_alive(stack.proxy.pid()),
        "the proxy process died\n{}",
        logs(stack)
    );
    assert!(
        !stack.proxy.logs().contains("panicked"),
        "the proxy logged a panic\n{}",
        logs(stack)
    );
}

// ---------------------------------------------------------------------------
// 1-2. Encryption requests without local TLS.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_request_is_declined_and_startup_continues() {
    let stack = Stack::start();
    let mut s = tcp(&stack).await;
    wire::send(&mut s, &wire::gssenc_request()).await.unwrap();
    let answer = wire::read_byte(&mut s, T).await.unwrap();
    assert_eq!(answer, Some(b'N'), "GSSENCRequest answer\n{}", logs(&stack));

    let resp = wire::startup(&mut s, &wire::startup_v3(APP_USER, APP_DB), T)
        .await
        .unwrap_or_else(|e| panic!("startup after GSSENC 'N': {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    check_select_one(&mut s, &stack).await;
    terminate(s, &stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_request_without_local_tls_is_declined_and_plaintext_startup_works() {
    let stack = Stack::start();
    let mut s = tcp(&stack).await;
    wire::send(&mut s, &wire::ssl_request()).await.unwrap();
    let answer = wire::read_byte(&mut s, T).await.unwrap();
    assert_eq!(answer, Some(b'N'), "SSLRequest answer\n{}", logs(&stack));

    let resp = wire::startup(&mut s, &wire::startup_v3(APP_USER, APP_DB), T)
        .await
        .unwrap_or_else(|e| panic!("startup after SSL 'N': {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    check_select_one(&mut s, &stack).await;
    terminate(s, &stack).await;

    // libpq's gssencmode=prefer + sslmode=prefer order: GSSENC, then SSL,
    // both declined, then plaintext.
    let mut s = tcp(&stack).await;
    wire::send(&mut s, &wire::gssenc_request()).await.unwrap();
    assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'N'));
    wire::send(&mut s, &wire::ssl_request()).await.unwrap();
    assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'N'));
    let resp = wire::startup(&mut s, &wire::startup_v3(APP_USER, APP_DB), T)
        .await
        .unwrap_or_else(|e| panic!("startup after GSSENC+SSL 'N': {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    check_select_one(&mut s, &stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_ssl_request_after_n_is_rejected() {
    let stack = Stack::start();
    // PostgreSQL answers one SSLRequest; a second one is not a special
    // packet any more and fails as protocol 1234.5679 (FATAL 0A000).
    let mut s = tcp(&stack).await;
    wire::send(&mut s, &wire::ssl_request()).await.unwrap();
    assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'N'));
    wire::send(&mut s, &wire::ssl_request()).await.unwrap();
    let (bytes, err) = wire::read_raw_to_close(&mut s, T).await;
    let (msgs, _) = wire::split_messages(&bytes);
    assert!(
        bytes.first() != Some(&b'N'),
        "the second SSLRequest was answered with 'N' again (bytes {bytes:?}, read error \
         {err:?}); PostgreSQL rejects it with FATAL 0A000\n{}",
        logs(&stack)
    );
    expect_fatal(&msgs, &["0A000", "08P01"], "second SSLRequest", &stack);

    // Also after a declined GSSENCRequest in between.
    let mut s = tcp(&stack).await;
    wire::send(&mut s, &wire::ssl_request()).await.unwrap();
    assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'N'));
    wire::send(&mut s, &wire::gssenc_request()).await.unwrap();
    assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'N'));
    wire::send(&mut s, &wire::ssl_request()).await.unwrap();
    let (bytes, err) = wire::read_raw_to_close(&mut s, T).await;
    let (msgs, _) = wire::split_messages(&bytes);
    assert!(
        bytes.first() != Some(&b'N'),
        "SSLRequest after SSL 'N' + GSSENC 'N' answered with 'N' again (bytes {bytes:?}, \
         read error {err:?})\n{}",
        logs(&stack)
    );
    expect_fatal(
        &msgs,
        &["0A000", "08P01"],
        "SSLRequest, GSSENCRequest, SSLRequest",
        &stack,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_pipelined_with_first_query_works() {
    let stack = Stack::start();
    // StartupMessage and Query in one write: the query must not be lost in
    // a startup read buffer.
    let mut s = tcp(&stack).await;
    let mut bytes = wire::startup_v3(APP_USER, APP_DB);
    bytes.extend(wire::query("select 1"));
    wire::send(&mut s, &bytes).await.unwrap();
    let resp = wire::read_startup_response(&mut s, T)
        .await
        .unwrap_or_else(|e| panic!("pipelined startup: {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    let msgs = wire::read_until(&mut s, b'Z', T)
        .await
        .unwrap_or_else(|e| panic!("pipelined query lost: {e}\n{}", logs(&stack)));
    assert_eq!(wire::rows(&msgs), vec![vec![Some("1".to_string())]]);

    // GSSENCRequest + StartupMessage + Query in one write (declining GSS
    // leaves the connection in plaintext, so the buffered bytes are fine).
    let mut s = tcp(&stack).await;
    let mut bytes = wire::gssenc_request();
    bytes.extend(wire::startup_v3(APP_USER, APP_DB));
    bytes.extend(wire::query("select 2"));
    wire::send(&mut s, &bytes).await.unwrap();
    assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'N'));
    let resp = wire::read_startup_response(&mut s, T)
        .await
        .unwrap_or_else(|e| panic!("pipelined GSSENC startup: {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    let msgs = wire::read_until(&mut s, b'Z', T).await.unwrap();
    assert_eq!(wire::rows(&msgs), vec![vec![Some("2".to_string())]]);

    // Startup + Terminate: a clean, immediate goodbye.
    let mut s = tcp(&stack).await;
    let mut bytes = wire::startup_v3(APP_USER, APP_DB);
    bytes.extend(wire::terminate());
    wire::send(&mut s, &bytes).await.unwrap();
    let resp = wire::read_startup_response(&mut s, T).await.unwrap();
    check_startup(&resp, false, 4, &stack);
    expect_silent_close(&mut s, "startup + Terminate", &stack).await;
    assert_proxy_alive(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_startup_errors_and_parameters_pass_through() {
    let stack = Stack::start();

    // `database` defaults to the user name; PostgreSQL's FATAL comes back.
    for (params, code, what) in [
        (
            vec![("user", APP_USER)],
            "3D000",
            "database defaults to user",
        ),
        (
            vec![("user", APP_USER), ("database", "no_such_db")],
            "3D000",
            "unknown database",
        ),
        (
            vec![
                ("user", APP_USER),
                ("database", APP_DB),
                ("work_mem", "banana"),
            ],
            "22023",
            "invalid GUC value",
        ),
    ] {
        let (msgs, _) = exchange(&stack, &wire::startup_message(PROTOCOL_3_0, &params)).await;
        assert!(
            msgs.iter().all(|m| m.tag != b'Z'),
            "{what}: session started: {msgs:?}"
        );
        let err = wire::first_error(&msgs)
            .unwrap_or_else(|| panic!("{what}: no ErrorResponse: {msgs:?}\n{}", logs(&stack)));
        assert_eq!(err.code(), Some(code), "{what}: {err:?}");
        assert_eq!(err.severity(), Some("FATAL"), "{what}: {err:?}");
        eprintln!("{what}: {err:?}");
    }

    // Startup GUCs reach the server and its ParameterStatus reaches us.
    let packet = wire::startup_message(
        PROTOCOL_3_0,
        &[
            ("user", APP_USER),
            ("database", APP_DB),
            ("application_name", "edge-test"),
            ("DateStyle", "SQL, DMY"),
            (
                "options",
                "-c search_path=edge,public -c statement_timeout=12345",
            ),
        ],
    );
    let mut s = tcp(&stack).await;
    let resp = wire::startup(&mut s, &packet, T)
        .await
        .unwrap_or_else(|e| panic!("startup with GUCs: {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    let params = resp.parameters();
    assert_eq!(
        params.get("application_name").map(String::as_str),
        Some("edge-test")
    );
    assert_eq!(
        params.get("DateStyle").map(String::as_str),
        Some("SQL, DMY")
    );
    let msgs = wire::simple_query(
        &mut s,
        "select current_setting('search_path'), current_setting('statement_timeout')",
        T,
    )
    .await
    .unwrap();
    assert_eq!(
        wire::rows(&msgs),
        vec![vec![
            Some("edge,public".to_string()),
            Some("12345ms".to_string())
        ]]
    );
    // A ParameterStatus sent mid-session is relayed too.
    let msgs = wire::simple_query(&mut s, "set application_name = 'renamed'", T)
        .await
        .unwrap();
    assert!(
        msgs.iter()
            .filter_map(BackendMessage::parameter_status)
            .any(|(k, v)| k == "application_name" && v == "renamed"),
        "{msgs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_startup_parameter_value_is_accepted_like_postgres() {
    let stack = Stack::start();
    // PostgreSQL does not require startup parameter values to be UTF-8 (old
    // clients send Latin-1 application names); application_name is cleaned
    // by the server ("h?llo" on 15) and the session starts.
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app\0database\0appdb\0application_name\0h\xe9llo\0\0");
    let mut s = tcp(&stack).await;
    let resp = wire::startup(&mut s, &wire::untyped(&body), T)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "a Latin-1 application_name was refused (PostgreSQL accepts it): {e}\n{}",
                logs(&stack)
            )
        });
    check_startup(&resp, false, 4, &stack);
    let app = resp.parameters().get("application_name").cloned();
    assert!(
        app.as_deref()
            .is_some_and(|a| a.starts_with('h') && a.ends_with("llo")),
        "application_name {app:?}"
    );
    check_select_one(&mut s, &stack).await;
}

// ---------------------------------------------------------------------------
// 3-4. Protocol versions and options.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_gets_32_byte_cancel_secret_without_negotiation() {
    let stack = Stack::start();
    let (mut s, resp) = raw_session(&stack, PROTOCOL_3_2).await;
    check_startup(&resp, false, 32, &stack);
    check_select_one(&mut s, &stack).await;

    // 3.0 on the same proxy still gets the 4-byte secret.
    let (mut s30, resp) = raw_session(&stack, PROTOCOL_3_0).await;
    check_startup(&resp, false, 4, &stack);
    check_select_one(&mut s30, &stack).await;
    terminate(s, &stack).await;
    terminate(s30, &stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_minor_version_and_protocol_options_are_negotiated() {
    let stack = Stack::start();

    // 3.5 with an unknown _pq_ option: the server offers 3.2 and names the
    // option, then carries on at 3.2.
    let packet = wire::startup_message(
        wire::protocol_version(3, 5),
        &[
            ("user", APP_USER),
            ("_pq_.test_option", "1"),
            ("database", APP_DB),
        ],
    );
    let mut s = tcp(&stack).await;
    let resp = wire::startup(&mut s, &packet, T)
        .await
        .unwrap_or_else(|e| panic!("3.5 startup: {e}\n{}", logs(&stack)));
    check_startup(&resp, true, 32, &stack);
    let npv = NegotiateProtocolVersion::parse(&resp.messages[0]).unwrap();
    assert_eq!(
        npv,
        NegotiateProtocolVersion {
            newest_minor_version: PROTOCOL_3_2,
            unrecognized_options: vec!["_pq_.test_option".into()],
        },
        "raw body: {:?}",
        resp.messages[0].body
    );
    check_select_one(&mut s, &stack).await;
    terminate(s, &stack).await;

    // 3.5 without options: negotiation for the version alone.
    let packet = wire::startup_message(
        wire::protocol_version(3, 5),
        &[("user", APP_USER), ("database", APP_DB)],
    );
    let mut s = tcp(&stack).await;
    let resp = wire::startup(&mut s, &packet, T)
        .await
        .unwrap_or_else(|e| panic!("3.5 startup without options: {e}\n{}", logs(&stack)));
    check_startup(&resp, true, 32, &stack);
    let npv = NegotiateProtocolVersion::parse(&resp.messages[0]).unwrap();
    assert_eq!(npv.newest_minor_version, PROTOCOL_3_2);
    assert!(npv.unrecognized_options.is_empty(), "{npv:?}");
    check_select_one(&mut s, &stack).await;

    // 3.0 with an option: the version is fine, the option is not.
    let packet = wire::startup_message(
        PROTOCOL_3_0,
        &[("user", APP_USER), ("database", APP_DB), ("_pq_.x", "y")],
    );
    let mut s = tcp(&stack).await;
    let resp = wire::startup(&mut s, &packet, T)
        .await
        .unwrap_or_else(|e| panic!("3.0 startup with _pq_.x: {e}\n{}", logs(&stack)));
    check_startup(&resp, true, 4, &stack);
    let npv = NegotiateProtocolVersion::parse(&resp.messages[0]).unwrap();
    assert_eq!(
        npv,
        NegotiateProtocolVersion {
            newest_minor_version: PROTOCOL_3_0,
            unrecognized_options: vec!["_pq_.x".into()],
        }
    );
    check_select_one(&mut s, &stack).await;

    // The _pq_ option never reaches the server as a GUC.
    let msgs = wire::simple_query(&mut s, "select current_setting('_pq_.x', true)", T)
        .await
        .unwrap();
    assert_eq!(wire::rows(&msgs), vec![vec![None]], "{msgs:?}");
}

// ---------------------------------------------------------------------------
// 5-6. Unsupported versions and bad lengths.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_major_versions_get_error_response() {
    let stack = Stack::start();
    for (major, minor) in [(2, 0), (4, 0), (1, 0), (9999, 1)] {
        let packet = wire::startup_message(
            wire::protocol_version(major, minor),
            &[("user", APP_USER), ("database", APP_DB)],
        );
        let (msgs, _) = exchange(&stack, &packet).await;
        let fields = expect_fatal(
            &msgs,
            &["0A000", "08P01"],
            &format!("protocol {major}.{minor}"),
            &stack,
        );
        eprintln!("protocol {major}.{minor}: {fields:?}");
    }
    assert_proxy_alive(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_packet_length_out_of_range_gets_protocol_violation() {
    let stack = Stack::start();
    // Only the length word is sent: the proxy must judge it without waiting
    // for a body (and there is no unread data to turn its close into a RST).
    for len in [
        20_000i32,
        10_001,
        1_000_000,
        i32::MAX,
        7,
        4,
        1,
        0,
        -1,
        i32::MIN,
    ] {
        let (msgs, err) = exchange(&stack, &len.to_be_bytes()).await;
        let fields = expect_fatal(
            &msgs,
            &["08P01"],
            &format!("startup length {len} (read error: {err:?})"),
            &stack,
        );
        eprintln!("length {len}: {fields:?}");
    }
    // The largest allowed packet is accepted: pad a real startup packet to
    // exactly 10,000 bytes with an extra parameter.
    let base = wire::startup_v3(APP_USER, APP_DB).len();
    let pad = 10_000 - base - "application_name".len() - 2;
    let name = "x".repeat(pad);
    let packet = wire::startup_message(
        PROTOCOL_3_0,
        &[
            ("user", APP_USER),
            ("database", APP_DB),
            ("application_name", &name),
        ],
    );
    assert_eq!(packet.len(), 10_000);
    let mut s = tcp(&stack).await;
    let resp = wire::startup(&mut s, &packet, T)
        .await
        .unwrap_or_else(|e| panic!("10,000-byte startup packet: {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    assert_proxy_alive(&stack);
}

// ---------------------------------------------------------------------------
// 7. Malformed input.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_without_user_is_rejected_with_28000() {
    let stack = Stack::start();
    for params in [
        vec![("database", APP_DB)],
        vec![],
        vec![("user", ""), ("database", APP_DB)],
    ] {
        let packet = wire::startup_message(PROTOCOL_3_0, &params);
        let (msgs, _) = exchange(&stack, &packet).await;
        let fields = expect_fatal(&msgs, &["28000"], &format!("params {params:?}"), &stack);
        assert_eq!(
            fields.message(),
            Some("no PostgreSQL user name specified in startup packet"),
            "{fields:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_with_bad_layout_gets_protocol_violation() {
    let stack = Stack::start();
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("no terminator", b"user\0app\0database\0appdb".to_vec()),
        ("no final NUL", b"user\0app\0database\0appdb\0".to_vec()),
        ("name without value", b"user\0app\0database\0\0".to_vec()),
        ("bytes after terminator", b"user\0app\0\0junk\0".to_vec()),
    ];
    for (what, tail) in bodies {
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(&tail);
        let (msgs, _) = exchange(&stack, &wire::untyped(&body)).await;
        expect_fatal(&msgs, &["08P01"], what, &stack);
    }
    // An SSLRequest with a body, and a CancelRequest without a secret.
    let mut ssl_long = wire::SSL_REQUEST_CODE.to_be_bytes().to_vec();
    ssl_long.extend_from_slice(&[0, 0, 0, 0]);
    let (msgs, _) = exchange(&stack, &wire::untyped(&ssl_long)).await;
    expect_fatal(&msgs, &["08P01"], "12-byte SSLRequest", &stack);
    assert_proxy_alive(&stack);
}

/// One malformed opening. `Ok` names what the proxy did (for the tally);
/// `Err` describes a violation.
async fn malformed_case(
    listen: std::net::SocketAddr,
    i: usize,
    rng: &mut XorShift,
) -> Result<String, String> {
    let mut s = TcpStream::connect(listen)
        .await
        .map_err(|e| format!("case {i}: connect: {e}"))?;
    let startup = wire::startup_v3(APP_USER, APP_DB);
    // What the proxy must answer: `Some(codes)` = a FATAL ErrorResponse with
    // one of them; `None` = an ErrorResponse or a close (no hang either way);
    // `Some(&[])` = close without sending anything.
    let (desc, bytes, half_close, expect): (String, Vec<u8>, bool, Option<&[&str]>) = match i % 10 {
        0 => {
            let mut b = rng.bytes(64);
            if b[0] == 0x16 {
                b[0] = 0x17;
            }
            ("64 random bytes".into(), b, true, None)
        }
        1 => {
            // Truncated startup, then an abrupt close: nothing to read.
            let cut = 1 + rng.below(startup.len() - 1);
            let _ = s.write_all(&startup[..cut]).await;
            drop(s);
            return Ok("truncated, closed by us".into());
        }
        2 => {
            let len = [20_000i32, 10_001, 0x7fff_ffff, 1 << 20][rng.below(4)];
            (
                format!("length {len}"),
                len.to_be_bytes().to_vec(),
                false,
                Some(&["08P01"]),
            )
        }
        3 => {
            let len = [0i32, 1, 4, 7, -1, -100_000][rng.below(6)];
            (
                format!("length {len}"),
                len.to_be_bytes().to_vec(),
                false,
                Some(&["08P01"]),
            )
        }
        4 => {
            // A well-sized startup packet whose last byte is not NUL.
            let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
            body.extend_from_slice(b"user\0app\0database\0appdb");
            let n = rng.below(8);
            body.extend(rng.bytes(n).into_iter().map(|b| b | 1));
            (
                "startup without terminator".into(),
                wire::untyped(&body),
                false,
                Some(&["08P01"]),
            )
        }
        5 => (
            "startup without user".into(),
            wire::startup_message(PROTOCOL_3_0, &[("database", APP_DB)]),
            false,
            Some(&["28000"]),
        ),
        6 => {
            if rng.below(2) == 0 {
                // Well-formed cancel for a key nobody holds.
                let pid = rng.next_u64() as i32;
                let n = if rng.below(2) == 0 { 4 } else { 32 };
                let secret = rng.bytes(n);
                (
                    "unknown cancel key".into(),
                    wire::cancel_request(pid, &secret),
                    false,
                    Some(&[]),
                )
            } else {
                let mut body = wire::CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
                body.extend_from_slice(&rng.bytes(4));
                (
                    "cancel without secret".into(),
                    wire::untyped(&body),
                    false,
                    None,
                )
            }
        }
        7 => {
            // SSLRequest, declined, then garbage.
            let _ = s.write_all(&wire::ssl_request()).await;
            match wire::read_byte(&mut s, T).await {
                Ok(Some(b'N')) => {}
                other => return Err(format!("case {i}: SSLRequest answer {other:?}")),
            }
            let n = 1 + rng.below(40);
            let mut b = rng.bytes(n);
            if b[0] == 0x16 {
                b[0] = 0;
            }
            ("garbage after SSL 'N'".into(), b, true, None)
        }
        8 => {
            // Typed frontend messages where a startup packet belongs.
            let msg = match rng.below(3) {
                0 => wire::query("select 1"),
                1 => wire::terminate(),
                _ => wire::parse("", "select 1", &[]),
            };
            (
                format!("typed message {:?} first", char::from(msg[0])),
                msg,
                false,
                Some(&["08P01"]),
            )
        }
        _ => {
            if rng.below(2) == 0 {
                // Something that looks like a TLS record, without local TLS.
                let mut b = vec![0x16, 0x03, 0x01];
                b.extend(rng.bytes(40));
                ("fake TLS record".into(), b, true, None)
            } else {
                // Invalid UTF-8 in a parameter value.
                let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
                body.extend_from_slice(b"user\0\xff\xfe\0\0");
                (
                    "invalid UTF-8 user".into(),
                    wire::untyped(&body),
                    true,
                    None,
                )
            }
        }
    };
    if let Err(e) = s.write_all(&bytes).await {
        // The proxy may already have answered and closed; that is fine for
        // the lenient cases, checked below for the strict ones.
        if expect.is_none() {
            return Ok(format!("{desc}: write failed ({:?})", e.kind()));
        }
        return Err(format!("case {i} ({desc}): write failed: {e}"));
    }
    if half_close {
        let _ = s.shutdown().await;
    }
    let (msgs, err) = wire::read_to_close(&mut s, T).await;
    if timed_out(&err) {
        return Err(format!(
            "case {i} ({desc}): no answer and no close within {T:?}: {msgs:?}"
        ));
    }
    let outcome = match msgs.first() {
        None => format!("{desc}: closed ({:?})", err.as_ref().map(|e| e.kind())),
        Some(m) => format!(
            "{desc}: {} {}",
            char::from(m.tag),
            m.sqlstate().unwrap_or_default()
        ),
    };
    match expect {
        None => match msgs.first() {
            None => Ok(outcome),
            Some(m) if m.tag == b'E' => Ok(outcome),
            Some(_) => Err(format!("case {i} ({desc}): unexpected answer {msgs:?}")),
        },
        Some([]) => {
            if msgs.is_empty() {
                Ok(outcome)
            } else {
                Err(format!("case {i} ({desc}): expected silence, got {msgs:?}"))
            }
        }
        Some(codes) => match msgs.first() {
            Some(m)
                if m.tag == b'E'
                    && m.sqlstate().is_some_and(|c| codes.contains(&c.as_str()))
                    && m.error_fields().unwrap().severity() == Some("FATAL") =>
            {
                Ok(outcome)
            }
            _ => Err(format!(
                "case {i} ({desc}): expected FATAL {codes:?}, got {msgs:?} (read error {err:?})"
            )),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_survives_200_malformed_openings() {
    let stack = Stack::start();
    let listen = stack.listen;
    let mut failures = Vec::new();
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    let started = Instant::now();
    for batch in 0..10usize {
        let mut tasks = Vec::new();
        for j in 0..20usize {
            let i = batch * 20 + j;
            tasks.push(tokio::spawn(async move {
                let mut rng = XorShift::new(0x5eed_0000 + i as u64);
                tokio::time::timeout(Duration::from_secs(30), malformed_case(listen, i, &mut rng))
                    .await
                    .unwrap_or_else(|_| Err(format!("case {i}: hung for 30s")))
            }));
        }
        for t in tasks {
            match t.await.expect("case task panicked") {
                Ok(outcome) => *tally.entry(outcome).or_default() += 1,
                Err(e) => failures.push(e),
            }
        }
        assert_proxy_alive(&stack);
    }
    eprintln!(
        "200 malformed openings took {:?}; outcomes: {tally:#?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of 200 malformed openings were mishandled:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        logs(&stack)
    );

    // Still serving real clients.
    let client = stack.connect(APP_USER, APP_DB).await;
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let (mut s, resp) = raw_session(&stack, PROTOCOL_3_0).await;
    check_startup(&resp, false, 4, &stack);
    check_select_one(&mut s, &stack).await;
    assert_proxy_alive(&stack);
}

// ---------------------------------------------------------------------------
// 8. Startup timeout.

async fn expect_startup_timeout(mut s: TcpStream, opened: Instant, what: &str, stack: &Stack) {
    let (msgs, err) = wire::read_to_close(&mut s, Duration::from_secs(10)).await;
    let elapsed = opened.elapsed();
    assert!(
        !timed_out(&err),
        "{what}: the proxy neither answered nor closed within 10s (startup_timeout 1s)\n{}",
        logs(stack)
    );
    let fields = expect_fatal(&msgs, &["08P01"], what, stack);
    assert!(
        fields.message().unwrap().contains("timeout"),
        "{what}: message should mention the timeout: {fields:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(800),
        "{what}: timed out too early ({elapsed:?})"
    );
    assert!(
        elapsed <= Duration::from_secs(5),
        "{what}: took {elapsed:?} for a 1s startup_timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_clients_time_out_with_error_response() {
    let stack = stack_with(Vec::new(), Some("1s"));

    // Nothing at all.
    let silent = async {
        let s = tcp(&stack).await;
        let opened = Instant::now();
        expect_startup_timeout(s, opened, "silent client", &stack).await;
    };
    // Half a startup packet.
    let half = async {
        let mut s = tcp(&stack).await;
        let opened = Instant::now();
        let packet = wire::startup_v3(APP_USER, APP_DB);
        wire::send(&mut s, &packet[..packet.len() / 2])
            .await
            .unwrap();
        expect_startup_timeout(s, opened, "half a startup packet", &stack).await;
    };
    // Only the first byte of the length word.
    let one_byte = async {
        let mut s = tcp(&stack).await;
        let opened = Instant::now();
        wire::send(&mut s, &[0]).await.unwrap();
        expect_startup_timeout(s, opened, "one byte", &stack).await;
    };
    // SSLRequest declined, then silence: the deadline covers the whole
    // startup, not each packet.
    let after_ssl = async {
        let mut s = tcp(&stack).await;
        let opened = Instant::now();
        wire::send(&mut s, &wire::ssl_request()).await.unwrap();
        assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'N'));
        expect_startup_timeout(s, opened, "silence after SSLRequest", &stack).await;
    };
    tokio::join!(silent, half, one_byte, after_ssl);

    // A trickling client cannot extend its deadline by sending a byte at a
    // time: 20 bytes 100ms apart take 2s, beyond the 1s timeout.
    let mut s = tcp(&stack).await;
    let opened = Instant::now();
    let packet = wire::startup_v3(APP_USER, APP_DB);
    for b in &packet[..20] {
        if s.write_all(std::slice::from_ref(b)).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if opened.elapsed() > Duration::from_millis(1500) {
            break;
        }
    }
    let (msgs, err) = wire::read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(
        opened.elapsed() <= Duration::from_secs(6),
        "trickling client kept the connection for {:?}: {msgs:?} {err:?}",
        opened.elapsed()
    );
    expect_fatal(&msgs, &["08P01"], "trickling client", &stack);

    // A normal client is not affected by the short timeout.
    let (mut s, resp) = raw_session(&stack, PROTOCOL_3_0).await;
    check_startup(&resp, false, 4, &stack);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    check_select_one(&mut s, &stack).await;
    assert_proxy_alive(&stack);
}

// ---------------------------------------------------------------------------
// 9-10. Cancel requests.

/// Sends a CancelRequest on a new connection; the proxy must close it
/// without answering.
async fn send_cancel(stack: &Stack, pid: i32, secret: &[u8]) {
    let c = tcp(stack).await;
    send_cancel_on(c, pid, secret, stack).await;
}

/// Sends a CancelRequest on `c` (plain or TLS) and expects a silent close.
async fn send_cancel_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut c: S,
    pid: i32,
    secret: &[u8],
    stack: &Stack,
) {
    wire::send(&mut c, &wire::cancel_request(pid, secret))
        .await
        .unwrap();
    let what = format!("CancelRequest (pid {pid}, {}-byte secret)", secret.len());
    expect_silent_close(&mut c, &what, stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_unknown_key_is_ignored_silently() {
    let stack = Stack::start();
    let (mut s, resp) = raw_session(&stack, PROTOCOL_3_0).await;
    let (pid, secret) = resp.backend_key().unwrap();
    let (mut s32, resp32) = raw_session(&stack, PROTOCOL_3_2).await;
    let (pid32, secret32) = resp32.backend_key().unwrap();

    // Both sessions run a 2s query while wrong keys are sent.
    wire::send(&mut s, &wire::query("select pg_sleep(2)"))
        .await
        .unwrap();
    wire::send(&mut s32, &wire::query("select pg_sleep(2)"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut wrong = secret.clone();
    wrong[0] ^= 0xff;
    let mut wrong32 = secret32.clone();
    wrong32[31] ^= 0x01;
    send_cancel(&stack, pid.wrapping_add(1), &secret).await; // unknown pid
    send_cancel(&stack, pid, &wrong).await; // wrong secret
    send_cancel(&stack, pid, &[secret.clone(), vec![0; 28]].concat()).await; // padded
    send_cancel(&stack, pid32, &wrong32).await;
    send_cancel(&stack, pid32, &secret32[..4]).await; // 3.0-sized prefix
    send_cancel(&stack, pid32, &secret32[..31]).await;
    send_cancel(&stack, 0, &[0; 4]).await;
    send_cancel(&stack, -1, &[0xff; 256]).await;

    for (name, sess) in [("3.0", &mut s), ("3.2", &mut s32)] {
        let msgs = wire::read_until(sess, b'Z', T).await.unwrap();
        assert!(
            wire::first_error(&msgs).is_none(),
            "{name} session was cancelled by a wrong key: {msgs:?}\n{}",
            logs(&stack)
        );
        assert_eq!(
            msgs.iter().find_map(BackendMessage::command_tag).as_deref(),
            Some("SELECT 1")
        );
        check_select_one(sess, &stack).await;
    }
    assert_proxy_alive(&stack);
}

async fn cancel_running_query(version: u32, secret_len: usize) {
    let stack = Stack::start();
    let (mut s, resp) = raw_session(&stack, version).await;
    check_startup(&resp, false, secret_len, &stack);
    let (pid, secret) = resp.backend_key().unwrap();

    wire::send(&mut s, &wire::query("select pg_sleep(30)"))
        .await
        .unwrap();
    // Let the query start on the server: a cancel for an idle backend is
    // ignored by PostgreSQL.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sent = Instant::now();
    send_cancel(&stack, pid, &secret).await;

    let msgs = wire::read_until(&mut s, b'Z', Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("cancelled query did not end: {e}\n{}", logs(&stack)));
    let err = wire::first_error(&msgs)
        .unwrap_or_else(|| panic!("expected 57014, got {msgs:?}\n{}", logs(&stack)));
    assert_eq!(err.code(), Some("57014"), "{err:?}");
    assert_eq!(err.severity(), Some("ERROR"), "{err:?}");
    assert_eq!(msgs.last().unwrap().ready_status(), Some(b'I'));
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        sent.elapsed()
    );

    // The session carries on, and the same key works again.
    check_select_one(&mut s, &stack).await;
    wire::send(&mut s, &wire::query("select pg_sleep(30)"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    send_cancel(&stack, pid, &secret).await;
    let msgs = wire::read_until(&mut s, b'Z', Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("second cancel: {e}\n{}", logs(&stack)));
    assert_eq!(
        wire::first_error(&msgs).and_then(|e| e.code().map(str::to_owned)),
        Some("57014".into()),
        "{msgs:?}"
    );
    terminate(s, &stack).await;

    // After the session ends its key is dead: no error, no answer.
    send_cancel(&stack, pid, &secret).await;
    assert_proxy_alive(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_valid_key_cancels_running_query_v3_0() {
    cancel_running_query(PROTOCOL_3_0, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_valid_key_cancels_running_query_v3_2() {
    cancel_running_query(PROTOCOL_3_2, 32).await;
}

// ---------------------------------------------------------------------------
// 11. Client limit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_limit_rejects_with_53300_until_a_slot_frees() {
    let stack = stack_with(vec!["max_client_connections = 2".into()], None);
    let (s1, _) = raw_session(&stack, PROTOCOL_3_0).await;
    let (mut s2, resp2) = raw_session(&stack, PROTOCOL_3_0).await;

    let (msgs, _) = exchange(&stack, &wire::startup_v3(APP_USER, APP_DB)).await;
    let fields = expect_fatal(&msgs, &["53300"], "third client", &stack);
    eprintln!("third client: {fields:?}");

    let err = connect_with(&stack.client_config(APP_USER, APP_DB), None)
        .await
        .err()
        .unwrap_or_else(|| panic!("a tokio-postgres client got past the limit"));
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("53300"),
        "tokio-postgres over the limit: {err:?}"
    );

    // Over the limit, nothing is answered before the startup packet.
    let mut early = tcp(&stack).await;
    let got = wire::read_message_or_eof(&mut early, Duration::from_millis(500)).await;
    assert!(
        got.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
        "the proxy answered before the startup packet: {got:?}"
    );
    drop(early);

    // SSLRequest first (declined: no local TLS), then the 53300.
    let mut s = tcp(&stack).await;
    wire::send(&mut s, &wire::ssl_request()).await.unwrap();
    assert_eq!(
        wire::read_byte(&mut s, T).await.unwrap(),
        Some(b'N'),
        "SSLRequest over the limit\n{}",
        logs(&stack)
    );
    wire::send(&mut s, &wire::startup_v3(APP_USER, APP_DB))
        .await
        .unwrap();
    let (msgs, _) = wire::read_to_close(&mut s, T).await;
    expect_fatal(
        &msgs,
        &["53300"],
        "SSLRequest then startup over the limit",
        &stack,
    );

    // The held sessions work, and can still be cancelled while the proxy is
    // full: PostgreSQL serves CancelRequests before its connection limit.
    check_select_one(&mut s2, &stack).await;
    let (pid2, secret2) = resp2.backend_key().unwrap();
    wire::send(&mut s2, &wire::query("select pg_sleep(30)"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    send_cancel(&stack, pid2, &secret2).await;
    let msgs = wire::read_until(&mut s2, b'Z', Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("cancel while at the limit: {e}\n{}", logs(&stack)));
    assert_eq!(
        wire::first_error(&msgs).and_then(|e| e.code().map(str::to_owned)),
        Some("57014".into()),
        "cancel while at the limit: {msgs:?}\n{}",
        logs(&stack)
    );
    check_select_one(&mut s2, &stack).await;

    terminate(s1, &stack).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s3 = loop {
        let mut s = tcp(&stack).await;
        match wire::startup(&mut s, &wire::startup_v3(APP_USER, APP_DB), T).await {
            Ok(resp) => {
                check_startup(&resp, false, 4, &stack);
                break s;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("slot not free yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no slot 10s after closing a session: {e}\n{}", logs(&stack)),
        }
    };
    check_select_one(&mut s3, &stack).await;
    check_select_one(&mut s2, &stack).await;
    assert_proxy_alive(&stack);
}

/// Sessions' backend connections for the app user (the probe, which logs
/// in as the same user, is not one).
fn app_backends(stack: &Stack) -> i64 {
    let sql = format!(
        "select count(*) from pg_stat_activity where usename = '{APP_USER}' \
         and backend_type = 'client backend' and application_name <> 'dsql-proxy-probe'"
    );
    tokio::task::block_in_place(|| stack.pg.superuser_sql(&sql))
        .parse()
        .expect("count(*)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_startups_release_slots_and_backend_connections() {
    let stack = stack_with(vec!["max_client_connections = 2".into()], None);
    // Clients that leave at every point of the startup: right after the
    // startup packet, after the first answer byte, and after SSLRequest.
    for i in 0..12 {
        let mut s = tcp(&stack).await;
        match i % 3 {
            0 => {
                wire::send(&mut s, &wire::startup_v3(APP_USER, APP_DB))
                    .await
                    .unwrap();
            }
            1 => {
                wire::send(&mut s, &wire::startup_v3(APP_USER, APP_DB))
                    .await
                    .unwrap();
                let _ = wire::read_byte(&mut s, T).await;
            }
            _ => {
                wire::send(&mut s, &wire::ssl_request()).await.unwrap();
                let _ = wire::read_byte(&mut s, T).await;
            }
        }
        drop(s);
    }

    // Both slots come back...
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut a, mut b) = loop {
        let mut a = tcp(&stack).await;
        let mut b = tcp(&stack).await;
        let ra = wire::startup(&mut a, &wire::startup_v3(APP_USER, APP_DB), T).await;
        let rb = wire::startup(&mut b, &wire::startup_v3(APP_USER, APP_DB), T).await;
        match (ra, rb) {
            (Ok(_), Ok(_)) => break (a, b),
            (ra, rb) if Instant::now() >= deadline => panic!(
                "slots not released 15s after abandoned startups: {ra:?} / {rb:?}\n{}",
                logs(&stack)
            ),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    check_select_one(&mut a, &stack).await;
    check_select_one(&mut b, &stack).await;

    // ...and no backend connection is left behind: only our two sessions.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = app_backends(&stack);
        if n == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} backend connections for {APP_USER} with 2 live sessions\n{}",
            logs(&stack)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    terminate(a, &stack).await;
    terminate(b, &stack).await;
    // Only what the pool keeps for the next clients (their Terminate came
    // while idle) stays, and the pool counts it.
    let admin = admin_of(&stack);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pooled = dsql_proxy_tests::metrics::scrape(admin).sum("dsql_proxy_pool_idle", &[]);
        let n = app_backends(&stack);
        if n as f64 == pooled && pooled <= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} backend connections left after all sessions closed, {pooled} pooled\n{}",
            logs(&stack)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_proxy_alive(&stack);
}

// ---------------------------------------------------------------------------
// 12. Local TLS.

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

fn alpn_config(pki: &TestPki, alpn: Option<&[u8]>) -> Arc<rustls::ClientConfig> {
    let mut cfg = (*pki.rustls_client_config()).clone();
    cfg.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
    Arc::new(cfg)
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// SSLRequest, 'S', then a TLS handshake verifying `localhost`.
async fn negotiate_tls(stack: &Stack, pki: &TestPki, alpn: Option<&[u8]>) -> ClientTls {
    let mut s = tcp(stack).await;
    wire::send(&mut s, &wire::ssl_request()).await.unwrap();
    let answer = wire::read_byte(&mut s, T).await.unwrap();
    assert_eq!(answer, Some(b'S'), "SSLRequest answer\n{}", logs(stack));
    let connector = tokio_rustls::TlsConnector::from(alpn_config(pki, alpn));
    tokio::time::timeout(T, connector.connect(localhost(), s))
        .await
        .expect("TLS handshake timed out")
        .unwrap_or_else(|e| panic!("TLS handshake after 'S': {e}\n{}", logs(stack)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_after_ssl_request_works() {
    let (stack, pki) = tls_stack();

    let mut tls = negotiate_tls(&stack, &pki, None).await;
    let resp = wire::startup(&mut tls, &wire::startup_v3(APP_USER, APP_DB), T)
        .await
        .unwrap_or_else(|e| panic!("startup inside TLS: {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    check_select_one(&mut tls, &stack).await;
    terminate(tls, &stack).await;

    // libpq 17 sends ALPN with SSLRequest too; 3.2 inside TLS.
    let mut tls = negotiate_tls(&stack, &pki, Some(b"postgresql")).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    let packet = wire::startup_message(PROTOCOL_3_2, &[("user", APP_USER), ("database", APP_DB)]);
    let resp = wire::startup(&mut tls, &packet, T)
        .await
        .unwrap_or_else(|e| panic!("3.2 startup inside TLS: {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 32, &stack);
    check_select_one(&mut tls, &stack).await;

    // GSSENCRequest declined first, then SSL (libpq's default order).
    let mut s = tcp(&stack).await;
    wire::send(&mut s, &wire::gssenc_request()).await.unwrap();
    assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'N'));
    wire::send(&mut s, &wire::ssl_request()).await.unwrap();
    assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'S'));
    let connector = tokio_rustls::TlsConnector::from(pki.rustls_client_config());
    let mut tls = tokio::time::timeout(T, connector.connect(localhost(), s))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("TLS after GSSENC 'N': {e}\n{}", logs(&stack)));
    let resp = wire::startup(&mut tls, &wire::startup_v3(APP_USER, APP_DB), T)
        .await
        .unwrap_or_else(|e| panic!("startup after GSSENC+SSL: {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    check_select_one(&mut tls, &stack).await;

    // Cancel keys issued inside TLS work over a plaintext cancel connection.
    let (pid, secret) = resp.backend_key().unwrap();
    wire::send(&mut tls, &wire::query("select pg_sleep(30)"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    send_cancel(&stack, pid, &secret).await;
    let msgs = wire::read_until(&mut tls, b'Z', Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        wire::first_error(&msgs).and_then(|e| e.code().map(str::to_owned)),
        Some("57014".into()),
        "{msgs:?}"
    );
    assert_proxy_alive(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_works() {
    let (stack, pki) = tls_stack();
    let s = tcp(&stack).await;
    let connector = tokio_rustls::TlsConnector::from(alpn_config(&pki, Some(b"postgresql")));
    let mut tls = tokio::time::timeout(T, connector.connect(localhost(), s))
        .await
        .expect("direct TLS handshake timed out")
        .unwrap_or_else(|e| panic!("direct TLS handshake: {e}\n{}", logs(&stack)));
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    let resp = wire::startup(&mut tls, &wire::startup_v3(APP_USER, APP_DB), T)
        .await
        .unwrap_or_else(|e| panic!("startup over direct TLS: {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    check_select_one(&mut tls, &stack).await;
    terminate(tls, &stack).await;

    // An SSLRequest inside direct TLS is a protocol violation too.
    let s = tcp(&stack).await;
    let mut tls = connector.connect(localhost(), s).await.unwrap();
    wire::send(&mut tls, &wire::ssl_request()).await.unwrap();
    let (msgs, _) = wire::read_to_close(&mut tls, T).await;
    expect_fatal(&msgs, &["08P01"], "SSLRequest inside direct TLS", &stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_without_alpn_is_rejected() {
    let (stack, pki) = tls_stack();
    for alpn in [None, Some(&b"http/1.1"[..])] {
        let s = tcp(&stack).await;
        let connector = tokio_rustls::TlsConnector::from(alpn_config(&pki, alpn));
        let handshake = tokio::time::timeout(T, connector.connect(localhost(), s))
            .await
            .expect("direct TLS handshake timed out");
        let mut tls = match handshake {
            Err(e) => {
                eprintln!("direct TLS with ALPN {alpn:?}: handshake refused: {e}");
                continue;
            }
            Ok(tls) => tls,
        };
        // The handshake went through; the proxy must not start a session.
        let _ = wire::send(&mut tls, &wire::startup_v3(APP_USER, APP_DB)).await;
        let (msgs, err) = wire::read_to_close(&mut tls, T).await;
        eprintln!("direct TLS with ALPN {alpn:?}: {msgs:?} {err:?}");
        assert!(
            !timed_out(&err),
            "direct TLS with ALPN {alpn:?}: no answer and no close: {msgs:?}\n{}",
            logs(&stack)
        );
        assert!(
            msgs.iter().all(|m| m.tag != b'Z' && m.tag != b'R'),
            "direct TLS with ALPN {alpn:?} reached a session: {msgs:?}\n{}",
            logs(&stack)
        );
        if !msgs.is_empty() {
            expect_fatal(&msgs, &["08P01"], "direct TLS without ALPN", &stack);
        }
    }
    assert_proxy_alive(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_startup_pipelined_with_query_and_cancel_over_tls() {
    let (stack, pki) = tls_stack();

    // Startup + Query in one TLS write (direct TLS and SSLRequest TLS): the
    // query must survive the proxy's TLS read buffer.
    let s = tcp(&stack).await;
    let connector = tokio_rustls::TlsConnector::from(alpn_config(&pki, Some(b"postgresql")));
    let mut direct = connector.connect(localhost(), s).await.unwrap();
    let mut bytes = wire::startup_v3(APP_USER, APP_DB);
    bytes.extend(wire::query("select 'direct'"));
    wire::send(&mut direct, &bytes).await.unwrap();
    let resp = wire::read_startup_response(&mut direct, T)
        .await
        .unwrap_or_else(|e| panic!("pipelined startup over direct TLS: {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 4, &stack);
    let msgs = wire::read_until(&mut direct, b'Z', T)
        .await
        .unwrap_or_else(|e| panic!("pipelined query over direct TLS: {e}\n{}", logs(&stack)));
    assert_eq!(wire::rows(&msgs), vec![vec![Some("direct".to_string())]]);

    let mut tls = negotiate_tls(&stack, &pki, None).await;
    let packet = wire::startup_message(PROTOCOL_3_2, &[("user", APP_USER), ("database", APP_DB)]);
    let mut bytes = packet.clone();
    bytes.extend(wire::query("select 'negotiated'"));
    wire::send(&mut tls, &bytes).await.unwrap();
    let resp = wire::read_startup_response(&mut tls, T)
        .await
        .unwrap_or_else(|e| panic!("pipelined startup over TLS: {e}\n{}", logs(&stack)));
    check_startup(&resp, false, 32, &stack);
    let msgs = wire::read_until(&mut tls, b'Z', T).await.unwrap();
    assert_eq!(
        wire::rows(&msgs),
        vec![vec![Some("negotiated".to_string())]]
    );

    // CancelRequest inside TLS (libpq 17 encrypts cancels like the session),
    // after SSLRequest and with direct TLS.
    let (pid, secret) = resp.backend_key().unwrap();
    for how in ["SSLRequest", "direct"] {
        wire::send(&mut tls, &wire::query("select pg_sleep(30)"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        if how == "direct" {
            let s = tcp(&stack).await;
            let c = connector.connect(localhost(), s).await.unwrap();
            send_cancel_on(c, pid, &secret, &stack).await;
        } else {
            let c = negotiate_tls(&stack, &pki, None).await;
            send_cancel_on(c, pid, &secret, &stack).await;
        }
        let msgs = wire::read_until(&mut tls, b'Z', Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("cancel over {how} TLS: {e}\n{}", logs(&stack)));
        assert_eq!(
            wire::first_error(&msgs).and_then(|e| e.code().map(str::to_owned)),
            Some("57014".into()),
            "cancel over {how} TLS: {msgs:?}\n{}",
            logs(&stack)
        );
    }
    check_select_one(&mut tls, &stack).await;
    check_select_one(&mut direct, &stack).await;
    assert_proxy_alive(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_sent_with_ssl_request_is_never_treated_as_encrypted() {
    let (stack, _pki) = tls_stack();
    // A man in the middle could append plaintext after the client's
    // SSLRequest (CVE-2021-23214). It must never become a session.
    let mut s = tcp(&stack).await;
    let mut bytes = wire::ssl_request();
    bytes.extend(wire::startup_v3(APP_USER, APP_DB));
    bytes.extend(wire::query("select 1"));
    wire::send(&mut s, &bytes).await.unwrap();
    let (raw, err) = wire::read_raw_to_close(&mut s, T).await;
    eprintln!("pipelined SSLRequest: {raw:?} {err:?}");
    assert!(
        !timed_out(&err),
        "no close within {T:?} (startup_timeout is 3s): {raw:?}\n{}",
        logs(&stack)
    );
    let rest = match raw.first() {
        Some(b'S') => &raw[1..],
        _ => &raw[..],
    };
    // After 'S' only a TLS alert (0x15) or a plaintext ErrorResponse (what
    // PostgreSQL sends: 08P01 "received unencrypted data after SSL request")
    // may follow.
    match rest.first() {
        None | Some(0x15) => {}
        Some(b'E') => {
            let (msgs, _) = wire::split_messages(rest);
            expect_fatal(&msgs, &["08P01"], "plaintext after SSLRequest", &stack);
        }
        Some(_) => panic!(
            "unexpected answer to SSLRequest + plaintext startup: {raw:?} = {:?}\n{}",
            wire::split_messages(rest),
            logs(&stack)
        ),
    }
    assert_proxy_alive(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_and_silent_tls_clients_time_out() {
    let (stack, pki) = tls_stack_with(Some("1s"));

    // 'S' and then no ClientHello.
    let after_s = async {
        let mut s = tcp(&stack).await;
        let opened = Instant::now();
        wire::send(&mut s, &wire::ssl_request()).await.unwrap();
        assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'S'));
        let (raw, err) = wire::read_raw_to_close(&mut s, Duration::from_secs(10)).await;
        let elapsed = opened.elapsed();
        assert!(
            !timed_out(&err) && elapsed <= Duration::from_secs(5),
            "no ClientHello after 'S': not closed ({elapsed:?}, {raw:?}, {err:?})\n{}",
            logs(&stack)
        );
    };
    // Half a TLS record header (direct TLS), then nothing.
    let partial_hello = async {
        let mut s = tcp(&stack).await;
        let opened = Instant::now();
        wire::send(&mut s, &[0x16, 0x03, 0x01, 0x00]).await.unwrap();
        let (raw, err) = wire::read_raw_to_close(&mut s, Duration::from_secs(10)).await;
        let elapsed = opened.elapsed();
        assert!(
            !timed_out(&err) && elapsed <= Duration::from_secs(5),
            "partial direct-TLS ClientHello: not closed ({elapsed:?}, {raw:?}, {err:?})\n{}",
            logs(&stack)
        );
    };
    // Handshake done, then silence: the timeout error comes inside TLS.
    let silent_tls = async {
        let opened = Instant::now();
        let mut tls = negotiate_tls(&stack, &pki, None).await;
        let (msgs, err) = wire::read_to_close(&mut tls, Duration::from_secs(10)).await;
        let elapsed = opened.elapsed();
        assert!(
            !timed_out(&err),
            "silent TLS client: not closed ({elapsed:?}, {msgs:?})\n{}",
            logs(&stack)
        );
        let fields = expect_fatal(&msgs, &["08P01"], "silent TLS client", &stack);
        assert!(fields.message().unwrap().contains("timeout"), "{fields:?}");
        assert!(elapsed <= Duration::from_secs(5), "took {elapsed:?}");
    };
    tokio::join!(after_s, partial_hello, silent_tls);

    // TLS clients that do finish are fine.
    let mut tls = negotiate_tls(&stack, &pki, None).await;
    let resp = wire::startup(&mut tls, &wire::startup_v3(APP_USER, APP_DB), T)
        .await
        .unwrap();
    check_startup(&resp, false, 4, &stack);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    check_select_one(&mut tls, &stack).await;
    assert_proxy_alive(&stack);
}

fn tls_client_config(stack: &Stack) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("localhost")
        .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .port(stack.listen.port())
        .user(APP_USER)
        .dbname(APP_DB)
        .ssl_mode(SslMode::Require)
        .connect_timeout(Duration::from_secs(10));
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_local_tls_works() {
    let (stack, pki) = tls_stack();

    let client = connect_with(&tls_client_config(&stack), Some(&pki))
        .await
        .unwrap_or_else(|e| panic!("sslmode=require: {e:?}\n{}", logs(&stack)));
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let stmt = client.prepare("select $1::text || 'x'").await.unwrap();
    let row = client.query_one(&stmt, &[&"a"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "ax");

    // sslnegotiation=direct (needs ALPN in the client config).
    let mut cfg = tls_client_config(&stack);
    cfg.ssl_negotiation(SslNegotiation::Direct);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
        (*alpn_config(&pki, Some(b"postgresql"))).clone(),
    );
    let (client, conn) = cfg
        .connect(tls)
        .await
        .unwrap_or_else(|e| panic!("sslnegotiation=direct: {e:?}\n{}", logs(&stack)));
    tokio::spawn(conn);
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // A client that does not trust the proxy's CA is refused by its own
    // verifier.
    let other = TestPki::new();
    connect_with(&tls_client_config(&stack), Some(&other))
        .await
        .expect_err("a certificate from an unknown CA must not verify");
    assert_proxy_alive(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_encryption_request_inside_tls_is_protocol_violation() {
    let (stack, pki) = tls_stack();

    let mut tls = negotiate_tls(&stack, &pki, None).await;
    wire::send(&mut tls, &wire::ssl_request()).await.unwrap();
    let (msgs, err) = wire::read_to_close(&mut tls, T).await;
    expect_fatal(
        &msgs,
        &["08P01"],
        &format!("second SSLRequest (read error {err:?})"),
        &stack,
    );

    let mut tls = negotiate_tls(&stack, &pki, None).await;
    wire::send(&mut tls, &wire::gssenc_request()).await.unwrap();
    let (msgs, err) = wire::read_to_close(&mut tls, T).await;
    expect_fatal(
        &msgs,
        &["08P01"],
        &format!("GSSENCRequest inside TLS (read error {err:?})"),
        &stack,
    );

    // Startup-packet checks apply inside TLS as well.
    let mut tls = negotiate_tls(&stack, &pki, None).await;
    wire::send(&mut tls, &20_000i32.to_be_bytes())
        .await
        .unwrap();
    let (msgs, err) = wire::read_to_close(&mut tls, T).await;
    expect_fatal(
        &msgs,
        &["08P01"],
        &format!("length 20000 inside TLS (read error {err:?})"),
        &stack,
    );
    let mut tls = negotiate_tls(&stack, &pki, None).await;
    wire::send(
        &mut tls,
        &wire::startup_message(wire::protocol_version(2, 0), &[("user", APP_USER)]),
    )
    .await
    .unwrap();
    let (msgs, err) = wire::read_to_close(&mut tls, T).await;
    expect_fatal(
        &msgs,
        &["0A000", "08P01"],
        &format!("protocol 2.0 inside TLS (read error {err:?})"),
        &stack,
    );

    // A second GSSENCRequest in plaintext (after 'N') is not answered with
    // another 'N' forever: PostgreSQL rejects the repeat.
    let mut s = tcp(&stack).await;
    wire::send(&mut s, &wire::gssenc_request()).await.unwrap();
    assert_eq!(wire::read_byte(&mut s, T).await.unwrap(), Some(b'N'));
    wire::send(&mut s, &wire::gssenc_request()).await.unwrap();
    let (msgs, err) = wire::read_to_close(&mut s, T).await;
    expect_fatal(
        &msgs,
        &["08P01"],
        &format!("second GSSENCRequest (read error {err:?})"),
        &stack,
    );
    assert_proxy_alive(&stack);
}

// ---------------------------------------------------------------------------
// 13. Passthrough after ReadyForQuery.

fn tags(msgs: &[BackendMessage]) -> String {
    msgs.iter().map(|m| char::from(m.tag)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_passes_through_unchanged() {
    let stack = Stack::start();
    let (mut s, resp) = raw_session(&stack, PROTOCOL_3_0).await;
    check_startup(&resp, false, 4, &stack);

    // Parse/Bind/Describe/Execute/Sync in one write.
    let mut batch = Vec::new();
    batch.extend(wire::parse("s1", "select $1::int4 + 1 as n", &[23]));
    batch.extend(wire::bind("", "s1", &[Some("41")]));
    batch.extend(wire::describe(b'P', ""));
    batch.extend(wire::execute("", 0));
    batch.extend(wire::sync());
    wire::send(&mut s, &batch).await.unwrap();
    let msgs = wire::read_until(&mut s, b'Z', T).await.unwrap();
    assert_eq!(tags(&msgs), "12TDCZ", "{msgs:?}");
    assert_eq!(wire::rows(&msgs), vec![vec![Some("42".to_string())]]);
    assert_eq!(msgs[4].command_tag().as_deref(), Some("SELECT 1"));
    assert_eq!(msgs[5].ready_status(), Some(b'I'));

    // Describe the named statement: ParameterDescription + RowDescription.
    let mut batch = wire::describe(b'S', "s1");
    batch.extend(wire::sync());
    wire::send(&mut s, &batch).await.unwrap();
    let msgs = wire::read_until(&mut s, b'Z', T).await.unwrap();
    assert_eq!(tags(&msgs), "tTZ", "{msgs:?}");
    assert_eq!(msgs[0].body, [0, 1, 0, 0, 0, 23], "one int4 parameter");

    // NULL parameter, and Flush instead of Sync delivers results early.
    let mut batch = wire::bind("p", "s1", &[None]);
    batch.extend(wire::execute("p", 0));
    batch.extend(wire::flush());
    wire::send(&mut s, &batch).await.unwrap();
    let msgs = wire::read_until(&mut s, b'C', T).await.unwrap();
    assert_eq!(tags(&msgs), "2DC", "{msgs:?}");
    assert_eq!(wire::rows(&msgs), vec![vec![None]]);
    wire::send(&mut s, &wire::sync()).await.unwrap();
    let msgs = wire::read_until(&mut s, b'Z', T).await.unwrap();
    assert_eq!(tags(&msgs), "Z", "{msgs:?}");

    // Row limits: PortalSuspended, then the rest.
    let mut batch = wire::parse("", "select generate_series(1, 3)", &[]);
    batch.extend(wire::bind("", "", &[]));
    batch.extend(wire::execute("", 1));
    batch.extend(wire::execute("", 0));
    batch.extend(wire::sync());
    wire::send(&mut s, &batch).await.unwrap();
    let msgs = wire::read_until(&mut s, b'Z', T).await.unwrap();
    assert_eq!(tags(&msgs), "12DsDDCZ", "{msgs:?}");
    assert_eq!(msgs[6].command_tag().as_deref(), Some("SELECT 2"));

    // An error skips to Sync; the server's error comes through intact.
    let mut batch = wire::parse("", "selec 1", &[]);
    batch.extend(wire::bind("", "", &[]));
    batch.extend(wire::execute("", 0));
    batch.extend(wire::sync());
    wire::send(&mut s, &batch).await.unwrap();
    let msgs = wire::read_until(&mut s, b'Z', T).await.unwrap();
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    let err = msgs[0].error_fields().unwrap();
    assert_eq!(err.code(), Some("42601"), "{err:?}");
    assert_eq!(err.severity(), Some("ERROR"));
    assert!(err.get(b'P').is_some(), "position field kept: {err:?}");

    // Transaction status in ReadyForQuery.
    let msgs = wire::simple_query(&mut s, "begin", T).await.unwrap();
    assert_eq!(msgs.last().unwrap().ready_status(), Some(b'T'));
    let msgs = wire::simple_query(&mut s, "select 1/0", T).await.unwrap();
    assert_eq!(
        wire::first_error(&msgs).unwrap().code(),
        Some("22012"),
        "{msgs:?}"
    );
    assert_eq!(msgs.last().unwrap().ready_status(), Some(b'E'));
    let msgs = wire::simple_query(&mut s, "rollback", T).await.unwrap();
    assert_eq!(msgs.last().unwrap().ready_status(), Some(b'I'));

    // A message trickled one byte per write is reassembled.
    let q = wire::query("select 'trickle'");
    for b in &q {
        s.write_all(std::slice::from_ref(b)).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let msgs = wire::read_until(&mut s, b'Z', T).await.unwrap();
    assert_eq!(wire::rows(&msgs), vec![vec![Some("trickle".to_string())]]);

    // Several messages in one write, and a message bigger than any buffer.
    let big = "x".repeat(1 << 20);
    let mut batch = wire::query("select 1");
    batch.extend(wire::query(&format!("select length('{big}')")));
    batch.extend(wire::query("select repeat('y', 1048576)"));
    wire::send(&mut s, &batch).await.unwrap();
    let mut all = Vec::new();
    for _ in 0..3 {
        all.extend(wire::read_until(&mut s, b'Z', T).await.unwrap());
    }
    let rows = wire::rows(&all);
    assert_eq!(rows.len(), 3, "{}", tags(&all));
    assert_eq!(rows[0][0].as_deref(), Some("1"));
    assert_eq!(rows[1][0].as_deref(), Some("1048576"));
    assert_eq!(rows[2][0].as_deref().map(str::len), Some(1 << 20));
    assert!(rows[2][0].as_deref().unwrap().bytes().all(|b| b == b'y'));

    // Close, then reuse of the closed statement fails with 26000.
    let mut batch = wire::close(b'S', "s1");
    batch.extend(wire::sync());
    batch.extend(wire::bind("", "s1", &[Some("1")]));
    batch.extend(wire::sync());
    wire::send(&mut s, &batch).await.unwrap();
    let mut msgs = wire::read_until(&mut s, b'Z', T).await.unwrap();
    msgs.extend(wire::read_until(&mut s, b'Z', T).await.unwrap());
    assert_eq!(tags(&msgs), "3ZEZ", "{msgs:?}");
    assert_eq!(msgs[2].sqlstate().as_deref(), Some("26000"));

    terminate(s, &stack).await;
    assert_proxy_alive(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_client_still_gets_its_results() {
    let stack = Stack::start();
    // Query, then shut down the write side (like `psql < file` at EOF):
    // PostgreSQL still answers the query before it sees the EOF.
    let (mut s, _) = raw_session(&stack, PROTOCOL_3_0).await;
    wire::send(&mut s, &wire::query("select pg_sleep(0.5), 'late'"))
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let (msgs, err) = wire::read_to_close(&mut s, T).await;
    assert_eq!(
        tags(&msgs),
        "TDCZ",
        "results after a half-close: {msgs:?} (read error {err:?})\n{}",
        logs(&stack)
    );
    assert_eq!(
        wire::rows(&msgs),
        vec![vec![Some(String::new()), Some("late".to_string())]]
    );
    assert!(err.is_none(), "{err:?}");
    assert_proxy_alive(&stack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_flow_in_both_directions_at_once() {
    let stack = Stack::start();
    let (s, _) = raw_session(&stack, PROTOCOL_3_0).await;
    let (mut rd, mut wr) = s.into_split();
    // Far more than the socket and relay buffers hold in either direction:
    // the writer only finishes if responses keep flowing meanwhile.
    const N: usize = 10_000;
    let payload = "z".repeat(1_000);
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        for i in 0..N {
            batch.extend(wire::query(&format!("select {i}, '{payload}'")));
            if batch.len() > 64 * 1024 {
                wr.write_all(&batch).await.unwrap();
                batch.clear();
            }
        }
        wr.write_all(&batch).await.unwrap();
        wr.flush().await.unwrap();
        wr
    });
    let started = Instant::now();
    for i in 0..N {
        let msgs = wire::read_until(&mut rd, b'Z', Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("query {i} of {N}: {e}\n{}", logs(&stack)));
        let rows = wire::rows(&msgs);
        assert_eq!(rows.len(), 1, "query {i}: {msgs:?}");
        assert_eq!(rows[0][0].as_deref(), Some(i.to_string().as_str()));
    }
    let wr = tokio::time::timeout(T, writer)
        .await
        .expect("writer finished")
        .unwrap();
    eprintln!("{N} pipelined queries in {:?}", started.elapsed());
    let mut s = rd.reunite(wr).unwrap();
    check_select_one(&mut s, &stack).await;
    terminate(s, &stack).await;
}

// ---------------------------------------------------------------------------
// No client can take an endpoint down (issue 15).

/// The admin address the fixture gave the stack's proxy.
fn admin_of(stack: &Stack) -> std::net::SocketAddr {
    let config = std::fs::read_to_string(stack.proxy.config_path()).unwrap();
    let admin = config
        .split("[admin]\naddress = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the fixture sets [admin] address");
    admin.parse().unwrap()
}

/// Waits until the monitor has recorded `n` more successful probes.
async fn wait_for_probes(stack: &Stack, n: f64) {
    let admin = admin_of(stack);
    let probes = || {
        dsql_proxy_tests::metrics::scrape(admin)
            .samples
            .iter()
            .filter(|s| s.name == "dsql_proxy_endpoint_latency_seconds_count")
            .map(|s| s.value)
            .sum::<f64>()
    };
    let target = probes() + n;
    let deadline = Instant::now() + T;
    while probes() < target {
        assert!(Instant::now() < deadline, "no probes ran\n{}", logs(stack));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn endpoint_untouched(stack: &Stack) {
    let admin = admin_of(stack);
    let scrape = dsql_proxy_tests::metrics::scrape(admin);
    let failures: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.name == "dsql_proxy_backend_connect_failures_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(
        failures,
        0.0,
        "a connect failure was counted\n{}",
        logs(stack)
    );
    let status = dsql_proxy_tests::metrics::status(admin);
    assert_eq!(status["endpoints"][0]["state"], "up", "{status:#}");
    let logs = stack.proxy.logs();
    assert!(
        !logs.contains("endpoint demoted by a failure on the data path"),
        "the client's bytes demoted the endpoint:\n{logs}"
    );
}

/// A startup packet PostgreSQL would drop silently once the proxy adds its
/// default application_name: the client gets 54000 and no endpoint is
/// touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_packet_too_long_to_forward_is_refused_before_any_endpoint() {
    let pg = PgServer::start(pg_options());
    let listen = free_addr();
    let opts = ProxyOptions {
        backend_extra: vec!["default_application_name = \"added-by-the-proxy\"".into()],
        ..ProxyOptions::default()
    };
    let stack = Stack {
        proxy: ProxyProcess::start_with(&proxy_toml(&pg, listen, &opts), listen),
        listen,
        pg,
    };
    // A 10,000-byte packet (the most a server takes) without an
    // application_name: the proxy's would push it over.
    let base = wire::startup_v3(APP_USER, APP_DB).len();
    let pad = 10_000 - base - "options".len() - 2;
    let options = format!(
        "-c search_path={}",
        "p".repeat(pad - "-c search_path=".len())
    );
    let packet = wire::startup_message(
        PROTOCOL_3_0,
        &[
            ("user", APP_USER),
            ("database", APP_DB),
            ("options", &options),
        ],
    );
    assert_eq!(packet.len(), 10_000);
    let (msgs, _) = exchange(&stack, &packet).await;
    let fields = expect_fatal(&msgs, &["54000"], "oversized forwarded startup", &stack);
    assert!(
        fields
            .message()
            .is_some_and(|m| m.contains("startup packet too long")),
        "{fields:?}"
    );
    endpoint_untouched(&stack);
    // A normal client still gets in.
    let (_s, resp) = raw_session(&stack, PROTOCOL_3_0).await;
    assert_eq!(resp.ready_status(), Some(b'I'));
}

/// A client that breaks the protocol in a way the server answers by
/// hanging up without an ErrorResponse (a Sync longer than the server's
/// limit for it): its session ends, the endpoint is not blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_breaking_the_protocol_does_not_demote_the_endpoint() {
    let stack = stack_with(Vec::new(), None);
    let (mut s, resp) = raw_session(&stack, PROTOCOL_3_0).await;
    assert_eq!(resp.ready_status(), Some(b'I'));
    // Valid framing, but over PostgreSQL's 10,000-byte limit for a Sync.
    let mut sync = vec![b'S'];
    sync.extend_from_slice(&20_004u32.to_be_bytes());
    sync.extend_from_slice(&[0u8; 20_000]);
    let _ = wire::send(&mut s, &sync).await;
    let (_msgs, _err) = wire::read_to_close(&mut s, T).await;
    assert!(
        stack.proxy.wait_for_log("session closed", T),
        "{}",
        logs(&stack)
    );
    // The server closed without an ErrorResponse. Once the monitor has
    // taken two more probe results (the report, if any, was sent before
    // the close was logged) the endpoint is still up and nothing demoted it.
    wait_for_probes(&stack, 2.0).await;
    endpoint_untouched(&stack);
    let log = stack.pg.log_contents();
    assert!(log.contains("invalid message length"), "{log}");
}

/// Client sockets get TCP keepalive, so a client host that vanishes
/// without a FIN does not hold its session (and backend connection) for
/// ever: the kernel shows the keepalive timer on the proxy's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sockets_have_tcp_keepalive() {
    let stack = stack_with(Vec::new(), None);
    let (s, resp) = raw_session(&stack, PROTOCOL_3_0).await;
    assert_eq!(resp.ready_status(), Some(b'I'));
    let client_port = s.local_addr().unwrap().port();
    let filter = format!(
        "( sport = :{} and dport = :{client_port} )",
        stack.listen.port()
    );
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", &filter])
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("timer:(keepalive"), "{text:?}");
    drop(s);
}
