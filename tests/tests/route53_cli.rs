//! `dsql-proxy route53 setup | teardown | status`, the real binary against
//! moto's server as Route 53 (`AWS_ENDPOINT_URL_ROUTE_53`). Each test starts
//! its own moto; a test fails (never skips) when moto cannot be started.

use std::process::Output;

use aws_sdk_route53::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_route53::types::{HealthCheck, HealthCheckConfig, HealthCheckType, TagResourceType};
use dsql_proxy_tests::aws_endpoints::{HttpResponse, HttpServer};
use dsql_proxy_tests::moto::{self, MotoServer};
use dsql_proxy_tests::{free_port, run_proxy_cmd, run_proxy_cmd_with_env};

const CONFIG: &str = r#"# Two-Region cluster (comments must survive --write)
[backend]
kind = "dsql"
auth = "dsql-iam"

# the primary Region
[[endpoints]]
name = "us-east-1"   # keep this comment
region = "us-east-1"
host = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"

[[endpoints]]
name = "us-east-2"
host = "bcdefghijklmnopqrstuvwxyza.dsql.us-east-2.on.aws"
priority = 2

[[endpoints]]
name = "local"
region = "eu-west-1"
host = "db.internal.example"
port = 6432

[routing]
route53 = "veto"
"#;

/// (endpoint name, host, port, Region tag, cluster tag)
const ENDPOINTS: [(&str, &str, u16, &str, Option<&str>); 3] = [
    (
        "us-east-1",
        "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws",
        5432,
        "us-east-1",
        Some("abcdefghijklmnopqrstuvwxyz"),
    ),
    (
        "us-east-2",
        "bcdefghijklmnopqrstuvwxyza.dsql.us-east-2.on.aws",
        5432,
        "us-east-2",
        Some("bcdefghijklmnopqrstuvwxyza"),
    ),
    ("local", "db.internal.example", 6432, "eu-west-1", None),
];

struct ConfigFile {
    _dir: tempfile::TempDir,
    path: String,
}

impl ConfigFile {
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text).expect("write config");
        Self {
            _dir: dir,
            path: path.display().to_string(),
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.path).expect("read config")
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `dsql-proxy route53 <args> --config <file>` against `moto`;
/// asserts success and that the secret key never shows.
fn r53(moto: &MotoServer, config: &ConfigFile, args: &[&str]) -> String {
    let out = r53_raw(&moto.env(), config, args);
    assert!(
        out.status.success(),
        "route53 {args:?} failed: {out:?}\nstdout:\n{}\nstderr:\n{}\nmoto log:\n{}",
        stdout(&out),
        stderr(&out),
        moto.log()
    );
    stdout(&out)
}

fn r53_raw(env: &[(String, String)], config: &ConfigFile, args: &[&str]) -> Output {
    let mut full = vec!["route53"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--config", &config.path]);
    let out = run_proxy_cmd_with_env(&full, env);
    for text in [stdout(&out), stderr(&out)] {
        assert!(
            !text.contains(moto::SECRET_ACCESS_KEY),
            "secret printed: {text}"
        );
        assert!(!text.contains("panicked"), "panic: {text}");
    }
    out
}

/// `route53_health_check_id = "<id>"` values, in order.
fn printed_ids(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("route53_health_check_id = \""))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect()
}

fn client(moto: &MotoServer) -> aws_sdk_route53::Client {
    let conf = aws_sdk_route53::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(moto.url())
        .credentials_provider(Credentials::new(
            moto::ACCESS_KEY_ID,
            moto::SECRET_ACCESS_KEY,
            None,
            None,
            "route53_cli test",
        ))
        .build();
    aws_sdk_route53::Client::from_conf(conf)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn list_checks(moto: &MotoServer) -> Vec<HealthCheck> {
    let client = client(moto);
    runtime().block_on(async {
        client
            .list_health_checks()
            .send()
            .await
            .unwrap_or_else(|e| panic!("list: {e:?}\n{}", moto.log()))
            .health_checks()
            .to_vec()
    })
}

fn tags(moto: &MotoServer, id: &str) -> Vec<(String, String)> {
    let client = client(moto);
    runtime().block_on(async {
        let out = client
            .list_tags_for_resource()
            .resource_type(TagResourceType::Healthcheck)
            .resource_id(id)
            .send()
            .await
            .unwrap_or_else(|e| panic!("tags: {e:?}"));
        out.resource_tag_set()
            .map(|s| {
                s.tags()
                    .iter()
                    .map(|t| {
                        (
                            t.key().unwrap_or_default().to_owned(),
                            t.value().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

fn ids_of(checks: &[HealthCheck]) -> Vec<String> {
    let mut ids: Vec<String> = checks.iter().map(|c| c.id().to_owned()).collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn setup_is_idempotent_writes_the_ids_back_and_teardown_deletes_them() {
    let moto = MotoServer::start();
    let config = ConfigFile::new(CONFIG);

    // First run: one TCP check per endpoint, with the default settings.
    let first = r53(&moto, &config, &["setup"]);
    let ids = printed_ids(&first);
    assert_eq!(ids.len(), 3, "{first}");
    assert!(first.contains("created 3, already there 0"), "{first}");
    assert!(first.contains("--write"), "{first}");
    assert_eq!(
        config.text(),
        CONFIG,
        "the file is only written with --write"
    );
    let checks = list_checks(&moto);
    assert_eq!(sorted(ids.clone()), ids_of(&checks), "{first}");
    for ((name, host, port, region, cluster), id) in ENDPOINTS.iter().zip(&ids) {
        let check = checks.iter().find(|c| c.id() == id).expect("listed");
        assert!(
            check.caller_reference().starts_with("dsqlproxy-"),
            "{check:?}"
        );
        let c = check.health_check_config().expect("config");
        assert_eq!(c.r#type(), &HealthCheckType::Tcp, "{name}");
        assert_eq!(c.fully_qualified_domain_name(), Some(*host), "{name}");
        assert_eq!(c.port(), Some(i32::from(*port)), "{name}");
        assert_eq!(c.request_interval(), Some(10), "{name}");
        assert_eq!(c.failure_threshold(), Some(3), "{name}");
        let tags = tags(&moto, id);
        let tag = |k: &str| {
            tags.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert!(tag("Name").is_some_and(|n| n.contains(name)), "{tags:?}");
        assert_eq!(tag("dsql-proxy:endpoint"), Some(*name), "{tags:?}");
        assert_eq!(tag("dsql-proxy:region"), Some(*region), "{tags:?}");
        assert_eq!(tag("dsql-proxy:cluster"), *cluster, "{tags:?}");
        assert_eq!(tag("dsql-proxy:host"), Some(*host), "{tags:?}");
    }
    // Every reference differs (they name the endpoint).
    let mut refs: Vec<&str> = checks.iter().map(HealthCheck::caller_reference).collect();
    refs.dedup();
    assert_eq!(refs.len(), 3);

    // Again: nothing new, the same ids.
    let second = r53(&moto, &config, &["setup"]);
    assert_eq!(printed_ids(&second), ids, "{second}");
    assert!(second.contains("created 0, already there 3"), "{second}");
    assert_eq!(ids_of(&list_checks(&moto)), sorted(ids.clone()));

    // --write: the ids land in the file, comments stay, and it still loads.
    let written = r53(&moto, &config, &["setup", "--write"]);
    assert_eq!(printed_ids(&written), ids, "{written}");
    assert_eq!(ids_of(&list_checks(&moto)), sorted(ids.clone()));
    let text = config.text();
    assert_eq!(printed_ids(&text), ids, "{text}");
    for comment in [
        "# Two-Region cluster",
        "# the primary Region",
        "name = \"us-east-1\"   # keep this comment",
    ] {
        assert!(text.contains(comment), "{text}");
    }
    let check = run_proxy_cmd(&["check", "--config", &config.path]);
    assert!(check.status.success(), "{check:?}");
    let resolved = stdout(&check);
    for id in &ids {
        assert!(resolved.contains(id.as_str()), "{resolved}");
    }
    // Once more with --write: the file is already right.
    let again = r53(&moto, &config, &["setup", "--write"]);
    assert!(again.contains("is up to date"), "{again}");
    assert_eq!(config.text(), text);

    // status: every endpoint's check and its checkers' observations.
    let status = r53(&moto, &config, &["status"]);
    for ((name, ..), id) in ENDPOINTS.iter().zip(&ids) {
        assert!(status.contains(&format!("{name} (")), "{status}");
        assert!(status.contains(id.as_str()), "{status}");
    }
    assert_eq!(
        status
            .matches("verdict: healthy (1 of 1 checkers report success)")
            .count(),
        3,
        "{status}"
    );
    assert!(status.contains("CHECKER REGION"), "{status}");
    assert!(status.contains("Success"), "{status}");
    assert!(status.contains("us-east-1 "), "{status}");

    // teardown --write: every check deleted, the lines removed.
    let down = r53(&moto, &config, &["teardown", "--write"]);
    assert!(down.contains("deleted 3"), "{down}");
    for id in &ids {
        assert!(
            down.contains(&format!("deleted health check {id}")),
            "{down}"
        );
    }
    assert!(list_checks(&moto).is_empty());
    assert_eq!(config.text(), CONFIG, "teardown --write restores the file");
    let check = run_proxy_cmd(&["check", "--config", &config.path]);
    assert!(check.status.success(), "{check:?}");

    // A second teardown finds nothing and is fine.
    let again = r53(&moto, &config, &["teardown"]);
    assert!(again.contains("deleted 0"), "{again}");
    // And status says there is nothing.
    let status = r53(&moto, &config, &["status"]);
    assert_eq!(status.matches("no health check").count(), 3, "{status}");
}

#[test]
fn flags_set_interval_and_threshold_and_other_settings_get_their_own_check() {
    let moto = MotoServer::start();
    let config = ConfigFile::new(CONFIG);
    let slow = r53(
        &moto,
        &config,
        &[
            "setup",
            "--request-interval",
            "30",
            "--failure-threshold",
            "5",
        ],
    );
    let slow_ids = printed_ids(&slow);
    assert_eq!(slow_ids.len(), 3, "{slow}");
    for check in list_checks(&moto) {
        let c = check.health_check_config().expect("config");
        assert_eq!(
            (c.request_interval(), c.failure_threshold()),
            (Some(30), Some(5))
        );
    }
    // The same flags again: nothing new.
    let same = r53(
        &moto,
        &config,
        &[
            "setup",
            "--request-interval",
            "30",
            "--failure-threshold",
            "5",
        ],
    );
    assert_eq!(printed_ids(&same), slow_ids, "{same}");
    assert_eq!(list_checks(&moto).len(), 3);

    // Other settings: new checks; the old ones are pointed out, not used.
    let fast = r53(&moto, &config, &["setup"]);
    let fast_ids = printed_ids(&fast);
    assert_eq!(fast_ids.len(), 3, "{fast}");
    assert!(fast_ids.iter().all(|id| !slow_ids.contains(id)), "{fast}");
    assert_eq!(
        fast.matches("earlier setup with other settings").count(),
        3,
        "{fast}"
    );
    assert_eq!(list_checks(&moto).len(), 6);

    // teardown deletes every check setup made for the endpoints.
    let down = r53(&moto, &config, &["teardown"]);
    assert!(down.contains("deleted 6"), "{down}");
    assert!(list_checks(&moto).is_empty());

    // Invalid flags are refused before anything is called.
    for bad in [
        ["setup", "--request-interval", "20"],
        ["setup", "--failure-threshold", "11"],
    ] {
        let out = r53_raw(&moto.env(), &config, &bad);
        assert!(!out.status.success(), "{bad:?}: {out:?}");
        assert!(stderr(&out).contains("invalid value"), "{}", stderr(&out));
    }
}

#[test]
fn teardown_leaves_checks_it_did_not_create_unless_forced() {
    let moto = MotoServer::start();
    let client = client(&moto);
    let foreign = runtime().block_on(async {
        client
            .create_health_check()
            .caller_reference("made-in-the-console")
            .health_check_config(
                HealthCheckConfig::builder()
                    .r#type(HealthCheckType::Tcp)
                    .fully_qualified_domain_name("db.internal.example")
                    .port(6432)
                    .build()
                    .expect("config"),
            )
            .send()
            .await
            .expect("create")
            .health_check()
            .expect("check")
            .id()
            .to_owned()
    });
    let text = CONFIG.replace(
        "port = 6432\n",
        &format!("port = 6432\nroute53_health_check_id = \"{foreign}\"\n"),
    );
    let config = ConfigFile::new(&text);
    // status reads the configured check.
    let status = r53(&moto, &config, &["status"]);
    assert!(
        status.contains(&format!("health check {foreign} (from the config)")),
        "{status}"
    );

    let down = r53(&moto, &config, &["teardown", "--write"]);
    assert!(down.contains("left alone (--force deletes it)"), "{down}");
    assert!(down.contains("deleted 0"), "{down}");
    assert_eq!(ids_of(&list_checks(&moto)), vec![foreign.clone()]);
    assert_eq!(config.text(), text, "a check left alone stays in the file");

    let forced = r53(&moto, &config, &["teardown", "--force", "--write"]);
    assert!(
        forced.contains(&format!("deleted health check {foreign}")),
        "{forced}"
    );
    assert!(list_checks(&moto).is_empty());
    assert_eq!(config.text(), CONFIG);
}

#[test]
fn missing_credentials_and_unreachable_endpoints_are_clear_errors() {
    let config = ConfigFile::new(CONFIG);

    // No credentials anywhere: refused before any request.
    let mut env = moto::isolated_aws_env();
    env.push((
        "AWS_ENDPOINT_URL_ROUTE_53".into(),
        format!("http://127.0.0.1:{}", free_port()),
    ));
    for action in ["setup", "teardown", "status"] {
        let out = r53_raw(&env, &config, &[action]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{action}: {out:?}");
        assert!(
            err.contains("no AWS credentials to call Route 53 with"),
            "{err}"
        );
        assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    }

    // Credentials, but nothing listens at the endpoint.
    let port = free_port();
    let mut env = moto::isolated_aws_env();
    env.extend([
        ("AWS_ACCESS_KEY_ID".into(), moto::ACCESS_KEY_ID.into()),
        (
            "AWS_SECRET_ACCESS_KEY".into(),
            moto::SECRET_ACCESS_KEY.into(),
        ),
        (
            "AWS_ENDPOINT_URL_ROUTE_53".into(),
            format!("http://127.0.0.1:{port}"),
        ),
    ]);
    for action in ["setup", "teardown", "status"] {
        let out = r53_raw(&env, &config, &[action]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{action}: {out:?}");
        assert!(
            err.contains(&format!(
                "cannot list the Route 53 health checks at http://127.0.0.1:{port} \
                 (AWS_ENDPOINT_URL_ROUTE_53)"
            )),
            "{err}"
        );
        assert!(err.contains("Connection refused"), "{err}");
    }
    assert_eq!(
        std::fs::read_to_string(&config.path).ok().as_deref(),
        Some(CONFIG)
    );
}

const ROUTE53_XMLNS: &str = "https://route53.amazonaws.com/doc/2013-04-01/";

/// A scripted Route 53 that, like the real one (and unlike moto), refuses a
/// `CallerReference` a deleted check used: every CreateHealthCheck gets
/// `HealthCheckAlreadyExists` unless its reference ends with `accept`.
fn conflicting_route53(accept: Option<&'static str>) -> HttpServer {
    HttpServer::start("route53-conflict", move |req| {
        let path = req.path();
        let xml = |status: u16, body: String| {
            HttpResponse::xml(status, format!("<?xml version=\"1.0\"?>\n{body}"))
        };
        match (req.method.as_str(), path) {
            ("GET", "/2013-04-01/healthcheck") => xml(
                200,
                format!(
                    "<ListHealthChecksResponse xmlns=\"{ROUTE53_XMLNS}\"><HealthChecks/>\
                     <Marker></Marker><IsTruncated>false</IsTruncated><MaxItems>100</MaxItems>\
                     </ListHealthChecksResponse>"
                ),
            ),
            ("POST", "/2013-04-01/healthcheck") => {
                let reference = req
                    .body
                    .split("<CallerReference>")
                    .nth(1)
                    .and_then(|rest| rest.split("</CallerReference>").next())
                    .unwrap_or_default()
                    .to_owned();
                if accept.is_some_and(|suffix| reference.ends_with(suffix)) {
                    xml(
                        201,
                        format!(
                            "<CreateHealthCheckResponse xmlns=\"{ROUTE53_XMLNS}\"><HealthCheck>\
                             <Id>hc-new</Id><CallerReference>{reference}</CallerReference>\
                             <HealthCheckConfig><Port>6432</Port><Type>TCP</Type>\
                             <FullyQualifiedDomainName>db.internal.example</FullyQualifiedDomainName>\
                             <RequestInterval>10</RequestInterval><FailureThreshold>3</FailureThreshold>\
                             </HealthCheckConfig><HealthCheckVersion>1</HealthCheckVersion>\
                             </HealthCheck></CreateHealthCheckResponse>"
                        ),
                    )
                    .with_header("Location", "https://route53.amazonaws.com/2013-04-01/healthcheck/hc-new")
                } else {
                    xml(
                        409,
                        format!(
                            "<ErrorResponse xmlns=\"{ROUTE53_XMLNS}\"><Error><Type>Sender</Type>\
                             <Code>HealthCheckAlreadyExists</Code><Message>A health check with \
                             caller reference {reference} already exists.</Message></Error>\
                             <RequestId>r-1</RequestId></ErrorResponse>"
                        ),
                    )
                }
            }
            ("GET", "/2013-04-01/tags/healthcheck/hc-new") => xml(
                200,
                format!(
                    "<ListTagsForResourceResponse xmlns=\"{ROUTE53_XMLNS}\"><ResourceTagSet>\
                     <ResourceType>healthcheck</ResourceType><ResourceId>hc-new</ResourceId>\
                     <Tags/></ResourceTagSet></ListTagsForResourceResponse>"
                ),
            ),
            ("POST", "/2013-04-01/tags/healthcheck/hc-new") => xml(
                200,
                format!("<ChangeTagsForResourceResponse xmlns=\"{ROUTE53_XMLNS}\"/>"),
            ),
            _ => HttpResponse::text(404, "not scripted"),
        }
    })
}

fn conflict_env(server: &HttpServer) -> Vec<(String, String)> {
    let mut env = moto::isolated_aws_env();
    env.extend([
        ("AWS_ACCESS_KEY_ID".into(), moto::ACCESS_KEY_ID.into()),
        (
            "AWS_SECRET_ACCESS_KEY".into(),
            moto::SECRET_ACCESS_KEY.into(),
        ),
        ("AWS_ENDPOINT_URL_ROUTE_53".into(), server.base_url()),
    ]);
    env
}

fn created_references(server: &HttpServer) -> Vec<String> {
    server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path() == "/2013-04-01/healthcheck")
        .filter_map(|r| {
            r.body
                .split("<CallerReference>")
                .nth(1)
                .and_then(|rest| rest.split("</CallerReference>").next())
                .map(str::to_owned)
        })
        .collect()
}

const ONE_ENDPOINT: &str = r#"[backend]
kind = "dsql"
[[endpoints]]
name = "local"
host = "db.internal.example"
port = 6432
"#;

#[test]
fn a_reference_used_by_a_deleted_check_moves_to_the_next_generation() {
    let server = conflicting_route53(Some("-g2"));
    let config = ConfigFile::new(ONE_ENDPOINT);
    let out = r53_raw(&conflict_env(&server), &config, &["setup", "--write"]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{out:?}\n{text}\n{}\n{}",
        stderr(&out),
        server.describe_requests()
    );
    let refs = created_references(&server);
    assert_eq!(refs.len(), 2, "{}", server.describe_requests());
    assert!(refs[0].starts_with("dsqlproxy-"), "{refs:?}");
    assert_eq!(refs[1], format!("{}-g2", refs[0]));
    assert!(text.contains("created health check hc-new"), "{text}");
    assert!(
        text.contains("HealthCheckAlreadyExists, so generation 2 was used"),
        "{text}"
    );
    assert_eq!(printed_ids(&text), ["hc-new"]);
    assert_eq!(printed_ids(&config.text()), ["hc-new"]);
    // The new check was tagged.
    assert!(server.requests().iter().any(|r| r.method == "POST"
        && r.path() == "/2013-04-01/tags/healthcheck/hc-new"
        && r.body.contains("dsql-proxy:endpoint")));
}

#[test]
fn a_reference_conflict_that_never_ends_is_a_clear_error() {
    let server = conflicting_route53(None);
    let config = ConfigFile::new(ONE_ENDPOINT);
    let out = r53_raw(&conflict_env(&server), &config, &["setup", "--write"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("cannot set up the health check of endpoint \"local\""),
        "{err}"
    );
    assert!(err.contains("HealthCheckAlreadyExists"), "{err}");
    assert!(
        err.contains("are all taken by deleted or changed health checks"),
        "{err}"
    );
    assert_eq!(created_references(&server).len(), 20);
    assert_eq!(config.text(), ONE_ENDPOINT, "nothing written");
}

/// `dsql-proxy drill --method route53`: the selected Region's health check
/// is inverted (UpdateHealthCheck Inverted=true) so the proxy's Route 53
/// veto moves new sessions away, then restored; moto plays Route 53.
#[test]
fn the_drill_inverts_the_selected_regions_health_check_and_restores_it() {
    use dsql_proxy_tests::{RegionsOptions, RegionsStack};
    let moto = MotoServer::start();
    let client = client(&moto);
    let check = runtime().block_on(async {
        client
            .create_health_check()
            .caller_reference("drill-region-a")
            .health_check_config(
                HealthCheckConfig::builder()
                    .r#type(HealthCheckType::Tcp)
                    .fully_qualified_domain_name("db.test.internal")
                    .port(5432)
                    .build()
                    .expect("config"),
            )
            .send()
            .await
            .expect("create")
            .health_check()
            .expect("check")
            .id()
            .to_owned()
    });
    let stack = RegionsStack::start(RegionsOptions {
        routing: vec![
            "probe_interval = \"200ms\"".into(),
            "switch_after = 2".into(),
            "route53_poll_interval = \"1s\"".into(),
        ],
        endpoint_extra: vec![
            vec![format!("route53_health_check_id = \"{check}\"")],
            Vec::new(),
        ],
        env: moto.env(),
        ..RegionsOptions::default()
    });
    let admin = stack.admin_addr();
    let runtime = runtime();
    assert!(
        runtime
            .block_on(stack.wait_for_landing("region-a", std::time::Duration::from_secs(15)))
            .is_some(),
        "{}",
        stack.proxy.logs()
    );
    let out = run_proxy_cmd_with_env(
        &[
            "drill",
            "--method",
            "route53",
            "--admin",
            &admin.to_string(),
            "--connect",
            &format!(
                "host=127.0.0.1 port={} user={} dbname={}",
                stack.listen.port(),
                dsql_proxy_tests::APP_USER,
                dsql_proxy_tests::APP_DB
            ),
            "--timeout",
            "20s",
        ],
        &moto.env(),
    );
    let timeline = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{timeline}\n{}\n--- proxy ---\n{}",
        stderr(&out),
        stack.proxy.logs()
    );
    for step in [
        format!("step 2: took region-a out: Route 53 health check {check} inverted"),
        "step 3: new sessions work and use region-b".to_owned(),
        format!("step 4: restored region-a (health check {check} no longer inverted)"),
        "step 5: new sessions work and use region-a again".to_owned(),
        "drill passed".to_owned(),
    ] {
        assert!(timeline.contains(&step), "{step:?} missing:\n{timeline}");
    }
    let inverted = runtime.block_on(async {
        client
            .get_health_check()
            .health_check_id(&check)
            .send()
            .await
            .expect("get")
            .health_check()
            .and_then(|c| c.health_check_config())
            .and_then(|c| c.inverted())
    });
    assert_ne!(inverted, Some(true), "the check is restored");
}
