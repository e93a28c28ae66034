//! `dsql-proxy status` (a running proxy's `/status` as a table) and
//! `dsql-proxy healthcheck` (its `/healthz`, as an exit code for container
//! HEALTHCHECKs).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dsql_proxy_config::{AdminConfig, Config};
use serde_json::Value;

use crate::admin_client;

const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Container health checks have their own timeout; answer well within it.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The admin address to ask: `--admin`/`DSQL_PROXY_ADMIN`, else the config
/// file's `[admin] address`, else the default. A wildcard bind address is
/// asked on loopback.
pub fn admin_target(flag: Option<SocketAddr>, config_path: &Path) -> SocketAddr {
    let addr = flag.unwrap_or_else(|| {
        match Config::load(config_path, std::env::vars()) {
            Ok(config) => config.admin.address,
            // No readable config (the common case for a bare `status`):
            // the default admin address.
            Err(_) => AdminConfig::default().address,
        }
    });
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

pub fn status(admin: SocketAddr) -> ExitCode {
    match fetch_status(admin) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dsql-proxy status: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn fetch_status(admin: SocketAddr) -> Result<String> {
    let reply = admin_client::get(admin, "/status", STATUS_TIMEOUT).context(
        "is the proxy running? (address from --admin, DSQL_PROXY_ADMIN or [admin] address)",
    )?;
    if reply.status != 200 {
        bail!(
            "{admin}/status answered HTTP {}: {}",
            reply.status,
            reply.body.trim()
        );
    }
    let status: Value = serde_json::from_str(&reply.body)
        .with_context(|| format!("{admin}/status did not answer JSON"))?;
    Ok(render(&status))
}

/// Exit 0 when `/healthz` answers 200, 1 otherwise (with the reason on
/// stderr).
pub fn healthcheck(admin: SocketAddr) -> ExitCode {
    match admin_client::get(admin, "/healthz", HEALTHCHECK_TIMEOUT) {
        Ok(reply) if reply.status == 200 => ExitCode::SUCCESS,
        Ok(reply) => {
            eprintln!(
                "dsql-proxy healthcheck: {admin}/healthz answered HTTP {}: {}",
                reply.status,
                reply.body.trim()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("dsql-proxy healthcheck: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why the selected endpoint is selected, in words.
fn explain_reason(reason: &str) -> &str {
    match reason {
        "preferred_region" => "pinned by prefer_region",
        "fastest" => "lowest latency (priority decides within latency_tolerance)",
        "priority" => "no latency measured yet: lowest priority",
        "holding" => "kept: a faster endpoint has not yet won switch_after rounds",
        "none_healthy" => "no endpoint is healthy: it is only the first to try",
        other => other,
    }
}

/// `/status` as text: a summary line, one row per endpoint, problems, the
/// policy.
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    let selected = status["selected"].as_str().unwrap_or("none");
    let reason = status["reason"].as_str().unwrap_or("unknown");
    let _ = writeln!(
        out,
        "selected: {selected} ({})   route changes: {}   table generation: {}",
        explain_reason(reason),
        status["route_changes_total"],
        status["generation"],
    );
    out.push('\n');
    let header = [
        "",
        "ENDPOINT",
        "REGION",
        "STATE",
        "ELIGIBLE",
        "RANK",
        "LATENCY",
        "LAST RTT",
        "CONNECT",
        "ROUTE 53",
        "SESSIONS",
        "LAST FAILURE",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    let mut notes = Vec::new();
    let empty = Vec::new();
    for e in status["endpoints"].as_array().unwrap_or(&empty) {
        let name = text(&e["name"]);
        rows.push(vec![
            if e["selected"] == Value::Bool(true) {
                "*"
            } else {
                ""
            }
            .to_owned(),
            name.clone(),
            text(&e["region"]),
            text(&e["state"]),
            match e["eligible"].as_bool() {
                _ if e["drained"] == Value::Bool(true) => "no (drained)".into(),
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "-".into(),
            },
            e["rank"]
                .as_u64()
                .map_or("-".into(), |r| (r + 1).to_string()),
            millis(&e["latency_ms"]),
            millis(&e["last_rtt_ms"]),
            millis(&e["connect_time_ms"]),
            route53(&e["route53"]),
            e["sessions_active"].as_i64().unwrap_or(0).to_string(),
            e["last_failure"]["reason"]
                .as_str()
                .map_or("-".into(), str::to_owned),
        ]);
        if e["drained"] == Value::Bool(true) {
            notes.push(format!(
                "{name}: drained through the admin API: no new sessions (POST /endpoints/{name}/undrain restores it)"
            ));
        }
        if let Some(detail) = e["last_failure"]["detail"].as_str() {
            notes.push(format!("{name}: last probe failure: {detail}"));
        }
        if let Some(auth) = e["auth_failure"].as_str() {
            notes.push(format!("{name}: probe login refused: {auth}"));
        }
        if let Some(err) = e["route53"]["last_error"].as_str() {
            notes.push(format!("{name}: last Route 53 error: {err}"));
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            let _ = writeln!(out, "{n}");
        }
    }
    if let Some(sessions) = status["sessions"].as_object() {
        out.push_str("\nsession continuity:\n");
        for (what, title) in [
            ("moved", "moved"),
            ("move_failures", "could not move"),
            ("pinned", "pinned now"),
        ] {
            let counts: Vec<String> = sessions
                .get(what)
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                .map(|(label, n)| format!("{label} {n}"))
                .collect();
            let counts = if counts.is_empty() {
                "none".to_owned()
            } else {
                counts.join(", ")
            };
            let _ = writeln!(out, "  {title}: {counts}");
        }
    }
    if let Some(policy) = status["policy"].as_object() {
        out.push_str("\npolicy:\n");
        if let Some(rule) = policy.get("rule").and_then(Value::as_str) {
            let _ = writeln!(out, "  {rule}");
        }
        for (key, value) in policy.iter().filter(|(k, _)| *k != "rule") {
            let _ = writeln!(out, "  {key} = {}", text(value));
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn millis(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |ms| format!("{ms:.1}ms"))
}

/// Route 53's verdict, its age, and whether it still counts.
fn route53(r: &Value) -> String {
    if r.is_null() {
        return "-".into();
    }
    let mut s = match r["healthy"].as_bool() {
        Some(true) => "healthy".to_owned(),
        Some(false) => "unhealthy".to_owned(),
        None => "no reading".to_owned(),
    };
    if let Some(age) = r["age_seconds"].as_u64() {
        let _ = write!(s, " ({age}s ago)");
    }
    if r["effective"] == Value::Bool(false) && !r["healthy"].is_null() {
        s.push_str(" stale");
    }
    if let Some(n) = r["errors_total"].as_u64().filter(|n| *n > 0) {
        let _ = write!(s, ", {n} errors");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_endpoints_selection_and_policy() {
        let status = serde_json::json!({
            "selected": "us-east-1",
            "reason": "fastest",
            "generation": 12,
            "route_changes_total": 2,
            "policy": {"rule": "healthy endpoints only", "probe_interval": "1s", "switch_after": 3},
            "sessions": {"moved": {"lifetime": 4, "endpoint_down": 0},
                         "move_failures": {"connect": 0},
                         "pinned": {"listen": 1, "temp_table": 2}},
            "endpoints": [
                {"name": "us-east-1", "region": "us-east-1", "selected": true, "rank": 0,
                 "state": "up", "eligible": true, "latency_ms": 1.234, "last_rtt_ms": 1.1,
                 "connect_time_ms": 5.0, "sessions_active": 3, "last_failure": null,
                 "auth_failure": null,
                 "route53": {"health_check_id": "abc", "healthy": true, "effective": true,
                             "age_seconds": 12, "errors_total": 0, "last_error": null}},
                {"name": "us-east-2", "region": "us-east-2", "selected": false, "rank": 1,
                 "state": "down", "eligible": false, "latency_ms": null, "last_rtt_ms": null,
                 "connect_time_ms": null, "sessions_active": 0, "drained": true,
                 "last_failure": {"reason": "refused", "detail": "connection refused"},
                 "auth_failure": null, "route53": null}
            ]
        });
        let out = render(&status);
        assert!(
            out.starts_with("selected: us-east-1 (lowest latency"),
            "{out}"
        );
        assert!(out.contains("  moved: lifetime 4\n"), "{out}");
        assert!(out.contains("  could not move: none\n"), "{out}");
        assert!(
            out.contains("  pinned now: listen 1, temp_table 2\n"),
            "{out}"
        );
        let row1 = out.lines().find(|l| l.contains("us-east-1  ")).unwrap();
        assert!(row1.starts_with('*'), "{out}");
        assert!(
            row1.contains("1.2ms") && row1.contains("healthy (12s ago)"),
            "{row1}"
        );
        let row2 = out.lines().find(|l| l.contains("us-east-2  ")).unwrap();
        assert!(
            !row2.starts_with('*') && row2.contains("down") && row2.contains("refused"),
            "{row2}"
        );
        assert!(
            out.contains("us-east-2: last probe failure: connection refused"),
            "{out}"
        );
        assert!(row2.contains("no (drained)"), "{row2}");
        assert!(
            out.contains("us-east-2: drained through the admin API"),
            "{out}"
        );
        assert!(out.contains("policy:\n  healthy endpoints only\n"), "{out}");
        assert!(out.contains("  switch_after = 3\n"), "{out}");
    }

    #[test]
    fn the_target_prefers_the_flag_then_the_config() {
        let flag: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(
            admin_target(Some(flag), Path::new("/nonexistent.toml")),
            flag
        );
        assert_eq!(
            admin_target(None, Path::new("/nonexistent.toml")).to_string(),
            "127.0.0.1:9090"
        );
        let dir = tempfile_dir();
        let path = dir.join("proxy.toml");
        std::fs::write(
            &path,
            "[admin]\naddress = \"0.0.0.0:9191\"\n[routing]\nprobe_user = \"app\"\n\
             [backend]\nkind = \"postgres\"\nauth = \"passthrough\"\n\
             [[endpoints]]\nname = \"a\"\nhost = \"h\"\n",
        )
        .unwrap();
        assert_eq!(admin_target(None, &path).to_string(), "127.0.0.1:9191");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dsql-proxy-status-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
