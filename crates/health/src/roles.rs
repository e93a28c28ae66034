//! The monitor's role state under `kind = "aurora-global"`: each
//! endpoint's last observed role, the writer/fencing tracker, and the
//! metrics that follow them. The rules themselves are
//! `dsql_proxy_routing::writer`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dsql_proxy_metrics::{Gauge, IntGauge, Metrics};
use dsql_proxy_routing::writer::{
    read_only_order, ControlInput, NoWriter, ReplicaInput, RoleInput, RoleObservation,
    WriterTracker,
};
use dsql_proxy_routing::ControlPlaneStatus;

use crate::control_plane::{ControlPlaneError, GlobalClusterView};
use dsql_proxy_routing::{Endpoint, EndpointId, Roles};
use tracing::{info, warn};

/// What the router must tell sessions once the new table is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RoleSignal {
    /// Every session on it leaves.
    Fenced(EndpointId),
    /// Its read-write sessions leave.
    WriterLost(EndpointId),
}

/// One endpoint as the monitor sees it when it evaluates roles.
pub(crate) struct EndpointView<'a> {
    pub endpoint: &'a Endpoint,
    /// Up by the probes: may take read-only sessions.
    pub reachable: bool,
    /// Not confirmed down by the probes: may stay (or become) the writer.
    /// A demotion by the data path alone (one broken or refused
    /// connection) moves read-only sessions to other replicas, but the
    /// writer has no stand-in, so it keeps its sessions and keeps taking
    /// new ones until a probe agrees it is down.
    pub writer_reachable: bool,
    pub latency: Option<Duration>,
}

struct RoleGauges {
    id: EndpointId,
    labels: [String; 2],
    writer: IntGauge,
    fenced: IntGauge,
    lag: Gauge,
}

impl RoleGauges {
    fn new(e: &Endpoint, metrics: &Metrics) -> Self {
        let labels = [e.name.as_str(), e.region_label()];
        let g = Self {
            id: e.id,
            labels: [e.name.clone(), e.region_label().to_owned()],
            writer: metrics.writer.with_label_values(&labels),
            fenced: metrics.endpoint_fenced.with_label_values(&labels),
            lag: metrics.replica_lag_seconds.with_label_values(&labels),
        };
        g.lag.set(-1.0);
        g
    }
}

pub(crate) struct RoleState {
    tracker: WriterTracker,
    /// Keyed by id: a reload changes the endpoint set.
    observed: Vec<(EndpointId, RoleObservation)>,
    max_replica_lag: Duration,
    writer_changes: u64,
    /// When the last evaluation found no writer (for the time counter).
    without_writer_since: Option<Instant>,
    /// The reason last logged for having no writer.
    logged: Option<Result<EndpointId, NoWriter>>,
    gauges: Vec<RoleGauges>,
    metrics: Arc<Metrics>,
    /// The RDS control plane's last view (`global_cluster_id`).
    control: Option<ControlState>,
}

struct ControlState {
    /// The last view read, and when.
    view: Option<(GlobalClusterView, Instant)>,
    /// After this a view no longer counts.
    max_age: Duration,
    last_error: Option<String>,
}

impl ControlState {
    fn fresh(&self, now: Instant) -> Option<&GlobalClusterView> {
        self.view
            .as_ref()
            .filter(|(_, at)| now.saturating_duration_since(*at) <= self.max_age)
            .map(|(v, _)| v)
    }
}

impl RoleState {
    pub fn new(
        endpoints: &[Arc<Endpoint>],
        max_replica_lag: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let gauges = endpoints
            .iter()
            .map(|e| RoleGauges::new(e, &metrics))
            .collect();
        Self {
            tracker: WriterTracker::new(),
            observed: Vec::new(),
            max_replica_lag,
            writer_changes: 0,
            without_writer_since: Some(Instant::now()),
            logged: None,
            gauges,
            metrics,
            control: None,
        }
    }

    /// Records a control-plane poll; true when routing may change (the
    /// writer Region or the failover state differs from the last view).
    pub fn record_control(
        &mut self,
        result: Result<GlobalClusterView, ControlPlaneError>,
        now: Instant,
        max_age: Duration,
    ) -> bool {
        let state = self.control.get_or_insert(ControlState {
            view: None,
            max_age,
            last_error: None,
        });
        state.max_age = max_age;
        let before = state
            .fresh(now)
            .map(|v| (v.writer_region().map(str::to_owned), v.failover.clone()));
        match result {
            Ok(view) => {
                let after = (
                    view.writer_region().map(str::to_owned),
                    view.failover.clone(),
                );
                if before.as_ref() != Some(&after) {
                    info!(
                        writer_region = after.0.as_deref().unwrap_or("none"),
                        failover = after.1.as_deref().unwrap_or("none"),
                        "RDS control plane: global cluster view changed"
                    );
                }
                state.view = Some((view, now));
                state.last_error = None;
                before != Some(after)
            }
            Err(e) => {
                warn!(error = %e, "RDS control plane: DescribeGlobalClusters failed; keeping the last view while it is fresh");
                state.last_error = Some(e.to_string());
                // Going stale is noticed by the next evaluation.
                false
            }
        }
    }

    /// The control plane's word mapped to endpoints: the writer is the
    /// endpoint whose Region (configured, or reported by Aurora) is the
    /// `IsWriter` member's, preferring one that accepts writes.
    fn control_input(&self, views: &[EndpointView<'_>], now: Instant) -> Option<ControlInput> {
        let view = self.control.as_ref()?.fresh(now)?;
        let writer = view.writer_region().and_then(|region| {
            let in_region = |v: &&EndpointView<'_>| {
                v.endpoint.region.as_deref() == Some(region)
                    || v.endpoint.region_label() == region
                    || observed_in(&self.observed, v.endpoint.id)
                        .and_then(|o| o.aurora.as_ref())
                        .and_then(|a| a.region.as_deref())
                        == Some(region)
            };
            let writable = |v: &&EndpointView<'_>| {
                observed_in(&self.observed, v.endpoint.id).is_some_and(|o| !o.read_only)
            };
            views
                .iter()
                .filter(in_region)
                .find(writable)
                .or_else(|| views.iter().find(in_region))
                .map(|v| v.endpoint.id)
        });
        Some(ControlInput {
            writer,
            failover: view.failover.clone(),
        })
    }

    /// Follows a new endpoint set after a reload: endpoints that stay keep
    /// their role, fencing and gauges; removed ones are forgotten.
    pub fn set_endpoints(&mut self, endpoints: &[Arc<Endpoint>]) {
        let keep = |id: EndpointId| endpoints.iter().any(|e| e.id == id);
        self.tracker.retain(keep);
        self.observed.retain(|(id, _)| keep(*id));
        let (kept, gone): (Vec<RoleGauges>, Vec<RoleGauges>) = std::mem::take(&mut self.gauges)
            .into_iter()
            .partition(|g| keep(g.id));
        self.gauges = kept;
        for e in endpoints {
            if !self.gauges.iter().any(|g| g.id == e.id) {
                self.gauges.push(RoleGauges::new(e, &self.metrics));
            }
        }
        for g in gone {
            if !self.gauges.iter().any(|k| k.labels == g.labels) {
                let labels = [g.labels[0].as_str(), g.labels[1].as_str()];
                let _ = self.metrics.writer.remove_label_values(&labels);
                let _ = self.metrics.endpoint_fenced.remove_label_values(&labels);
                let _ = self
                    .metrics
                    .replica_lag_seconds
                    .remove_label_values(&labels);
            }
        }
    }

    pub fn set_max_replica_lag(&mut self, lag: Duration) {
        self.max_replica_lag = lag;
    }

    /// Records a probe's role; true when routing may change now (role,
    /// timeline, or the lag crossing the bound), not for every lag tick.
    pub fn observe(&mut self, id: EndpointId, role: RoleObservation) -> bool {
        // None: a late report from a probe of an endpoint a reload removed.
        let Some(g) = self.gauges.iter().find(|g| g.id == id) else {
            return false;
        };
        g.lag.set(role.lag.map_or(-1.0, |l| l.as_secs_f64()));
        let within = |r: &RoleObservation| r.lag.is_some_and(|l| l <= self.max_replica_lag);
        let slot = self.observed.iter_mut().find(|(e, _)| *e == id);
        let changed = match &slot {
            Some((_, old)) => {
                old.read_only != role.read_only
                    || old.timeline != role.timeline
                    || within(old) != within(&role)
            }
            None => true,
        };
        match slot {
            Some((_, old)) => *old = role,
            None => self.observed.push((id, role)),
        }
        changed
    }

    /// Decides the writer, fencing and the read-only order; returns the
    /// table's roles and what to tell sessions after publishing it.
    pub fn evaluate(&mut self, views: &[EndpointView<'_>]) -> (Roles, Vec<RoleSignal>) {
        let inputs: Vec<RoleInput<'_>> = views
            .iter()
            .map(|v| RoleInput {
                id: v.endpoint.id,
                reachable: v.writer_reachable,
                role: observed_in(&self.observed, v.endpoint.id),
            })
            .collect();
        let now = Instant::now();
        let control = self.control_input(views, now);
        let decision = self.tracker.evaluate(&inputs, control.as_ref());
        let name = |id: EndpointId| {
            views
                .iter()
                .find(|v| v.endpoint.id == id)
                .map_or("?", |v| v.endpoint.name.as_str())
        };
        let mut signals = Vec::new();
        for &id in &decision.newly_fenced {
            warn!(
                endpoint = name(id),
                writer = decision.writer.as_ref().ok().map(|&w| name(w)),
                "fencing a stale writer: it still accepts writes but another endpoint is proven newer; closing its sessions"
            );
            signals.push(RoleSignal::Fenced(id));
        }
        for &id in &decision.released {
            info!(
                endpoint = name(id),
                "fenced endpoint is read-only now; released"
            );
        }
        if let Some(previous) = decision.moved_from {
            let to = decision.writer.as_ref().ok().map(|&w| name(w));
            match previous {
                Some(old) => {
                    self.writer_changes += 1;
                    self.metrics.writer_changes_total.inc();
                    warn!(
                        from = name(old),
                        to = to.unwrap_or("none"),
                        "writer changed"
                    );
                    if !decision.newly_fenced.contains(&old) {
                        signals.push(RoleSignal::WriterLost(old));
                    }
                }
                None => info!(writer = to.unwrap_or("none"), "writer found"),
            }
        }
        if let Err(why) = &decision.writer {
            if self.logged.as_ref().and_then(|l| l.as_ref().err()) != Some(why) {
                let endpoints: Vec<&Endpoint> = views.iter().map(|v| v.endpoint).collect();
                let detail = why.describe(&endpoints);
                warn!(reason = %detail, "no writer: read-write sessions wait for one");
            }
        }
        self.logged = Some(decision.writer.clone());
        if let Some(since) = self.without_writer_since.take() {
            self.metrics
                .no_writer_seconds_total
                .inc_by(now.saturating_duration_since(since).as_secs_f64());
        }
        if decision.writer.is_err() {
            self.without_writer_since = Some(now);
        }
        let writer = decision.writer.as_ref().ok().copied();
        let replicas: Vec<ReplicaInput> = views
            .iter()
            .map(|v| {
                let role = observed_in(&self.observed, v.endpoint.id);
                ReplicaInput {
                    id: v.endpoint.id,
                    reachable: v.reachable,
                    fenced: self.tracker.is_fenced(v.endpoint.id),
                    read_only: role.is_some_and(|r| r.read_only),
                    lag: role.and_then(|r| r.lag),
                    latency: v.latency,
                    priority: v.endpoint.priority,
                }
            })
            .collect();
        let read_order = read_only_order(&replicas, writer, self.max_replica_lag);
        let roles = Roles {
            writer: decision.writer,
            fenced: self.tracker.fenced().to_vec(),
            read_order,
            observed: self.observed.clone(),
            writer_changes_total: self.writer_changes,
            control_plane: self.control.as_ref().map(|c| ControlPlaneStatus {
                writer_region: c
                    .fresh(now)
                    .and_then(|v| v.writer_region().map(str::to_owned)),
                failover: c.fresh(now).and_then(|v| v.failover.clone()),
                age: c
                    .view
                    .as_ref()
                    .map(|(_, at)| now.saturating_duration_since(*at)),
                fresh: c.fresh(now).is_some(),
                last_error: c.last_error.clone(),
            }),
        };
        (roles, signals)
    }

    /// Sets the writer and fenced gauges from the last evaluation. Called
    /// after the table is published and sessions are signalled, so a
    /// scraper that sees the new writer never sees it before the sessions
    /// on the old one were told to leave.
    pub fn update_gauges(&self) {
        let writer = self.tracker.writer();
        for g in &self.gauges {
            g.writer.set(i64::from(writer == Some(g.id)));
            g.fenced.set(i64::from(self.tracker.is_fenced(g.id)));
        }
    }
}

fn observed_in(
    observed: &[(EndpointId, RoleObservation)],
    id: EndpointId,
) -> Option<&RoleObservation> {
    observed
        .iter()
        .find(|(e, _)| *e == id)
        .map(|(_, role)| role)
}
