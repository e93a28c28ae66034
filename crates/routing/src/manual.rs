//! Manual overrides an operator sets through the admin API: drained
//! endpoints. A drained endpoint gets no new sessions (the selection skips
//! it exactly like an unhealthy one) while its open sessions are left
//! alone. Keyed by [`EndpointId`], so a reload that keeps an endpoint (same
//! id) keeps it drained, and one that changes its address (a fresh id)
//! starts it undrained.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;

use crate::{EndpointId, RouteError, TableRouter};

/// The drained set and a change counter the health monitor watches, so a
/// drain moves the selection at once rather than at the next probe round.
#[derive(Debug)]
pub struct ManualOverrides {
    // Read by the monitor per evaluation and by /status; never on the
    // connect path, which only sees the published table.
    drained: Mutex<BTreeSet<EndpointId>>,
    changes: watch::Sender<u64>,
}

impl Default for ManualOverrides {
    fn default() -> Self {
        Self {
            drained: Mutex::new(BTreeSet::new()),
            changes: watch::Sender::new(0),
        }
    }
}

impl ManualOverrides {
    /// Drains (`true`) or restores (`false`) `id`. Returns whether that
    /// changed anything; watchers are woken only then.
    pub fn set_drained(&self, id: EndpointId, drained: bool) -> bool {
        let changed = {
            let mut set = self.drained.lock().unwrap_or_else(PoisonError::into_inner);
            if drained {
                set.insert(id)
            } else {
                set.remove(&id)
            }
        };
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
        changed
    }

    pub fn is_drained(&self, id: EndpointId) -> bool {
        self.drained
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&id)
    }

    /// Forgets endpoints that are no longer configured (ids are never
    /// reused, so this only keeps the set small).
    pub fn retain(&self, keep: impl Fn(EndpointId) -> bool) {
        self.drained
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id| keep(*id));
    }

    /// Changes whenever an endpoint is drained or restored.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl TableRouter {
    /// The drained set, for the monitor and `/status`.
    pub fn manual(&self) -> &ManualOverrides {
        &self.manual
    }

    /// Drains (`true`) or restores (`false`) the endpoint named `name`.
    /// Returns its id and whether anything changed. Refused without a
    /// health monitor (`with_reports` is how the binary attaches one):
    /// nothing would re-evaluate the selection.
    pub fn set_drained(&self, name: &str, drained: bool) -> Result<(EndpointId, bool), RouteError> {
        let table = self.table.load();
        let Some(endpoint) = table.endpoints().iter().find(|e| e.name == name) else {
            return Err(RouteError::UnknownEndpoint {
                name: name.to_owned(),
                known: table.endpoints().iter().map(|e| e.name.clone()).collect(),
            });
        };
        if self.reports.is_none() {
            return Err(RouteError::DrainNeedsProbes);
        }
        Ok((endpoint.id, self.manual.set_drained(endpoint.id, drained)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_and_restore_report_changes_and_wake_watchers() {
        let manual = ManualOverrides::default();
        let mut changes = manual.subscribe();
        assert!(!manual.is_drained(EndpointId(1)));
        assert!(manual.set_drained(EndpointId(1), true));
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        assert!(!manual.set_drained(EndpointId(1), true), "already drained");
        assert!(!changes.has_changed().unwrap());
        assert!(manual.is_drained(EndpointId(1)));
        assert!(manual.set_drained(EndpointId(1), false));
        assert!(!manual.is_drained(EndpointId(1)));
        assert!(changes.has_changed().unwrap());
    }

    #[test]
    fn the_router_drains_by_name_and_needs_a_monitor() {
        let configs: Vec<dsql_proxy_config::EndpointConfig> = ["a", "b"]
            .iter()
            .map(|name| dsql_proxy_config::EndpointConfig {
                name: (*name).into(),
                region: None,
                host: format!("{name}.example"),
                port: 5432,
                connect_address: None,
                priority: 1,
                route53_health_check_id: None,
            })
            .collect();
        let table = crate::RoutingTable::from_configs(&configs);
        let without_monitor = TableRouter::new(table.clone());
        assert_eq!(
            without_monitor.set_drained("a", true),
            Err(RouteError::DrainNeedsProbes)
        );
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let router = TableRouter::new(table).with_reports(tx);
        let err = router.set_drained("zz", true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no endpoint is named \"zz\" (endpoints: a, b)"
        );
        assert_eq!(router.set_drained("b", true), Ok((EndpointId(1), true)));
        assert!(router.manual().is_drained(EndpointId(1)));
        // A reload that keeps b keeps it drained; one that drops it forgets.
        let plan = router.plan(&configs);
        router.replace_endpoints(crate::RoutingTable::by_priority(plan.endpoints));
        assert!(router.manual().is_drained(EndpointId(1)));
        let plan = router.plan(&configs[..1]);
        router.replace_endpoints(crate::RoutingTable::by_priority(plan.endpoints));
        assert!(!router.manual().is_drained(EndpointId(1)));
    }

    #[test]
    fn retain_forgets_removed_endpoints() {
        let manual = ManualOverrides::default();
        manual.set_drained(EndpointId(1), true);
        manual.set_drained(EndpointId(2), true);
        manual.retain(|id| id == EndpointId(2));
        assert!(!manual.is_drained(EndpointId(1)));
        assert!(manual.is_drained(EndpointId(2)));
    }
}
