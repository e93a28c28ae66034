//! Route 53 health checks steering routing end to end: the real proxy
//! binary reads `FakeRoute53` (Route 53's real XML over HTTP) through
//! `aws-sdk-route53`, found via `AWS_ENDPOINT_URL_ROUTE_53`, while real
//! PostgreSQL servers behind latency relays play the Regions.
//!
//! "fast" (3ms each way) carries health check `hc-fast`; "slow" (30ms) has
//! none. Route 53 is polled every second.

use std::time::{Duration, Instant};

use dsql_proxy_tests::dsql_stack::isolated_aws_env;
use dsql_proxy_tests::route53::{FakeFailure, FakeHealthCheck, FakeRoute53};
use dsql_proxy_tests::{RegionsOptions, RegionsStack};

const CHECK: &str = "hc-fast";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The proxy's environment: the fake's URL and fixed credentials, nothing
/// from the host's AWS setup.
fn route53_env(fake: &FakeRoute53) -> Vec<(String, String)> {
    let mut env = isolated_aws_env();
    env.push(("AWS_ACCESS_KEY_ID".into(), "AKIDROUTE53ROUTING".into()));
    env.push((
        "AWS_SECRET_ACCESS_KEY".into(),
        "route53-routing-test-secret".into(),
    ));
    env.push(("AWS_ENDPOINT_URL_ROUTE_53".into(), fake.url()));
    env
}

/// Starts the fake with `check` for "fast", then the Regions and proxy.
fn start(check: FakeHealthCheck, routing: &[&str]) -> (FakeRoute53, RegionsStack) {
    let fake = FakeRoute53::start();
    fake.set_check(CHECK, check);
    let mut lines: Vec<String> = vec![
        "probe_interval = \"250ms\"".into(),
        "probe_timeout = \"1s\"".into(),
        "route53_poll_interval = \"1s\"".into(),
    ];
    lines.extend(routing.iter().map(|l| (*l).to_owned()));
    let stack = RegionsStack::start(RegionsOptions {
        regions: vec![("slow", ms(30)), ("fast", ms(3))],
        routing: lines,
        endpoint_extra: vec![
            Vec::new(),
            vec![format!("route53_health_check_id = \"{CHECK}\"")],
        ],
        env: route53_env(&fake),
        ..RegionsOptions::default()
    });
    (fake, stack)
}

fn context(fake: &FakeRoute53, stack: &RegionsStack) -> String {
    format!(
        "{}--- proxy log ---\n{}",
        fake.describe_requests(),
        stack.proxy.logs()
    )
}

/// Every session opened for `period` lands on `region`.
async fn stays_on(fake: &FakeRoute53, stack: &RegionsStack, region: &str, period: Duration) {
    let start = Instant::now();
    while start.elapsed() < period {
        let landed = stack
            .landing()
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", context(fake, stack)));
        assert_eq!(landed, region, "{}", context(fake, stack));
        tokio::time::sleep(ms(100)).await;
    }
}

async fn moves_to(
    fake: &FakeRoute53,
    stack: &RegionsStack,
    region: &str,
    within: Duration,
) -> Duration {
    stack
        .wait_for_landing(region, within)
        .await
        .unwrap_or_else(|| {
            panic!(
                "sessions did not move to {region} within {within:?}\n{}",
                context(fake, stack)
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_check_vetoes_the_faster_region_until_it_recovers() {
    let (fake, stack) = start(FakeHealthCheck::failing(), &[]);
    // Vetoed as soon as the first reading arrives (one poll).
    moves_to(&fake, &stack, "slow", Duration::from_secs(3)).await;
    stays_on(&fake, &stack, "slow", Duration::from_millis(1_500)).await;
    assert!(
        stack
            .proxy
            .logs()
            .contains("Route 53 status changed endpoint=fast healthy=Some(false)"),
        "{}",
        context(&fake, &stack)
    );

    fake.set_check(CHECK, FakeHealthCheck::healthy());
    let took = moves_to(&fake, &stack, "fast", Duration::from_secs(4)).await;
    eprintln!("healthy again: sessions back on fast after {took:?}");
    stays_on(&fake, &stack, "fast", ms(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inverted_check_whose_checkers_all_succeed_is_vetoed() {
    let (fake, stack) = start(FakeHealthCheck::healthy().inverted(), &[]);
    moves_to(&fake, &stack, "slow", Duration::from_secs(3)).await;
    stays_on(&fake, &stack, "slow", Duration::from_millis(1_500)).await;
    assert!(
        stack
            .proxy
            .logs()
            .contains("Route 53 status changed endpoint=fast healthy=Some(false)"),
        "{}",
        context(&fake, &stack)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_check_is_healthy_and_its_status_is_never_asked_for() {
    // Its checkers all fail, but a disabled check is "always healthy".
    let (fake, stack) = start(FakeHealthCheck::failing().disabled(), &[]);
    stays_on(&fake, &stack, "fast", Duration::from_millis(2_500)).await;
    let logs = stack.proxy.logs();
    assert!(
        logs.contains("Route 53 status changed endpoint=fast healthy=Some(true)"),
        "{}",
        context(&fake, &stack)
    );
    assert!(
        !logs.contains("could not be read"),
        "{}",
        context(&fake, &stack)
    );
    assert!(fake.get_requests(CHECK) >= 2, "{}", context(&fake, &stack));
    assert_eq!(fake.status_requests(CHECK), 0, "{}", context(&fake, &stack));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_reports_a_failing_check_but_keeps_routing() {
    let (fake, stack) = start(FakeHealthCheck::failing(), &["route53 = \"advisory\""]);
    assert!(
        stack.proxy.wait_for_log(
            "Route 53 status changed endpoint=fast healthy=Some(false)",
            Duration::from_secs(3)
        ),
        "{}",
        context(&fake, &stack)
    );
    stays_on(&fake, &stack, "fast", Duration::from_millis(2_000)).await;
    assert!(
        fake.status_requests(CHECK) >= 2,
        "{}",
        context(&fake, &stack)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_keep_the_last_status_until_it_is_stale() {
    const STALENESS: Duration = Duration::from_secs(4);
    let (fake, stack) = start(
        FakeHealthCheck::failing(),
        &["route53_max_staleness = \"4s\""],
    );
    moves_to(&fake, &stack, "slow", Duration::from_secs(3)).await;

    // Route 53 starts throttling, then fails outright.
    let mark = stack.proxy.logs().len();
    fake.set_failure(Some(FakeFailure::Throttling));
    let errors_from = Instant::now();
    let logged = |needle: &str| stack.proxy.logs()[mark..].contains(needle);
    while !logged("Route 53 health check could not be read") {
        assert!(
            errors_from.elapsed() < Duration::from_secs(3),
            "no Route 53 error logged\n{}",
            context(&fake, &stack)
        );
        tokio::time::sleep(ms(50)).await;
    }
    // Right after the errors started, the last status (unhealthy) holds.
    stays_on(&fake, &stack, "slow", ms(500)).await;
    fake.set_failure(Some(FakeFailure::Internal));

    // Once the last reading is older than route53_max_staleness it stops
    // counting: the fast Region is taken again, with Route 53 still down.
    let took = moves_to(&fake, &stack, "fast", Duration::from_secs(7)).await;
    let since_errors = errors_from.elapsed();
    eprintln!("Route 53 failing: back on fast {since_errors:?} after the errors started");
    // The last good reading was at most one poll before the errors began.
    assert!(
        since_errors >= STALENESS - Duration::from_secs(1) - ms(200),
        "the stale status stopped counting too early ({since_errors:?}, waited {took:?})\n{}",
        context(&fake, &stack)
    );
    // Both kinds of failure were reported (each read is bounded by the
    // operation timeout, so a retried failure may surface as a timeout).
    let logs = stack.proxy.logs();
    let after = &logs[mark..];
    for line in after.lines().filter(|l| l.contains("Route 53")) {
        eprintln!("{line}");
    }
    assert!(
        after.contains("Route 53 throttled the request") || after.contains("operation timeout"),
        "{}",
        context(&fake, &stack)
    );
    assert!(
        after.contains("InternalFailure") || after.contains("operation timeout"),
        "{}",
        context(&fake, &stack)
    );
    fake.set_failure(None);
}
