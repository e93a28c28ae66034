use super::*;

const MINIMAL: &str = r#"
[routing]
probe_user = "app"
[backend]
kind = "postgres"
auth = "password"
password = "hunter2"
tls = "require"
[[endpoints]]
name = "a"
host = "db.example"
"#;

/// `base` with `lines` added to its `[routing]` table.
fn with_routing(base: &str, lines: &str) -> String {
    base.replacen("[routing]\n", &format!("[routing]\n{lines}\n"), 1)
}

#[test]
fn defaults_are_filled_in() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.listen.address.to_string(), "127.0.0.1:5432");
    assert_eq!(c.admin.address.to_string(), "127.0.0.1:9090");
    assert_eq!(c.backend.connect_timeout.get().as_secs(), 5);
    assert_eq!(c.endpoints[0].port, 5432);
    assert_eq!(c.endpoints[0].priority, 1);
}

#[test]
fn the_documented_example_parses() {
    let text = r#"
[listen]
address = "127.0.0.1:5432"
max_client_connections = 10000
[admin]
address = "127.0.0.1:9090"
[backend]
kind = "dsql"
auth = "dsql-iam"
tls = "verify-full"
connect_timeout = "5s"
[[endpoints]]
name = "us-east-1"
region = "us-east-1"
host = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"
port = 5432
priority = 1
"#;
    Config::parse(text).unwrap();
}

#[test]
fn unknown_keys_are_errors_with_a_line() {
    let err = Config::parse(&MINIMAL.replace("tls = \"require\"", "tls = \"require\"\ntsl = 1"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 9"), "{err}");
    assert!(err.contains("tsl"), "{err}");
}

#[test]
fn bad_values_are_explained() {
    let cases = [
        (MINIMAL.replace("\"require\"", "\"sometimes\""), "sometimes"),
        (
            format!("{MINIMAL}\n[listen]\nstartup_timeout = \"5 parsecs\""),
            "unit",
        ),
        (
            MINIMAL.replace("password = \"hunter2\"", ""),
            "needs password",
        ),
        (
            MINIMAL.replace(
                "password = \"hunter2\"",
                "password = \"x\"\npassword_env = \"Y\"",
            ),
            "only one",
        ),
        (
            format!("{MINIMAL}[[endpoints]]\nname = \"a\"\nhost = \"h\"\n"),
            "used twice",
        ),
        (MINIMAL.replace("\"postgres\"", "\"dsql\""), "verify-full"),
        (
            format!("{MINIMAL}\n[listen]\nauth = \"scram-sha-256\"\n"),
            "needs password",
        ),
    ];
    for (text, needle) in cases {
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

#[test]
fn secrets_are_redacted() {
    let c = Config::parse(MINIMAL).unwrap();
    let shown = c.to_redacted_toml();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("<redacted>"));
    assert!(!format!("{c:?}").contains("hunter2"));
    // The rendering is itself a valid config (modulo the redacted secret).
    Config::parse(&shown).unwrap();
}

#[test]
fn environment_overrides_single_keys() {
    let env = vec![
        (
            "DSQL_PROXY__BACKEND__TLS".to_string(),
            "disable".to_string(),
        ),
        (
            "DSQL_PROXY__LISTEN__MAX_CLIENT_CONNECTIONS".to_string(),
            "7".to_string(),
        ),
        ("UNRELATED".to_string(), "x".to_string()),
    ];
    let c = Config::parse_with_env(MINIMAL, "t", env).unwrap();
    assert_eq!(c.backend.tls, TlsMode::Disable);
    assert_eq!(c.listen.max_client_connections, 7);
    let bad = vec![("DSQL_PROXY__NOPE".to_string(), "1".to_string())];
    assert!(Config::parse_with_env(MINIMAL, "t", bad).is_err());
}

#[test]
fn durations_parse_and_print() {
    for (s, ms) in [
        ("250ms", 250),
        ("5s", 5000),
        ("15m", 900_000),
        ("1h", 3_600_000),
    ] {
        let d: DurationStr = s.parse().unwrap();
        assert_eq!(d.get().as_millis(), ms);
        assert_eq!(d.to_string(), s);
    }
    for bad in ["", "5", "s", "-1s", "1.5s", "99999999999999999999d"] {
        assert!(bad.parse::<DurationStr>().is_err(), "{bad}");
    }
}

#[test]
fn password_sources_read_env_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pw");
    std::fs::write(&f, "from-file\n").unwrap();
    assert_eq!(
        PasswordSource::File(f).read().unwrap().expose(),
        "from-file"
    );
    assert!(PasswordSource::File(dir.path().join("missing"))
        .read()
        .is_err());
    assert!(PasswordSource::Env("DSQL_PROXY_TEST_SURELY_UNSET".into())
        .read()
        .is_err());
}

#[test]
fn routing_defaults_and_overrides() {
    let c = Config::parse(MINIMAL).unwrap();
    let r = &c.routing;
    assert_eq!(r.probe_interval.get().as_millis(), 1000);
    assert_eq!(r.probe_timeout.get().as_millis(), 1000);
    assert_eq!(r.latency_tolerance.get().as_millis(), 5);
    assert_eq!((r.down_after, r.up_after, r.switch_after), (3, 3, 3));
    assert_eq!(r.route53, Route53Policy::Veto);
    assert_eq!(r.route53_poll_interval.get().as_secs(), 30);
    assert_eq!(r.on_endpoint_down, OnEndpointDown::Move);
    assert_eq!(r.attempt_timeout.get().as_secs(), 2);

    let text = format!(
        "{}region = \"us-east-1\"\nroute53_health_check_id = \"57a713b9-1111\"\n\
         [shutdown]\nmin_accept = \"1s\"\n",
        with_routing(
            MINIMAL,
            "probe_interval = \"250ms\"\nroute53 = \"advisory\"\n\
             on_endpoint_down = \"keep\"\nprefer_region = \"us-east-1\""
        )
    );
    // [shutdown] after [[endpoints]] is a new table, as TOML reads it.
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.routing.probe_interval.get().as_millis(), 250);
    assert_eq!(c.routing.route53, Route53Policy::Advisory);
    assert_eq!(c.routing.on_endpoint_down, OnEndpointDown::Keep);
    assert_eq!(
        c.endpoints[0].route53_health_check_id.as_deref(),
        Some("57a713b9-1111")
    );
    let env = [(
        "DSQL_PROXY__ROUTING__LATENCY_TOLERANCE".to_owned(),
        "20ms".to_owned(),
    )];
    let c = Config::parse_with_env(MINIMAL, "text", env).unwrap();
    assert_eq!(c.routing.latency_tolerance.get().as_millis(), 20);
}

#[test]
fn bad_routing_settings_are_explained() {
    for (routing, needle) in [
        ("route53 = \"maybe\"", "unknown variant"),
        ("probe_interval = \"0ms\"", "at least 10ms"),
        ("down_after = 0", "at least 1"),
        ("route53_poll_interval = \"100ms\"", "at least 1s"),
        ("prefer_region = \"mars-1\"", "matches no endpoint"),
        ("on_endpoint_down = \"explode\"", "unknown variant"),
        ("probe_intervall = \"1s\"", "unknown field"),
    ] {
        let text = with_routing(MINIMAL, routing);
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{routing}: {err}");
    }
}

#[test]
fn connect_rate_defaults_follow_the_kind() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(
        c.backend.effective_connect_rate(),
        0.0,
        "postgres: unlimited"
    );
    assert_eq!(c.backend.connect_queue, 1000);
    assert_eq!(c.routing.busy_cooldown.get().as_secs(), 5);

    let dsql = MINIMAL
        .replace("\"postgres\"", "\"dsql\"")
        .replace("\"require\"", "\"verify-full\"");
    let c = Config::parse(&dsql).unwrap();
    assert_eq!(c.backend.effective_connect_rate(), DSQL_CONNECT_RATE);
    assert_eq!(c.backend.effective_connect_burst(), DSQL_CONNECT_BURST);

    let text = MINIMAL.replace(
        "tls = \"require\"",
        "tls = \"require\"\nconnect_rate = 20\nconnect_queue = 2",
    );
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.backend.effective_connect_rate(), 20.0);
    assert_eq!(
        c.backend.effective_connect_burst(),
        20,
        "one second's worth"
    );
    assert_eq!(c.backend.connect_queue, 2);

    let text = MINIMAL.replace("tls = \"require\"", "tls = \"require\"\nconnect_rate = 0.5");
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.backend.effective_connect_burst(), 1);
    // The rendering keeps what was set, and parses again.
    Config::parse(&c.to_redacted_toml().replace("<redacted>", "x")).unwrap();
}

#[test]
fn bad_connect_rate_settings_are_explained() {
    for (line, needle) in [
        ("connect_rate = -1", "0 or more"),
        ("connect_rate = nan", "0 or more"),
        ("connect_rate = 10\nconnect_burst = 0", "at least 1"),
        ("connect_burst = -1", "invalid value"),
        ("connect_rate = \"fast\"", "invalid type"),
    ] {
        let text = MINIMAL.replace("tls = \"require\"", &format!("tls = \"require\"\n{line}"));
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{line}: {err}");
    }
    // Unlimited needs no burst.
    let text = MINIMAL.replace(
        "tls = \"require\"",
        "tls = \"require\"\nconnect_rate = 0\nconnect_burst = 0",
    );
    Config::parse(&text).unwrap();
}

#[test]
fn shutdown_defaults_fit_kubernetes_and_are_checked() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.shutdown.min_accept.get().as_secs(), 0);
    // With request_grace and a few seconds of goodbyes, inside Kubernetes'
    // default terminationGracePeriodSeconds (30 s).
    assert_eq!(c.shutdown.max_drain.get().as_secs(), 20);
    assert_eq!(c.shutdown.request_grace.get().as_secs(), 5);
    let grace = c.shutdown.max_drain.get() + c.shutdown.request_grace.get();
    assert!(grace + std::time::Duration::from_secs(3) < std::time::Duration::from_secs(30));
    assert!(c.to_redacted_toml().contains("request_grace"));

    let text = format!(
        "{MINIMAL}[shutdown]\nmin_accept = \"5s\"\nmax_drain = \"25s\"\nrequest_grace = \"0s\"\n"
    );
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.shutdown.min_accept.get().as_secs(), 5);
    assert_eq!(c.shutdown.max_drain.get().as_secs(), 25);
    assert!(c.shutdown.request_grace.get().is_zero());

    let env = [(
        "DSQL_PROXY__SHUTDOWN__MAX_DRAIN".to_owned(),
        "3s".to_owned(),
    )];
    let c = Config::parse_with_env(MINIMAL, "text", env).unwrap();
    assert_eq!(c.shutdown.max_drain.get().as_secs(), 3);

    for (shutdown, needle) in [
        ("min_accept = \"30s\"", "must not exceed max_drain"),
        ("max_drain = \"soon\"", "whole number"),
        ("max_drian = \"1s\"", "unknown field"),
    ] {
        let text = format!("{MINIMAL}[shutdown]\n{shutdown}\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{shutdown}: {err}");
    }
}

const GLOBAL: &str = r#"
[listen]
read_only_address = "127.0.0.1:5433"
[routing]
probe_user = "app"
[backend]
kind = "aurora-global"
auth = "password"
password = "x"
[[endpoints]]
name = "east"
host = "east.example"
[[endpoints]]
name = "west"
host = "west.example"
"#;

#[test]
fn aurora_global_settings_parse_with_defaults() {
    let c = Config::parse(GLOBAL).unwrap();
    assert_eq!(c.backend.kind, BackendKind::AuroraGlobal);
    assert_eq!(c.routing.writer_wait.get().as_secs(), 30);
    assert_eq!(c.routing.max_replica_lag.get().as_secs(), 5);
    assert_eq!(c.routing.global_cluster_id, None);
    assert_eq!(
        c.listen.read_only_address,
        Some("127.0.0.1:5433".parse().unwrap())
    );
    let text = with_routing(
        GLOBAL,
        "writer_wait = \"2s\"\nmax_replica_lag = \"500ms\"\nglobal_cluster_id = \"my-global\"",
    );
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.routing.writer_wait.get().as_secs(), 2);
    assert_eq!(c.routing.max_replica_lag.get().as_millis(), 500);
    assert_eq!(c.routing.global_cluster_id.as_deref(), Some("my-global"));
    assert_eq!(c.routing.global_cluster_poll_interval.get().as_secs(), 5);
}

#[test]
fn aurora_global_rules_are_explained() {
    let cases = [
        (
            GLOBAL.replace(
                "auth = \"password\"\npassword = \"x\"",
                "auth = \"passthrough\"",
            ),
            "needs auth",
        ),
        (with_routing(GLOBAL, "probes = false"), "probes = true"),
        (
            GLOBAL.replace("kind = \"aurora-global\"", "kind = \"postgres\""),
            "read_only_address needs",
        ),
        (GLOBAL.replace("5433", "5432"), "must differ from address"),
        (
            with_routing(GLOBAL, "global_cluster_poll_interval = \"100ms\""),
            "at least 1s",
        ),
        (
            with_routing(GLOBAL, "global_cluster_id = \"\""),
            "must not be empty",
        ),
        (
            with_routing(
                &GLOBAL
                    .replace("kind = \"aurora-global\"", "kind = \"postgres\"")
                    .replace("read_only_address = \"127.0.0.1:5433\"", ""),
                "global_cluster_id = \"g\"",
            ),
            "global_cluster_id needs",
        ),
    ];
    for (text, needle) in cases {
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn the_rendering_shows_aurora_global_keys_only_for_that_kind() {
    const KEYS: [&str; 3] = [
        "writer_wait",
        "max_replica_lag",
        "global_cluster_poll_interval",
    ];
    let global = Config::parse(GLOBAL).unwrap().to_redacted_toml();
    let plain = Config::parse(MINIMAL).unwrap().to_redacted_toml();
    for key in KEYS {
        assert!(global.contains(key), "{key} missing:\n{global}");
        assert!(!plain.contains(key), "{key} shown for postgres:\n{plain}");
    }
    // Still the other routing keys, in the written order, and a valid config.
    assert!(plain.contains("probe_interval"), "{plain}");
    assert!(plain.find("[listen]") < plain.find("[backend]"), "{plain}");
    Config::parse(&plain.replace("<redacted>", "x")).unwrap();
}

#[test]
fn non_dsql_kinds_need_an_explicit_probe_user() {
    let without = MINIMAL.replace("probe_user = \"app\"\n", "");
    let err = Config::parse(&without).unwrap_err().to_string();
    assert!(
        err.contains("probe_user is required for [backend] kind = \"postgres\""),
        "{err}"
    );
    let err = Config::parse(&GLOBAL.replace("probe_user = \"app\"\n", ""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("which endpoint is the writer"), "{err}");
    // Without probes nobody logs in.
    Config::parse(&with_routing(&without, "probes = false")).unwrap();
    assert!(Config::parse(&with_routing(&without, "probe_user = \"\""))
        .unwrap_err()
        .to_string()
        .contains("must not be empty"));
    // DSQL has the admin role: the default stands.
    let dsql = without
        .replace("\"postgres\"", "\"dsql\"")
        .replace("\"require\"", "\"verify-full\"")
        .replace(
            "auth = \"password\"\npassword = \"hunter2\"",
            "auth = \"dsql-iam\"",
        );
    let c = Config::parse(&dsql).unwrap();
    assert_eq!(c.routing.probe_user(), "admin");
    assert_eq!(Config::parse(MINIMAL).unwrap().routing.probe_user(), "app");
}

#[test]
fn an_empty_route53_health_check_id_is_an_error() {
    for id in ["", "  "] {
        let text = format!("{MINIMAL}route53_health_check_id = \"{id}\"\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("route53_health_check_id is empty"), "{err}");
    }
}

#[test]
fn secret_overrides_are_strings_and_never_shown() {
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    // Digits, a boolean word and TOML syntax are passwords like any other.
    for secret in ["123456", "true", "[1, 2]", "0x10", "\"quoted\""] {
        let c = Config::parse_with_env(
            MINIMAL,
            "t",
            env(&[("DSQL_PROXY__BACKEND__PASSWORD", secret)]),
        )
        .unwrap();
        assert_eq!(c.backend.password.as_ref().unwrap().expose(), secret);
    }
    // A failing config with a secret override: the secret is not in the
    // error (here the override makes the listen side invalid).
    let err = Config::parse_with_env(
        MINIMAL,
        "t",
        env(&[
            ("DSQL_PROXY__LISTEN__PASSWORD", "s3cr3t-from-env"),
            ("DSQL_PROXY__LISTEN__MAX_CLIENT_CONNECTIONS", "many"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(!err.contains("s3cr3t-from-env"), "{err}");
    let err = Config::parse_with_env(
        MINIMAL,
        "t",
        env(&[("DSQL_PROXY__LISTEN__PASSWORD", "s3cr3t-from-env")]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("scram-sha-256"), "{err}");
    assert!(!err.contains("s3cr3t-from-env"), "{err}");
}

#[test]
fn toml_errors_never_show_a_secret_line() {
    let cases = [
        // Unterminated string.
        MINIMAL.replace("password = \"hunter2\"", "password = \"hunter2-long"),
        // Not a string: toml's own message would quote the number.
        MINIMAL.replace("password = \"hunter2\"", "password = 99887766"),
        MINIMAL.replace(
            "password = \"hunter2\"",
            "password = \"hunter2-long\" trailing",
        ),
        MINIMAL.replace(
            "password = \"hunter2\"",
            "\"password\" = [\"hunter2-long\"]",
        ),
    ];
    for text in cases {
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("line 7"), "{err}");
        assert!(err.contains("may hold a secret"), "{err}");
        for secret in ["hunter2", "99887766"] {
            assert!(!err.contains(secret), "{err}");
        }
    }
    // Other lines are shown as toml shows them.
    let err = Config::parse(&MINIMAL.replace("tls = \"require\"", "tls = \"require"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls = \"require"), "{err}");
}

#[test]
fn admin_settings_default_to_loopback_and_no_quitquitquit() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.admin, AdminConfig::default());
    assert!(!c.admin.quitquitquit);
    assert_eq!(c.admin.token_file, None);
    assert_eq!(c.admin.max_connections, 32);
    assert_eq!(c.backend.default_application_name, "");
    let text = format!(
        "[admin]\naddress = \"0.0.0.0:9090\"\ntoken_file = \"/run/token\"\n\
         quitquitquit = true\nmax_connections = 4\n{MINIMAL}"
    );
    let c = Config::parse(&text).unwrap();
    assert!(c.admin.quitquitquit);
    assert_eq!(c.admin.max_connections, 4);
    assert_eq!(
        c.admin.token_file.as_deref(),
        Some(std::path::Path::new("/run/token"))
    );
    let env = [(
        "DSQL_PROXY__ADMIN__QUITQUITQUIT".to_owned(),
        "true".to_owned(),
    )];
    assert!(
        Config::parse_with_env(MINIMAL, "t", env)
            .unwrap()
            .admin
            .quitquitquit
    );
    for bad in ["max_connections = 0", "token_file = \"\""] {
        let err = Config::parse(&format!("[admin]\n{bad}\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[admin]"), "{bad}: {err}");
    }
}

#[test]
fn server_lifetime_defaults_to_55m_for_dsql_only_and_stays_under_dsql_s_limit() {
    use std::time::Duration;
    let postgres = Config::parse(MINIMAL).unwrap();
    assert_eq!(postgres.backend.effective_server_lifetime(), Duration::ZERO);
    let dsql_text = MINIMAL.replace(
        "kind = \"postgres\"\nauth = \"password\"\npassword = \"hunter2\"\ntls = \"require\"",
        "kind = \"dsql\"\nauth = \"dsql-iam\"\ntls = \"verify-full\"",
    );
    let dsql = Config::parse(&dsql_text).unwrap();
    assert_eq!(
        dsql.backend.effective_server_lifetime(),
        Duration::from_secs(55 * 60)
    );
    let set = MINIMAL.replace("[backend]\n", "[backend]\nserver_lifetime = \"10m\"\n");
    let c = Config::parse(&set).unwrap();
    assert_eq!(
        c.backend.effective_server_lifetime(),
        Duration::from_secs(600)
    );
    let too_long = dsql_text.replace("[backend]\n", "[backend]\nserver_lifetime = \"60m\"\n");
    let err = Config::parse(&too_long).unwrap_err().to_string();
    assert!(err.contains("server_lifetime must be under 60m"), "{err}");
    let off = dsql_text.replace("[backend]\n", "[backend]\nserver_lifetime = \"0s\"\n");
    assert_eq!(
        Config::parse(&off)
            .unwrap()
            .backend
            .effective_server_lifetime(),
        Duration::ZERO
    );
}

#[test]
fn retry_is_off_by_default_and_parses_with_units() {
    let c = Config::parse(MINIMAL).unwrap();
    assert!(!c.retry.enabled());
    assert_eq!(c.retry.max_buffered, ByteSize::kib(256));
    assert_eq!(c.retry.sqlstates, DEFAULT_RETRY_SQLSTATES);
    let c = Config::parse(&format!(
        "{MINIMAL}\n[retry]\nmax_attempts = 10\nbase_delay = \"5ms\"\nmax_delay = \"1s\"\n\
         max_buffered = \"1MiB\"\nsqlstates = [\"40001\"]\n"
    ))
    .unwrap();
    assert!(c.retry.enabled());
    assert_eq!(c.retry.max_attempts, 10);
    assert_eq!(c.retry.base_delay.get().as_millis(), 5);
    assert_eq!(c.retry.max_buffered.get(), 1 << 20);
    let env = [("DSQL_PROXY__RETRY__MAX_ATTEMPTS", "4")].map(|(k, v)| (k.to_owned(), v.to_owned()));
    let c = Config::parse_with_env(MINIMAL, "text", env).unwrap();
    assert_eq!(c.retry.max_attempts, 4);
}

#[test]
fn bad_retry_settings_are_explained() {
    let cases = [
        ("max_attempts = 0", "between 1 (off) and 100"),
        ("max_attempts = 1000", "between 1 (off) and 100"),
        ("base_delay = \"0s\"", "above 0"),
        (
            "base_delay = \"1s\"\nmax_delay = \"10ms\"",
            "at most max_delay",
        ),
        ("max_delay = \"1m\"", "at most 10s"),
        ("max_buffered = \"12B\"", "between 1KiB and 64MiB"),
        ("max_buffered = \"1GiB\"", "unknown unit"),
        ("max_attempts = 3\nsqlstates = []", "must not be empty"),
        ("sqlstates = [\"4001\"]", "is not a SQLSTATE"),
        ("sqlstates = [\"57014\"]", "cannot be retried"),
        ("sqlstates = [\"08006\"]", "cannot be retried"),
    ];
    for (lines, expected) in cases {
        let err = Config::parse(&format!("{MINIMAL}\n[retry]\n{lines}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{lines}: {err}");
    }
}

#[test]
fn pool_defaults_and_rules() {
    let c = Config::parse(MINIMAL).unwrap();
    assert!(c.pool.enabled);
    assert_eq!((c.pool.max_idle, c.pool.max_idle_total), (20, 100));
    assert_eq!(c.pool.idle_timeout.get().as_secs(), 60);
    assert_eq!(c.pool.min_idle, 0);
    let c = Config::parse(&format!(
        "{MINIMAL}\n[pool]\nmin_idle = 2\nmin_idle_user = \"app\"\nmin_idle_database = \"appdb\"\n"
    ))
    .unwrap();
    assert_eq!(c.pool.min_idle_user.as_deref(), Some("app"));
    let cases = [
        ("max_idle = 0", "at least 1"),
        (
            "max_idle = 50\nmax_idle_total = 10",
            "at most max_idle_total",
        ),
        ("max_idle_total = 20000", "at most 10000"),
        ("idle_timeout = \"0s\"", "above 0"),
        ("min_idle = 30", "at most max_idle"),
        ("min_idle = 1", "needs min_idle_user"),
        (
            "enabled = false\nmin_idle = 1\nmin_idle_user = \"app\"",
            "needs enabled = true",
        ),
    ];
    for (lines, expected) in cases {
        let err = Config::parse(&format!("{MINIMAL}\n[pool]\n{lines}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{lines}: {err}");
    }
    let passthrough = MINIMAL
        .replace("auth = \"password\"", "auth = \"passthrough\"")
        .replace("password = \"hunter2\"\n", "");
    let err = Config::parse(&format!(
        "{passthrough}\n[pool]\nmin_idle = 1\nmin_idle_user = \"app\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("passthrough"), "{err}");
}
