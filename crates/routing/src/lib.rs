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
pub mod policy;
pub mod route53;
mod table;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use thiserror::Error;
use tokio::sync::{mpsc, watch};

pub use backpressure::Backpressure;
pub use endpoint::{Endpoint, EndpointId};
pub use health::{FailureKind, Liveness, PassiveSignal, ProbeOutcome};
pub use policy::{SelectionPolicy, SelectionReason};
pub use table::{endpoints_from_configs, EndpointStatus, Route53Status, RoutingTable};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RouteError {
    #[error("no endpoint is configured")]
    NoEndpoints,
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
    /// One per endpoint, indexed by id.
    down: Vec<watch::Sender<u64>>,
    reports: Option<mpsc::Sender<Report>>,
    backpressure: Backpressure,
}

/// How long a busy endpoint is tried last unless configured
/// (`[routing] busy_cooldown`).
pub const DEFAULT_BUSY_COOLDOWN: Duration = Duration::from_secs(5);

impl TableRouter {
    pub fn new(table: RoutingTable) -> Self {
        let down = table
            .endpoints()
            .iter()
            .map(|_| watch::Sender::new(0))
            .collect();
        let backpressure = Backpressure::new(
            table.endpoints().len(),
            DEFAULT_BUSY_COOLDOWN,
            Instant::now(),
        );
        Self {
            table: ArcSwap::from_pointee(table),
            down,
            reports: None,
            backpressure,
        }
    }

    /// Sets how long an endpoint that refused a connect for load is tried
    /// after the others (zero: never).
    pub fn with_busy_cooldown(mut self, cooldown: Duration) -> Self {
        self.backpressure = Backpressure::new(self.down.len(), cooldown, Instant::now());
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

    /// Replaces the table; sessions already routed are unaffected.
    pub fn publish(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
    }

    pub fn snapshot(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Wakes everything watching `id` for a down event.
    pub fn signal_down(&self, id: EndpointId) {
        if let Some(tx) = self.down.get(id.index()) {
            tx.send_modify(|n| *n += 1);
        }
    }
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
        self.table.load().endpoints().get(id.index()).cloned()
    }

    fn report(&self, id: EndpointId, signal: PassiveSignal) {
        if let Some(tx) = &self.reports {
            // A full queue already holds reports that demote; dropping
            // one more loses nothing.
            let _ = tx.try_send((id, signal));
        }
    }

    fn watch_down(&self, id: EndpointId) -> Option<DownWatch> {
        self.down.get(id.index()).map(|tx| tx.subscribe())
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
}
