//! Operating the proxy like a sidecar, through the real binary: graceful
//! shutdown on SIGTERM/SIGINT/`POST /quitquitquit` (drain, `min_accept`,
//! `max_drain`, FATAL 57P01, second-signal shortcut, exit 0), the `status`
//! and `healthcheck` commands, per-session log ids and the redacted
//! configuration logged at startup; a drain after a reload.

use std::net::{SocketAddr, TcpStream};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use dsql_proxy_tests::fixture::client_config;
use dsql_proxy_tests::metrics::http;
use dsql_proxy_tests::process::{SIGHUP, SIGINT, SIGTERM};
use dsql_proxy_tests::{
    free_addr, proxy_toml, run_proxy_cmd, wire, AuthMethod, PgOptions, PgServer, ProxyOptions,
    ProxyProcess, APP_DB, APP_PASSWORD, APP_USER,
};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// Liveness bound on top of the configured waits; never a performance check.
const SLACK: Duration = Duration::from_secs(10);

fn server() -> PgServer {
    PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    })
}

/// A proxy for `pg` with a known admin address, `[shutdown]` settings and
/// extra command-line arguments.
struct Proxy {
    process: ProxyProcess,
    listen: SocketAddr,
    admin: SocketAddr,
}

fn start(pg: &PgServer, shutdown: &str, extra_toml: &str, args: &[&str]) -> Proxy {
    let listen = free_addr();
    let admin = free_addr();
    let opts = ProxyOptions {
        // This proxy's [routing] section is appended below.
        routing: Vec::new(),
        ..ProxyOptions::default()
    };
    let mut toml = proxy_toml(pg, listen, &opts);
    let from = toml.find("[admin]").expect("admin section");
    let to = from + toml[from..].find("[backend]").expect("backend section");
    toml.replace_range(from..to, &format!("[admin]\naddress = \"{admin}\"\n"));
    // `extra_toml` continues [routing] and may add [[endpoints]].
    toml.push_str(&format!(
        "[shutdown]\n{shutdown}\n\
         [routing]\nprobe_user = \"{APP_USER}\"\nprobe_database = \"{APP_DB}\"\nprobe_interval = \"250ms\"\n\
         {extra_toml}"
    ));
    let mut process = ProxyProcess::spawn_with_args(&toml, args);
    process.wait_ready(listen, dsql_proxy_tests::proxy::START_TIMEOUT);
    Proxy {
        process,
        listen,
        admin,
    }
}

/// Polls `path` until it answers `want`; the last answer otherwise.
fn wait_http(addr: SocketAddr, path: &str, want: u16) -> (u16, String) {
    let deadline = Instant::now() + SLACK;
    loop {
        let answer = http(addr, "GET", path);
        if answer.0 == want || Instant::now() >= deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client whose connection task's result can be inspected: an idle
/// session hears about a FATAL only there.
async fn connect(listen: SocketAddr) -> (Client, JoinHandle<Result<(), tokio_postgres::Error>>) {
    let (client, conn) = client_config(listen, APP_USER, APP_DB)
        .connect(NoTls)
        .await
        .expect("connect through the proxy");
    (client, tokio::spawn(conn))
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.code()
}

async fn wait_exit(proxy: &mut ProxyProcess, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = proxy.wait_exit(Duration::ZERO) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not exit within {within:?}\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn still_running(proxy: &mut ProxyProcess, for_at_least: Duration) {
    tokio::time::sleep(for_at_least).await;
    assert!(
        proxy.wait_exit(Duration::ZERO).is_none(),
        "the proxy exited early\n{}",
        proxy.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_closes_idle_and_busy_sessions_with_57p01() {
    let pg = server();
    let mut p = start(&pg, "max_drain = \"2s\"", "", &[]);
    let (idle, idle_conn) = connect(p.listen).await;
    idle.simple_query("select 1").await.unwrap();
    let (busy, _busy_conn) = connect(p.listen).await;
    busy.batch_execute("begin; create temp table t (x int); insert into t values (1)")
        .await
        .unwrap();
    let query = tokio::spawn(async move {
        let r = busy.simple_query("select pg_sleep(60)").await;
        (r, busy)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    p.process.send_signal(SIGTERM);
    assert_eq!(
        wait_http(p.admin, "/readyz", 503),
        (503, "draining\n".into())
    );
    assert_eq!(http(p.admin, "GET", "/healthz").0, 200, "liveness stays up");

    let (result, _busy) = tokio::time::timeout(Duration::from_secs(2) + SLACK, query)
        .await
        .expect("the running query ends")
        .unwrap();
    let closed_after = signalled.elapsed();
    let err = result.expect_err("the query is cut off by the shutdown");
    assert_eq!(sqlstate(&err), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        db.message(),
        "terminating connection due to administrator command"
    );
    assert_eq!(db.detail(), Some("dsql-proxy is shutting down"));
    assert_eq!(db.severity(), "FATAL");
    assert!(
        closed_after >= Duration::from_millis(1900),
        "sessions were closed before max_drain: {closed_after:?}"
    );
    let idle_end = tokio::time::timeout(SLACK, idle_conn)
        .await
        .expect("the idle connection ends")
        .unwrap();
    let err = idle_end.expect_err("the idle session gets a FATAL");
    assert_eq!(sqlstate(&err), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");

    let status = wait_exit(&mut p.process, Duration::from_secs(2) + SLACK).await;
    assert!(status.success(), "{status:?}\n{}", p.process.logs());
    let logs = p.process.logs();
    let shutdown_closes = logs
        .lines()
        .filter(|l| l.contains("session closed") && l.contains("reason=shutdown"))
        .count();
    assert_eq!(shutdown_closes, 2, "{logs}");
    assert!(logs.contains("max_drain reached"), "{logs}");
}

/// A reload builds a new session context; sessions accepted before and
/// after it must both be waited for and closed by one drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_from_before_and_after_a_reload_are_drained_together() {
    let pg = server();
    let mut p = start(&pg, "max_drain = \"1s\"", "", &[]);
    let (before, before_conn) = connect(p.listen).await;
    before.simple_query("select 1").await.unwrap();

    let config = std::fs::read_to_string(p.process.config_path()).unwrap();
    p.process
        .write_config(&config.replace("[routing]\n", "[routing]\nswitch_after = 2\n"));
    p.process.send_signal(SIGHUP);
    assert!(
        p.process.wait_for_log("configuration reloaded", SLACK),
        "{}",
        p.process.logs()
    );
    let (after, after_conn) = connect(p.listen).await;
    after.simple_query("select 1").await.unwrap();

    p.process.send_signal(SIGTERM);
    for (name, conn) in [("before", before_conn), ("after", after_conn)] {
        let end = tokio::time::timeout(Duration::from_secs(1) + SLACK, conn)
            .await
            .unwrap_or_else(|_| panic!("the session from {name} the reload ends"))
            .unwrap();
        let err = end.expect_err("a FATAL at the end of the drain");
        assert_eq!(
            sqlstate(&err),
            Some(&SqlState::ADMIN_SHUTDOWN),
            "{name}: {err:?}"
        );
    }
    let status = wait_exit(&mut p.process, Duration::from_secs(1) + SLACK).await;
    assert!(status.success(), "{status:?}\n{}", p.process.logs());
    let logs = p.process.logs();
    assert!(logs.contains("max_drain reached"), "{logs}");
    drop((before, after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_accept_keeps_accepting_then_closes_the_listeners() {
    let pg = server();
    let socket_dir = tempfile::tempdir().unwrap();
    let mut p = start(
        &pg,
        "min_accept = \"2s\"\nmax_drain = \"20s\"",
        "",
        &["--unix-socket-dir", socket_dir.path().to_str().unwrap()],
    );
    let socket = socket_dir
        .path()
        .join(format!(".s.PGSQL.{}", p.listen.port()));
    assert!(socket.exists());

    p.process.send_signal(SIGTERM);
    let signalled = Instant::now();
    assert_eq!(wait_http(p.admin, "/readyz", 503).0, 503);
    // Still accepting: a new session works although /readyz says 503.
    let (late, _late_conn) = connect(p.listen).await;
    late.simple_query("select 1").await.unwrap();
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "too slow to test min_accept"
    );

    // After min_accept the listeners are gone, the session is not.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(signalled.elapsed())).await;
    let refused = TcpStream::connect_timeout(&p.listen, Duration::from_secs(2));
    assert!(refused.is_err(), "still accepting after min_accept");
    assert!(!socket.exists(), "the Unix socket file is removed");
    late.simple_query("select 1").await.unwrap();

    // The last session ends: the proxy exits long before max_drain.
    drop(late);
    let status = wait_exit(&mut p.process, SLACK).await;
    assert!(status.success(), "{status:?}\n{}", p.process.logs());
    assert!(p.process.logs().contains("every session ended"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_exits_as_soon_as_the_last_session_ends() {
    let pg = server();
    let mut p = start(&pg, "max_drain = \"60s\"", "", &[]);
    let (client, conn) = connect(p.listen).await;
    client.simple_query("select 1").await.unwrap();
    p.process.send_signal(SIGTERM);
    still_running(&mut p.process, Duration::from_millis(500)).await;
    // Sessions keep working during the drain.
    client.simple_query("select 2").await.unwrap();
    drop(client);
    conn.await.unwrap().expect("a clean end, no FATAL");
    let status = wait_exit(&mut p.process, SLACK).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_too_and_a_second_signal_skips_the_wait() {
    let pg = server();
    let mut p = start(&pg, "max_drain = \"60s\"", "", &[]);
    let (client, conn) = connect(p.listen).await;
    client.simple_query("select 1").await.unwrap();
    p.process.send_signal(SIGINT);
    assert_eq!(wait_http(p.admin, "/readyz", 503).0, 503);
    still_running(&mut p.process, Duration::from_millis(500)).await;
    client.simple_query("select 2").await.unwrap();

    p.process.send_signal(SIGINT);
    let end = tokio::time::timeout(SLACK, conn)
        .await
        .expect("the session is closed at once")
        .unwrap();
    let err = end.expect_err("FATAL 57P01");
    assert_eq!(sqlstate(&err), Some(&SqlState::ADMIN_SHUTDOWN), "{err:?}");
    let status = wait_exit(&mut p.process, SLACK).await;
    assert!(status.success(), "{status:?}");
    assert!(p.process.logs().contains("second stop request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_drains_and_tells_sessions_still_starting() {
    let pg = server();
    let mut p = start(&pg, "max_drain = \"1s\"", "", &[]);
    let (client, conn) = connect(p.listen).await;
    client.simple_query("select 1").await.unwrap();
    // A client that connected but has not sent its startup packet yet.
    let mut starting = tokio::net::TcpStream::connect(p.listen).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert_eq!(http(p.admin, "POST", "/quitquitquit").0, 200);
    let (messages, _) = wire::read_to_close(&mut starting, Duration::from_secs(1) + SLACK).await;
    let error = wire::first_error(&messages).expect("an ErrorResponse");
    assert_eq!(error.code(), Some("57P01"), "{messages:?}");
    assert_eq!(error.severity(), Some("FATAL"));

    let end = tokio::time::timeout(SLACK, conn).await.unwrap().unwrap();
    assert_eq!(
        sqlstate(&end.expect_err("FATAL")),
        Some(&SqlState::ADMIN_SHUTDOWN)
    );
    let status = wait_exit(&mut p.process, SLACK).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_a_table_and_healthcheck_sets_the_exit_code() {
    let pg = server();
    let p = start(&pg, "", "", &[]);
    let (status, _) = wait_http(p.admin, "/readyz", 200);
    assert_eq!(status, 200, "{}", p.process.logs());
    let (client, _conn) = connect(p.listen).await;
    client.simple_query("select 1").await.unwrap();

    let admin = p.admin.to_string();
    let out = run_proxy_cmd(&["status", "--admin", &admin]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.starts_with("selected: local-1 ("), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.contains("local-1") && l.contains("test-1"))
        .unwrap_or_else(|| panic!("no endpoint row:\n{stdout}"));
    assert!(row.starts_with('*'), "selected mark: {stdout}");
    assert!(row.contains(" up ") && row.contains(" yes "), "{row}");
    assert!(stdout.contains("ENDPOINT") && stdout.contains("SESSIONS"));
    assert!(stdout.contains("policy:"), "{stdout}");

    // Without --admin: the address comes from the config file.
    let config = p.process.config_path().to_str().unwrap().to_owned();
    let out = run_proxy_cmd(&["status", "--config", &config]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("local-1"));

    let out = run_proxy_cmd(&["healthcheck", "--admin", &admin]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let dead = free_addr().to_string();
    let out = run_proxy_cmd(&["status", "--admin", &dead]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot reach the admin server") && stderr.contains(&dead),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    let out = run_proxy_cmd(&["healthcheck", "--admin", &dead]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// Two endpoints, the first dead and probes off: every session logs a
/// failed attempt (debug), a failover (info) and its close (info).
fn failover_extra(dead: SocketAddr) -> String {
    format!(
        "probes = false\n\
         [[endpoints]]\nname = \"dead-0\"\nregion = \"test-0\"\nhost = \"db.test.internal\"\n\
         connect_address = \"{dead}\"\npriority = 0\n"
    )
}

/// The `session` id of a text log line, if it is inside a session span.
fn text_session_id(line: &str) -> Option<u64> {
    let start = line.find("session{session=")? + "session{session=".len();
    let end = start + line[start..].find('}')?;
    line[start..end].parse().ok()
}

async fn two_sessions(listen: SocketAddr, proxy: &ProxyProcess) {
    for _ in 0..2 {
        let (client, conn) = connect(listen).await;
        client.simple_query("select 1").await.unwrap();
        drop(client);
        let _ = conn.await;
    }
    let deadline = Instant::now() + SLACK;
    while proxy.logs().matches("session closed").count() < 2 {
        assert!(Instant::now() < deadline, "{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_log_lines_share_an_id_and_the_config_is_logged_redacted() {
    let pg = server();
    let dead = free_addr();
    let mut p = start(
        &pg,
        "",
        &failover_extra(dead),
        &["--log-level", "info,dsql_proxy_session=debug"],
    );
    two_sessions(p.listen, &p.process).await;
    p.process.send_signal(SIGTERM);
    wait_exit(&mut p.process, SLACK).await;
    let logs = p.process.logs();

    let mut ids = Vec::new();
    for line in logs.lines().filter(|l| l.contains("session closed")) {
        let id = text_session_id(line).unwrap_or_else(|| panic!("no session id: {line}"));
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| text_session_id(l) == Some(id))
            .collect();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("DEBUG") && l.contains("trying the next endpoint")),
            "debug line of session {id} missing:\n{logs}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("connected after failing over")),
            "{logs}"
        );
        ids.push(id);
    }
    assert_eq!(ids.len(), 2, "{logs}");
    assert_ne!(ids[0], ids[1], "sessions have distinct ids");

    let config_line = logs
        .lines()
        .find(|l| l.contains("resolved configuration"))
        .unwrap_or_else(|| panic!("config not logged:\n{logs}"));
    assert!(config_line.contains("INFO"), "{config_line}");
    assert!(config_line.contains("max_drain"), "{config_line}");
    assert!(config_line.contains("<redacted>"), "{config_line}");
    assert!(
        !logs.contains(APP_PASSWORD),
        "the backend password is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_session_id() {
    let pg = server();
    let dead = free_addr();
    let mut p = start(
        &pg,
        "",
        &failover_extra(dead),
        &[
            "--log-format",
            "json",
            "--log-level",
            "info,dsql_proxy_session=debug",
        ],
    );
    two_sessions(p.listen, &p.process).await;
    p.process.send_signal(SIGTERM);
    wait_exit(&mut p.process, SLACK).await;
    let logs = p.process.logs();

    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let session_of = |v: &serde_json::Value| v["span"]["session"].as_u64();
    let closes: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["message"] == "session closed")
        .collect();
    assert_eq!(closes.len(), 2, "{logs}");
    for close in closes {
        let id = session_of(close).unwrap_or_else(|| panic!("no session id: {close}"));
        let messages: Vec<&str> = lines
            .iter()
            .filter(|v| session_of(v) == Some(id))
            .filter_map(|v| v["message"].as_str())
            .collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("trying the next endpoint")),
            "{messages:?}"
        );
        assert!(
            messages.contains(&"connected after failing over"),
            "{messages:?}"
        );
    }
    let config = lines
        .iter()
        .find(|v| v["message"] == "resolved configuration (secrets redacted)")
        .expect("config logged");
    let config: serde_json::Value =
        serde_json::from_str(config["config"].as_str().expect("a string field")).unwrap();
    assert_eq!(config["backend"]["password"], "<redacted>");
    assert_eq!(config["shutdown"]["max_drain"], "25s");
    assert!(!logs.contains(APP_PASSWORD));
}
