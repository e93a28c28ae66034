//! The binary: `check`, configuration errors, missing credentials, logs and
//! signals.

use std::time::Duration;

use dsql_proxy_tests::fixture::client_config;
use dsql_proxy_tests::process::{SIGHUP, SIGTERM};
use dsql_proxy_tests::{
    connect_with, free_addr, proxy_toml, run_proxy_cmd, AuthMethod, PgOptions, PgServer,
    ProxyOptions, ProxyProcess, Stack, APP_DB, APP_USER,
};

fn write_config(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path.display().to_string())
}

const VALID: &str = r#"
[listen]
address = "127.0.0.1:6543"
[routing]
probe_user = "app"
[backend]
kind = "postgres"
auth = "password"
password = "very-secret-value"
tls = "require"
[[endpoints]]
name = "a"
host = "db.example"
"#;

#[test]
fn check_prints_the_resolved_config_with_secrets_redacted() {
    let (_dir, path) = write_config(VALID);
    let out = run_proxy_cmd(&["check", "--config", &path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("address = \"127.0.0.1:6543\""), "{stdout}");
    assert!(
        stdout.contains("connect_timeout = \"5s\""),
        "defaults shown: {stdout}"
    );
    assert!(stdout.contains("<redacted>"), "{stdout}");
    assert!(!stdout.contains("very-secret-value"), "{stdout}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("very-secret-value"));
}

#[test]
fn the_shipped_proxy_toml_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy.toml");
    let out = run_proxy_cmd(&["check", "--config", path]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn config_errors_are_clear_and_name_the_line() {
    let (_dir, path) = write_config(&VALID.replace(
        "tls = \"require\"",
        "tls = \"require\"\nconect_timeout = \"1s\"",
    ));
    let out = run_proxy_cmd(&["check", "--config", &path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("line 11") && stderr.contains("conect_timeout"),
        "{stderr}"
    );

    let (_dir, path) = write_config(
        &VALID
            .replace("\"5s\"", "\"x\"")
            .replace("tls = \"require\"", "tls = \"sometimes\""),
    );
    let out = run_proxy_cmd(&["check", "--config", &path]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sometimes"));

    let out = run_proxy_cmd(&["check", "--config", "/nonexistent/proxy.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/proxy.toml"));

    // Environment overrides go through the same validation.
    let (_dir, path) = write_config(VALID);
    let out = std::process::Command::new(dsql_proxy_tests::proxy_binary())
        .args(["check", "--config", &path])
        .env("DSQL_PROXY__BACKEND__TLS", "disable")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("tls = \"disable\""));
}

#[test]
fn check_refuses_a_postgres_config_without_a_probe_user() {
    let (_dir, path) = write_config(&VALID.replace("[routing]\nprobe_user = \"app\"\n", ""));
    let out = run_proxy_cmd(&["check", "--config", &path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("[routing] probe_user is required for [backend] kind = \"postgres\""),
        "{stderr}"
    );
    // An empty Route 53 health check id is an error too.
    let (_dir, path) = write_config(&format!("{VALID}route53_health_check_id = \"\"\n"));
    let out = run_proxy_cmd(&["check", "--config", &path]);
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("route53_health_check_id is empty"));
}

#[test]
fn secrets_from_the_environment_are_strings_and_never_echoed() {
    let check = |env: &[(&str, &str)], text: Option<&str>| {
        let (_dir, path) = match text {
            Some(t) => write_config(t),
            None => write_config(VALID),
        };
        let mut cmd = std::process::Command::new(dsql_proxy_tests::proxy_binary());
        cmd.args(["check", "--config", &path]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    // A numeric password from the environment is a password.
    let out = check(&[("DSQL_PROXY__BACKEND__PASSWORD", "123456")], None);
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("123456"));
    // A failing config never shows it, whatever else is wrong.
    let out = check(
        &[
            ("DSQL_PROXY__BACKEND__PASSWORD", "7777-secret-7777"),
            ("DSQL_PROXY__LISTEN__AUTH", "scram-sha-256"),
        ],
        None,
    );
    let all = format!("{out:?}");
    assert!(!out.status.success(), "{all}");
    assert!(!all.contains("7777-secret-7777"), "{all}");
    // A TOML syntax error on the password line does not show the line.
    let broken = VALID.replace(
        "password = \"very-secret-value\"",
        "password = \"very-secret-value",
    );
    let out = check(&[], Some(&broken));
    let all = format!("{out:?}");
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("line 9"), "{all}");
    assert!(!all.contains("very-secret-value"), "{all}");
}

#[test]
fn missing_credentials_stop_startup_with_a_clear_message() {
    let text = VALID.replace(
        "password = \"very-secret-value\"",
        "password_env = \"DSQL_PROXY_TEST_UNSET_PASSWORD\"",
    );
    let mut proxy = ProxyProcess::spawn(&text);
    let status = proxy.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!status.success());
    let logs = proxy.logs();
    assert!(
        logs.contains("DSQL_PROXY_TEST_UNSET_PASSWORD is not set"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_logged_once_at_close_and_sigterm_exits_zero() {
    let mut stack = Stack::start();
    let client = stack.connect(APP_USER, APP_DB).await;
    client.simple_query("select 1").await.unwrap();
    drop(client);
    assert!(
        stack
            .proxy
            .wait_for_log("session closed", Duration::from_secs(10)),
        "{}",
        stack.proxy.logs()
    );
    let logs = stack.proxy.logs();
    let line = logs.lines().find(|l| l.contains("session closed")).unwrap();
    for field in [
        "client=127.0.0.1:",
        "user=app",
        "database=appdb",
        "endpoint=local-1",
        "duration_ms=",
        "bytes_from_client=",
        "bytes_to_client=",
        "reason=client_closed",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    assert!(!logs.contains("app-secret"), "password in logs");

    // SIGHUP does not kill the process.
    stack.proxy.send_signal(SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.connect(APP_USER, APP_DB).await;

    stack.proxy.send_signal(SIGTERM);
    let status = stack
        .proxy
        .wait_exit(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// Like PgBouncer's `log_disconnections = 0`: the per-session line has a
/// target of its own, so a filter drops it and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_filter_drops_the_session_lines_alone() {
    let pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    });
    let listen = free_addr();
    let toml = proxy_toml(&pg, listen, &ProxyOptions::default());
    let mut proxy =
        ProxyProcess::spawn_with_args(&toml, &["--log-level", "info,dsql_proxy::sessions=off"]);
    proxy.wait_ready(listen, Duration::from_secs(20));
    for _ in 0..2 {
        let client = connect_with(&client_config(listen, APP_USER, APP_DB), None)
            .await
            .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", proxy.logs()));
        client.simple_query("select 1").await.unwrap();
    }
    proxy.send_signal(SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{status:?}");
    let logs = proxy.logs();
    assert!(logs.contains("dsql-proxy listening"), "{logs}");
    assert!(!logs.contains("session closed"), "{logs}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let listen = free_addr();
    let text = VALID.replace("127.0.0.1:6543", &listen.to_string());
    let mut proxy = ProxyProcess::spawn_with_args(&text, &["--log-format", "json"]);
    proxy.wait_ready(listen, Duration::from_secs(20));
    // The port accepts before the first probe round ends (db.example may
    // take a while to fail to resolve); the line comes after it.
    assert!(
        proxy.wait_for_log("dsql-proxy listening", Duration::from_secs(20)),
        "{}",
        proxy.logs()
    );
    proxy.send_signal(SIGTERM);
    proxy.wait_exit(Duration::from_secs(10)).expect("exits");
    let logs = proxy.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not JSON: {line}"
        );
    }
    assert!(
        logs.contains("\"message\":\"dsql-proxy listening\""),
        "{logs}"
    );
}

#[test]
fn busy_poll_settings_are_checked_before_anything_starts() {
    let (_dir, path) = write_config(VALID);
    for (args, expect) in [
        (
            vec!["--busy-poll", "200us", "--worker-threads", "2"],
            "--busy-poll needs the single worker thread",
        ),
        (vec!["--busy-poll", "5ms"], "between 1us and 1000us"),
        (
            vec!["--busy-poll", "fast"],
            "expected e.g. 200us, 1ms or off",
        ),
    ] {
        let mut all = vec!["--config", path.as_str()];
        all.extend(&args);
        let out = run_proxy_cmd(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
