//! Routing: which endpoint a new session goes to.
//!
//! Pure parts: the per-endpoint health state machine ([`health`]), Route
//! 53's last word ([`route53`]), the selection rule ([`policy`]) and the
//! immutable [`RoutingTable`]. The table is published through `arc-swap`, so
//! the connect path reads it with one atomic load, no lock and no await.
//! The background tasks that feed it live in the health crate.

mod backpressure;
mod endpoint;
pub mod health;
mod manual;
pub mod policy;
pub mod route53;
mod table;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dsql_proxy_config::EndpointConfig;
use thiserror::Error;
use tokio::sync::{mpsc, watch};

pub use backpressure::Backpressure;
pub use endpoint::{Endpoint, EndpointId};
pub use health::{FailureKind, Liveness, PassiveSignal, ProbeOutcome};
pub use manual::ManualOverrides;
pub use policy::{SelectionPolicy, SelectionReason};
pub use table::{endpoints_from_configs, EndpointStatus, Route53Status, RoutingTable};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RouteError {
    #[error("no endpoint is configured")]
    NoEndpoints,
    #[error("no endpoint is named {name:?} (endpoints: {})", known.join(", "))]
    UnknownEndpoint { name: String, known: Vec<String> },
    #[error("draining needs the health monitor ([routing] probes = true): without it nothing re-evaluates the selection")]
    DrainNeedsProbes,
}

/// Tells sessions an endpoint went down. The value counts down events;
/// a receiver sees a change only for events after it subscribed.
pub type DownWatch = watch::Receiver<u64>;

/// Chooses endpoints for new backend connections and hears back about
/// failures the data path sees.
pub trait Router: Send + Sync + 'static {
    /// The current table: its candidates, best first.
    fn route(&self) -> Result<Arc<RoutingTable>, RouteError>;

    /// The endpoint with this id, for cancel requests, whatever its health.
    fn endpoint(&self, id: EndpointId) -> Option<Arc<Endpoint>>;

    /// A failure seen on the data path; demotes the endpoint at once.
    fn report(&self, _id: EndpointId, _signal: PassiveSignal) {}

    /// Resolves when `id` goes down after this call.
    fn watch_down(&self, _id: EndpointId) -> Option<DownWatch> {
        None
    }

    /// `id` refused a connect for load (53300/53400): try it after the
    /// other eligible endpoints for a while. Returns true when it was not
    /// busy before (worth a log line).
    fn report_busy(&self, _id: EndpointId) -> bool {
        false
    }

    /// `id` took a connect: it is not busy (any more).
    fn report_connected(&self, _id: EndpointId) {}

    /// Whether `id` is in its busy cooldown.
    fn is_busy(&self, _id: EndpointId) -> bool {
        false
    }
}

/// A passive signal on its way to the health monitor.
pub type Report = (EndpointId, PassiveSignal);

/// A router over a published [`RoutingTable`].
pub struct TableRouter {
    table: ArcSwap<RoutingTable>,
    /// One per endpoint in the table. Replaced (never edited) when the
    /// endpoint set changes, so sessions subscribe without a lock.
    down: ArcSwap<Vec<DownSender>>,
    reports: Option<mpsc::Sender<Report>>,
    /// The next id for an endpoint a reload adds or changes.
    next_id: AtomicU32,
    backpressure: Backpressure,
    /// Drained endpoints (admin API); the monitor applies them.
    manual: ManualOverrides,
}

struct DownSender {
    id: EndpointId,
    tx: watch::Sender<u64>,
}

/// A new endpoint set matched against the current one (see
/// [`TableRouter::plan`]).
#[derive(Debug, Clone)]
pub struct EndpointPlan {
    /// The new set in config order: kept endpoints with their old ids (and
    /// possibly a new priority), added or changed ones with fresh ids.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Names of endpoints that are new or whose address changed.
    pub added: Vec<String>,
    /// Names of endpoints that are gone or whose address changed.
    pub removed: Vec<String>,
}

/// How long a busy endpoint is tried last unless configured
/// (`[routing] busy_cooldown`).
pub const DEFAULT_BUSY_COOLDOWN: Duration = Duration::from_secs(5);

impl TableRouter {
    pub fn new(table: RoutingTable) -> Self {
        let next_id = table
            .endpoints()
            .iter()
            .map(|e| e.id.0 + 1)
            .max()
            .unwrap_or(0);
        let down = down_senders(table.endpoints(), &[]);
        let backpressure = Backpressure::new(
            table.endpoints().iter().map(|e| e.id),
            DEFAULT_BUSY_COOLDOWN,
            Instant::now(),
        );
        Self {
            table: ArcSwap::from_pointee(table),
            down: ArcSwap::from_pointee(down),
            reports: None,
            next_id: AtomicU32::new(next_id),
            backpressure,
            manual: ManualOverrides::default(),
        }
    }

    /// Sets how long an endpoint that refused a connect for load is tried
    /// after the others (zero: never).
    pub fn with_busy_cooldown(mut self, cooldown: Duration) -> Self {
        let ids: Vec<EndpointId> = self.down.load().iter().map(|d| d.id).collect();
        self.backpressure = Backpressure::new(ids, cooldown, Instant::now());
        self
    }

    /// Time left in `id`'s busy cooldown, for status and metrics.
    pub fn busy_remaining(&self, id: EndpointId) -> Option<Duration> {
        self.backpressure.remaining(id, Instant::now())
    }

    /// Sends passive signals to a health monitor.
    pub fn with_reports(mut self, reports: mpsc::Sender<Report>) -> Self {
        self.reports = Some(reports);
        self
    }

    /// Replaces the table; sessions already routed are unaffected. The
    /// table must hold the same endpoints as the current one; a new set
    /// goes through [`Self::replace_endpoints`].
    pub fn publish(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
    }

    pub fn snapshot(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Matches `configs` against the current endpoints. An endpoint keeps
    /// its id when one of the same name still has the same address (see
    /// [`Endpoint::same_target`]); every other one gets an id never used
    /// before. Changes nothing but the id counter.
    pub fn plan(&self, configs: &[EndpointConfig]) -> EndpointPlan {
        let current = self.table.load();
        let mut added = Vec::new();
        let endpoints: Vec<Arc<Endpoint>> = configs
            .iter()
            .map(|c| {
                let kept = current.endpoints().iter().find(|e| e.same_target(c));
                let id = match kept {
                    Some(e) => e.id,
                    None => {
                        added.push(c.name.clone());
                        EndpointId(self.next_id.fetch_add(1, Ordering::Relaxed))
                    }
                };
                Arc::new(Endpoint::from_config(id, c))
            })
            .collect();
        let removed = current
            .endpoints()
            .iter()
            .filter(|old| !endpoints.iter().any(|e| e.id == old.id))
            .map(|old| old.name.clone())
            .collect();
        EndpointPlan {
            endpoints,
            added,
            removed,
        }
    }

    /// Publishes a table over a new endpoint set. Down-watches of new
    /// endpoints exist before the table names them; those of endpoints no
    /// longer in it are dropped after, which leaves their sessions relaying
    /// without one (they are not told to leave).
    pub fn replace_endpoints(&self, table: RoutingTable) {
        let down = down_senders(table.endpoints(), &self.down.load());
        self.down.store(Arc::new(down));
        self.backpressure
            .set_endpoints(table.endpoints().iter().map(|e| e.id));
        self.manual
            .retain(|id| table.endpoints().iter().any(|e| e.id == id));
        self.table.store(Arc::new(table));
    }

    /// Wakes everything watching `id` for a down event.
    pub fn signal_down(&self, id: EndpointId) {
        if let Some(d) = self.down.load().iter().find(|d| d.id == id) {
            d.tx.send_modify(|n| *n += 1);
        }
    }
}

/// One sender per endpoint, reusing `existing` ones so subscribers keep
/// hearing about the endpoints that stay.
fn down_senders(endpoints: &[Arc<Endpoint>], existing: &[DownSender]) -> Vec<DownSender> {
    endpoints
        .iter()
        .map(|e| DownSender {
            id: e.id,
            tx: existing
                .iter()
                .find(|d| d.id == e.id)
                .map_or_else(|| watch::Sender::new(0), |d| d.tx.clone()),
        })
        .collect()
}

impl Router for TableRouter {
    fn route(&self) -> Result<Arc<RoutingTable>, RouteError> {
        let table = self.table.load_full();
        if table.is_empty() {
            return Err(RouteError::NoEndpoints);
        }
        Ok(table)
    }

    fn endpoint(&self, id: EndpointId) -> Option<Arc<Endpoint>> {
        self.table.load().endpoint(id).cloned()
    }

    fn report(&self, id: EndpointId, signal: PassiveSignal) {
        if let Some(tx) = &self.reports {
            // A full queue already holds reports that demote; dropping
            // one more loses nothing.
            let _ = tx.try_send((id, signal));
        }
    }

    fn watch_down(&self, id: EndpointId) -> Option<DownWatch> {
        self.down
            .load()
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.tx.subscribe())
    }

    fn report_busy(&self, id: EndpointId) -> bool {
        self.backpressure.mark(id, Instant::now())
    }

    fn report_connected(&self, id: EndpointId) {
        self.backpressure.clear(id);
    }

    fn is_busy(&self, id: EndpointId) -> bool {
        self.backpressure.is_busy(id, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsql_proxy_config::EndpointConfig;

    fn config(name: &str, priority: u32) -> EndpointConfig {
        EndpointConfig {
            name: name.into(),
            region: None,
            host: format!("{name}.example"),
            port: 5432,
            connect_address: None,
            priority,
            route53_health_check_id: None,
        }
    }

    #[test]
    fn lowest_priority_then_config_order_wins() {
        let table = RoutingTable::from_configs(&[config("a", 2), config("b", 1), config("c", 1)]);
        assert_eq!(table.selected().unwrap().name, "b");
        let names: Vec<&str> = table.candidates().map(|(e, _)| e.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "a"]);
        let router = TableRouter::new(table);
        assert_eq!(router.route().unwrap().selected().unwrap().name, "b");
        router.publish(RoutingTable::from_configs(&[config("c", 0)]));
        assert_eq!(router.route().unwrap().selected().unwrap().name, "c");
        assert!(router.endpoint(EndpointId(0)).is_some());
        assert!(router.endpoint(EndpointId(9)).is_none());
    }

    #[test]
    fn empty_table_is_an_error() {
        let router = TableRouter::new(RoutingTable::from_configs(&[]));
        assert_eq!(router.route().err(), Some(RouteError::NoEndpoints));
    }

    #[test]
    fn busy_reports_reorder_connects_without_touching_the_table() {
        let router = TableRouter::new(RoutingTable::from_configs(&[
            config("a", 1),
            config("b", 2),
        ]))
        .with_busy_cooldown(Duration::from_secs(60));
        assert!(router.report_busy(EndpointId(0)));
        assert!(!router.report_busy(EndpointId(0)));
        assert!(router.is_busy(EndpointId(0)));
        assert!(router.busy_remaining(EndpointId(0)).is_some());
        let table = router.route().unwrap();
        assert_eq!(table.selected().unwrap().name, "a", "the selection stays");
        let order: Vec<&str> = table
            .connect_order(|id| router.is_busy(id))
            .map(|(e, _)| e.name.as_str())
            .collect();
        assert_eq!(order, ["b", "a"]);
        router.report_connected(EndpointId(0));
        assert!(!router.is_busy(EndpointId(0)));
    }

    #[tokio::test]
    async fn down_watch_fires_only_for_later_events() {
        let router = TableRouter::new(RoutingTable::from_configs(&[config("a", 1)]));
        router.signal_down(EndpointId(0));
        let mut w = router.watch_down(EndpointId(0)).unwrap();
        assert!(!w.has_changed().unwrap());
        router.signal_down(EndpointId(0));
        w.changed().await.unwrap();
    }

    fn names(table: &RoutingTable) -> Vec<&str> {
        table.candidates().map(|(e, _)| e.name.as_str()).collect()
    }

    #[test]
    fn plan_keeps_ids_of_unchanged_endpoints_and_never_reuses_one() {
        let router = TableRouter::new(RoutingTable::from_configs(&[
            config("a", 1),
            config("b", 1),
            config("c", 1),
        ]));
        // b goes, c moves to another port, a only changes priority, d is new.
        let mut moved = config("c", 1);
        moved.port = 6543;
        let plan = router.plan(&[config("d", 1), config("a", 0), moved]);
        let ids: Vec<(&str, u32)> = plan
            .endpoints
            .iter()
            .map(|e| (e.name.as_str(), e.id.0))
            .collect();
        assert_eq!(ids, [("d", 3), ("a", 0), ("c", 4)]);
        assert_eq!(plan.endpoints[1].priority, 0);
        assert_eq!(plan.added, ["d", "c"]);
        assert_eq!(plan.removed, ["b", "c"]);
        // Planning again does not hand out the same fresh ids.
        let again = router.plan(&[config("e", 1)]);
        assert_eq!(again.endpoints[0].id, EndpointId(5));
    }

    #[tokio::test]
    async fn replacing_endpoints_keeps_watches_of_those_that_stay() {
        let router = TableRouter::new(RoutingTable::from_configs(&[
            config("a", 1),
            config("b", 2),
        ]));
        let mut on_a = router.watch_down(EndpointId(0)).unwrap();
        let mut on_b = router.watch_down(EndpointId(1)).unwrap();
        let plan = router.plan(&[config("a", 1), config("c", 0)]);
        router.replace_endpoints(RoutingTable::by_priority(plan.endpoints));
        assert_eq!(names(&router.route().unwrap()), ["c", "a"]);
        assert!(router.endpoint(EndpointId(1)).is_none());
        assert_eq!(router.endpoint(EndpointId(2)).unwrap().name, "c");
        // b's sessions keep running: their watch closes instead of firing.
        assert!(on_b.changed().await.is_err());
        router.signal_down(EndpointId(0));
        on_a.changed().await.unwrap();
        let mut on_c = router.watch_down(EndpointId(2)).unwrap();
        router.signal_down(EndpointId(2));
        on_c.changed().await.unwrap();
        assert!(router.watch_down(EndpointId(1)).is_none());
    }

    #[test]
    fn tables_look_endpoints_up_by_id_not_position() {
        let router = TableRouter::new(RoutingTable::from_configs(&[
            config("a", 1),
            config("b", 2),
        ]));
        let plan = router.plan(&[config("b", 2), config("z", 1)]);
        let table = RoutingTable::by_priority(plan.endpoints);
        assert_eq!(table.endpoint(EndpointId(1)).unwrap().name, "b");
        assert!(table.status(EndpointId(0)).is_none());
        assert!(table.status(EndpointId(2)).is_some());
        assert_eq!(names(&table), ["z", "b"]);
    }
}
