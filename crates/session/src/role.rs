//! Roles under `kind = "aurora-global"`: read-write sessions go only to
//! the current writer (the connect loop waits up to `writer_wait` for one
//! during a failover window), read-only sessions to the nearest replica
//! within the lag bound, else the writer. The connect loop
//! ([`crate::connect`]) asks this module for candidates and whether a
//! connected endpoint still fits; the relay's role watch uses
//! [`eviction`] for the FATAL.

use std::sync::Arc;
use std::time::Duration;

use dsql_proxy_protocol::{sqlstate, PgError, StartupMessage};
use dsql_proxy_routing::{Endpoint, EndpointId, RoutingTable};

use crate::{ProxyContext, SessionError};

/// What a client session is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    ReadWrite,
    ReadOnly,
}

impl Intent {
    /// The listener's intent, unless the client's startup packet carries
    /// `target_session_attrs` asking for a standby (libpq and most drivers
    /// evaluate that setting themselves and never send it; a client that
    /// does send it gets it honoured here).
    pub fn for_startup(listener: Intent, startup: &StartupMessage) -> Intent {
        match startup.param("target_session_attrs").as_deref() {
            Some("read-only" | "standby" | "prefer-standby") => Intent::ReadOnly,
            _ => listener,
        }
    }
}

/// Settings the role-aware connect path needs.
#[derive(Debug, Clone)]
pub struct GlobalSettings {
    pub writer_wait: Duration,
}

/// Whether `id` may still take a session of this intent under `table`:
/// the writer for read-write, not fenced for read-only.
pub(crate) fn fits(table: &RoutingTable, id: EndpointId, intent: Intent) -> bool {
    let Some(roles) = &table.roles else {
        return false;
    };
    match intent {
        Intent::ReadWrite => roles.writer() == Some(id),
        Intent::ReadOnly => !roles.is_fenced(id),
    }
}

/// The endpoints to try, best first.
pub(crate) fn candidates(table: &RoutingTable, intent: Intent) -> Vec<Arc<Endpoint>> {
    let Some(roles) = &table.roles else {
        return Vec::new();
    };
    let ids = match intent {
        Intent::ReadWrite => roles.writer().into_iter().collect(),
        Intent::ReadOnly => roles.read_order.clone(),
    };
    ids.into_iter()
        .filter_map(|id| table.endpoint(id).cloned())
        .collect()
}

/// The client's error when no endpoint of the right role took the session
/// within `writer_wait`.
pub(crate) fn nowhere(
    table: &RoutingTable,
    intent: Intent,
    writer_wait: Duration,
    last_error: Option<&SessionError>,
) -> SessionError {
    let why = match table.roles.as_ref().map(|r| &r.writer) {
        Some(Ok(_)) => match &last_error {
            Some(e) => format!(
                "the writer {} did not take the session: {e}",
                table.writer_name()
            ),
            None => "the writer changed while connecting".to_owned(),
        },
        Some(Err(no_writer)) => no_writer.describe(table.endpoints()),
        None => "endpoint roles are not known yet".to_owned(),
    };
    let what = match intent {
        Intent::ReadWrite => "no writer",
        Intent::ReadOnly => "no replica within max_replica_lag and no writer",
    };
    SessionError::Rejected(PgError::fatal(
        sqlstate::CANNOT_CONNECT_NOW,
        format!("dsql-proxy: {what} within writer_wait ({writer_wait:?}): {why}; retry later"),
    ))
}

/// The FATAL a session gets when its endpoint's role changed.
pub(crate) fn eviction(ctx: &ProxyContext, endpoint: &Endpoint) -> (PgError, &'static str) {
    let table = ctx.router.route().ok();
    let roles = table.as_ref().and_then(|t| t.roles.as_ref());
    let fenced = roles.is_some_and(|r| r.is_fenced(endpoint.id));
    let writer = table.as_ref().and_then(|t| {
        let id = t.roles.as_ref()?.writer()?;
        t.endpoint(id).cloned()
    });
    let to = match &writer {
        Some(w) => format!("{} (Region {})", w.name, w.region_label()),
        None => "none known yet".to_owned(),
    };
    if fenced {
        let message = format!(
            "dsql-proxy: endpoint {} is a stale writer and was fenced; the writer is {to}; reconnect",
            endpoint.name
        );
        (PgError::fatal(sqlstate::ADMIN_SHUTDOWN, message), "fenced")
    } else {
        let message = format!(
            "dsql-proxy: writer moved from {} to {to}; reconnect",
            endpoint.name
        );
        (
            PgError::fatal(sqlstate::ADMIN_SHUTDOWN, message),
            "writer_moved",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsql_proxy_config::EndpointConfig;
    use dsql_proxy_routing::writer::NoWriter;
    use dsql_proxy_routing::Roles;

    fn table(writer: Result<EndpointId, NoWriter>, fenced: [bool; 3]) -> RoutingTable {
        let configs: Vec<EndpointConfig> = ["east", "west", "south"]
            .iter()
            .map(|name| EndpointConfig {
                name: (*name).into(),
                region: Some((*name).into()),
                host: format!("{name}.example"),
                port: 5432,
                connect_address: None,
                priority: 1,
                route53_health_check_id: None,
            })
            .collect();
        let mut t = RoutingTable::from_configs(&configs);
        let read_order = [EndpointId(2), EndpointId(1)]
            .into_iter()
            .filter(|id| !fenced[id.0 as usize])
            .chain(writer.as_ref().ok().copied())
            .collect();
        t.roles = Some(Arc::new(Roles {
            writer,
            fenced: (0..3)
                .filter(|&i| fenced[i])
                .map(|i| EndpointId(i as u32))
                .collect(),
            read_order,
            observed: Vec::new(),
            writer_changes_total: 0,
            control_plane: None,
        }));
        t
    }

    fn names(endpoints: Vec<Arc<Endpoint>>) -> Vec<String> {
        endpoints.iter().map(|e| e.name.clone()).collect()
    }

    #[test]
    fn read_write_goes_only_to_the_writer_and_read_only_follows_the_read_order() {
        let (east, west) = (EndpointId(0), EndpointId(1));
        let t = table(Ok(east), [false; 3]);
        assert_eq!(names(candidates(&t, Intent::ReadWrite)), ["east"]);
        assert_eq!(
            names(candidates(&t, Intent::ReadOnly)),
            ["south", "west", "east"]
        );
        assert!(fits(&t, east, Intent::ReadWrite) && !fits(&t, west, Intent::ReadWrite));
        assert!(fits(&t, west, Intent::ReadOnly));

        // West promoted, east fenced: nothing may stay on east.
        let t = table(Ok(west), [true, false, false]);
        assert_eq!(names(candidates(&t, Intent::ReadWrite)), ["west"]);
        assert!(!fits(&t, east, Intent::ReadWrite) && !fits(&t, east, Intent::ReadOnly));

        // No writer: read-write sessions have nothing to try (they wait).
        let t = table(Err(NoWriter::NoneWritable), [false; 3]);
        assert!(candidates(&t, Intent::ReadWrite).is_empty());
        assert!(!fits(&t, east, Intent::ReadWrite));
        assert_eq!(names(candidates(&t, Intent::ReadOnly)), ["south", "west"]);

        // A table without roles (not aurora-global): nothing fits.
        let mut t = table(Ok(east), [false; 3]);
        t.roles = None;
        assert!(candidates(&t, Intent::ReadWrite).is_empty());
        assert!(!fits(&t, east, Intent::ReadOnly));
    }
}
