//! Configuration reload on SIGHUP.
//!
//! The file is read again with the same environment and command-line
//! overrides, validated, and everything that can fail is built (TLS
//! configs, the local password, the backend password source, Route 53
//! reader) before anything is applied. Any error leaves the running
//! configuration untouched: it is logged and counted as
//! `config_reloads_total{result="failure"}`.
//!
//! Applied live: endpoints (through `TableRouter::plan` and the monitor,
//! which keeps the health state of endpoints whose address did not
//! change), `[routing]` policy, intervals and thresholds, limits and
//! timeouts, `[listen]` authentication and TLS files, `[backend]` TLS
//! (`ca_file` re-read), password source and startup parameters. New
//! sessions get the new context; running ones keep theirs. Settings bound
//! at startup (listeners, admin address, the credential source's kind,
//! probes on or off) keep their old value with a warning.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use dsql_proxy_admin::AdminState;
use dsql_proxy_config::{BackendAuth, Config};
use dsql_proxy_credentials::CredentialSource;
use dsql_proxy_health::monitor::ControlPlanePoll;
use dsql_proxy_health::{Monitor, MonitorUpdate, PgProbe};
use dsql_proxy_metrics::Metrics;
use dsql_proxy_routing::{RoutingTable, TableRouter};
use dsql_proxy_session::SharedContext;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::monitor::{self, Route53Reader};

/// Where the configuration comes from: the file plus the command-line
/// overrides, applied the same way at startup and on every reload.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub unix_socket_dir: Option<PathBuf>,
}

impl ConfigSource {
    /// Loads the file, then applies `DSQL_PROXY__*` and command-line
    /// overrides, and validates the result.
    pub fn load(&self) -> Result<Config> {
        let mut config = Config::load(&self.path, std::env::vars())?;
        if let Some(addr) = self.listen {
            config.listen.address = addr;
        }
        if let Some(addr) = self.admin {
            config.admin.address = addr;
        }
        if let Some(dir) = &self.unix_socket_dir {
            config.listen.unix_socket_dir = Some(dir.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

/// The SIGHUP stream. Installed first thing, so a SIGHUP during startup
/// waits for the reloader instead of killing the process.
pub fn hangups() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler: configuration reload is unavailable");
            None
        }
    }
}

/// Everything a reload replaces or hands the new configuration to.
pub struct Reloader {
    pub source: ConfigSource,
    /// The configuration in force.
    pub current: Config,
    pub contexts: SharedContext,
    pub router: Arc<TableRouter>,
    /// `None` with `[routing] probes = false`.
    pub monitor: Option<Monitor<PgProbe>>,
    pub route53: Option<Route53Reader>,
    /// Made at startup; `global_cluster_id` is restart-only.
    pub control_plane: Option<ControlPlanePoll>,
    pub admin: Arc<AdminState>,
    pub metrics: Arc<Metrics>,
}

/// The running reloader; dropping it stops reloads and the health monitor
/// it owns.
pub struct ReloadTask {
    _task: JoinSet<()>,
}

impl Reloader {
    /// Reloads on every SIGHUP until dropped. Signals that arrive during a
    /// reload are folded into one more reload after it.
    pub fn spawn(mut self, hangups: Option<Signal>) -> ReloadTask {
        for result in ["success", "failure"] {
            self.metrics
                .config_reloads_total
                .with_label_values(&[result]);
        }
        let mut task = JoinSet::new();
        task.spawn(async move {
            let Some(mut hangups) = hangups else {
                // Keep the monitor running; there is just nothing to do.
                return std::future::pending().await;
            };
            while hangups.recv().await.is_some() {
                info!(config = %self.source.path.display(), "SIGHUP received: reloading the configuration");
                self.reload().await;
            }
        });
        ReloadTask { _task: task }
    }

    async fn reload(&mut self) {
        match self.try_reload().await {
            Ok(()) => self
                .metrics
                .config_reloads_total
                .with_label_values(&["success"])
                .inc(),
            Err(e) => {
                self.metrics
                    .config_reloads_total
                    .with_label_values(&["failure"])
                    .inc();
                error!(error = %format!("{e:#}"), "configuration reload failed; the previous configuration stays in force");
            }
        }
    }

    async fn try_reload(&mut self) -> Result<()> {
        let loaded = self.source.load()?;
        let config = keep_startup_settings(&self.current, loaded)?;
        let credentials = self.credentials_for(&config).await?;
        let ctx = self
            .contexts
            .load()
            .reconfigured(&config, Arc::clone(&credentials))
            .context("cannot apply the new configuration")?;
        let route53 = match self.monitor {
            Some(_) => monitor::route53_reader(&config, self.route53.as_ref()).await,
            None => None,
        };

        // Everything is built: from here on nothing fails but a dead
        // monitor, which would be a bug.
        let before = self.router.snapshot().endpoints().to_vec();
        let plan = self.router.plan(&config.endpoints);
        monitor::sync_endpoint_series(&self.metrics, &before, &plan.endpoints);
        match &self.monitor {
            Some(running) => {
                let update = MonitorUpdate {
                    probes: monitor::probes(&config, &plan.endpoints, &ctx.connector, &credentials),
                    endpoints: plan.endpoints,
                    route53: route53.as_ref().map(|r| Arc::clone(&r.source)),
                    settings: monitor::settings(&config, self.control_plane.as_ref()),
                };
                if !running.reconfigure(update).await {
                    bail!("the health monitor is not running");
                }
            }
            None => self
                .router
                .replace_endpoints(RoutingTable::by_priority(plan.endpoints)),
        }
        self.contexts.store(Arc::new(ctx));
        self.admin
            .policy
            .store(Arc::new(crate::policy_json(&config)));
        self.admin.client_limit.store(
            config.listen.max_client_connections as usize,
            std::sync::atomic::Ordering::Release,
        );
        self.route53 = route53;
        info!(
            endpoints = config.endpoints.len(),
            added = ?plan.added,
            removed = ?plan.removed,
            "configuration reloaded"
        );
        self.current = config;
        Ok(())
    }

    /// The backend credential source for `config`: a password source is
    /// rebuilt (and read once, so a missing file fails the reload); IAM
    /// token caches and passthrough carry over.
    async fn credentials_for(&self, config: &Config) -> Result<Arc<dyn CredentialSource>> {
        if config.backend.auth == BackendAuth::Password {
            return dsql_proxy_credentials::from_config(config)
                .await
                .context("cannot set up backend credentials");
        }
        Ok(Arc::clone(&self.contexts.load().credentials))
    }
}

/// `loaded` with the settings that only take effect at startup put back to
/// their running values, each with a warning. The result is validated
/// again: a new file may only make sense with its new startup settings.
fn keep_startup_settings(running: &Config, mut loaded: Config) -> Result<Config> {
    let mut kept = Vec::new();
    let mut keep = |name: &'static str, changed: bool| {
        if changed {
            warn!(setting = name, "{name} changed; restart to apply");
            kept.push(name);
        }
    };
    keep(
        "[listen] address",
        loaded.listen.address != running.listen.address,
    );
    keep(
        "[listen] unix_socket_dir",
        loaded.listen.unix_socket_dir != running.listen.unix_socket_dir,
    );
    keep("[admin]", loaded.admin != running.admin);
    keep(
        "[backend] kind",
        loaded.backend.kind != running.backend.kind,
    );
    keep(
        "[backend] auth",
        loaded.backend.auth != running.backend.auth,
    );
    let iam = matches!(
        running.backend.auth,
        BackendAuth::DsqlIam | BackendAuth::RdsIam
    );
    keep(
        "[backend] token_expires_in",
        iam && loaded.backend.token_expires_in != running.backend.token_expires_in,
    );
    keep(
        "[routing] probes",
        loaded.routing.probes != running.routing.probes,
    );
    keep("[shutdown]", loaded.shutdown != running.shutdown);
    keep("[pool]", loaded.pool != running.pool);
    keep(
        "[routing] global_cluster_id",
        loaded.routing.global_cluster_id != running.routing.global_cluster_id
            || loaded.routing.global_cluster_poll_interval
                != running.routing.global_cluster_poll_interval,
    );
    keep(
        "[routing] busy_cooldown",
        loaded.routing.busy_cooldown != running.routing.busy_cooldown,
    );
    if kept.is_empty() {
        return Ok(loaded);
    }
    loaded.listen.address = running.listen.address;
    loaded.listen.unix_socket_dir = running.listen.unix_socket_dir.clone();
    loaded.admin = running.admin.clone();
    loaded.backend.kind = running.backend.kind;
    loaded.backend.auth = running.backend.auth;
    loaded.backend.token_expires_in = running.backend.token_expires_in;
    loaded.routing.probes = running.routing.probes;
    loaded.routing.busy_cooldown = running.routing.busy_cooldown;
    loaded.routing.global_cluster_id = running.routing.global_cluster_id.clone();
    loaded.routing.global_cluster_poll_interval = running.routing.global_cluster_poll_interval;
    loaded.shutdown = running.shutdown.clone();
    loaded.pool = running.pool.clone();
    loaded.validate().with_context(|| {
        format!(
            "the new configuration is only valid with its new {}, which need a restart",
            kept.join(", ")
        )
    })?;
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[listen]
address = "127.0.0.1:6432"
[routing]
probe_user = "app"
[backend]
kind = "postgres"
auth = "password"
password = "pw"
tls = "require"
[[endpoints]]
name = "a"
host = "a.example"
"#;

    #[test]
    fn startup_settings_keep_their_running_values() {
        let running = Config::parse(BASE).unwrap();
        let loaded = Config::parse(
            &BASE
                .replace("6432", "7432")
                .replace("tls = \"require\"", "tls = \"verify-full\""),
        )
        .unwrap();
        let applied = keep_startup_settings(&running, loaded).unwrap();
        assert_eq!(applied.listen.address, running.listen.address);
        assert_eq!(applied.backend.tls, dsql_proxy_config::TlsMode::VerifyFull);
        // [admin] is bound at startup, its access rules included.
        let loaded = Config::parse(&format!(
            "[admin]\nquitquitquit = true\ntoken_file = \"/run/t\"\n{BASE}"
        ))
        .unwrap();
        let applied = keep_startup_settings(&running, loaded).unwrap();
        assert_eq!(applied.admin, running.admin);
    }

    #[test]
    fn a_file_valid_only_with_its_new_startup_settings_is_refused() {
        let running = Config::parse(BASE).unwrap();
        // Valid as written; with auth kept at "password" it lacks the
        // password.
        let loaded = Config::parse(
            &BASE
                .replace("auth = \"password\"", "auth = \"passthrough\"")
                .replace("password = \"pw\"\n", ""),
        )
        .unwrap();
        let err = keep_startup_settings(&running, loaded).unwrap_err();
        assert!(format!("{err:#}").contains("[backend] auth"), "{err:#}");
    }
}
