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
    /// Fenced stale writers, by endpoint index.
    pub fenced: Vec<bool>,
    /// Endpoints a read-only session tries, best first.
    pub read_order: Vec<EndpointId>,
    /// The last role each endpoint's probe saw, by endpoint index.
    pub observed: Vec<Option<RoleObservation>>,
    pub writer_changes_total: u64,
}

impl Roles {
    pub fn writer(&self) -> Option<EndpointId> {
        self.writer.as_ref().ok().copied()
    }

    pub fn is_fenced(&self, id: EndpointId) -> bool {
        self.fenced.get(id.index()).copied().unwrap_or(false)
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
        let order = selection.order.iter().map(|id| id.index()).collect();
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
        self.status.get(id.index())
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

    /// The writer, by name, for messages: `none` when there is none.
    pub fn writer_name(&self) -> &str {
        self.roles
            .as_ref()
            .and_then(|r| r.writer())
            .and_then(|id| self.endpoints.get(id.index()))
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
