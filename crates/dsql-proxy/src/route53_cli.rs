//! `dsql-proxy route53 setup | teardown | status`: the Route 53 health
//! checks of the config's endpoints (one TCP check each), over
//! `dsql_proxy_health::route53_admin`.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dsql_proxy_config::edit::{set_health_check_ids, HEALTH_CHECK_ID_KEY};
use dsql_proxy_config::{Config, EndpointConfig};
use dsql_proxy_health::route53::{route53_verdict, Route53Error};
use dsql_proxy_health::route53_admin::{
    dsql_host_parts, Deleted, Ensured, ExistingCheck, HealthCheckSpec, Observation, Route53Admin,
};

/// Each Route 53 call, retries included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Create one Route 53 TCP health check per [[endpoints]] entry (none when
    /// an identical one exists) and print its route53_health_check_id line.
    Setup(SetupArgs),
    /// Delete the health checks `route53 setup` created for the endpoints.
    Teardown(TeardownArgs),
    /// Show each endpoint's health check and its checkers' observations.
    Status,
}

#[derive(Args, Debug)]
pub struct SetupArgs {
    /// Seconds between two checks by one Route 53 checker: 10 (fast,
    /// billed extra) or 30.
    #[arg(long, default_value_t = 10, value_parser = request_interval)]
    pub request_interval: u32,
    /// Consecutive failed checks before a checker calls the endpoint
    /// unhealthy (1-10).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub failure_threshold: u32,
    /// Write the route53_health_check_id lines into the config file (only
    /// those lines change; comments stay).
    #[arg(long)]
    pub write: bool,
}

#[derive(Args, Debug)]
pub struct TeardownArgs {
    /// Remove the deleted checks' route53_health_check_id lines from the
    /// config file.
    #[arg(long)]
    pub write: bool,
    /// Also delete health checks named in the config that `route53 setup`
    /// did not create.
    #[arg(long)]
    pub force: bool,
}

fn request_interval(s: &str) -> Result<u32, String> {
    match s.trim_end_matches('s') {
        "10" => Ok(10),
        "30" => Ok(30),
        _ => Err("Route 53 supports a request interval of 10 or 30 seconds".into()),
    }
}

/// Runs one action; output goes to stdout, errors are returned.
pub fn run(action: &Action, config_path: &Path, config: &Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let admin = match Route53Admin::from_env(OPERATION_TIMEOUT).await {
            Ok(admin) => admin,
            Err(Route53Error::Credentials(why)) => bail!(
                "no AWS credentials to call Route 53 with: set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with a role (IRSA, EKS Pod \
                 Identity, ECS task role, EC2 instance profile). The SDK said: {why}"
            ),
            Err(e) => return Err(e).context("cannot set up the Route 53 client"),
        };
        match action {
            Action::Setup(args) => setup(&admin, args, config_path, config).await,
            Action::Teardown(args) => teardown(&admin, args, config_path, config).await,
            Action::Status => status(&admin, config).await,
        }
    })
}

/// The Route 53 endpoint the SDK will use, for error messages (not secret).
fn endpoint_hint() -> String {
    for var in ["AWS_ENDPOINT_URL_ROUTE_53", "AWS_ENDPOINT_URL"] {
        if let Ok(url) = std::env::var(var) {
            if !url.is_empty() {
                return format!(" at {url} ({var})");
            }
        }
    }
    String::new()
}

async fn list(admin: &Route53Admin) -> Result<Vec<ExistingCheck>> {
    admin
        .list()
        .await
        .with_context(|| format!("cannot list the Route 53 health checks{}", endpoint_hint()))
}

fn spec(
    endpoint: &EndpointConfig,
    request_interval: u32,
    failure_threshold: u32,
) -> HealthCheckSpec {
    let parts = dsql_host_parts(&endpoint.host);
    HealthCheckSpec {
        endpoint: endpoint.name.clone(),
        region: endpoint
            .region
            .clone()
            .or_else(|| parts.map(|(_, region)| region.to_owned())),
        cluster: parts.map(|(cluster, _)| cluster.to_owned()),
        host: endpoint.host.clone(),
        port: endpoint.port,
        request_interval,
        failure_threshold,
    }
}

fn describe(check: &ExistingCheck) -> String {
    let target = match (&check.host, &check.ip_address) {
        (Some(host), _) => host.clone(),
        (None, Some(ip)) => ip.clone(),
        (None, None) => "?".into(),
    };
    let port = check.port.map(|p| format!(":{p}")).unwrap_or_default();
    let mut text = format!("{} {target}{port}", check.kind);
    if let Some(interval) = check.request_interval {
        text.push_str(&format!(", every {interval}s"));
    }
    if let Some(threshold) = check.failure_threshold {
        text.push_str(&format!(", failure threshold {threshold}"));
    }
    if check.disabled {
        text.push_str(", DISABLED");
    }
    if check.inverted {
        text.push_str(", INVERTED");
    }
    text
}

async fn setup(
    admin: &Route53Admin,
    args: &SetupArgs,
    config_path: &Path,
    config: &Config,
) -> Result<()> {
    let existing = list(admin).await?;
    let mut ids = Vec::new();
    let (mut created, mut reused) = (0, 0);
    for endpoint in &config.endpoints {
        let spec = spec(endpoint, args.request_interval, args.failure_threshold);
        let ensured = admin.ensure(&spec, &existing).await.with_context(|| {
            format!(
                "cannot set up the health check of endpoint {:?} ({}:{}){}",
                endpoint.name,
                endpoint.host,
                endpoint.port,
                endpoint_hint()
            )
        })?;
        let check = ensured.check();
        match &ensured {
            Ensured::Existing(_) => {
                reused += 1;
                println!(
                    "{}: health check {} exists with these settings ({}); nothing created",
                    endpoint.name,
                    check.id,
                    describe(check)
                );
            }
            Ensured::Created { generation, .. } => {
                created += 1;
                println!(
                    "{}: created health check {} ({}; CallerReference {})",
                    endpoint.name,
                    check.id,
                    describe(check),
                    check.caller_reference
                );
                if *generation > 1 {
                    println!(
                        "  (CallerReference {} was used by a deleted or changed check: Route 53 \
                         answered HealthCheckAlreadyExists, so generation {generation} was used)",
                        spec.caller_reference(1)
                    );
                }
            }
        }
        for other in existing.iter().filter(|c| c.id != check.id && spec.owns(c)) {
            println!(
                "  note: health check {} ({}) was made for this endpoint by an earlier setup with \
                 {} settings; it is not used (`dsql-proxy route53 teardown` deletes it too)",
                other.id,
                describe(other),
                if spec.matches(other) {
                    "the same"
                } else {
                    "other"
                }
            );
        }
        if let Some(old) = endpoint
            .route53_health_check_id
            .as_deref()
            .filter(|old| *old != check.id)
        {
            println!(
                "  note: the config names health check {old} for this endpoint; {} replaces it",
                check.id
            );
        }
        ids.push((endpoint.name.clone(), check.id.clone()));
    }
    println!("created {created}, already there {reused}");
    println!();
    println!("# [[endpoints]] {HEALTH_CHECK_ID_KEY} lines:");
    for (name, id) in &ids {
        println!("# name = {name:?}");
        println!("{HEALTH_CHECK_ID_KEY} = {id:?}");
    }
    if args.write {
        let edits: Vec<(&str, Option<&str>)> = ids
            .iter()
            .map(|(name, id)| (name.as_str(), Some(id.as_str())))
            .collect();
        write_ids(config_path, &edits)?;
    } else {
        println!(
            "# add them to {}, or run again with --write",
            config_path.display()
        );
    }
    Ok(())
}

async fn teardown(
    admin: &Route53Admin,
    args: &TeardownArgs,
    config_path: &Path,
    config: &Config,
) -> Result<()> {
    let existing = list(admin).await?;
    let mut deleted = 0;
    let mut cleared: Vec<&str> = Vec::new();
    let mut failure = None;
    'endpoints: for endpoint in &config.endpoints {
        // Settings do not matter for ownership.
        let spec = spec(endpoint, 30, 3);
        let mut targets: Vec<(String, &str)> = existing
            .iter()
            .filter(|c| spec.owns(c))
            .map(|c| (c.id.clone(), "made by route53 setup"))
            .collect();
        let configured = endpoint.route53_health_check_id.as_deref();
        if let Some(id) = configured {
            match existing.iter().find(|c| c.id == id) {
                Some(_) if targets.iter().any(|(t, _)| t == id) => {}
                Some(c) if args.force => targets.push((c.id.clone(), "named in the config")),
                Some(c) => println!(
                    "{}: health check {id} named in the config was not created by route53 setup \
                     (CallerReference {:?}); left alone (--force deletes it)",
                    endpoint.name, c.caller_reference
                ),
                None => {
                    println!(
                        "{}: health check {id} named in the config is already gone",
                        endpoint.name
                    );
                    cleared.push(&endpoint.name);
                }
            }
        }
        if targets.is_empty() && configured.is_none() {
            println!("{}: no health check to delete", endpoint.name);
        }
        for (id, why) in targets {
            let outcome = match admin.delete(&id).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    failure = Some(anyhow::Error::new(e).context(format!(
                        "cannot delete health check {id} of endpoint {:?}{}",
                        endpoint.name,
                        endpoint_hint()
                    )));
                    break 'endpoints;
                }
            };
            match outcome {
                Deleted::Now => {
                    deleted += 1;
                    println!("{}: deleted health check {id} ({why})", endpoint.name);
                }
                Deleted::AlreadyGone => {
                    println!("{}: health check {id} was already gone", endpoint.name)
                }
            }
            if configured == Some(id.as_str()) {
                cleared.push(&endpoint.name);
            }
        }
    }
    println!("deleted {deleted}");
    // Also after a failure: the lines of what is gone go with it.
    if args.write && !cleared.is_empty() {
        let edits: Vec<(&str, Option<&str>)> = cleared.iter().map(|n| (*n, None)).collect();
        write_ids(config_path, &edits)?;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Edits the config file in place (through a temporary file in the same
/// directory, renamed over it), after checking the result still loads.
fn write_ids(path: &Path, edits: &[(&str, Option<&str>)]) -> Result<()> {
    // Through a symlink: edit the file it points to, keep the link.
    let resolved = std::fs::canonicalize(path);
    let path = resolved.as_deref().unwrap_or(path);
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let new_text = set_health_check_ids(&text, edits)
        .with_context(|| format!("cannot edit {}", path.display()))?;
    if new_text == text {
        println!("# {} is up to date", path.display());
        return Ok(());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "proxy.toml".into());
    let tmp = dir.join(format!(".{file_name}.route53-{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        {
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            f.write_all(new_text.as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("cannot write {}", tmp.display()))?;
        }
        if let Ok(meta) = std::fs::metadata(path) {
            // Best effort: keep the file's mode.
            let _ = std::fs::set_permissions(&tmp, meta.permissions());
        }
        Config::load(&tmp, std::env::vars())
            .context("the edited configuration does not load; the file was not changed")?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    println!(
        "# wrote {} {HEALTH_CHECK_ID_KEY} change(s) to {}",
        edits.len(),
        path.display()
    );
    Ok(())
}

async fn status(admin: &Route53Admin, config: &Config) -> Result<()> {
    // Endpoints without an id in the config: look for setup's checks.
    let found = if config
        .endpoints
        .iter()
        .any(|e| e.route53_health_check_id.is_none())
    {
        list(admin).await?
    } else {
        Vec::new()
    };
    let mut failures = 0;
    for (i, endpoint) in config.endpoints.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let region = spec(endpoint, 30, 3).region.unwrap_or_else(|| "-".into());
        let region = region.as_str();
        let ids: Vec<(String, &str)> = match &endpoint.route53_health_check_id {
            Some(id) => vec![(id.clone(), "from the config")],
            None => {
                let spec = spec(endpoint, 30, 3);
                found
                    .iter()
                    .filter(|c| spec.owns(c))
                    .map(|c| (c.id.clone(), "made by route53 setup; not in the config"))
                    .collect()
            }
        };
        if ids.is_empty() {
            println!(
                "{} ({region}): no health check (run `dsql-proxy route53 setup`)",
                endpoint.name
            );
            continue;
        }
        for (id, source) in ids {
            if let Err(e) = show_check(admin, &endpoint.name, region, &id, source).await {
                failures += 1;
                println!("  error: {e:#}");
            }
        }
    }
    if failures > 0 {
        bail!(
            "{failures} health check(s) could not be read{}",
            endpoint_hint()
        );
    }
    Ok(())
}

async fn show_check(
    admin: &Route53Admin,
    name: &str,
    region: &str,
    id: &str,
    source: &str,
) -> Result<()> {
    println!("{name} ({region}): health check {id} ({source})");
    let Some(check) = admin.get(id).await? else {
        bail!("health check {id} does not exist");
    };
    println!("  {}", describe(&check));
    if check.disabled {
        println!(
            "  verdict: healthy (disabled: Route 53 treats it as healthy{})",
            if check.inverted {
                ", and inverted: unhealthy"
            } else {
                ""
            }
        );
        return Ok(());
    }
    let observations = admin.observations(id).await?;
    print_observations(&observations, check.inverted);
    Ok(())
}

fn print_observations(observations: &[Observation], inverted: bool) {
    let total = observations.len();
    let successes = observations.iter().filter(|o| o.is_success()).count();
    let verdict = route53_verdict(
        u32::try_from(successes).unwrap_or(u32::MAX),
        u32::try_from(total).unwrap_or(u32::MAX),
        inverted,
    );
    let verdict = match verdict {
        Some(true) => "healthy",
        Some(false) => "unhealthy",
        None => "unknown (no observations yet)",
    };
    println!(
        "  verdict: {verdict} ({successes} of {total} checkers report success{})",
        if inverted { "; inverted" } else { "" }
    );
    if observations.is_empty() {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let rows: Vec<[String; 5]> = observations
        .iter()
        .map(|o| {
            let age = o
                .checked_epoch
                .map(|t| format!("{}s", (now - t).max(0)))
                .unwrap_or_else(|| "-".into());
            [
                o.region.clone(),
                o.ip_address.clone(),
                o.checked_at.clone(),
                age,
                o.status.clone(),
            ]
        })
        .collect();
    let header = [
        "CHECKER REGION",
        "IP ADDRESS",
        "CHECKED AT",
        "AGE",
        "STATUS",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut out = String::from("  ");
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_interval_is_10_or_30() {
        assert_eq!(request_interval("10"), Ok(10));
        assert_eq!(request_interval("30s"), Ok(30));
        assert!(request_interval("20").is_err());
        assert!(request_interval("").is_err());
    }

    #[test]
    fn spec_takes_cluster_and_region_from_a_dsql_host() {
        let endpoint = EndpointConfig {
            name: "e".into(),
            region: None,
            host: "abc.dsql.eu-west-1.on.aws".into(),
            port: 5432,
            connect_address: None,
            priority: 1,
            route53_health_check_id: None,
        };
        let s = spec(&endpoint, 10, 3);
        assert_eq!(s.cluster.as_deref(), Some("abc"));
        assert_eq!(s.region.as_deref(), Some("eu-west-1"));
        let endpoint = EndpointConfig {
            region: Some("us-east-1".into()),
            host: "db.example".into(),
            ..endpoint
        };
        let s = spec(&endpoint, 10, 3);
        assert_eq!((s.cluster, s.region.as_deref()), (None, Some("us-east-1")));
    }
}
