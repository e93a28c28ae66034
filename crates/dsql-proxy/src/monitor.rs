//! Wiring of the health monitor: one probe per endpoint and a Route 53
//! reader when any endpoint names a health check. Used at startup and by
//! configuration reload.

use std::sync::Arc;
use std::time::Duration;

use dsql_proxy_config::{BackendKind, Config};
use dsql_proxy_connector::Connector;
use dsql_proxy_credentials::CredentialSource;
use dsql_proxy_health::control_plane::SdkGlobalClusters;
use dsql_proxy_health::monitor::ControlPlanePoll;
use dsql_proxy_health::route53::{HealthCheckSource, SdkHealthChecks};
use dsql_proxy_health::{Monitor, MonitorSettings, PgProbe};
use dsql_proxy_metrics::Metrics;
use dsql_proxy_routing::{Endpoint, Report, TableRouter};
use tracing::info;

/// A Route 53 reader and the poll interval its timeout was derived from.
#[derive(Clone)]
pub struct Route53Reader {
    pub source: Arc<dyn HealthCheckSource>,
    poll_interval: Duration,
}

/// The Route 53 reader `config` needs: `None` when no endpoint names a
/// health check; `existing` when its settings still fit.
pub async fn route53_reader(
    config: &Config,
    existing: Option<&Route53Reader>,
) -> Option<Route53Reader> {
    if !config
        .endpoints
        .iter()
        .any(|e| e.route53_health_check_id.is_some())
    {
        return None;
    }
    let poll_interval = config.routing.route53_poll_interval.get();
    if let Some(reader) = existing.filter(|r| r.poll_interval == poll_interval) {
        return Some(reader.clone());
    }
    let timeout = poll_interval.min(Duration::from_secs(10));
    Some(Route53Reader {
        source: Arc::new(SdkHealthChecks::from_env(timeout).await),
        poll_interval,
    })
}

/// One probe per endpoint, in the same order.
pub fn probes(
    config: &Config,
    endpoints: &[Arc<Endpoint>],
    connector: &Arc<Connector>,
    credentials: &Arc<dyn CredentialSource>,
) -> Vec<Arc<PgProbe>> {
    let global = config.backend.kind == BackendKind::AuroraGlobal;
    endpoints
        .iter()
        .map(|endpoint| {
            let probe = PgProbe::new(
                Arc::clone(endpoint),
                Arc::clone(connector),
                Arc::clone(credentials),
                config.routing.probe_user(),
                &config.routing.probe_database,
            );
            // aurora-global: every probe also learns the endpoint's role.
            Arc::new(if global { probe.with_roles() } else { probe })
        })
        .collect()
}

/// The monitor's settings for `config`; `aurora-global` adds the replica
/// lag bound and the control-plane poll.
pub fn settings(config: &Config, control_plane: Option<&ControlPlanePoll>) -> MonitorSettings {
    let mut settings = MonitorSettings::from_config(&config.routing);
    if config.backend.kind == BackendKind::AuroraGlobal {
        settings.max_replica_lag = Some(config.routing.max_replica_lag.get());
        settings.control_plane = control_plane.cloned();
    }
    settings
}

/// The RDS control-plane poll `config` asks for (`aurora-global` with
/// `global_cluster_id`). Its Region is the SDK's, else the first endpoint's.
pub async fn control_plane(config: &Config) -> Option<ControlPlanePoll> {
    if config.backend.kind != BackendKind::AuroraGlobal {
        return None;
    }
    let id = config.routing.global_cluster_id.clone()?;
    let interval = config.routing.global_cluster_poll_interval.get();
    let fallback_region = config.endpoints.iter().find_map(|e| e.region.as_deref());
    let source =
        SdkGlobalClusters::from_env(interval.min(Duration::from_secs(10)), fallback_region).await;
    info!(global_cluster_id = %id, interval = ?interval, "polling the RDS control plane for the global cluster's writer and failover state");
    Some(ControlPlanePoll {
        global_cluster_id: id,
        source: Arc::new(source),
        interval,
    })
}

/// What the monitor polls besides the endpoints themselves.
pub struct Pollers<'a> {
    pub route53: Option<&'a Route53Reader>,
    pub control_plane: Option<&'a ControlPlanePoll>,
}

/// Probes for the router's endpoints and the monitor task over them;
/// returns after the first probe round (see `dsql_proxy_health::start`).
pub async fn start(
    config: &Config,
    router: Arc<TableRouter>,
    reports: tokio::sync::mpsc::Receiver<Report>,
    connector: &Arc<Connector>,
    credentials: &Arc<dyn CredentialSource>,
    pollers: Pollers<'_>,
    metrics: Arc<Metrics>,
) -> Monitor<PgProbe> {
    let probes = probes(
        config,
        router.snapshot().endpoints(),
        connector,
        credentials,
    );
    dsql_proxy_health::start(
        router,
        reports,
        probes,
        pollers.route53.map(|r| Arc::clone(&r.source)),
        settings(config, pollers.control_plane),
        metrics,
    )
    .await
}

/// Keeps the endpoint-labelled series in line with the endpoint set: every
/// endpoint of `now` has its failure counters (at 0 until something
/// fails), connect-time histogram and session gauge; those of endpoints
/// only in `before` are removed. At startup `before` is empty.
pub fn sync_endpoint_series(metrics: &Metrics, before: &[Arc<Endpoint>], now: &[Arc<Endpoint>]) {
    for e in now {
        metrics.register_endpoint(
            &e.name,
            e.region_label(),
            e.route53_health_check_id.is_some(),
        );
    }
    for gone in before {
        let kept = now
            .iter()
            .any(|e| e.name == gone.name && e.region_label() == gone.region_label());
        if !kept {
            metrics.forget_endpoint(&gone.name, gone.region_label());
        }
    }
}
