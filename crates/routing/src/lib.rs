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
pub mod writer;

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
pub use table::{
    endpoints_from_configs, ControlPlaneStatus, EndpointStatus, Roles, Route53Status, RoutingTable,
};

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

    /// Resolves when sessions of this intent on `id` must leave because
    /// its role changed: read-write sessions when it stops being the writer
    /// or is fenced, read-only ones when it is fenced.
    fn watch_role(&self, _id: EndpointId, _read_only: bool) -> Option<DownWatch> {
        None
    }

    /// Changes whenever a new table is published.
    fn watch_table(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    /// Changes whenever an endpoint is drained or restored (admin API).
    fn watch_drains(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    /// Whether `id` is drained (admin API).
    fn is_drained(&self, _id: EndpointId) -> bool {
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
    watches: ArcSwap<Vec<EndpointWatches>>,
    /// Bumped whenever a table is published.
    published: watch::Sender<u64>,
    reports: Option<mpsc::Sender<Report>>,
    /// The next id for an endpoint a reload adds or changes.
    next_id: AtomicU32,
    backpressure: Backpressure,
    /// Drained endpoints (admin API); the monitor applies them.
    manual: ManualOverrides,
}

/// What sessions on one endpoint are told.
struct EndpointWatches {
    id: EndpointId,
    /// The endpoint is down: every session leaves.
    down: watch::Sender<u64>,
    /// It stopped being the writer or was fenced: read-write sessions
    /// leave (`aurora-global`).
    writer_lost: watch::Sender<u64>,
    /// It was fenced as a stale writer: every session leaves.
    fenced: watch::Sender<u64>,
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
        let watches = endpoint_watches(table.endpoints(), &[]);
        let backpressure = Backpressure::new(
            table.endpoints().iter().map(|e| e.id),
            DEFAULT_BUSY_COOLDOWN,
            Instant::now(),
        );
        Self {
            table: ArcSwap::from_pointee(table),
            watches: ArcSwap::from_pointee(watches),
            published: watch::Sender::new(0),
            reports: None,
            next_id: AtomicU32::new(next_id),
            backpressure,
            manual: ManualOverrides::default(),
        }
    }

    /// Sets how long an endpoint that refused a connect for load is tried
    /// after the others (zero: never).
    pub fn with_busy_cooldown(mut self, cooldown: Duration) -> Self {
        let ids: Vec<EndpointId> = self.watches.load().iter().map(|w| w.id).collect();
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
        self.published.send_modify(|n| *n += 1);
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

    /// Publishes a table over a new endpoint set. Watches of new
    /// endpoints exist before the table names them; those of endpoints no
    /// longer in it are dropped after, which leaves their sessions relaying
    /// without one (they are not told to leave).
    pub fn replace_endpoints(&self, table: RoutingTable) {
        let watches = endpoint_watches(table.endpoints(), &self.watches.load());
        self.watches.store(Arc::new(watches));
        self.backpressure
            .set_endpoints(table.endpoints().iter().map(|e| e.id));
        self.manual
            .retain(|id| table.endpoints().iter().any(|e| e.id == id));
        self.table.store(Arc::new(table));
        self.published.send_modify(|n| *n += 1);
    }

    fn watches_of(&self, id: EndpointId, bump: impl Fn(&EndpointWatches)) {
        if let Some(w) = self.watches.load().iter().find(|w| w.id == id) {
            bump(w);
        }
    }

    /// Wakes everything watching `id` for a down event.
    pub fn signal_down(&self, id: EndpointId) {
        self.watches_of(id, |w| w.down.send_modify(|n| *n += 1));
    }

    /// Tells read-write sessions on `id` to leave: it is no longer the
    /// writer.
    pub fn signal_writer_lost(&self, id: EndpointId) {
        self.watches_of(id, |w| w.writer_lost.send_modify(|n| *n += 1));
    }

    /// Tells every session on `id` to leave: it is a fenced stale writer.
    pub fn signal_fenced(&self, id: EndpointId) {
        self.watches_of(id, |w| {
            w.writer_lost.send_modify(|n| *n += 1);
            w.fenced.send_modify(|n| *n += 1);
        });
    }
}

/// One set of senders per endpoint, reusing `existing` ones so
/// subscribers keep hearing about the endpoints that stay.
fn endpoint_watches(
    endpoints: &[Arc<Endpoint>],
    existing: &[EndpointWatches],
) -> Vec<EndpointWatches> {
    endpoints
        .iter()
        .map(|e| match existing.iter().find(|w| w.id == e.id) {
            Some(w) => EndpointWatches {
                id: e.id,
                down: w.down.clone(),
                writer_lost: w.writer_lost.clone(),
                fenced: w.fenced.clone(),
            },
            None => EndpointWatches {
                id: e.id,
                down: watch::Sender::new(0),
                writer_lost: watch::Sender::new(0),
                fenced: watch::Sender::new(0),
            },
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

    fn watch_drains(&self) -> Option<watch::Receiver<u64>> {
        Some(self.manual.subscribe())
    }

    fn is_drained(&self, id: EndpointId) -> bool {
        self.manual.is_drained(id)
    }

    fn watch_down(&self, id: EndpointId) -> Option<DownWatch> {
        self.watches
            .load()
            .iter()
            .find(|w| w.id == id)
            .map(|w| w.down.subscribe())
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

    fn watch_role(&self, id: EndpointId, read_only: bool) -> Option<DownWatch> {
        let watches = self.watches.load();
        let w = watches.iter().find(|w| w.id == id)?;
        Some(if read_only {
            w.fenced.subscribe()
        } else {
            w.writer_lost.subscribe()
        })
    }

    fn watch_table(&self) -> Option<watch::Receiver<u64>> {
        Some(self.published.subscribe())
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

    #[tokio::test]
    async fn fencing_reaches_both_intents_and_writer_loss_only_writers() {
        let router = TableRouter::new(RoutingTable::from_configs(&[config("a", 1)]));
        let a = EndpointId(0);
        let (mut rw, ro) = (
            router.watch_role(a, false).unwrap(),
            router.watch_role(a, true).unwrap(),
        );
        let mut published = router.watch_table().unwrap();
        router.signal_writer_lost(a);
        assert!(rw.has_changed().unwrap() && !ro.has_changed().unwrap());
        rw.mark_unchanged();
        router.signal_fenced(a);
        assert!(rw.has_changed().unwrap() && ro.has_changed().unwrap());
        router.publish(RoutingTable::from_configs(&[config("a", 1)]));
        published.changed().await.unwrap();
    }

    #[tokio::test]
    async fn role_watches_follow_ids_across_a_new_endpoint_set() {
        let router = TableRouter::new(RoutingTable::from_configs(&[
            config("a", 1),
            config("b", 2),
        ]));
        let mut on_a = router.watch_role(EndpointId(0), false).unwrap();
        let mut on_b = router.watch_role(EndpointId(1), true).unwrap();
        let mut published = router.watch_table().unwrap();
        let plan = router.plan(&[config("a", 1), config("c", 0)]);
        router.replace_endpoints(RoutingTable::by_priority(plan.endpoints));
        published.changed().await.unwrap();
        // b is gone: its sessions are not told to leave.
        assert!(on_b.changed().await.is_err());
        router.signal_fenced(EndpointId(0));
        on_a.changed().await.unwrap();
        let mut on_c = router.watch_role(EndpointId(2), true).unwrap();
        router.signal_fenced(EndpointId(2));
        on_c.changed().await.unwrap();
        assert!(router.watch_role(EndpointId(1), false).is_none());
    }
}
