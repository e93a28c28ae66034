//! The control path: background tasks that watch every endpoint and
//! publish the routing table the connect path reads.
//!
//! * [`probe`]: one PostgreSQL-level check (TLS, login, `SELECT 1`).
//! * `task`: one probe task per endpoint, on a persistent connection.
//! * [`route53`]: Route 53 health checks through `aws-sdk-route53`.
//! * [`route53_admin`]: creating, listing and deleting the health checks
//!   (`dsql-proxy route53`).
//! * [`control_plane`]: the RDS `DescribeGlobalClusters` view of an Aurora
//!   global database (`aws-sdk-rds`).
//! * [`monitor`]: the task that owns all health state, applies the
//!   selection rule and publishes tables through `TableRouter`.

pub mod control_plane;
pub mod monitor;
pub mod probe;
mod roles;
pub mod route53;
pub mod route53_admin;
mod sdk;
mod task;

pub use monitor::{start, Monitor, MonitorSettings, MonitorUpdate};
pub use probe::{PgProbe, Probe};

use dsql_proxy_routing::route53::Route53Reading;
use dsql_proxy_routing::{EndpointId, ProbeOutcome};

/// What the monitor task hears from its helpers.
pub(crate) enum Event {
    Probe(EndpointId, ProbeOutcome),
    Route53(EndpointId, Result<Route53Reading, route53::Route53Error>),
    ControlPlane(Result<control_plane::GlobalClusterView, control_plane::ControlPlaneError>),
}
