//! `/status`: the routing table as JSON.

use dsql_proxy_metrics::Metrics;
use dsql_proxy_routing::{EndpointId, FailureKind, RoutingTable};
use serde_json::{json, Map, Value};

fn ms(d: Option<std::time::Duration>) -> Value {
    d.map_or(Value::Null, |d| {
        json!((d.as_secs_f64() * 1e6).round() / 1e3)
    })
}

/// `busy` tells the time left in an endpoint's busy cooldown (backpressure
/// after a 53300/53400 answer), if any; `drained` whether it was drained
/// through the admin API.
pub fn status_json(
    table: &RoutingTable,
    metrics: &Metrics,
    policy: &Value,
    busy: impl Fn(EndpointId) -> Option<std::time::Duration>,
    drained: impl Fn(EndpointId) -> bool,
) -> Value {
    let selected = table.selected().map(|e| e.id);
    let ranks: Vec<_> = table.candidates().map(|(e, _)| e.id).collect();
    let endpoints: Vec<Value> = table
        .endpoints()
        .iter()
        .map(|e| {
            let s = table.status(e.id);
            let mut failures = Map::new();
            if let Some(s) = s {
                for (kind, n) in FailureKind::ALL.iter().zip(s.probe_failures) {
                    if n > 0 {
                        failures.insert(kind.as_str().to_owned(), json!(n));
                    }
                }
            }
            let sessions = metrics
                .sessions_active
                .get_metric_with_label_values(&[&e.name, e.region_label()])
                .map(|g| g.get())
                .unwrap_or(0);
            let roles = table.roles.as_ref();
            let role = roles.map(|r| {
                let seen = r.observed(e.id);
                json!({
                    "writer": r.writer() == Some(e.id),
                    "fenced": r.is_fenced(e.id),
                    "read_only": seen.map(|o| o.read_only),
                    "timeline": seen.and_then(|o| o.timeline),
                    "lag_ms": ms(seen.and_then(|o| o.lag)),
                    "aurora": seen.and_then(|o| o.aurora.as_ref()).map(|a| json!({
                        "region": a.region,
                        "writer_region": a.writer_region,
                        "rpo_lag_ms": ms(a.rpo_lag),
                    })),
                    "read_rank": r.read_order.iter().position(|id| *id == e.id),
                })
            });
            json!({
                "role": role,
                "name": e.name,
                "region": e.region,
                "host": e.host,
                "port": e.port,
                "priority": e.priority,
                "selected": Some(e.id) == selected,
                "rank": ranks.iter().position(|id| *id == e.id),
                "state": s.map(|s| s.liveness.as_str()),
                "eligible": s.map(|s| s.eligible),
                "drained": drained(e.id),
                "latency_ms": ms(s.and_then(|s| s.latency)),
                "last_rtt_ms": ms(s.and_then(|s| s.last_rtt)),
                "connect_time_ms": ms(s.and_then(|s| s.connect_time)),
                "consecutive_failures": s.map(|s| s.consecutive_failures),
                "consecutive_successes": s.map(|s| s.consecutive_successes),
                "last_failure": s.and_then(|s| s.last_failure.as_ref()).map(|(k, d)| json!({"reason": k.as_str(), "detail": d})),
                "auth_failure": s.and_then(|s| s.auth_failure.clone()),
                "seconds_since_up": s.and_then(|s| s.last_up).map(|t| t.elapsed().as_secs()),
                "probe_failures": failures,
                "sessions_active": sessions,
                "busy": busy(e.id).map(|left| json!({"remaining_ms": ms(Some(left))})),
                "route53": s.and_then(|s| s.route53.as_ref()).map(|r| json!({
                    "health_check_id": r.health_check_id,
                    "healthy": r.reading.as_ref().map(|x| x.healthy),
                    "effective": r.effective,
                    "disabled": r.reading.as_ref().map(|x| x.disabled),
                    "inverted": r.reading.as_ref().map(|x| x.inverted),
                    "observations": r.reading.as_ref().map(|x| json!({"success": x.successes, "total": x.observations})),
                    "age_seconds": r.age.map(|a| a.as_secs()),
                    "errors_total": r.errors_total,
                    "last_error": r.last_error,
                })),
            })
        })
        .collect();
    let writer = table.roles.as_ref().map(|r| match &r.writer {
        Ok(_) => json!({"endpoint": table.writer_name(), "changes_total": r.writer_changes_total}),
        Err(why) => json!({"endpoint": null, "why_none": why.describe(table.endpoints()), "changes_total": r.writer_changes_total}),
    });
    let control_plane = table
        .roles
        .as_ref()
        .and_then(|r| r.control_plane.as_ref())
        .map(|c| {
            json!({
                "writer_region": c.writer_region,
                "failover": c.failover,
                "fresh": c.fresh,
                "age_ms": ms(c.age),
                "last_error": c.last_error,
            })
        });
    let mut sessions = Map::new();
    for (what, counts) in metrics.continuity_counts() {
        let counts: Map<String, Value> = counts
            .into_iter()
            .map(|(label, n)| (label.to_owned(), json!(n)))
            .collect();
        sessions.insert(what.to_owned(), Value::Object(counts));
    }
    let mut pool = Map::new();
    for (what, counts) in metrics.pool_counts() {
        let counts: Map<String, Value> = counts
            .into_iter()
            .map(|(label, n)| (label, json!(n)))
            .collect();
        pool.insert(what.to_owned(), Value::Object(counts));
    }
    json!({
        "sessions": sessions,
        "pool": pool,
        "writer": writer,
        "control_plane": control_plane,
        "selected": table.selected().map(|e| e.name.clone()),
        "reason": table.reason().as_str(),
        "generation": table.generation,
        "route_changes_total": table.route_changes_total,
        "policy": policy,
        "endpoints": endpoints,
    })
}
