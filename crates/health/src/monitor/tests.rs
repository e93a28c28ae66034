//! The monitor over a scripted probe: endpoint-set replacement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dsql_proxy_config::{EndpointConfig, Route53Policy};
use dsql_proxy_metrics::Metrics;
use dsql_proxy_routing::health::Hysteresis;
use dsql_proxy_routing::{
    EndpointId, Liveness, ProbeOutcome, Router, RoutingTable, SelectionPolicy, TableRouter,
};
use tokio::sync::mpsc;

use super::{start, MonitorSettings, MonitorUpdate};
use crate::probe::{CheckFuture, Probe, ProbeConnection};

/// Always answers at once with the same round trip.
struct Answers(Duration);

impl Probe for Answers {
    fn check(self: Arc<Self>, _conn: Option<ProbeConnection>) -> CheckFuture {
        let rtt = self.0;
        Box::pin(async move {
            (
                ProbeOutcome::Success {
                    rtt,
                    connect_time: None,
                    role: None,
                },
                None,
            )
        })
    }
}

fn config(name: &str, priority: u32) -> EndpointConfig {
    EndpointConfig {
        name: name.into(),
        region: Some(format!("{name}-region")),
        host: format!("{name}.example"),
        port: 5432,
        connect_address: None,
        priority,
        route53_health_check_id: None,
    }
}

fn settings() -> MonitorSettings {
    MonitorSettings {
        max_replica_lag: None,
        control_plane: None,
        probe_interval: Duration::from_millis(10),
        probe_timeout: Duration::from_secs(1),
        hysteresis: Hysteresis {
            down_after: 1,
            up_after: 1,
        },
        policy: SelectionPolicy {
            latency_tolerance: Duration::from_millis(5),
            prefer_region: None,
            route53: Route53Policy::Veto,
            // Far more rounds than the test waits: a switch it sees comes
            // from the re-selection a reconfiguration triggers.
            switch_after: 10_000,
        },
        route53_poll_interval: Duration::from_secs(30),
        route53_max_staleness: Duration::from_secs(120),
    }
}

fn probes(n: usize) -> Vec<Arc<Answers>> {
    (0..n)
        .map(|_| Arc::new(Answers(Duration::from_millis(1))))
        .collect()
}

async fn wait_for(router: &TableRouter, what: &str, done: impl Fn(&RoutingTable) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(&router.snapshot()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn selected(table: &RoutingTable) -> Option<&str> {
    table.selected().map(|e| e.name.as_str())
}

#[tokio::test]
async fn reconfigure_keeps_kept_endpoints_state_and_swaps_the_rest() {
    let metrics = Arc::new(Metrics::new("test").unwrap());
    let router = Arc::new(TableRouter::new(RoutingTable::from_configs(&[
        config("a", 1),
        config("b", 1),
    ])));
    let (_reports_tx, reports_rx) = mpsc::channel(8);
    let monitor = start(
        Arc::clone(&router),
        reports_rx,
        probes(2),
        None,
        settings(),
        Arc::clone(&metrics),
    )
    .await;
    let a = EndpointId(0);
    wait_for(&router, "a up and selected", |t| {
        t.status(a).is_some_and(|s| s.liveness == Liveness::Up) && selected(t) == Some("a")
    })
    .await;
    assert!(metrics.render().contains("endpoint=\"b\""));

    // b goes; c comes with a better priority.
    let plan = router.plan(&[config("a", 1), config("c", 0)]);
    assert!(
        monitor
            .reconfigure(MonitorUpdate {
                endpoints: plan.endpoints.clone(),
                probes: probes(2),
                route53: None,
                settings: settings(),
            })
            .await
    );
    let table = router.snapshot();
    let names: Vec<&str> = table.endpoints().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    let c = plan.endpoints[1].id;
    assert_eq!(c, EndpointId(2), "a fresh id, not b's");
    let kept = table.status(a).unwrap();
    assert_eq!(kept.liveness, Liveness::Up, "a keeps its health");
    assert!(kept.latency.is_some(), "a keeps its latency history");
    assert_eq!(table.status(c).unwrap().liveness, Liveness::Unknown);
    assert!(router.watch_down(EndpointId(1)).is_none());
    let rendered = metrics.render();
    assert!(
        !rendered.contains("endpoint=\"b\",region=\"b-region\"} "),
        "b's gauges are gone:\n{rendered}"
    );

    // Once c has reported, the selection is re-made at once, without
    // waiting switch_after rounds.
    wait_for(&router, "c selected", |t| selected(t) == Some("c")).await;
    assert!(metrics
        .render()
        .contains("dsql_proxy_endpoint_up{endpoint=\"c\",region=\"c-region\"} 1"));

    // Only a priority change keeps the id; c is preferred no more.
    let plan = router.plan(&[config("a", 1), config("c", 2)]);
    assert_eq!(plan.endpoints[1].id, c);
    assert!(plan.added.is_empty() && plan.removed.is_empty());
    assert!(
        monitor
            .reconfigure(MonitorUpdate {
                endpoints: plan.endpoints,
                probes: probes(2),
                route53: None,
                settings: settings(),
            })
            .await
    );
    wait_for(&router, "a selected again", |t| selected(t) == Some("a")).await;
}

/// Fails as many checks as it is told to, then succeeds; counts checks.
struct Flaky {
    fail_next: std::sync::atomic::AtomicU32,
    checks: std::sync::atomic::AtomicU32,
}

impl Probe for Flaky {
    fn check(self: Arc<Self>, _conn: Option<ProbeConnection>) -> CheckFuture {
        use std::sync::atomic::Ordering::SeqCst;
        let failing = self
            .fail_next
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        self.checks.fetch_add(1, SeqCst);
        Box::pin(async move {
            let outcome = if failing {
                ProbeOutcome::Failure {
                    kind: dsql_proxy_routing::FailureKind::Timeout,
                    detail: "scripted failure".into(),
                }
            } else {
                ProbeOutcome::Success {
                    rtt: Duration::from_millis(1),
                    connect_time: None,
                    role: None,
                }
            };
            (outcome, None)
        })
    }
}

/// A passive report demotes at once, but sessions are closed only on the
/// probes' own verdict (`down_after` failures in a row): one flaky probe
/// after one broken session closes nothing.
#[tokio::test]
async fn closing_sessions_needs_down_after_probe_failures_after_a_passive_demotion() {
    use std::sync::atomic::Ordering::SeqCst;
    let metrics = Arc::new(Metrics::new("test").unwrap());
    let (reports_tx, reports_rx) = mpsc::channel(8);
    let router = Arc::new(
        TableRouter::new(RoutingTable::from_configs(&[config("a", 1)])).with_reports(reports_tx),
    );
    let probe = Arc::new(Flaky {
        fail_next: 0.into(),
        checks: 0.into(),
    });
    let mut s = settings();
    s.hysteresis = Hysteresis {
        down_after: 3,
        up_after: 1,
    };
    let _monitor = start(
        Arc::clone(&router),
        reports_rx,
        vec![Arc::clone(&probe)],
        None,
        s,
        Arc::clone(&metrics),
    )
    .await;
    let a = EndpointId(0);
    wait_for(&router, "a up", |t| {
        t.status(a).is_some_and(|s| s.liveness == Liveness::Up)
    })
    .await;
    let mut down = router.watch_down(a).expect("a down watch");
    let wait_checks = |n: u32| {
        let probe = Arc::clone(&probe);
        async move {
            let target = probe.checks.load(SeqCst) + n;
            while probe.checks.load(SeqCst) < target {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };

    // One broken session, then one failed probe: demoted, nothing closed.
    probe.fail_next.store(1, SeqCst);
    router.report(
        a,
        dsql_proxy_routing::PassiveSignal::SessionBroken {
            detail: "reset".into(),
        },
    );
    wait_for(&router, "a demoted", |t| {
        t.status(a).is_some_and(|s| s.liveness == Liveness::Down)
    })
    .await;
    wait_checks(5).await;
    assert!(
        !down.has_changed().unwrap(),
        "one probe failure after a passive demotion closed the sessions"
    );
    wait_for(&router, "a back up", |t| {
        t.status(a).is_some_and(|s| s.liveness == Liveness::Up)
    })
    .await;

    // The probes' own verdict closes them.
    router.report(
        a,
        dsql_proxy_routing::PassiveSignal::SessionBroken {
            detail: "reset".into(),
        },
    );
    probe.fail_next.store(3, SeqCst);
    tokio::time::timeout(Duration::from_secs(10), down.changed())
        .await
        .expect("down_after probe failures close the sessions")
        .unwrap();
}

#[test]
fn metric_reason_lists_match_the_failure_kinds() {
    let kinds: Vec<&str> = dsql_proxy_routing::FailureKind::ALL
        .iter()
        .map(|k| k.as_str())
        .collect();
    let probe: Vec<&str> = dsql_proxy_metrics::probe_failure_reasons().collect();
    assert_eq!(kinds, probe);
    // A connect attempt fails with any kind but a probe query's.
    let connect: Vec<&str> = dsql_proxy_metrics::connect_failure_reasons().collect();
    for kind in kinds.iter().filter(|k| **k != "query") {
        assert!(connect.contains(kind), "{kind}");
    }
}
