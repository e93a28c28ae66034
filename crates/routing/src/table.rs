//! The immutable routing table the connect path reads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dsql_proxy_config::EndpointConfig;

use crate::health::{FailureKind, Liveness};
use crate::policy::{Selection, SelectionReason};
use crate::route53::Route53Reading;
use crate::writer::{NoWriter, RoleObservation};
use crate::{Endpoint, EndpointId};

/// Roles under `kind = "aurora-global"`: where writes and reads go.
#[derive(Debug, Clone)]
pub struct Roles {
    /// Where read-write sessions go, or why nowhere.
    pub writer: Result<EndpointId, NoWriter>,
    /// Fenced stale writers.
    pub fenced: Vec<EndpointId>,
    /// Endpoints a read-only session tries, best first.
    pub read_order: Vec<EndpointId>,
    /// The last role each endpoint's probe saw.
    pub observed: Vec<(EndpointId, RoleObservation)>,
    pub writer_changes_total: u64,
    /// The RDS control plane's view, when `global_cluster_id` is set.
    pub control_plane: Option<ControlPlaneStatus>,
}

/// The RDS control plane's view as the last evaluation used it.
#[derive(Debug, Clone)]
pub struct ControlPlaneStatus {
    /// The `IsWriter` member's Region (only while the view is fresh).
    pub writer_region: Option<String>,
    /// `FailoverState.Status` (only while the view is fresh).
    pub failover: Option<String>,
    /// Since the last successful read.
    pub age: Option<Duration>,
    /// Whether the view still counts.
    pub fresh: bool,
    pub last_error: Option<String>,
}

impl Roles {
    pub fn writer(&self) -> Option<EndpointId> {
        self.writer.as_ref().ok().copied()
    }

    pub fn is_fenced(&self, id: EndpointId) -> bool {
        self.fenced.contains(&id)
    }

    /// The last role `id`'s probe saw.
    pub fn observed(&self, id: EndpointId) -> Option<&RoleObservation> {
        self.observed
            .iter()
            .find(|(e, _)| *e == id)
            .map(|(_, role)| role)
    }
}

/// One endpoint's state when the table was built, for status and metrics.
#[derive(Debug, Clone)]
pub struct EndpointStatus {
    pub liveness: Liveness,
    /// Eligible for new sessions under the policy.
    pub eligible: bool,
    pub latency: Option<Duration>,
    pub last_rtt: Option<Duration>,
    pub connect_time: Option<Duration>,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub last_failure: Option<(FailureKind, String)>,
    pub auth_failure: Option<String>,
    pub last_up: Option<Instant>,
    /// Failed probes so far, indexed like [`FailureKind::ALL`].
    pub probe_failures: [u64; FailureKind::ALL.len()],
    pub route53: Option<Route53Status>,
}

impl EndpointStatus {
    pub fn unknown() -> Self {
        Self {
            liveness: Liveness::Unknown,
            eligible: true,
            latency: None,
            last_rtt: None,
            connect_time: None,
            consecutive_failures: 0,
            consecutive_successes: 0,
            last_failure: None,
            auth_failure: None,
            last_up: None,
            probe_failures: [0; FailureKind::ALL.len()],
            route53: None,
        }
    }
}

/// Route 53's view of an endpoint with a health check.
#[derive(Debug, Clone)]
pub struct Route53Status {
    pub health_check_id: String,
    pub reading: Option<Route53Reading>,
    pub age: Option<Duration>,
    /// The verdict routing uses: `None` when there is none or it is stale.
    pub effective: Option<bool>,
    pub errors_total: u64,
    pub last_error: Option<String>,
}

/// An immutable snapshot: endpoints, their state, and the order new
/// sessions try them in.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    endpoints: Vec<Arc<Endpoint>>,
    status: Vec<EndpointStatus>,
    /// Indices into `endpoints`: every endpoint, best first.
    order: Vec<usize>,
    /// How many leading entries of `order` are eligible.
    eligible: usize,
    reason: SelectionReason,
    /// Counts publishes; 0 for the table built from config.
    pub generation: u64,
    /// Times the selected endpoint changed since start.
    pub route_changes_total: u64,
    /// Set under `kind = "aurora-global"` once probes reported.
    pub roles: Option<Arc<Roles>>,
}

impl RoutingTable {
    /// The table before any probe: lower `priority` first, then config order.
    pub fn by_priority(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let mut order: Vec<usize> = (0..endpoints.len()).collect();
        order.sort_by_key(|&i| (endpoints[i].priority, i));
        Self {
            status: endpoints
                .iter()
                .map(|_| EndpointStatus::unknown())
                .collect(),
            eligible: endpoints.len(),
            endpoints,
            order,
            reason: SelectionReason::Priority,
            generation: 0,
            route_changes_total: 0,
            roles: None,
        }
    }

    pub fn from_configs(configs: &[EndpointConfig]) -> Self {
        Self::by_priority(endpoints_from_configs(configs))
    }

    /// A table from an evaluation. `status` is indexed like `endpoints`.
    pub fn from_selection(
        endpoints: Vec<Arc<Endpoint>>,
        status: Vec<EndpointStatus>,
        selection: &Selection,
        generation: u64,
    ) -> Self {
        let order = selection
            .order
            .iter()
            .filter_map(|&id| endpoints.iter().position(|e| e.id == id))
            .collect();
        Self {
            endpoints,
            status,
            order,
            eligible: selection.eligible,
            reason: selection.reason,
            generation,
            route_changes_total: 0,
            roles: None,
        }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn status(&self, id: EndpointId) -> Option<&EndpointStatus> {
        self.status.get(self.position(id)?)
    }

    /// The endpoint with this id, if the table has it.
    pub fn endpoint(&self, id: EndpointId) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(self.position(id)?)
    }

    /// Ids are not positions once endpoints were added or removed; tables
    /// hold a handful of endpoints, so a scan is the cheapest lookup.
    fn position(&self, id: EndpointId) -> Option<usize> {
        self.endpoints.iter().position(|e| e.id == id)
    }

    /// The endpoint new sessions use first, when one is eligible.
    pub fn selected(&self) -> Option<&Arc<Endpoint>> {
        (self.eligible > 0).then(|| &self.endpoints[self.order[0]])
    }

    pub fn reason(&self) -> SelectionReason {
        self.reason
    }

    /// Every endpoint in the order a connect tries them, with whether the
    /// policy considers it eligible.
    pub fn candidates(&self) -> impl Iterator<Item = (&Arc<Endpoint>, bool)> + '_ {
        self.order
            .iter()
            .enumerate()
            .map(|(rank, &i)| (&self.endpoints[i], rank < self.eligible))
    }

    /// [`Self::candidates`] with backpressure applied: eligible endpoints
    /// that are not `busy` first, then eligible busy ones, then the
    /// ineligible ones; each group in table order. A busy endpoint is still
    /// tried, after the others: busy is not down.
    pub fn connect_order<'a>(
        &'a self,
        busy: impl Fn(EndpointId) -> bool + Copy + 'a,
    ) -> impl Iterator<Item = (&'a Arc<Endpoint>, bool)> + 'a {
        let eligible = || self.candidates().take(self.eligible);
        eligible()
            .filter(move |(e, _)| !busy(e.id))
            .chain(eligible().filter(move |(e, _)| busy(e.id)))
            .chain(self.candidates().skip(self.eligible))
    }

    /// The writer, by name, for messages: `none` when there is none.
    pub fn writer_name(&self) -> &str {
        self.roles
            .as_ref()
            .and_then(|r| r.writer())
            .and_then(|id| self.endpoint(id))
            .map_or("none", |e| e.name.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

pub fn endpoints_from_configs(configs: &[EndpointConfig]) -> Vec<Arc<Endpoint>> {
    configs
        .iter()
        .enumerate()
        .map(|(i, c)| Arc::new(Endpoint::from_config(EndpointId(i as u32), c)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Selection, SelectionReason};

    fn table(order: &[u32], eligible: usize) -> RoutingTable {
        let endpoints: Vec<Arc<Endpoint>> = (0..order.len() as u32)
            .map(|i| {
                Arc::new(Endpoint {
                    id: EndpointId(i),
                    name: format!("e{i}"),
                    region: None,
                    host: format!("e{i}.example"),
                    port: 5432,
                    connect_address: None,
                    priority: 1,
                    route53_health_check_id: None,
                })
            })
            .collect();
        let status = endpoints
            .iter()
            .map(|_| EndpointStatus::unknown())
            .collect();
        let selection = Selection {
            order: order.iter().map(|&i| EndpointId(i)).collect(),
            eligible,
            reason: SelectionReason::Fastest,
            changed: false,
        };
        RoutingTable::from_selection(endpoints, status, &selection, 1)
    }

    fn names<'a>(it: impl Iterator<Item = (&'a Arc<Endpoint>, bool)>) -> Vec<(String, bool)> {
        it.map(|(e, ok)| (e.name.clone(), ok)).collect()
    }

    #[test]
    fn busy_endpoints_go_after_the_other_eligible_ones_but_before_ineligible() {
        // Table order e2, e0, e1, e3; e1 and e3 ineligible.
        let t = table(&[2, 0, 1, 3], 2);
        let order = names(t.connect_order(|id| id == EndpointId(2)));
        assert_eq!(
            order,
            [
                ("e0".into(), true),
                ("e2".into(), true),
                ("e1".into(), false),
                ("e3".into(), false)
            ]
        );
    }

    #[test]
    fn without_busy_endpoints_the_table_order_is_kept() {
        let t = table(&[2, 0, 1, 3], 2);
        assert_eq!(names(t.connect_order(|_| false)), names(t.candidates()));
        // All busy: same order too (nothing better to try first).
        assert_eq!(names(t.connect_order(|_| true)), names(t.candidates()));
    }

    #[test]
    fn a_busy_ineligible_endpoint_stays_with_the_ineligible() {
        let t = table(&[0, 1, 2], 1);
        let order = names(t.connect_order(|id| id != EndpointId(0)));
        assert_eq!(
            order,
            [
                ("e0".into(), true),
                ("e1".into(), false),
                ("e2".into(), false)
            ]
        );
    }
}
