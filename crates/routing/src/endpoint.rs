//! The endpoints sessions connect to.

use std::net::SocketAddr;

use dsql_proxy_config::EndpointConfig;

/// Identifies one endpoint for the life of the process. The initial config's
/// endpoints get 0, 1, ... in config order; endpoints added or changed by a
/// reload get fresh ids, never reused, because down-watches, passive reports
/// and probe events already in flight are keyed by id.
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
    pub route53_health_check_id: Option<String>,
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
            route53_health_check_id: c.route53_health_check_id.clone(),
        }
    }

    /// Whether `c` names this same endpoint at the same address, so its
    /// health history still applies. Only `priority` may differ: it ranks
    /// the endpoint but says nothing about its health.
    pub fn same_target(&self, c: &EndpointConfig) -> bool {
        self.name == c.name
            && self.host == c.host
            && self.port == c.port
            && self.connect_address == c.connect_address
            && self.region == c.region
            && self.route53_health_check_id == c.route53_health_check_id
    }

    /// What to dial, for messages: `name (host:port)` or with `via ip:port`.
    pub fn describe(&self) -> String {
        match self.connect_address {
            Some(a) => format!("{} ({}:{} via {a})", self.name, self.host, self.port),
            None => format!("{} ({}:{})", self.name, self.host, self.port),
        }
    }

    /// The Region label for metrics and status: the configured Region, or
    /// the endpoint's name when none is set.
    pub fn region_label(&self) -> &str {
        self.region.as_deref().unwrap_or(&self.name)
    }
}
