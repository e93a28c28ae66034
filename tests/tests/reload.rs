//! Configuration reload on SIGHUP, through the real binary: endpoints added
//! and removed while sessions run, broken files refused, a limit lowered,
//! and a setting that needs a restart.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsql_proxy_tests::fixture::client_config;
use dsql_proxy_tests::process::SIGHUP;
use dsql_proxy_tests::{
    connect_with, free_addr, PgServer, ProxyProcess, TestPki, APP_DB, APP_PASSWORD, APP_USER,
};
use tokio_postgres::Client;

/// Generous bound for anything the proxy does on its own (a reload, a
/// probe round); only liveness, never a performance assertion.
const WITHIN: Duration = Duration::from_secs(20);

/// Two PostgreSQL servers that one CA file covers.
struct Servers {
    a: PgServer,
    b: PgServer,
    pki: Arc<TestPki>,
}

impl Servers {
    fn start() -> Servers {
        let pki = Arc::new(TestPki::new());
        let (a, b) = (
            PgServer::start_tls_scram(&pki),
            PgServer::start_tls_scram(&pki),
        );
        Servers { a, b, pki }
    }
}

/// One `[[endpoints]]` entry: name (also its Region), server, priority.
type Entry<'a> = (&'a str, &'a PgServer, u32);

/// What a test varies between the configs it writes.
struct Setup {
    listen: SocketAddr,
    admin: SocketAddr,
    /// Extra `[listen]` lines.
    listen_extra: String,
    /// Extra `[routing]` lines.
    routing_extra: String,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            listen: free_addr(),
            admin: free_addr(),
            listen_extra: String::new(),
            routing_extra: String::new(),
        }
    }

    fn toml(&self, servers: &Servers, endpoints: &[Entry<'_>]) -> String {
        let mut s = format!(
            "[listen]\naddress = \"{}\"\nstartup_timeout = \"5s\"\n{}\n\
             [admin]\naddress = \"{}\"\n\
             [backend]\nkind = \"postgres\"\nauth = \"password\"\npassword = \"{APP_PASSWORD}\"\n\
             tls = \"verify-full\"\nca_file = \"{}\"\nconnect_timeout = \"5s\"\n\
             [routing]\nprobe_user = \"{APP_USER}\"\nprobe_database = \"{APP_DB}\"\n\
             probe_interval = \"250ms\"\nprobe_timeout = \"1s\"\n{}\n",
            self.listen,
            self.listen_extra,
            self.admin,
            servers.pki.ca_cert_path().display(),
            self.routing_extra,
        );
        for (name, pg, priority) in endpoints {
            s.push_str(&format!(
                "[[endpoints]]\nname = \"{name}\"\nregion = \"test-{name}\"\n\
                 host = \"db.test.internal\"\nport = {}\nconnect_address = \"{}\"\n\
                 priority = {priority}\n",
                pg.port(),
                pg.addr()
            ));
        }
        s
    }

    fn start(&self, servers: &Servers, endpoints: &[Entry<'_>]) -> ProxyProcess {
        let mut proxy = ProxyProcess::spawn(&self.toml(servers, endpoints));
        proxy.wait_ready(self.listen, WITHIN);
        // Clients are served once the first probe round is in.
        assert!(
            proxy.wait_for_log("dsql-proxy listening", WITHIN),
            "the proxy never served\n{}",
            proxy.logs()
        );
        proxy
    }
}

/// Writes `toml` over the proxy's config, sends SIGHUP and waits for the
/// reload's outcome: the `n`th line containing `outcome`.
fn reload(proxy: &ProxyProcess, toml: &str, outcome: &str, n: usize) {
    proxy.write_config(toml);
    proxy.send_signal(SIGHUP);
    let deadline = Instant::now() + WITHIN;
    while proxy.logs().matches(outcome).count() < n {
        assert!(
            Instant::now() < deadline,
            "no {outcome:?} #{n} after SIGHUP\n--- proxy log ---\n{}",
            proxy.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const RELOADED: &str = "configuration reloaded";
const REFUSED: &str = "configuration reload failed";

/// One HTTP/1.1 GET with `Connection: close`; returns the body.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn status_names(admin: SocketAddr) -> Vec<String> {
    let status: serde_json::Value =
        serde_json::from_str(&get(admin, "/status")).expect("/status is JSON");
    status["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn connect(listen: SocketAddr, proxy: &ProxyProcess) -> Client {
    match connect_with(&client_config(listen, APP_USER, APP_DB), None).await {
        Ok(c) => c,
        Err(e) => panic!(
            "connect through the proxy: {e:?}\n--- proxy log ---\n{}",
            proxy.logs()
        ),
    }
}

/// The port of the server a session runs on.
async fn port_of(client: &Client) -> u16 {
    let row = client
        .query_one("select current_setting('port')", &[])
        .await
        .expect("query the server's port");
    row.get::<_, String>(0).parse().expect("port number")
}

/// Opens sessions until one lands on the server listening on `port`.
async fn wait_for_landing(listen: SocketAddr, proxy: &ProxyProcess, port: u16) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let client = connect(listen, proxy).await;
        if port_of(&client).await == port {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no new session landed on port {port}\n--- proxy log ---\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_an_endpoint_while_sessions_run() {
    let servers = Servers::start();
    let (a, b) = (&servers.a, &servers.b);
    let setup = Setup::new();
    let proxy = setup.start(&servers, &[("a", a, 1)]);
    let metrics = get(setup.admin, "/metrics");
    assert!(
        metrics.contains("dsql_proxy_config_reloads_total{result=\"success\"} 0"),
        "{metrics}"
    );
    // Before anything failed, a's failure counters exist at 0.
    for line in [
        "dsql_proxy_backend_connect_failures_total{endpoint=\"a\",reason=\"connection\",region=\"test-a\"} 0",
        "dsql_proxy_probe_failures_total{endpoint=\"a\",reason=\"timeout\",region=\"test-a\"} 0",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    let on_a = connect(setup.listen, &proxy).await;
    assert_eq!(port_of(&on_a).await, a.port());

    // Add b with the better priority: new sessions move to it once its
    // first probe is in.
    reload(
        &proxy,
        &setup.toml(&servers, &[("a", a, 1), ("b", b, 0)]),
        RELOADED,
        1,
    );
    assert_eq!(status_names(setup.admin), ["a", "b"]);
    wait_for_landing(setup.listen, &proxy, b.port()).await;
    assert_eq!(port_of(&on_a).await, a.port(), "the session on a runs on");
    let metrics = get(setup.admin, "/metrics");
    for line in [
        "dsql_proxy_config_reloads_total{result=\"success\"} 1",
        "dsql_proxy_config_reloads_total{result=\"failure\"} 0",
        "dsql_proxy_endpoint_up{endpoint=\"b\",region=\"test-b\"} 1",
        "dsql_proxy_endpoint_selected{endpoint=\"b\",region=\"test-b\"} 1",
        // The reload created b's counters at 0.
        "dsql_proxy_backend_connect_failures_total{endpoint=\"b\",reason=\"busy\",region=\"test-b\"} 0",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    let on_b = connect(setup.listen, &proxy).await;
    assert_eq!(port_of(&on_b).await, b.port());
    on_b.batch_execute("set application_name = 'on-b'")
        .await
        .unwrap();

    // Remove b again: new sessions go back to a at once; the idle session
    // on b is not closed: it moves to a at its next message, with its
    // state (on_endpoint_down = "move", the default).
    reload(&proxy, &setup.toml(&servers, &[("a", a, 1)]), RELOADED, 2);
    assert_eq!(status_names(setup.admin), ["a"]);
    for _ in 0..5 {
        let client = connect(setup.listen, &proxy).await;
        assert_eq!(port_of(&client).await, a.port());
    }
    assert_eq!(
        port_of(&on_b).await,
        a.port(),
        "the session on b moved to a"
    );
    let name = on_b.query_one("show application_name", &[]).await.unwrap();
    assert_eq!(name.get::<_, String>(0), "on-b");
    assert!(
        proxy.logs().contains("reason=endpoint_down"),
        "{}",
        proxy.logs()
    );
    assert_eq!(port_of(&on_a).await, a.port());
    let metrics = get(setup.admin, "/metrics");
    assert!(
        metrics.contains("dsql_proxy_config_reloads_total{result=\"success\"} 2"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("endpoint=\"b\""),
        "b is gone from every endpoint series:\n{metrics}"
    );
    assert!(
        metrics.contains("dsql_proxy_endpoint_up{endpoint=\"a\",region=\"test-a\"} 1"),
        "{metrics}"
    );
    let logs = proxy.logs();
    assert!(logs.contains("endpoint added"), "{logs}");
    assert!(logs.contains("endpoint removed"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_is_refused_and_the_old_one_stays() {
    let servers = Servers::start();
    let (a, b) = (&servers.a, &servers.b);
    let setup = Setup::new();
    let proxy = setup.start(&servers, &[("a", a, 1)]);
    let held = connect(setup.listen, &proxy).await;

    let good = setup.toml(&servers, &[("a", a, 1), ("b", b, 0)]);
    let broken = [
        // Not TOML at all.
        ("[listen\naddress = ".to_owned(), "invalid config"),
        // Valid TOML, but no endpoint.
        (
            setup.toml(&servers, &[]),
            "at least one [[endpoints]] entry is required",
        ),
        // A duration that is not one.
        (
            good.replace("probe_interval = \"250ms\"", "probe_interval = \"soon\""),
            "soon",
        ),
        // A TLS file that does not exist: only building the new context
        // finds that.
        (
            good.replace(
                servers.pki.ca_cert_path().to_str().unwrap(),
                "/nonexistent/ca.pem",
            ),
            "/nonexistent/ca.pem",
        ),
    ];
    for (n, (toml, reason)) in broken.iter().enumerate() {
        reload(&proxy, toml, REFUSED, n + 1);
        // The error may span lines (TOML errors quote the file).
        let logs = proxy.logs();
        let (at, _) = logs.match_indices(REFUSED).nth(n).unwrap_or_default();
        let line_start = logs[..at].rfind('\n').map_or(0, |i| i + 1);
        let entry = &logs[line_start..];
        let entry = &entry[..entry.find("SIGHUP received").unwrap_or(entry.len())];
        assert!(
            entry.lines().next().unwrap_or_default().contains("ERROR"),
            "refusal #{} is not logged as an error: {entry}",
            n + 1
        );
        assert!(
            entry.contains(reason),
            "refusal #{} does not say {reason:?}: {entry}",
            n + 1
        );
        // Still serving, with the old endpoint set.
        let client = connect(setup.listen, &proxy).await;
        assert_eq!(port_of(&client).await, a.port());
        assert_eq!(status_names(setup.admin), ["a"]);
    }
    assert_eq!(port_of(&held).await, a.port());
    let metrics = get(setup.admin, "/metrics");
    assert!(
        metrics.contains("dsql_proxy_config_reloads_total{result=\"failure\"} 4"),
        "{metrics}"
    );

    // A good file after the broken ones applies.
    reload(&proxy, &good, RELOADED, 1);
    wait_for_landing(setup.listen, &proxy, b.port()).await;
    let metrics = get(setup.admin, "/metrics");
    assert!(
        metrics.contains("dsql_proxy_config_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_client_limit_applies_to_new_connections() {
    let servers = Servers::start();
    let a = &servers.a;
    let mut setup = Setup::new();
    setup.listen_extra = "max_client_connections = 10".into();
    let proxy = setup.start(&servers, &[("a", a, 1)]);
    let first = connect(setup.listen, &proxy).await;
    let second = connect(setup.listen, &proxy).await;

    setup.listen_extra = "max_client_connections = 2".into();
    reload(&proxy, &setup.toml(&servers, &[("a", a, 1)]), RELOADED, 1);
    let err = connect_with(&client_config(setup.listen, APP_USER, APP_DB), None)
        .await
        .err()
        .unwrap_or_else(|| panic!("a third client got past the lowered limit"));
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err:?}");
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message.as_deref().unwrap_or_default().contains("(2)"),
        "{message:?}"
    );
    // Connections already open are not touched.
    assert_eq!(port_of(&first).await, a.port());
    assert_eq!(port_of(&second).await, a.port());

    // One leaves: its place is free for the next client.
    drop(first);
    let deadline = Instant::now() + WITHIN;
    loop {
        match connect_with(&client_config(setup.listen, APP_USER, APP_DB), None).await {
            Ok(c) => {
                assert_eq!(port_of(&c).await, a.port());
                break;
            }
            Err(e) => {
                assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e:?}");
                assert!(Instant::now() < deadline, "the freed place never came back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_address_change_waits_for_a_restart() {
    let servers = Servers::start();
    let a = &servers.a;
    let mut setup = Setup::new();
    let proxy = setup.start(&servers, &[("a", a, 1)]);
    let listening = setup.listen;

    // A new address and a new tolerance: the first is kept with a warning,
    // the second applies.
    setup.listen = free_addr();
    setup.routing_extra = "latency_tolerance = \"50ms\"".into();
    reload(&proxy, &setup.toml(&servers, &[("a", a, 1)]), RELOADED, 1);
    let logs = proxy.logs();
    let warning = logs
        .lines()
        .find(|l| l.contains("[listen] address changed; restart to apply"))
        .unwrap_or_else(|| panic!("no restart warning\n{logs}"));
    assert!(warning.contains("WARN"), "{warning}");
    let status: serde_json::Value =
        serde_json::from_str(&get(setup.admin, "/status")).expect("/status is JSON");
    assert_eq!(status["policy"]["latency_tolerance"], "50ms", "{status}");

    let client = connect(listening, &proxy).await;
    assert_eq!(port_of(&client).await, a.port());
    assert!(
        TcpStream::connect_timeout(&setup.listen, Duration::from_millis(500)).is_err(),
        "the proxy listens on the new address without a restart"
    );
}

/// A drained endpoint that a reload keeps stays drained (and unselected);
/// one whose address changes comes back undrained, as a new endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_drained_state_of_endpoints_that_stay() {
    use dsql_proxy_tests::metrics::{http, status};
    let servers = Servers::start();
    let mut setup = Setup::new();
    let proxy = setup.start(&servers, &[("a", &servers.a, 1), ("b", &servers.b, 2)]);
    let (code, body) = http(setup.admin, "POST", "/endpoints/a/drain");
    assert_eq!(code, 200, "{body}");
    let drained = |s: &serde_json::Value, name: &str| {
        s["endpoints"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["name"] == name))
            .map(|e| e["drained"].clone())
    };
    assert_eq!(status(setup.admin)["selected"], "b");

    // A routing change only: both endpoints stay.
    setup.routing_extra = "switch_after = 2".into();
    reload(
        &proxy,
        &setup.toml(&servers, &[("a", &servers.a, 1), ("b", &servers.b, 2)]),
        RELOADED,
        1,
    );
    // Give a re-made selection time to show (a probe round or two).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = status(setup.admin);
    assert_eq!(
        drained(&s, "a"),
        Some(serde_json::Value::Bool(true)),
        "{s:#}"
    );
    assert_eq!(s["selected"], "b", "{s:#}\n{}", proxy.logs());

    // "a" now points at the other server: a new endpoint, not drained.
    reload(
        &proxy,
        &setup.toml(&servers, &[("a", &servers.b, 1), ("b", &servers.b, 2)]),
        RELOADED,
        2,
    );
    let deadline = Instant::now() + WITHIN;
    loop {
        let s = status(setup.admin);
        if drained(&s, "a") == Some(serde_json::Value::Bool(false)) && s["selected"] == "a" {
            break;
        }
        assert!(Instant::now() < deadline, "{s:#}\n{}", proxy.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
