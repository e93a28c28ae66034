//! The routing table: the set of endpoints and which one new sessions use.
//!
//! A table is immutable once built and published through `arc-swap`, so the
//! connect path reads it with one atomic load and no lock or await. Health
//! probing (a later component) publishes new tables; this crate only knows
//! how to hold and read them.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use dsql_proxy_config::EndpointConfig;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RouteError {
    #[error("no endpoint is configured")]
    NoEndpoints,
    #[error("no endpoint is routable: {0}")]
    NoneRoutable(String),
}

/// Index of an endpoint in configuration order; stable for a config's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

/// One database endpoint, as sessions need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: EndpointId,
    pub name: String,
    pub region: Option<String>,
    /// Name for SNI and certificate verification.
    pub host: String,
    pub port: u16,
    /// Dialled instead of `host:port` when set.
    pub connect_address: Option<SocketAddr>,
    pub priority: u32,
}

impl Endpoint {
    pub fn from_config(id: EndpointId, c: &EndpointConfig) -> Self {
        Self {
            id,
            name: c.name.clone(),
            region: c.region.clone(),
            host: c.host.clone(),
            port: c.port,
            connect_address: c.connect_address,
            priority: c.priority,
        }
    }

    /// What to dial, for messages: `host:port` or `host:port via ip:port`.
    pub fn describe(&self) -> String {
        match self.connect_address {
            Some(a) => format!("{} ({}:{} via {a})", self.name, self.host, self.port),
            None => format!("{} ({}:{})", self.name, self.host, self.port),
        }
    }
}

/// An immutable snapshot: endpoints plus the order new sessions try them in.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    endpoints: Vec<Arc<Endpoint>>,
    /// Indices into `endpoints`, best first; empty when nothing is routable.
    preference: Vec<usize>,
}

impl RoutingTable {
    /// A table that prefers lower `priority`, then configuration order.
    pub fn by_priority(endpoints: Vec<Arc<Endpoint>>) -> Self {
        let mut preference: Vec<usize> = (0..endpoints.len()).collect();
        preference.sort_by_key(|&i| (endpoints[i].priority, i));
        Self {
            endpoints,
            preference,
        }
    }

    pub fn from_configs(configs: &[EndpointConfig]) -> Self {
        let endpoints = configs
            .iter()
            .enumerate()
            .map(|(i, c)| Arc::new(Endpoint::from_config(EndpointId(i as u32), c)))
            .collect();
        Self::by_priority(endpoints)
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The endpoint a new session should use.
    pub fn selected(&self) -> Result<&Arc<Endpoint>, RouteError> {
        match self.preference.first() {
            Some(&i) => Ok(&self.endpoints[i]),
            None if self.endpoints.is_empty() => Err(RouteError::NoEndpoints),
            None => Err(RouteError::NoneRoutable(
                "every endpoint is marked down".into(),
            )),
        }
    }
}

/// Chooses the endpoint for a new backend connection.
pub trait Router: Send + Sync + 'static {
    fn route(&self) -> Result<Arc<Endpoint>, RouteError>;
    /// The endpoint with this id, for cancel requests, whatever its health.
    fn endpoint(&self, id: EndpointId) -> Option<Arc<Endpoint>>;
}

/// A router over a published [`RoutingTable`].
pub struct TableRouter {
    table: ArcSwap<RoutingTable>,
}

impl TableRouter {
    pub fn new(table: RoutingTable) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
        }
    }

    /// Replaces the table; sessions already routed are unaffected.
    pub fn publish(&self, table: RoutingTable) {
        self.table.store(Arc::new(table));
    }

    pub fn snapshot(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }
}

impl Router for TableRouter {
    fn route(&self) -> Result<Arc<Endpoint>, RouteError> {
        self.table.load().selected().cloned()
    }

    fn endpoint(&self, id: EndpointId) -> Option<Arc<Endpoint>> {
        self.table
            .load()
            .endpoints()
            .iter()
            .find(|e| e.id == id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, priority: u32) -> EndpointConfig {
        EndpointConfig {
            name: name.into(),
            region: None,
            host: format!("{name}.example"),
            port: 5432,
            connect_address: None,
            priority,
        }
    }

    #[test]
    fn lowest_priority_then_config_order_wins() {
        let table = RoutingTable::from_configs(&[config("a", 2), config("b", 1), config("c", 1)]);
        assert_eq!(table.selected().unwrap().name, "b");
        let router = TableRouter::new(table);
        assert_eq!(router.route().unwrap().name, "b");
        router.publish(RoutingTable::from_configs(&[config("c", 0)]));
        assert_eq!(router.route().unwrap().name, "c");
        assert!(router.endpoint(EndpointId(0)).is_some());
        assert!(router.endpoint(EndpointId(9)).is_none());
    }

    #[test]
    fn empty_table_is_an_error() {
        let router = TableRouter::new(RoutingTable::from_configs(&[]));
        assert_eq!(router.route(), Err(RouteError::NoEndpoints));
    }
}
