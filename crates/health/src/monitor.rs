//! The monitor: one task that owns every endpoint's health state, hears
//! probe results, Route 53 readings and the data path's failure reports,
//! and publishes a new routing table when something changed and once per
//! probe round.

use std::sync::Arc;
use std::time::Duration;

use dsql_proxy_config::RoutingConfig;
use dsql_proxy_metrics::Metrics;
use dsql_proxy_metrics::{Histogram, IntGauge};
use dsql_proxy_routing::health::{HealthTracker, Hysteresis, Transition};
use dsql_proxy_routing::policy::{Candidate, Selector};
use dsql_proxy_routing::route53::{Route53Reading, Route53State};
use dsql_proxy_routing::{
    Endpoint, EndpointId, EndpointStatus, FailureKind, Liveness, PassiveSignal, ProbeOutcome,
    Report, Route53Status, RoutingTable, SelectionPolicy, TableRouter,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use crate::control_plane::GlobalClusterSource;
use crate::probe::Probe;
use crate::roles::{EndpointView, RoleSignal, RoleState};
use crate::route53::HealthCheckSource;
use crate::task::ProbeTask;
use crate::Event;

/// The monitor's settings, from `[routing]`.
#[derive(Debug, Clone)]
pub struct MonitorSettings {
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub hysteresis: Hysteresis,
    pub policy: SelectionPolicy,
    pub route53_poll_interval: Duration,
    pub route53_max_staleness: Duration,
    /// `kind = "aurora-global"`: track roles, with this replica lag bound.
    pub max_replica_lag: Option<Duration>,
    /// `kind = "aurora-global"` with `global_cluster_id`: poll the RDS
    /// control plane.
    pub control_plane: Option<ControlPlanePoll>,
}

/// Where and how often the monitor asks the RDS control plane.
#[derive(Clone)]
pub struct ControlPlanePoll {
    pub global_cluster_id: String,
    pub source: Arc<dyn GlobalClusterSource>,
    pub interval: Duration,
}

impl std::fmt::Debug for ControlPlanePoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlanePoll")
            .field("global_cluster_id", &self.global_cluster_id)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl MonitorSettings {
    pub fn from_config(c: &RoutingConfig) -> Self {
        Self {
            probe_interval: c.probe_interval.get(),
            probe_timeout: c.probe_timeout.get(),
            hysteresis: Hysteresis {
                down_after: c.down_after,
                up_after: c.up_after,
            },
            policy: SelectionPolicy {
                latency_tolerance: c.latency_tolerance.get(),
                prefer_region: c.prefer_region.clone(),
                route53: c.route53,
                switch_after: c.switch_after,
            },
            route53_poll_interval: c.route53_poll_interval.get(),
            route53_max_staleness: c.route53_max_staleness.get(),
            max_replica_lag: None,
            control_plane: None,
        }
    }
}

/// The running monitor; dropping it stops the monitor task, which stops
/// its probe tasks and Route 53 pollers with it.
pub struct Monitor<P> {
    control: mpsc::Sender<Reconfigure<P>>,
    _task: JoinSet<()>,
}

/// A new endpoint set and settings for a running monitor (configuration
/// reload).
pub struct MonitorUpdate<P> {
    /// The new endpoint set, from `TableRouter::plan`: kept endpoints carry
    /// their old ids, so their health state and latency history carry over.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// One probe per endpoint, in the same order.
    pub probes: Vec<Arc<P>>,
    pub route53: Option<Arc<dyn HealthCheckSource>>,
    pub settings: MonitorSettings,
}

type Reconfigure<P> = (MonitorUpdate<P>, oneshot::Sender<()>);

impl<P: Probe> Monitor<P> {
    /// Applies `update` and resolves once the table over the new endpoint
    /// set is published. Every probe task and Route 53 poller restarts
    /// (with the new probes, intervals and source); kept endpoints keep
    /// their state, new ones start unknown and, being unmeasured, rank
    /// after measured endpoints until their first successful probe. Once
    /// every endpoint has reported, the selection is re-made at once
    /// under the new policy, as at startup. Returns false when the monitor
    /// task is gone (it only ends by panicking).
    pub async fn reconfigure(&self, update: MonitorUpdate<P>) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        if self.control.send((update, done_tx)).await.is_err() {
            return false;
        }
        done_rx.await.is_ok()
    }
}

/// Starts one probe task per endpoint, one Route 53 poller per health
/// check, and the monitor task. Returns once every endpoint has reported
/// its first probe (or `probe_timeout` passed), so the first sessions are
/// routed on measurements rather than on priority alone.
pub async fn start<P: Probe>(
    router: Arc<TableRouter>,
    reports: mpsc::Receiver<Report>,
    probes: Vec<Arc<P>>,
    route53: Option<Arc<dyn HealthCheckSource>>,
    settings: MonitorSettings,
    metrics: Arc<Metrics>,
) -> Monitor<P> {
    let endpoints: Vec<Arc<Endpoint>> = router.snapshot().endpoints().to_vec();
    let (events_tx, events_rx) = mpsc::channel(1024);
    let (control_tx, control_rx) = mpsc::channel(1);
    let (ready_tx, ready_rx) = oneshot::channel();
    let mut state = MonitorState::new(router, endpoints, settings.clone(), metrics, events_tx);
    state.spawn_helpers(probes, route53);
    let mut task = JoinSet::new();
    task.spawn(state.run(events_rx, reports, control_rx, ready_tx));
    let _ = tokio::time::timeout(
        settings.probe_timeout + Duration::from_millis(100),
        ready_rx,
    )
    .await;
    Monitor {
        control: control_tx,
        _task: task,
    }
}

/// How long a control-plane view counts after it was read: three polls, so
/// one failed request does not drop it.
fn control_plane_max_age(interval: Duration) -> Duration {
    interval * 3
}

async fn poll_control_plane(poll: ControlPlanePoll, events: mpsc::Sender<Event>) {
    let mut ticker = tokio::time::interval(poll.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = poll.source.describe(&poll.global_cluster_id).await;
        if events.send(Event::ControlPlane(result)).await.is_err() {
            return;
        }
    }
}

async fn poll_route53(
    id: EndpointId,
    check: String,
    source: Arc<dyn HealthCheckSource>,
    interval: Duration,
    events: mpsc::Sender<Event>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = source.read(&check).await.map(|r| Route53Reading {
            healthy: r.healthy,
            disabled: r.disabled,
            inverted: r.inverted,
            successes: r.successes,
            observations: r.observations,
        });
        if events.send(Event::Route53(id, result)).await.is_err() {
            return;
        }
    }
}

/// One endpoint's metric handles, resolved once.
struct EndpointMetrics {
    up: IntGauge,
    selected: IntGauge,
    drained: IntGauge,
    latency: Histogram,
    route53_healthy: IntGauge,
}

struct EndpointState {
    endpoint: Arc<Endpoint>,
    gauges: EndpointMetrics,
    health: HealthTracker,
    route53: Option<Route53State>,
    wake: Arc<Notify>,
    probe_failures: [u64; FailureKind::ALL.len()],
    first_report: bool,
    /// Its sessions were told to leave for the current down period.
    evicted: bool,
    /// The Route 53 verdict last logged.
    route53_logged: Option<bool>,
}

impl EndpointState {
    fn new(endpoint: Arc<Endpoint>, metrics: &Metrics) -> Self {
        let labels = [endpoint.name.as_str(), endpoint.region_label()];
        Self {
            gauges: EndpointMetrics {
                up: metrics.endpoint_up.with_label_values(&labels),
                selected: metrics.endpoint_selected.with_label_values(&labels),
                drained: metrics.endpoint_drained.with_label_values(&labels),
                latency: metrics.endpoint_latency_seconds.with_label_values(&labels),
                route53_healthy: metrics.route53_healthy.with_label_values(&labels),
            },
            route53: endpoint
                .route53_health_check_id
                .as_ref()
                .map(|_| Route53State::default()),
            endpoint,
            health: HealthTracker::new(),
            wake: Arc::new(Notify::new()),
            probe_failures: [0; FailureKind::ALL.len()],
            first_report: false,
            evicted: false,
            route53_logged: None,
        }
    }

    fn labels(&self) -> [&str; 2] {
        [self.endpoint.name.as_str(), self.endpoint.region_label()]
    }
}

struct MonitorState {
    router: Arc<TableRouter>,
    endpoints: Vec<EndpointState>,
    selector: Selector,
    settings: MonitorSettings,
    generation: u64,
    route_changes: u64,
    metrics: Arc<Metrics>,
    /// Probe tasks and Route 53 pollers; replaced (so aborted) on reload.
    helpers: JoinSet<()>,
    /// Handed to each helper. The monitor keeps one, so `events` never
    /// closes: the monitor ends when its `Monitor` handle is dropped.
    events: mpsc::Sender<Event>,
    /// Waiting for every endpoint's first report (after startup or a
    /// reload) to re-make the selection at once.
    settling: bool,
    roles: Option<RoleState>,
}

impl MonitorState {
    fn new(
        router: Arc<TableRouter>,
        endpoints: Vec<Arc<Endpoint>>,
        settings: MonitorSettings,
        metrics: Arc<Metrics>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        let endpoints: Vec<EndpointState> = endpoints
            .into_iter()
            .map(|endpoint| EndpointState::new(endpoint, &metrics))
            .collect();
        let roles = settings.max_replica_lag.map(|lag| {
            let list: Vec<Arc<Endpoint>> =
                endpoints.iter().map(|s| Arc::clone(&s.endpoint)).collect();
            RoleState::new(&list, lag, Arc::clone(&metrics))
        });
        Self {
            roles,
            router,
            endpoints,
            selector: Selector::default(),
            settings,
            generation: 0,
            route_changes: 0,
            metrics,
            helpers: JoinSet::new(),
            events,
            settling: true,
        }
    }

    /// Starts one probe task per endpoint (`probes` is in endpoint order)
    /// and a Route 53 poller per health check.
    fn spawn_helpers<P: Probe>(
        &mut self,
        probes: Vec<Arc<P>>,
        route53: Option<Arc<dyn HealthCheckSource>>,
    ) {
        for (state, probe) in self.endpoints.iter().zip(probes) {
            self.helpers.spawn(
                ProbeTask {
                    id: state.endpoint.id,
                    probe,
                    interval: self.settings.probe_interval,
                    timeout: self.settings.probe_timeout,
                    events: self.events.clone(),
                    wake: Arc::clone(&state.wake),
                }
                .run(),
            );
        }
        if let Some(poll) = &self.settings.control_plane {
            self.helpers
                .spawn(poll_control_plane(poll.clone(), self.events.clone()));
        }
        let Some(source) = route53 else { return };
        for state in &self.endpoints {
            if let Some(check) = &state.endpoint.route53_health_check_id {
                self.helpers.spawn(poll_route53(
                    state.endpoint.id,
                    check.clone(),
                    Arc::clone(&source),
                    self.settings.route53_poll_interval,
                    self.events.clone(),
                ));
            }
        }
    }

    /// Swaps in a new endpoint set and settings, restarts the helpers and
    /// publishes the table over the new set. Events already queued from
    /// the old helpers still apply: ids are never reused, so those of
    /// removed endpoints match nothing.
    fn reconfigure<P: Probe>(&mut self, update: MonitorUpdate<P>) {
        self.helpers = JoinSet::new();
        let mut old = std::mem::take(&mut self.endpoints);
        for endpoint in update.endpoints {
            let state = match old.iter().position(|s| s.endpoint.id == endpoint.id) {
                Some(i) => {
                    let mut kept = old.swap_remove(i);
                    // Only the priority can differ (see `same_target`).
                    kept.endpoint = endpoint;
                    kept
                }
                None => {
                    info!(endpoint = %endpoint.name, address = %endpoint.describe(), "endpoint added");
                    EndpointState::new(endpoint, &self.metrics)
                }
            };
            self.endpoints.push(state);
        }
        for gone in old {
            info!(endpoint = %gone.endpoint.name, address = %gone.endpoint.describe(), "endpoint removed; its sessions keep running");
            let labels = gone.labels();
            if !self.endpoints.iter().any(|s| s.labels() == labels) {
                let _ = self.metrics.endpoint_up.remove_label_values(&labels);
                let _ = self.metrics.endpoint_selected.remove_label_values(&labels);
                let _ = self.metrics.endpoint_drained.remove_label_values(&labels);
                let _ = self.metrics.route53_healthy.remove_label_values(&labels);
                let _ = self
                    .metrics
                    .endpoint_latency_seconds
                    .remove_label_values(&labels);
            }
        }
        self.roles = match (self.roles.take(), update.settings.max_replica_lag) {
            (Some(mut roles), Some(lag)) => {
                roles.set_endpoints(&self.endpoint_list());
                roles.set_max_replica_lag(lag);
                Some(roles)
            }
            (None, Some(lag)) => Some(RoleState::new(
                &self.endpoint_list(),
                lag,
                Arc::clone(&self.metrics),
            )),
            (_, None) => None,
        };
        self.settings = update.settings;
        self.settling = true;
        self.spawn_helpers(update.probes, update.route53);
        let (table, signals) = self.evaluate(false);
        self.router.replace_endpoints(table);
        self.send_role_signals(signals);
    }

    fn endpoint_list(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints
            .iter()
            .map(|s| Arc::clone(&s.endpoint))
            .collect()
    }

    async fn run<P: Probe>(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut reports: mpsc::Receiver<Report>,
        mut control: mpsc::Receiver<Reconfigure<P>>,
        ready: oneshot::Sender<()>,
    ) {
        let mut ready = Some(ready);
        let mut round = rounds(self.settings.probe_interval).await;
        let mut drains = self.router.manual().subscribe();
        loop {
            let changed = tokio::select! {
                Some(event) = events.recv() => self.on_event(event),
                // An endpoint drained or restored through the admin API:
                // re-evaluate now, like an endpoint going down or up.
                Ok(()) = drains.changed() => true,
                Some((id, signal)) = reports.recv() => self.on_passive(id, signal),
                Some((update, done)) = control.recv() => {
                    let interval = self.settings.probe_interval;
                    self.reconfigure(update);
                    if self.settings.probe_interval != interval {
                        round = rounds(self.settings.probe_interval).await;
                    }
                    let _ = done.send(());
                    false
                }
                _ = round.tick() => {
                    self.publish(true);
                    continue;
                }
                else => return,
            };
            if self.settling && self.endpoints.iter().all(|e| e.first_report) {
                // Whatever was selected while only some endpoints had
                // reported (or under the previous configuration) gives way
                // now, without switch_after rounds.
                self.settling = false;
                self.selector.mark_provisional();
                self.publish(false);
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            } else if changed {
                self.publish(false);
            }
        }
    }

    /// Returns true when routing may have to change now.
    fn on_event(&mut self, event: Event) -> bool {
        match event {
            Event::Probe(id, outcome) => {
                let rules = self.settings.hysteresis;
                let Some(state) = find_mut(&mut self.endpoints, id) else {
                    return false;
                };
                state.first_report = true;
                let count_failure = |state: &mut EndpointState, kind: FailureKind| {
                    state.probe_failures[kind.index()] += 1;
                    self.metrics
                        .probe_failures_total
                        .with_label_values(&[
                            state.endpoint.name.as_str(),
                            state.endpoint.region_label(),
                            kind.as_str(),
                        ])
                        .inc();
                };
                match &outcome {
                    ProbeOutcome::Success { rtt, .. }
                    | ProbeOutcome::AuthFailure { rtt: Some(rtt), .. }
                    | ProbeOutcome::Busy { rtt, .. } => {
                        state.gauges.latency.observe(rtt.as_secs_f64());
                    }
                    _ => {}
                }
                match &outcome {
                    ProbeOutcome::Failure { kind, detail } => {
                        count_failure(state, *kind);
                        debug!(endpoint = %state.endpoint.name, reason = kind.as_str(), %detail, "probe failed");
                    }
                    ProbeOutcome::Busy { detail, .. } => {
                        // Counted by reason, but no step towards down_after.
                        count_failure(state, FailureKind::Busy);
                        debug!(endpoint = %state.endpoint.name, %detail, "probe login refused for load; not treated as an outage");
                    }
                    ProbeOutcome::AuthFailure { detail, .. }
                        if state.health.auth_failure().is_none() =>
                    {
                        warn!(endpoint = %state.endpoint.name, %detail, "probe login refused; not treated as an outage");
                    }
                    _ => {}
                }
                let failed = matches!(outcome, ProbeOutcome::Failure { .. });
                let role_changed = match (&mut self.roles, &outcome) {
                    (Some(roles), ProbeOutcome::Success { role: Some(r), .. }) => {
                        roles.observe(id, r.clone())
                    }
                    _ => false,
                };
                let transition = state
                    .health
                    .observe(outcome, std::time::Instant::now(), rules);
                // A passive demotion is confirmed only by the probes' own
                // verdict, `down_after` failures in a row, like a probe-driven
                // down: only then are the endpoint's sessions told to leave.
                // One flaky probe after one broken session must not end every
                // session on a healthy endpoint.
                if failed
                    && transition.is_none()
                    && state.health.liveness() == Liveness::Down
                    && state.health.consecutive_failures() >= rules.down_after
                    && !state.evicted
                {
                    state.evicted = true;
                    warn!(endpoint = %state.endpoint.name, "endpoint marked down: a probe confirmed the demotion; closing its sessions");
                    self.router.signal_down(id);
                    // Under aurora-global a confirmed-down writer is no
                    // longer the writer: publish the roles now.
                    return self.roles.is_some();
                }
                self.on_transition(id, transition) || role_changed
            }
            Event::ControlPlane(result) => {
                let max_age = self
                    .settings
                    .control_plane
                    .as_ref()
                    .map_or(Duration::ZERO, |p| control_plane_max_age(p.interval));
                match &mut self.roles {
                    Some(roles) => roles.record_control(result, std::time::Instant::now(), max_age),
                    None => false,
                }
            }
            Event::Route53(id, result) => {
                let now = std::time::Instant::now();
                let max = self.settings.route53_max_staleness;
                let Some(state) = find_mut(&mut self.endpoints, id) else {
                    return false;
                };
                let Some(r53) = state.route53.as_mut() else {
                    return false;
                };
                let before = r53.effective(now, max);
                match result {
                    Ok(reading) => r53.record(reading, now),
                    Err(e) => {
                        self.metrics
                            .route53_errors_total
                            .with_label_values(&[
                                state.endpoint.name.as_str(),
                                state.endpoint.region_label(),
                                e.reason(),
                            ])
                            .inc();
                        warn!(endpoint = %state.endpoint.name, reason = e.reason(), error = %e, "Route 53 health check could not be read; keeping the last status");
                        r53.record_error(e.to_string());
                    }
                }
                // `publish` logs the change (and one from going stale).
                before != r53.effective(now, max)
            }
        }
    }

    fn on_passive(&mut self, id: EndpointId, signal: PassiveSignal) -> bool {
        let Some(state) = find_mut(&mut self.endpoints, id) else {
            return false;
        };
        // Whatever the verdict, look again now with a fresh connection.
        state.wake.notify_one();
        let transition = state.health.passive(signal);
        if transition.is_some() {
            // Routing moves at once; sessions wait for the probe to agree,
            // so one broken connection cannot close a healthy endpoint's
            // sessions.
            state.evicted = false;
            let cause = state
                .health
                .last_failure()
                .map(|(k, d)| format!("{}: {d}", k.as_str()))
                .unwrap_or_default();
            warn!(endpoint = %state.endpoint.name, %cause, "endpoint demoted by a failure on the data path");
            self.publish(false);
        }
        false
    }

    fn on_transition(&mut self, id: EndpointId, transition: Option<Transition>) -> bool {
        let Some(state) = find(&self.endpoints, id) else {
            return false;
        };
        match transition {
            Some(Transition::WentDown) => {
                let cause = state
                    .health
                    .last_failure()
                    .map(|(k, d)| format!("{}: {d}", k.as_str()))
                    .unwrap_or_default();
                warn!(endpoint = %state.endpoint.name, %cause, "endpoint marked down");
                // Probe-confirmed: its sessions are told to leave (the
                // writer rule reads this too, so set it before publishing).
                if let Some(state) = find_mut(&mut self.endpoints, id) {
                    state.evicted = true;
                }
                // Publish before waking sessions, so those that reconnect
                // at once are routed elsewhere.
                self.publish(false);
                self.router.signal_down(id);
                false
            }
            Some(Transition::WentUp) => {
                if let Some(state) = find_mut(&mut self.endpoints, id) {
                    state.evicted = false;
                }
                let Some(state) = find(&self.endpoints, id) else {
                    return false;
                };
                info!(endpoint = %state.endpoint.name, latency = ?state.health.latency(), "endpoint marked up");
                true
            }
            None => false,
        }
    }

    fn publish(&mut self, round: bool) {
        let (table, signals) = self.evaluate(round);
        self.router.publish(table);
        self.send_role_signals(signals);
    }

    /// After the publish, so sessions that reconnect at once find the new
    /// writer.
    fn send_role_signals(&self, signals: Vec<RoleSignal>) {
        for signal in signals {
            match signal {
                RoleSignal::Fenced(id) => self.router.signal_fenced(id),
                RoleSignal::WriterLost(id) => self.router.signal_writer_lost(id),
            }
        }
        if let Some(roles) = &self.roles {
            roles.update_gauges();
        }
    }

    /// Applies the selection (and, under `aurora-global`, the writer) rules
    /// and builds the table to publish with what sessions must be told once
    /// it is out; updates the per-endpoint gauges.
    fn evaluate(&mut self, round: bool) -> (RoutingTable, Vec<RoleSignal>) {
        let now = std::time::Instant::now();
        let max = self.settings.route53_max_staleness;
        for s in &mut self.endpoints {
            let Some(r53) = &s.route53 else { continue };
            let effective = r53.effective(now, max);
            if effective != s.route53_logged {
                s.route53_logged = effective;
                match effective {
                    Some(_) => {
                        info!(endpoint = %s.endpoint.name, healthy = ?effective, "Route 53 status changed")
                    }
                    None if r53.reading().is_some() => {
                        warn!(endpoint = %s.endpoint.name, max_staleness = ?max, "Route 53 status is stale; it no longer influences routing")
                    }
                    None => {}
                }
            }
        }
        let candidates: Vec<Candidate<'_>> = self
            .endpoints
            .iter()
            .map(|s| Candidate {
                id: s.endpoint.id,
                region: s.endpoint.region.as_deref(),
                priority: s.endpoint.priority,
                liveness: s.health.liveness(),
                latency: s.health.latency(),
                route53_healthy: s.route53.as_ref().and_then(|r| r.effective(now, max)),
                last_up: s.health.last_up(),
                drained: self.router.manual().is_drained(s.endpoint.id),
            })
            .collect();
        let previous = self.selector.current();
        let selection = self
            .selector
            .evaluate(&candidates, &self.settings.policy, round);
        let eligible: Vec<bool> = candidates
            .iter()
            .map(|c| c.eligible(&self.settings.policy))
            .collect();
        // endpoint_up tells health; a drained endpoint may well be healthy.
        let healthy: Vec<bool> = candidates
            .iter()
            .map(|c| {
                Candidate {
                    drained: false,
                    ..c.clone()
                }
                .eligible(&self.settings.policy)
            })
            .collect();
        drop(candidates);
        if selection.changed {
            self.route_changes += 1;
            self.metrics.route_changes_total.inc();
            // A previous selection that was removed by a reload is no
            // failover.
            let forced = previous.is_some_and(|p| {
                let at = self.endpoints.iter().position(|s| s.endpoint.id == p);
                !at.and_then(|i| eligible.get(i)).copied().unwrap_or(true)
            });
            if forced {
                self.metrics.failovers_total.inc();
            }
            let name = |id: Option<EndpointId>| {
                id.map_or("none", |id| {
                    find(&self.endpoints, id).map_or("(removed)", |s| s.endpoint.name.as_str())
                })
            };
            info!(
                from = name(previous),
                to = name(selection.selected()),
                reason = selection.reason.as_str(),
                "route changed"
            );
        }
        self.generation += 1;
        let selected = selection.selected();
        for (s, ok) in self.endpoints.iter().zip(&healthy) {
            let up = *ok && s.health.liveness() != Liveness::Down;
            s.gauges.up.set(i64::from(up));
            s.gauges
                .selected
                .set(i64::from(selected == Some(s.endpoint.id)));
            s.gauges
                .drained
                .set(i64::from(self.router.manual().is_drained(s.endpoint.id)));
            let r53 = match s.route53.as_ref().and_then(|r| r.effective(now, max)) {
                Some(true) => 1,
                Some(false) => 0,
                None => -1,
            };
            s.gauges.route53_healthy.set(r53);
        }
        let status = self
            .endpoints
            .iter()
            .zip(eligible)
            .map(|(s, eligible)| status_of(s, eligible, now, max))
            .collect();
        let endpoints = self
            .endpoints
            .iter()
            .map(|s| Arc::clone(&s.endpoint))
            .collect();
        let mut table =
            RoutingTable::from_selection(endpoints, status, &selection, self.generation);
        table.route_changes_total = self.route_changes;
        let signals = match &mut self.roles {
            Some(roles) => {
                let views: Vec<EndpointView<'_>> = self
                    .endpoints
                    .iter()
                    .map(|s| EndpointView {
                        endpoint: &s.endpoint,
                        // A drained replica takes no new read-only
                        // sessions; draining never moves the writer.
                        reachable: s.health.liveness() == Liveness::Up
                            && !self.router.manual().is_drained(s.endpoint.id),
                        writer_reachable: match s.health.liveness() {
                            Liveness::Up => true,
                            // Demoted by the data path, not yet confirmed
                            // by a probe.
                            Liveness::Down => !s.evicted,
                            Liveness::Unknown => false,
                        },
                        latency: s.health.latency(),
                    })
                    .collect();
                let (r, signals) = roles.evaluate(&views);
                table.roles = Some(Arc::new(r));
                signals
            }
            None => Vec::new(),
        };
        (table, signals)
    }
}

/// Endpoints are few; ids are not positions once a reload changed the set.
fn find(endpoints: &[EndpointState], id: EndpointId) -> Option<&EndpointState> {
    endpoints.iter().find(|s| s.endpoint.id == id)
}

fn find_mut(endpoints: &mut [EndpointState], id: EndpointId) -> Option<&mut EndpointState> {
    endpoints.iter_mut().find(|s| s.endpoint.id == id)
}

/// The probe-round ticker; its first tick is consumed, so rounds start one
/// interval in.
async fn rounds(interval: Duration) -> tokio::time::Interval {
    let mut round = tokio::time::interval(interval);
    round.set_missed_tick_behavior(MissedTickBehavior::Delay);
    round.tick().await;
    round
}

fn status_of(
    s: &EndpointState,
    eligible: bool,
    now: std::time::Instant,
    max_staleness: Duration,
) -> EndpointStatus {
    let h = &s.health;
    EndpointStatus {
        liveness: h.liveness(),
        eligible,
        latency: h.latency(),
        last_rtt: h.last_rtt(),
        connect_time: h.connect_time(),
        consecutive_failures: h.consecutive_failures(),
        consecutive_successes: h.consecutive_successes(),
        last_failure: h.last_failure().cloned(),
        auth_failure: h.auth_failure().map(str::to_owned),
        last_up: h.last_up(),
        probe_failures: s.probe_failures,
        route53: s.route53.as_ref().map(|r| Route53Status {
            health_check_id: s
                .endpoint
                .route53_health_check_id
                .clone()
                .unwrap_or_default(),
            reading: r.reading().cloned(),
            age: r.age(now),
            effective: r.effective(now, max_staleness),
            errors_total: r.errors_total(),
            last_error: r.last_error().map(str::to_owned),
        }),
    }
}

#[cfg(test)]
mod tests;
