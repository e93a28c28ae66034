//! The packaging: `Dockerfile`, `deploy/kubernetes`, `deploy/prometheus`,
//! `deploy/iam` and `deploy/grafana`, checked against the real proxy.
//!
//! No Docker engine or Kubernetes API is available to the tests, so the files
//! are parsed and their fields checked; wherever the proxy itself is the
//! authority, it is asked: the ConfigMap's `proxy.toml` goes through
//! `dsql-proxy check`, the admin port is the one the binary resolves, every
//! metric the dashboard and the alerts query is looked up in a running
//! proxy's `/metrics`, and the batch Job's `/quitquitquit` call really stops
//! a proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dsql_proxy_tests::dsql_stack::isolated_aws_env;
use dsql_proxy_tests::metrics::scrape;
use dsql_proxy_tests::route53::FakeRoute53;
use dsql_proxy_tests::{
    connect_with, fixture, free_addr, proxy_toml, run_proxy_cmd, AuthMethod, PgOptions, PgServer,
    ProxyOptions, ProxyProcess, APP_DB, APP_USER,
};
use serde::Deserialize;
use serde_json::Value;

/// `[shutdown] max_drain` plus `request_grace` by default: the longest the
/// proxy drains sessions after SIGTERM, which the pod's grace period must
/// leave room for.
const DEFAULT_MAX_DRAIN_SECS: u64 = 20 + 5;

/// Where the batch Job mounts the admin token Secret.
const TOKEN_DIR: &str = "/var/run/secrets/dsql-proxy-admin";

/// The image's config path, which the ConfigMap is mounted to provide.
const CONFIG_PATH: &str = "/etc/dsql-proxy/proxy.toml";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every file under `dir` (recursively) whose name ends with one of `exts`.
fn files_under(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if exts.iter().any(|e| path.to_string_lossy().ends_with(e)) {
                out.push(path);
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no {exts:?} under {}", dir.display());
    out
}

/// Every non-empty YAML document in the file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "kustomization.yaml")
}

/// The plain Prometheus rules file (not a Kubernetes object).
fn rules_file() -> PathBuf {
    deploy("prometheus/dsql-proxy.rules.yml")
}

/// Every Kubernetes object under deploy/kubernetes and deploy/prometheus.
fn k8s_objects() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for dir in ["kubernetes", "prometheus"] {
        for path in files_under(&deploy(dir), &[".yaml", ".yml"]) {
            if is_kustomization(&path) || path == rules_file() {
                continue;
            }
            for doc in yaml_documents(&path) {
                out.push((path.clone(), doc));
            }
        }
    }
    out
}

fn object(kind: &str, name: &str) -> Value {
    k8s_objects()
        .into_iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} under deploy/"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

fn array<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not a list: {v}"))
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    array(list, "containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {list}"))
}

fn env_value<'a>(c: &'a Value, name: &str) -> &'a str {
    array(&c["env"], "env")
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("container {} has no env {name}", c["name"]))
}

/// The port number behind a probe's or Service's `port` (a number, or the
/// name of one of the container's ports).
fn container_port(c: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = str_of(port, "port");
    array(&c["ports"], "ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container {} has no port named {name}", c["name"]))
}

/// Writes `toml` to a temp file and runs the real `dsql-proxy check` on it;
/// returns the resolved configuration it prints.
fn proxy_check(toml: &str) -> toml::Table {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).expect("write config");
    check_file(&path)
}

fn check_file(path: &Path) -> toml::Table {
    let path = path.to_string_lossy();
    let out = run_proxy_cmd(&["check", "--config", &path]);
    assert!(
        out.status.success(),
        "dsql-proxy check --config {path} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .parse()
        .unwrap_or_else(|e| panic!("check output is not TOML: {e}"))
}

fn resolved_addr(config: &toml::Table, section: &str) -> SocketAddr {
    config
        .get(section)
        .and_then(|s| s.get("address"))
        .and_then(|a| a.as_str())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no [{section}] address in {config}"))
}

/// The ConfigMap's `proxy.toml`.
fn configmap_toml() -> String {
    let cm = object("ConfigMap", "dsql-proxy-config");
    str_of(&cm["data"]["proxy.toml"], "data.proxy.toml").to_owned()
}

/// The admin port the binary uses when `[admin]` is not configured.
fn default_admin_port() -> u16 {
    let mut toml = configmap_toml();
    let start = toml.find("[admin]").expect("ConfigMap has [admin]");
    let end = start
        + toml[start..]
            .find("[backend]")
            .expect("[backend] after [admin]");
    toml.replace_range(start..end, "");
    resolved_addr(&proxy_check(&toml), "admin").port()
}

fn assert_hardened(c: &Value) {
    let sc = &c["securityContext"];
    let name = &c["name"];
    assert_eq!(sc["runAsNonRoot"], true, "{name}: runAsNonRoot");
    assert_eq!(
        sc["readOnlyRootFilesystem"], true,
        "{name}: readOnlyRootFilesystem"
    );
    assert_eq!(
        sc["allowPrivilegeEscalation"], false,
        "{name}: allowPrivilegeEscalation"
    );
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{name}: capabilities"
    );
    assert_eq!(
        sc["seccompProfile"]["type"], "RuntimeDefault",
        "{name}: seccompProfile"
    );
    if let Some(uid) = sc["runAsUser"].as_u64() {
        assert_ne!(uid, 0, "{name}: runAsUser");
    }
}

fn assert_resources(c: &Value) {
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][resource].is_string(),
                "container {}: resources.{kind}.{resource} missing",
                c["name"]
            );
        }
    }
}

fn http_get(c: &Value, probe: &str) -> (String, u64) {
    let get = &c[probe]["httpGet"];
    (
        str_of(&get["path"], probe).to_owned(),
        container_port(c, &get["port"]),
    )
}

#[test]
fn every_manifest_parses_and_every_object_names_itself() {
    let mut seen = BTreeSet::new();
    let objects = k8s_objects();
    for (path, o) in &objects {
        let where_ = path.display();
        for field in [&o["apiVersion"], &o["kind"], &o["metadata"]["name"]] {
            assert!(
                field.as_str().is_some_and(|s| !s.is_empty()),
                "{where_}: apiVersion, kind and metadata.name are required: {o}"
            );
        }
        assert!(
            seen.insert((o["kind"].to_string(), o["metadata"]["name"].to_string())),
            "{where_}: duplicate {} {}",
            o["kind"],
            o["metadata"]["name"]
        );
    }
    let kinds: BTreeSet<&str> = objects
        .iter()
        .filter_map(|(_, o)| o["kind"].as_str())
        .collect();
    for kind in [
        "ConfigMap",
        "Deployment",
        "Job",
        "NetworkPolicy",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(kind), "no {kind} under deploy/: {kinds:?}");
    }
    for dir in ["iam", "grafana"] {
        for path in files_under(&deploy(dir), &[".json"]) {
            json_file(&path);
        }
    }
}

#[test]
fn kustomizations_list_existing_files_and_cover_every_image() {
    let kustomizations: Vec<PathBuf> = files_under(&root().join("deploy"), &[".yaml"])
        .into_iter()
        .filter(|p| is_kustomization(p))
        .collect();
    assert!(kustomizations.len() >= 4, "{kustomizations:?}");
    for path in kustomizations {
        let k = &yaml_documents(&path)[0];
        assert_eq!(k["kind"], "Kustomization", "{}", path.display());
        let dir = path.parent().expect("file has a directory");
        let mut listed = BTreeSet::new();
        let mut images_used = BTreeSet::new();
        for entry in array(&k["resources"], "resources") {
            let target = dir.join(str_of(entry, "resource"));
            if target.is_dir() {
                assert!(
                    target.join("kustomization.yaml").is_file(),
                    "{}: {} is a directory without kustomization.yaml",
                    path.display(),
                    target.display()
                );
                continue;
            }
            assert!(
                target.is_file(),
                "{}: {} does not exist",
                path.display(),
                target.display()
            );
            listed.insert(target.clone());
            for doc in yaml_documents(&target) {
                let spec = &doc["spec"]["template"]["spec"];
                for list in ["containers", "initContainers"] {
                    for c in spec[list].as_array().into_iter().flatten() {
                        images_used.insert(str_of(&c["image"], "image").to_owned());
                    }
                }
            }
        }
        // Every object file beside the kustomization is one of its resources.
        for file in std::fs::read_dir(dir).expect("read dir") {
            let file = file.expect("dir entry").path();
            let yaml = file.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if yaml && !is_kustomization(&file) && file != rules_file() {
                assert!(
                    listed.contains(&file),
                    "{} is not listed in {}",
                    file.display(),
                    path.display()
                );
            }
        }
        let images_set: BTreeSet<String> = k["images"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| str_of(&i["name"], "images[].name").to_owned())
            .collect();
        assert!(
            images_used.is_subset(&images_set),
            "{}: images {images_used:?} not all set in images: {images_set:?}",
            path.display()
        );
    }
}

#[test]
fn deployment_runs_the_proxy_as_a_hardened_native_sidecar() {
    let deployment = object("Deployment", "app");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    let proxy = container(&spec["initContainers"], "dsql-proxy");
    assert_eq!(proxy["restartPolicy"], "Always", "native sidecar");
    assert_eq!(proxy["image"], "dsql-proxy");

    // Probes hit the admin server the ConfigMap configures, on the port the
    // binary uses by default.
    let config = proxy_check(&configmap_toml());
    let admin = resolved_addr(&config, "admin");
    assert!(
        admin.ip().is_unspecified(),
        "kubelet probes the pod IP: {admin}"
    );
    assert_eq!(admin.port(), default_admin_port());
    let admin_port = u64::from(admin.port());
    for (probe, path) in [
        ("startupProbe", "/startup"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(
            http_get(proxy, probe),
            (path.to_owned(), admin_port),
            "{probe}"
        );
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // The config reaches the path the image reads.
    assert_eq!(env_value(proxy, "DSQL_PROXY_CONFIG"), CONFIG_PATH);
    let mount = array(&proxy["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| CONFIG_PATH.starts_with(&format!("{}/", str_of(&m["mountPath"], "mountPath"))))
        .expect("the config directory is mounted");
    let volume = array(&spec["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume exists");
    assert_eq!(volume["configMap"]["name"], "dsql-proxy-config");

    // The app reaches the proxy over the pod's loopback.
    let listen = resolved_addr(&config, "listen");
    assert!(listen.ip().is_loopback(), "{listen}");
    let app = container(&spec["containers"], "app");
    assert_eq!(env_value(app, "PGHOST"), listen.ip().to_string());
    assert_eq!(env_value(app, "PGPORT"), listen.port().to_string());

    for c in [proxy, app] {
        assert_hardened(c);
        assert_resources(c);
    }
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );

    // Identity: the ServiceAccount carries an IRSA role.
    let sa_name = str_of(&spec["serviceAccountName"], "serviceAccountName");
    let sa = object("ServiceAccount", sa_name);
    let role = str_of(
        &sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "IRSA annotation",
    );
    assert!(role.starts_with("arn:aws:iam::ACCOUNT_ID:role/"), "{role}");

    // Shutdown: the app's preStop, then the proxy's drain, fit in the grace
    // period.
    let pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("the app sleeps in preStop");
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace >= pre_stop + DEFAULT_MAX_DRAIN_SECS,
        "grace {grace}s < preStop {pre_stop}s + max_drain {DEFAULT_MAX_DRAIN_SECS}s"
    );
}

#[test]
fn service_monitor_scrapes_the_admin_port_with_the_proxys_labels() {
    let deployment = object("Deployment", "app");
    let proxy = container(
        &deployment["spec"]["template"]["spec"]["initContainers"],
        "dsql-proxy",
    );
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let service = object("Service", "app-dsql-proxy-metrics");
    let monitor = object("ServiceMonitor", "dsql-proxy");

    for (key, value) in service["spec"]["selector"]
        .as_object()
        .expect("Service selector")
    {
        assert_eq!(
            &pod_labels[key], value,
            "the Service selects the app's pods"
        );
    }
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("ServiceMonitor selector")
    {
        assert_eq!(
            &service["metadata"]["labels"][key], value,
            "the ServiceMonitor selects the Service"
        );
    }
    let endpoint = &array(&monitor["spec"]["endpoints"], "endpoints")[0];
    assert_eq!(endpoint["path"], "/metrics");
    // The proxy's own `endpoint` label must not be renamed exported_endpoint.
    assert_eq!(endpoint["honorLabels"], true);
    let port = array(&service["spec"]["ports"], "Service ports")
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .expect("the ServiceMonitor's port is a Service port");
    assert_eq!(
        container_port(proxy, &port["targetPort"]),
        u64::from(default_admin_port())
    );
}

/// The shell script the Job's batch container runs.
fn job_script() -> String {
    let job = object("Job", "nightly-batch");
    let spec = &job["spec"]["template"]["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    let proxy = container(&spec["containers"], "dsql-proxy");
    assert_eq!(env_value(proxy, "DSQL_PROXY_CONFIG"), CONFIG_PATH);
    let batch = container(&spec["containers"], "batch");
    for c in [proxy, batch] {
        assert_hardened(c);
        assert_resources(c);
    }
    let args = array(&batch["args"], "args");
    str_of(&args[0], "script").to_owned()
}

#[test]
fn job_asks_the_proxy_to_quit_whatever_the_outcome() {
    let script = job_script();
    let trap = script
        .lines()
        .find(|l| l.trim_start().starts_with("trap "))
        .expect("the script traps EXIT");
    assert!(trap.trim_end().ends_with(" EXIT"), "{trap}");
    let url = format!("http://127.0.0.1:{}/quitquitquit", default_admin_port());
    assert!(trap.contains("-X POST") && trap.contains(&url), "{trap}");
    // With the bearer token from the Secret, which the proxy requires.
    let token = format!("Authorization: Bearer $(cat {TOKEN_DIR}/token)");
    assert!(trap.contains(&token), "{trap}");
    let job = object("Job", "nightly-batch");
    let spec = &job["spec"]["template"]["spec"];
    let proxy = container(&spec["containers"], "dsql-proxy");
    assert_eq!(env_value(proxy, "DSQL_PROXY__ADMIN__QUITQUITQUIT"), "true");
    assert_eq!(
        env_value(proxy, "DSQL_PROXY__ADMIN__TOKEN_FILE"),
        format!("{TOKEN_DIR}/token")
    );
    let volume = array(&spec["volumes"], "volumes")
        .iter()
        .find(|v| v["secret"]["secretName"] == "dsql-proxy-admin-token")
        .expect("the token comes from a Secret");
    for name in ["dsql-proxy", "batch"] {
        let c = container(&spec["containers"], name);
        let mounted = array(&c["volumeMounts"], "volumeMounts")
            .iter()
            .any(|m| m["name"] == volume["name"] && m["mountPath"] == TOKEN_DIR);
        assert!(mounted, "{name} does not mount the token at {TOKEN_DIR}");
    }
    // The Deployment's proxy serves no /quitquitquit (a native sidecar is
    // stopped by Kubernetes).
    let config = proxy_check(&configmap_toml());
    assert_eq!(config["admin"]["quitquitquit"].as_bool(), Some(false));
}

#[test]
fn the_network_policy_lets_only_prometheus_reach_the_admin_port() {
    let policy = object("NetworkPolicy", "app");
    let deployment = object("Deployment", "app");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&policy["spec"]["podSelector"]["matchLabels"], labels);
    assert_eq!(policy["spec"]["policyTypes"][0], "Ingress");
    let spec = &deployment["spec"]["template"]["spec"];
    let proxy = container(&spec["initContainers"], "dsql-proxy");
    let app = container(&spec["containers"], "app");
    let mut admin_rules = 0;
    for rule in array(&policy["spec"]["ingress"], "ingress") {
        for port in array(&rule["ports"], "ports") {
            let named = str_of(&port["port"], "port");
            if named == "admin" {
                admin_rules += 1;
                assert_eq!(
                    container_port(proxy, &port["port"]),
                    u64::from(default_admin_port())
                );
                let from = array(&rule["from"], "from");
                assert!(!from.is_empty(), "the admin port is open to everyone");
                for peer in from {
                    assert!(
                        peer["namespaceSelector"]["matchLabels"].is_object(),
                        "admin port: {peer:?}"
                    );
                }
            } else {
                // The application's own port, by name.
                container_port(app, &port["port"]);
            }
        }
    }
    assert_eq!(admin_rules, 1);
}

/// Every `dsql_proxy_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("dsql_proxy_") {
        let preceded = rest[..at].chars().next_back().is_some_and(is_ident);
        let len = rest[at..]
            .find(|c: char| !is_ident(c))
            .unwrap_or(rest.len() - at);
        if !preceded {
            names.push(&rest[at..at + len]);
        }
        rest = &rest[at + len..];
    }
    names
}

/// Every PromQL string in the dashboard (panel targets, variables,
/// annotations).
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_queries(i, out)),
        _ => {}
    }
}

fn alert_rules() -> Vec<Value> {
    let plain = &yaml_documents(&rules_file())[0];
    array(&plain["groups"], "groups")
        .iter()
        .flat_map(|g| array(&g["rules"], "rules").clone())
        .collect()
}

#[test]
fn alert_rules_are_complete_and_the_prometheusrule_matches_them() {
    let plain = &yaml_documents(&rules_file())[0];
    let operator = object("PrometheusRule", "dsql-proxy");
    assert_eq!(
        operator["spec"], *plain,
        "prometheusrule.yaml differs from dsql-proxy.rules.yml"
    );
    let rules = alert_rules();
    for rule in &rules {
        assert!(
            rule["alert"].is_string() && rule["expr"].is_string(),
            "{rule}"
        );
        assert!(
            ["critical", "warning"].contains(&str_of(&rule["labels"]["severity"], "severity")),
            "{rule}"
        );
        assert!(rule["annotations"]["summary"].is_string(), "{rule}");
    }
    let watched: BTreeSet<&str> = rules
        .iter()
        .flat_map(|r| metric_names(str_of(&r["expr"], "expr")))
        .collect();
    for needed in [
        "dsql_proxy_endpoint_up",
        "dsql_proxy_failovers_total",
        "dsql_proxy_token_generation_failures_total",
        "dsql_proxy_route53_errors_total",
    ] {
        assert!(
            watched.contains(needed),
            "no alert on {needed}: {watched:?}"
        );
    }
}

/// Statements of an IAM policy document, each with a unique Sid.
fn statements(path: &Path) -> Vec<Value> {
    let policy = json_file(path);
    assert_eq!(policy["Version"], "2012-10-17", "{}", path.display());
    let list = array(&policy["Statement"], "Statement").clone();
    let sids: BTreeSet<&str> = list.iter().map(|s| str_of(&s["Sid"], "Sid")).collect();
    assert_eq!(
        sids.len(),
        list.len(),
        "{}: Sids must be unique",
        path.display()
    );
    for s in &list {
        assert_eq!(s["Effect"], "Allow", "{}: {s}", path.display());
    }
    list
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        other => panic!("expected a string or a list: {other}"),
    }
}

/// `(action -> resources)` over every statement of a permissions policy.
fn grants(path: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in statements(path) {
        let resources = strings(&s["Resource"]);
        for action in strings(&s["Action"]) {
            assert!(
                !action.contains('*'),
                "{}: wildcard action {action}",
                path.display()
            );
            out.entry(action).or_default().extend(resources.clone());
        }
    }
    out
}

/// The IAM actions of the Route 53 operations a source file sends:
/// `client.<operation>()` (also split over lines) -> `route53:<Operation>`.
fn route53_calls(rel: &str) -> BTreeSet<String> {
    let source = read(&root().join(rel));
    let mut actions = BTreeSet::new();
    for (at, _) in source.match_indices("client") {
        let Some(rest) = source[at + "client".len()..].trim_start().strip_prefix('.') else {
            continue;
        };
        let op: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if op.is_empty() || !rest[op.len()..].starts_with("()") {
            continue;
        }
        let pascal: String = op
            .split('_')
            .map(|word| {
                let mut chars = word.chars();
                chars
                    .next()
                    .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            })
            .collect();
        actions.insert(format!("route53:{pascal}"));
    }
    assert!(
        !actions.is_empty(),
        "{rel}: no client.<operation>() calls found"
    );
    actions
}

#[test]
fn iam_policies_grant_exactly_what_the_proxy_calls() {
    let iam = |f: &str| deploy(&format!("iam/{f}"));
    let dsql = grants(&iam("proxy-dsql.json"));
    assert_eq!(
        dsql.keys().collect::<Vec<_>>(),
        ["dsql:DbConnect", "dsql:DbConnectAdmin"]
    );
    for arn in dsql.values().flatten() {
        assert!(
            arn.starts_with("arn:aws:dsql:") && arn.contains(":ACCOUNT_ID:cluster/CLUSTER_ID"),
            "{arn}"
        );
    }
    let route53 = grants(&iam("proxy-route53.json"));
    assert_eq!(
        route53.keys().collect::<Vec<_>>(),
        ["route53:GetHealthCheck", "route53:GetHealthCheckStatus"]
    );
    // ... which is what the proxy's reader calls.
    assert_eq!(
        route53.keys().cloned().collect::<BTreeSet<_>>(),
        route53_calls("crates/health/src/route53.rs")
    );
    for arn in route53.values().flatten() {
        assert!(arn.starts_with("arn:aws:route53:::healthcheck/"), "{arn}");
    }
    let global = grants(&iam("proxy-aurora-global.json"));
    assert_eq!(
        global.keys().collect::<Vec<_>>(),
        ["rds-db:connect", "rds:DescribeGlobalClusters"]
    );
    for arn in global.values().flatten() {
        assert!(arn.contains(":ACCOUNT_ID:"), "{arn}");
    }
    let setup = grants(&iam("route53-setup.json"));
    let expected: BTreeSet<String> = [
        "route53:ChangeTagsForResource",
        "route53:CreateHealthCheck",
        "route53:DeleteHealthCheck",
        "route53:GetHealthCheck",
        "route53:GetHealthCheckStatus",
        "route53:ListHealthChecks",
        "route53:ListTagsForResource",
        "route53:UpdateHealthCheck",
    ]
    .map(String::from)
    .into();
    assert_eq!(setup.keys().cloned().collect::<BTreeSet<_>>(), expected);
    // ... which is what `dsql-proxy route53 setup|teardown|status` and
    // `drill --method route53` (UpdateHealthCheck Inverted) call.
    assert_eq!(
        expected,
        route53_calls("crates/health/src/route53_admin.rs"),
        "deploy/iam/route53-setup.json must grant exactly the calls of the route53 commands and the drill"
    );
    // Only the actions without resource-level permissions get "*".
    for (action, resources) in dsql.iter().chain(&route53).chain(&global).chain(&setup) {
        if resources.iter().any(|r| r == "*") {
            assert!(
                ["route53:CreateHealthCheck", "route53:ListHealthChecks"]
                    .contains(&action.as_str()),
                "{action} on *"
            );
        }
    }
    for trust in ["trust-irsa.json", "trust-pod-identity.json"] {
        for s in statements(&iam(trust)) {
            assert!(s["Principal"].is_object(), "{trust}: {s}");
        }
    }
}

/// Every metric the dashboard and the alert rules query is a family the
/// real proxy exports; the Job's `/quitquitquit` call stops it.
///
/// Vector families only appear once a series exists, so the proxy is made
/// to produce each: a real PostgreSQL server and an unreachable endpoint
/// (probe failures), a Route 53 health check the fake Route 53 does not know
/// (errors, an unknown verdict), one session (latency, connect time, session
/// counters) and one connect while the server is down (connect failures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_metrics_are_exported_by_the_real_proxy() {
    let mut dashboard_exprs = Vec::new();
    dashboard_queries(
        &json_file(&deploy("grafana/dsql-proxy-dashboard.json")),
        &mut dashboard_exprs,
    );
    let mut exprs: Vec<(String, String)> = dashboard_exprs
        .into_iter()
        .map(|e| ("grafana/dsql-proxy-dashboard.json".to_owned(), e))
        .collect();
    for rule in alert_rules() {
        exprs.push((
            format!("alert {}", rule["alert"]),
            str_of(&rule["expr"], "expr").to_owned(),
        ));
    }
    let referenced: BTreeMap<&str, &str> = exprs
        .iter()
        .flat_map(|(source, e)| {
            metric_names(e)
                .into_iter()
                .map(move |n| (n, source.as_str()))
        })
        .collect();
    for needed in [
        "endpoint_selected",
        "endpoint_latency_seconds_bucket",
        "failovers_total",
        "route_changes_total",
        "sessions_active",
        "backend_connect_failures_total",
        "token_generation_failures_total",
        "route53_healthy",
        "route53_errors_total",
    ] {
        let name = format!("dsql_proxy_{needed}");
        assert!(
            referenced.contains_key(name.as_str()),
            "nothing shows {name}"
        );
    }

    let mut pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    });
    let route53 = FakeRoute53::start();
    let listen = free_addr();
    let admin_port = dsql_proxy_tests::free_port();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let mut toml = proxy_toml(&pg, listen, &ProxyOptions::default());
    let start = toml.find("[admin]").expect("[admin]");
    let end = start + toml[start..].find("[backend]").expect("[backend]");
    // On every interface, as in the ConfigMap, so the Job's call below can
    // come from a non-loopback address and must carry the token.
    toml.replace_range(
        start..end,
        &format!("[admin]\naddress = \"0.0.0.0:{admin_port}\"\n"),
    );
    // The fixture ends in its [routing] table, after its one endpoint.
    let routing = toml.find("[routing]\n").expect("[routing]");
    toml.insert_str(routing, "route53_health_check_id = \"hc-unknown\"\n");
    toml.push_str(&format!(
        "probe_interval = \"250ms\"\nroute53 = \"advisory\"\nroute53_poll_interval = \"1s\"\n\
         [[endpoints]]\nname = \"unreachable-2\"\nregion = \"test-2\"\nhost = \"db.test.internal\"\n\
         connect_address = \"{}\"\npriority = 2\n",
        free_addr()
    ));
    let mut env = isolated_aws_env();
    env.push(("AWS_ACCESS_KEY_ID".into(), "AKIDDEPLOYMANIFESTS".into()));
    env.push((
        "AWS_SECRET_ACCESS_KEY".into(),
        "deploy-manifests-secret".into(),
    ));
    env.push(("AWS_ENDPOINT_URL_ROUTE_53".into(), route53.url()));
    // The Job's admin settings, with the token Secret in a temp directory.
    let secrets = tempfile::tempdir().expect("tempdir");
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "job-token-0123456789\n").expect("write token");
    let job = object("Job", "nightly-batch");
    let job_proxy = container(&job["spec"]["template"]["spec"]["containers"], "dsql-proxy");
    for name in [
        "DSQL_PROXY__ADMIN__QUITQUITQUIT",
        "DSQL_PROXY__ADMIN__TOKEN_FILE",
    ] {
        let value =
            env_value(job_proxy, name).replace(TOKEN_DIR, &secrets.path().display().to_string());
        env.push((name.into(), value));
    }
    let mut proxy = ProxyProcess::spawn_with_env(&toml, &[], &env);
    proxy.wait_ready(listen, dsql_proxy_tests::proxy::START_TIMEOUT);

    let client_config = fixture::client_config(listen, APP_USER, APP_DB);
    let client = connect_with(&client_config, None)
        .await
        .unwrap_or_else(|e| panic!("connect through the proxy: {e}\n{}", proxy.logs()));
    client.simple_query("select 1").await.expect("select 1");
    drop(client);
    pg.kill9();
    assert!(
        connect_with(&client_config, None).await.is_err(),
        "no endpoint is reachable"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let (families, missing) = loop {
        let scrape = scrape(admin);
        for sample in &scrape.samples {
            assert!(
                scrape.family_of(&sample.name).is_some(),
                "sample {} belongs to no declared family",
                sample.name
            );
        }
        let missing: Vec<String> = referenced
            .iter()
            .filter(|(name, _)| scrape.family_of(name).is_none())
            .map(|(name, source)| format!("{name} (in {source})"))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break (scrape.families, missing);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        missing.is_empty(),
        "not exported by the proxy: {missing:?}\nexported: {:?}",
        families.keys().collect::<Vec<_>>()
    );
    // Histogram quantiles are taken over histograms.
    for (_, expr) in &exprs {
        if expr.contains("histogram_quantile") {
            for name in metric_names(expr) {
                let base = name
                    .strip_suffix("_bucket")
                    .unwrap_or_else(|| panic!("{expr}"));
                assert_eq!(
                    families.get(base).map(String::as_str),
                    Some("histogram"),
                    "{expr}"
                );
            }
        }
    }

    // The Job's trap line, pointed at this proxy's admin address.
    let script = job_script();
    let trap = script
        .lines()
        .find(|l| l.trim_start().starts_with("trap "))
        .expect("trap line");
    let command = trap
        .trim_start()
        .strip_prefix("trap '")
        .and_then(|t| t.strip_suffix("' EXIT"))
        .unwrap_or_else(|| panic!("unexpected trap line: {trap}"))
        .replace(
            &format!("127.0.0.1:{}", default_admin_port()),
            &format!("{}:{admin_port}", dsql_proxy_tests::net::non_loopback_ip()),
        )
        .replace(TOKEN_DIR, &secrets.path().display().to_string())
        .replace(" || true", "");
    // Without the token the same call is refused.
    let unauthorized = command.replace("Authorization: Bearer", "X-Not-Authorization: Bearer");
    let refused = Command::new("sh")
        .args(["-c", &unauthorized])
        .stdin(Stdio::null())
        .status()
        .expect("run sh (the Job's script needs curl)");
    assert!(!refused.success(), "{unauthorized}");
    let status = Command::new("sh")
        .args(["-c", &command])
        .stdin(Stdio::null())
        .status()
        .expect("run sh (the Job's script needs curl)");
    assert!(status.success(), "{command}\n{}", proxy.logs());
    let exit = proxy
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("proxy still running after /quitquitquit\n{}", proxy.logs()));
    assert!(exit.success(), "{}", proxy.logs());
    pg.restart();
}

/// Instructions of a Dockerfile: continuation lines joined, comments and
/// parser directives dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((keyword.to_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    out
}

fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not exec form ({e}): {args}"))
}

/// The `ARG`s declared before the first `FROM` (which `FROM` lines may
/// use), with their default values.
fn global_args(all: &[(String, String)]) -> BTreeMap<String, String> {
    all.iter()
        .take_while(|(k, _)| k != "FROM")
        .filter(|(k, _)| k == "ARG")
        .map(|(_, a)| {
            let (name, default) = a.split_once('=').unwrap_or((a, ""));
            (name.to_owned(), default.to_owned())
        })
        .collect()
}

/// A `FROM` line's image with a global `ARG` reference (`${NAME}`)
/// replaced by that ARG's default. Panics unless the image is given by
/// such an ARG: both base images are replaceable with `--build-arg`, which
/// is how scripts/image.sh builds without a registry.
fn from_image_arg(from: &str, args: &BTreeMap<String, String>) -> String {
    let image = from.split_whitespace().next().unwrap_or_default();
    let name = image
        .strip_prefix("${")
        .and_then(|n| n.strip_suffix('}'))
        .unwrap_or_else(|| panic!("FROM {from}: the base image is not an ARG"));
    let default = &args[name];
    assert!(!default.is_empty(), "ARG {name} has no default");
    from.replacen(image, default, 1)
}

#[test]
fn dockerfile_builds_a_small_nonroot_image_around_the_binary() {
    let text = read(&root().join("Dockerfile"));
    let all = dockerfile_instructions(&text);
    let args = global_args(&all);
    let froms: Vec<usize> = (0..all.len()).filter(|&i| all[i].0 == "FROM").collect();
    assert!(froms.len() >= 2, "multi-stage build: {froms:?}");
    let builder = &from_image_arg(&all[froms[0]].1, &args);
    let runtime = &all[*froms.last().expect("a FROM")..];
    let runtime_image = &from_image_arg(&runtime[0].1, &args);
    assert!(
        runtime_image.starts_with("gcr.io/distroless/cc-debian12"),
        "{runtime_image}"
    );

    // The builder's Rust is at least the workspace's rust-version, and both
    // stages are Debian 12, so the binary's glibc is the runtime's.
    let workspace: toml::Table = read(&root().join("Cargo.toml"))
        .parse()
        .expect("Cargo.toml");
    let msrv = workspace["workspace"]["package"]["rust-version"]
        .as_str()
        .expect("rust-version");
    let version = |v: &str| -> Vec<u32> { v.split('.').filter_map(|p| p.parse().ok()).collect() };
    let builder_rust = builder
        .strip_prefix("rust:")
        .and_then(|t| t.split('-').next())
        .unwrap_or_else(|| panic!("builder is the official Rust image: {builder}"));
    assert!(
        version(builder_rust) >= version(msrv),
        "{builder_rust} < {msrv}"
    );
    assert!(builder.contains("-bookworm"), "{builder}");
    assert!(
        runtime_image.contains("debian12") || runtime_image.contains("bookworm"),
        "{runtime_image}"
    );

    let last = |keyword: &str| -> &str {
        runtime
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, a)| a.as_str())
            .unwrap_or_else(|| panic!("no {keyword} in the runtime stage"))
    };
    let user = last("USER").split(':').next().unwrap_or_default();
    assert!(
        user.parse::<u32>().is_ok_and(|uid| uid != 0),
        "USER must be a numeric non-root uid (runAsNonRoot checks it): {user}"
    );
    let entrypoint = exec_form(last("ENTRYPOINT"));
    let binary = &entrypoint[0];
    assert_eq!(entrypoint.len(), 1, "{entrypoint:?}");
    assert!(
        runtime
            .iter()
            .any(|(k, a)| k == "COPY" && a.starts_with("--from=") && a.ends_with(binary.as_str())),
        "the entrypoint {binary} is the binary copied from the builder"
    );
    let exposed: Vec<u16> = runtime
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect();
    assert!(exposed.contains(&default_admin_port()), "{exposed:?}");
    let healthcheck = last("HEALTHCHECK");
    let cmd = healthcheck
        .split_once("CMD ")
        .map(|(_, c)| exec_form(c))
        .unwrap_or_else(|| panic!("HEALTHCHECK without CMD: {healthcheck}"));
    assert_eq!(cmd[..2], [binary.clone(), "healthcheck".to_owned()]);

    // The default config the image ships is the repository's, valid, and at
    // the path the Kubernetes manifests mount over.
    assert_eq!(last("ENV"), format!("DSQL_PROXY_CONFIG={CONFIG_PATH}"));
    assert!(
        runtime
            .iter()
            .any(|(k, a)| k == "COPY" && a.ends_with(&format!("proxy.toml {CONFIG_PATH}"))),
        "proxy.toml is copied to {CONFIG_PATH}"
    );
    check_file(&root().join("proxy.toml"));

    let ignored = read(&root().join(".dockerignore"));
    assert!(ignored.lines().any(|l| l.trim() == "target/"), "{ignored}");
}

/// The image's binary is the release build without the default `demo`
/// feature (emulator, latency relays, certificate generation), stripped.
#[test]
fn image_binary_is_stripped_and_leaves_out_the_demo() {
    let workspace: toml::Table = read(&root().join("Cargo.toml"))
        .parse()
        .expect("Cargo.toml");
    let strip = &workspace["profile"]["release"]["strip"];
    assert!(
        strip.as_bool() == Some(true) || strip.as_str() == Some("symbols"),
        "[profile.release] strip = {strip}"
    );
    let binary: toml::Table = read(&root().join("crates/dsql-proxy/Cargo.toml"))
        .parse()
        .expect("crates/dsql-proxy/Cargo.toml");
    let features = &binary["features"];
    let listed = |name: &str| -> Vec<&str> {
        features[name]
            .as_array()
            .unwrap_or_else(|| panic!("feature {name}"))
            .iter()
            .filter_map(|v| v.as_str())
            .collect()
    };
    assert!(
        listed("default").contains(&"demo"),
        "cargo build gives the demo"
    );
    for dep in ["dsql-emulator", "dsql-proxy-netsim", "rcgen"] {
        assert!(
            listed("demo").contains(&format!("dep:{dep}").as_str()),
            "{dep}"
        );
        assert_eq!(
            binary["dependencies"][dep]["optional"].as_bool(),
            Some(true),
            "{dep} is only in builds with the demo"
        );
    }
    let dockerfile = dockerfile_instructions(&read(&root().join("Dockerfile")));
    let build = dockerfile
        .iter()
        .find(|(k, a)| k == "RUN" && a.contains("cargo build"))
        .map(|(_, a)| a.as_str())
        .expect("a RUN with cargo build");
    for flag in [
        "--release",
        "--locked",
        "-p dsql-proxy",
        "--no-default-features",
    ] {
        assert!(build.contains(flag), "{flag}: {build}");
    }
}

/// `scripts/image.sh --test` runs the image the way deployment.yaml runs the
/// sidecar (user, read-only root filesystem, capabilities, config mount),
/// and the image, the kustomization and the ConfigMap agree on its name and
/// ports.
#[test]
fn image_test_runs_the_container_like_the_deployment() {
    let script = read(&root().join("scripts/image.sh"));
    let flags: Vec<&str> = script
        .split_once("SIDECAR_FLAGS=(")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(flags, _)| flags.split_whitespace().collect())
        .expect("SIDECAR_FLAGS=(...) in scripts/image.sh");
    let has = |pair: &[&str]| flags.windows(pair.len()).any(|w| w == pair);

    let deployment = object("Deployment", "app");
    let spec = &deployment["spec"]["template"]["spec"];
    let proxy = container(&spec["initContainers"], "dsql-proxy");
    let sc = &proxy["securityContext"];
    let uid = sc["runAsUser"].as_u64().expect("runAsUser");
    let gid = sc["runAsGroup"].as_u64().expect("runAsGroup");
    let user = format!("{uid}:{gid}");
    assert!(has(&["--user", &user]), "{flags:?}");
    let dockerfile = dockerfile_instructions(&read(&root().join("Dockerfile")));
    let image_user = dockerfile
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, a)| a.as_str());
    assert_eq!(image_user, Some(user.as_str()), "the image's USER");
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    // Kubernetes mounts no tmpfs on a read-only root; podman would.
    assert!(
        has(&["--read-only", "--read-only-tmpfs=false"]),
        "{flags:?}"
    );
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(has(&["--cap-drop", "ALL"]), "{flags:?}");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(has(&["--security-opt", "no-new-privileges"]), "{flags:?}");
    let mount = array(&proxy["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["name"] == "dsql-proxy-config")
        .expect("the config mount");
    assert_eq!(mount["readOnly"], true);
    let dir = str_of(&mount["mountPath"], "mountPath");
    assert!(
        script.contains(&format!(":{dir}:ro\"")),
        "config mounted read-only at {dir}"
    );

    // Image name: the script's local tag and the kustomization's image.
    let local = script
        .lines()
        .find_map(|l| l.strip_prefix("IMAGE="))
        .expect("IMAGE= in scripts/image.sh");
    assert_eq!(local, "localhost/dsql-proxy:dev");
    let kustomization = &yaml_documents(&deploy("kubernetes/kustomization.yaml"))[0];
    assert!(
        array(&kustomization["images"], "images")
            .iter()
            .any(|i| i["name"] == "dsql-proxy"),
        "the kustomization sets the dsql-proxy image"
    );
    assert_eq!(proxy["image"], "dsql-proxy");

    // Ports: the image exposes the ConfigMap's client and admin ports.
    let config = proxy_check(&configmap_toml());
    let exposed: Vec<u16> = dockerfile
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect();
    for section in ["listen", "admin"] {
        let port = resolved_addr(&config, section).port();
        assert!(
            exposed.contains(&port),
            "[{section}] port {port}: EXPOSE {exposed:?}"
        );
    }
}
