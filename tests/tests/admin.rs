//! The admin HTTP server through the real binary: metrics families, health
//! endpoints, `/status`, and `POST /quitquitquit`.

use std::net::SocketAddr;
use std::time::Duration;

use dsql_proxy_tests::metrics::{http, http_with};
use dsql_proxy_tests::{
    free_addr, proxy_toml, AuthMethod, PgOptions, PgServer, ProxyOptions, ProxyProcess, APP_DB,
    APP_USER,
};

/// A proxy for `pg` with its admin server on a known address.
fn start(pg: &PgServer, routing: &str) -> (ProxyProcess, SocketAddr, SocketAddr) {
    start_with_admin(pg, routing, "")
}

/// [`start`] with more `[admin]` lines.
fn start_with_admin(
    pg: &PgServer,
    routing: &str,
    admin_extra: &str,
) -> (ProxyProcess, SocketAddr, SocketAddr) {
    let listen = free_addr();
    let admin = free_addr();
    start_at(
        pg,
        routing,
        &format!("address = \"{admin}\"\n{admin_extra}"),
        listen,
        admin,
    )
}

fn start_at(
    pg: &PgServer,
    routing: &str,
    admin_section: &str,
    listen: SocketAddr,
    admin: SocketAddr,
) -> (ProxyProcess, SocketAddr, SocketAddr) {
    let mut toml = proxy_toml(pg, listen, &ProxyOptions::default());
    let start = toml.find("[admin]").unwrap();
    let end = start + toml[start..].find("[backend]").unwrap();
    toml.replace_range(start..end, &format!("[admin]\n{admin_section}\n"));
    // The fixture ends in its [routing] table.
    toml.push_str(&format!("{routing}\n"));
    let proxy = ProxyProcess::start_with(&toml, listen);
    (proxy, listen, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_metrics_and_status() {
    let mut pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    });
    let (proxy, listen, admin) = start(&pg, "probe_interval = \"250ms\"");
    assert_eq!(http(admin, "GET", "/healthz").0, 200);
    assert_eq!(http(admin, "GET", "/startup").0, 200);
    assert_eq!(http(admin, "GET", "/readyz"), (200, "ready\n".into()));
    assert_eq!(http(admin, "GET", "/nope").0, 404);
    assert_eq!(http(admin, "GET", "/quitquitquit").0, 405);

    let client = dsql_proxy_tests::connect_with(
        &dsql_proxy_tests::fixture::client_config(listen, APP_USER, APP_DB),
        None,
    )
    .await
    .expect("connect through proxy");
    client.simple_query("select 1").await.unwrap();
    let (_, metrics) = http(admin, "GET", "/metrics");
    for family in [
        "dsql_proxy_build_info{version=",
        "dsql_proxy_endpoint_up{endpoint=\"local-1\",region=\"test-1\"} 1",
        "dsql_proxy_endpoint_selected{endpoint=\"local-1\",region=\"test-1\"} 1",
        "dsql_proxy_endpoint_latency_seconds_count{endpoint=\"local-1\"",
        "dsql_proxy_backend_connect_seconds_count{endpoint=\"local-1\"",
        "dsql_proxy_sessions_active{endpoint=\"local-1\",region=\"test-1\"} 1",
        "dsql_proxy_client_connections_total ",
        "dsql_proxy_client_connections_active 1",
        "dsql_proxy_route_changes_total 1",
        "# TYPE dsql_proxy_failovers_total counter",
        "# TYPE dsql_proxy_token_generations_total counter",
    ] {
        assert!(metrics.contains(family), "{family} missing:\n{metrics}");
    }
    let (code, status) = http(admin, "GET", "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status is JSON");
    assert_eq!(status["selected"], "local-1");
    assert_eq!(status["endpoints"][0]["state"], "up");
    assert_eq!(status["endpoints"][0]["sessions_active"], 1);
    assert!(status["endpoints"][0]["latency_ms"].as_f64().is_some());
    drop(client);

    // The only endpoint goes away: probes fail, /readyz turns 503 without
    // the admin server dialling anything itself.
    pg.kill9();
    let mut ready = 200;
    for _ in 0..40 {
        ready = http(admin, "GET", "/readyz").0;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 503, "{}", proxy.logs());
    let (_, metrics) = http(admin, "GET", "/metrics");
    assert!(
        metrics.contains("dsql_proxy_endpoint_up{endpoint=\"local-1\",region=\"test-1\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dsql_proxy_probe_failures_total{endpoint=\"local-1\",reason="),
        "{metrics}"
    );
    pg.restart();
}

#[test]
fn quitquitquit_shuts_down_with_exit_zero() {
    let pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    });
    // Off by default: 404, and the proxy keeps running.
    let (proxy, _listen, admin) = start(&pg, "");
    let (code, text) = http(admin, "POST", "/quitquitquit");
    assert_eq!(code, 404, "{text}");
    assert!(text.contains("[admin] quitquitquit = true"), "{text}");
    assert_eq!(http(admin, "GET", "/healthz").0, 200);
    drop(proxy);

    let (mut proxy, _listen, admin) = start_with_admin(&pg, "", "quitquitquit = true");
    assert_eq!(http(admin, "POST", "/quitquitquit").0, 200);
    let status = proxy.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{}", proxy.logs());
}

/// The admin security model through the real binary, seen from a
/// non-loopback peer (this host's own address on its default-route
/// interface) and from loopback: read-only routes for anyone; mutating
/// ones for loopback or the bearer token (re-read from the file, never
/// logged); no cross-site or DNS-rebound requests; a connection cap.
#[test]
fn mutating_routes_need_a_loopback_peer_or_the_bearer_token() {
    let pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "t0ken-for-the-admin-test\n").unwrap();
    let port = dsql_proxy_tests::net::free_port();
    let listen = free_addr();
    let (proxy, _, local) = start_at(
        &pg,
        "",
        &format!(
            "address = \"0.0.0.0:{port}\"\ntoken_file = \"{}\"\nquitquitquit = true\nmax_connections = 4\n",
            token_file.display()
        ),
        listen,
        SocketAddr::from(([127, 0, 0, 1], port)),
    );
    let remote = SocketAddr::new(dsql_proxy_tests::net::non_loopback_ip(), port);
    let bearer = "Bearer t0ken-for-the-admin-test";
    let drain = "/endpoints/local-1/drain";
    let undrain = "/endpoints/local-1/undrain";

    // Read-only routes answer the remote peer.
    for path in ["/healthz", "/startup", "/readyz", "/status", "/metrics"] {
        assert_eq!(http(remote, "GET", path).0, 200, "{path}");
    }
    // Mutating ones need the token from it.
    for path in [drain, "/quitquitquit", "/demo/fail/x"] {
        let (code, text) = http(remote, "POST", path);
        assert_eq!(code, 403, "{path}: {text}");
        assert!(text.contains("Authorization: Bearer"), "{text}");
    }
    let (code, _) = http_with(remote, "POST", drain, &[("Authorization", "Bearer wrong")]);
    assert_eq!(code, 403);
    let (code, text) = http_with(remote, "POST", drain, &[("Authorization", bearer)]);
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        dsql_proxy_tests::metrics::status(local)["endpoints"][0]["drained"],
        true
    );
    // Loopback needs none.
    assert_eq!(http(local, "POST", undrain).0, 200);
    // A web page cannot: not with its Origin, not through a rebound name.
    for headers in [
        vec![("Origin", "https://attacker.example")],
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![
            ("Host", "attacker.example:9090"),
            ("Origin", "http://attacker.example:9090"),
        ],
    ] {
        let (code, text) = http_with(local, "POST", drain, &headers);
        assert_eq!(code, 403, "{headers:?}: {text}");
    }
    assert_eq!(
        dsql_proxy_tests::metrics::status(local)["endpoints"][0]["drained"],
        false
    );
    // A rotated token applies at once.
    std::fs::write(&token_file, "rotated-token").unwrap();
    assert_eq!(
        http_with(remote, "POST", drain, &[("Authorization", bearer)]).0,
        403
    );
    assert_eq!(
        http_with(
            remote,
            "POST",
            undrain,
            &[("Authorization", "Bearer rotated-token")]
        )
        .0,
        200
    );

    // At most 4 connections at once: a fifth is closed unanswered.
    let idle: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(local).unwrap())
        .collect();
    let mut refused = false;
    for _ in 0..50 {
        if http(local, "GET", "/healthz").0 == 0 {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused, "a fifth connection was served");
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http(local, "GET", "/healthz").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the cap never freed up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let logs = proxy.logs();
    assert!(logs.contains("admin request refused"), "{logs}");
    assert!(
        !logs.contains("t0ken-for-the-admin-test") && !logs.contains("rotated-token"),
        "{logs}"
    );
    let mut proxy = proxy;
    let (code, _) = http_with(
        remote,
        "POST",
        "/quitquitquit",
        &[("Authorization", "Bearer rotated-token")],
    );
    assert_eq!(code, 200);
    let status = proxy.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{}", proxy.logs());
}

/// Drain/undrain through the admin API: unknown names are 404, a drained
/// endpoint is not selected and gets no new sessions, `/status` and
/// `/metrics` show it, and undrain brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_endpoints_get_no_new_sessions_until_undrained() {
    use dsql_proxy_tests::{RegionsOptions, RegionsStack};
    let stack = RegionsStack::start(RegionsOptions {
        routing: vec![
            "probe_interval = \"200ms\"".into(),
            "switch_after = 2".into(),
        ],
        ..RegionsOptions::default()
    });
    let admin = stack.admin_addr();
    let (code, text) = http(admin, "POST", "/endpoints/nowhere/drain");
    assert_eq!(code, 404, "{text}");
    assert!(
        text.contains("no endpoint is named \"nowhere\" (endpoints: region-a, region-b)"),
        "{text}"
    );
    assert_eq!(http(admin, "GET", "/endpoints/region-a/drain").0, 405);
    assert_eq!(
        http(admin, "POST", "/demo/fail/region-a").0,
        404,
        "not a demo"
    );
    assert!(
        stack
            .wait_for_landing("region-a", Duration::from_secs(10))
            .await
            .is_some(),
        "the faster region-a is selected first"
    );
    let open = stack.connect().await;

    let (code, text) = http(admin, "POST", "/endpoints/region-a/drain");
    assert_eq!(code, 200, "{text}");
    let status = dsql_proxy_tests::metrics::status(admin);
    assert_eq!(status["selected"], "region-b", "{status:#}");
    let a = &status["endpoints"][0];
    assert_eq!(
        (a["name"].as_str(), a["drained"].as_bool()),
        (Some("region-a"), Some(true))
    );
    assert_eq!(a["state"], "up", "drained, not down");
    for _ in 0..5 {
        assert_eq!(stack.landing().await.unwrap(), "region-b");
    }
    // The session opened before the drain moves at its next message
    // (`on_endpoint_down = "move"`, the default).
    assert_eq!(stack.region_of(&open).await, "region-b");
    let scrape = dsql_proxy_tests::metrics::scrape(admin);
    assert_eq!(
        scrape.value("dsql_proxy_endpoint_drained", &[("endpoint", "region-a")]),
        Some(1.0)
    );
    assert_eq!(
        scrape.value("dsql_proxy_endpoint_up", &[("endpoint", "region-a")]),
        Some(1.0)
    );
    let out = dsql_proxy_tests::run_proxy_cmd(&["status", "--admin", &admin.to_string()]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("no (drained)"), "{table}");

    let (code, text) = http(admin, "POST", "/endpoints/region-a/undrain");
    assert_eq!(code, 200, "{text}");
    let back = stack
        .wait_for_landing("region-a", Duration::from_secs(10))
        .await;
    assert!(back.is_some(), "{}", stack.proxy.logs());
    let status = dsql_proxy_tests::metrics::status(admin);
    assert_eq!(status["endpoints"][0]["drained"], false);
}
