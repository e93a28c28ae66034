//! Routing: which endpoint a new session goes to.
//!
//! Pure parts: the per-endpoint health state machine ([`health`]), Route
//! 53's last word ([`route53`]), the selection rule ([`policy`]) and the
//! immutable [`RoutingTable`]. The table is published through `arc-swap`, so
//! the connect path reads it with one atomic load, no lock and no await.
//! The background tasks that feed it live in the health crate.

mod endpoint;
pub mod health;
pub mod policy;
pub mod route53;
mod table;
pub mod writer;

use std::sync::Arc;

use arc_swap::ArcSwap;
use thiserror::Error;
use tokio::sync::{mpsc, watch};

pub use endpoint::{Endpoint, EndpointId};
pub use health::{FailureKind, Liveness, PassiveSignal, ProbeOutcome};
pub use policy::{SelectionPolicy, SelectionReason};
pub use table::{endpoints_from_configs, EndpointStatus, Roles, Route53Status, RoutingTable};

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
}

/// A passive signal on its way to the health monitor.
pub type Report = (EndpointId, PassiveSignal);

/// A router over a published [`RoutingTable`].
pub struct TableRouter {
    table: ArcSwap<RoutingTable>,
    /// One per endpoint, indexed by id.
    down: Vec<watch::Sender<u64>>,
    /// Per endpoint: bumped when it stops being the writer or is fenced.
    writer_lost: Vec<watch::Sender<u64>>,
    /// Per endpoint: bumped when it is fenced (every session leaves).
    fenced: Vec<watch::Sender<u64>>,
    published: watch::Sender<u64>,
    reports: Option<mpsc::Sender<Report>>,
}

impl TableRouter {
    pub fn new(table: RoutingTable) -> Self {
        let watches = || -> Vec<watch::Sender<u64>> {
            table
                .endpoints()
                .iter()
                .map(|_| watch::Sender::new(0))
                .collect()
        };
        let (down, writer_lost, fenced) = (watches(), watches(), watches());
        Self {
            table: ArcSwap::from_pointee(table),
            down,
            writer_lost,
            fenced,
            published: watch::Sender::new(0),
            reports: None,
        }
    }

    /// Sends passive signals to a health monitor.
    pub fn with_reports(mut self, reports: mpsc::Sender<Report>) -> Self {
        self.reports = Some(reports);
        self
    }

    /// Replaces the table; sessions already routed are unaffected.
    pub fn publish(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
        self.published.send_modify(|n| *n += 1);
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

    /// Tells read-write sessions on `id` to leave: it is no longer the
    /// writer.
    pub fn signal_writer_lost(&self, id: EndpointId) {
        if let Some(tx) = self.writer_lost.get(id.index()) {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Tells every session on `id` to leave: it is a fenced stale writer.
    pub fn signal_fenced(&self, id: EndpointId) {
        self.signal_writer_lost(id);
        if let Some(tx) = self.fenced.get(id.index()) {
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

    fn watch_role(&self, id: EndpointId, read_only: bool) -> Option<DownWatch> {
        let senders = if read_only {
            &self.fenced
        } else {
            &self.writer_lost
        };
        senders.get(id.index()).map(|tx| tx.subscribe())
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

    #[tokio::test]
    async fn down_watch_fires_only_for_later_events() {
        let router = TableRouter::new(RoutingTable::from_configs(&[config("a", 1)]));
        router.signal_down(EndpointId(0));
        let mut w = router.watch_down(EndpointId(0)).unwrap();
        assert!(!w.has_changed().unwrap());
        router.signal_down(EndpointId(0));
        w.changed().await.unwrap();
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
}
