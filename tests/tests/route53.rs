//! `SdkHealthChecks` (the real aws-sdk-route53 client, SigV4 signing,
//! retries, timeouts, XML parsing) against `FakeRoute53`, which serves
//! Route 53's real wire format: Route 53's 18% rule, Inverted, Disabled
//! (including a check disabled between the two calls), and how throttling,
//! server faults, unknown ids, unreachable and hanging endpoints are
//! reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_route53::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use aws_types::SdkConfig;
use dsql_proxy_health::route53::{
    HealthCheckReading, HealthCheckSource, Route53Error, SdkHealthChecks,
};
use dsql_proxy_tests::free_port;
use dsql_proxy_tests::route53::{FakeFailure, FakeHealthCheck, FakeRoute53};

const TIMEOUT: Duration = Duration::from_secs(10);
const ACCESS_KEY: &str = "AKIDROUTE53TEST";
const SECRET_KEY: &str = "route53-test-secret-key";

fn sdk_config(endpoint_url: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            ACCESS_KEY,
            SECRET_KEY,
            None,
            None,
            "route53-tests",
        )))
        .endpoint_url(endpoint_url)
        .build()
}

fn source(fake: &FakeRoute53) -> SdkHealthChecks {
    SdkHealthChecks::from_sdk_config(&sdk_config(&fake.url()), TIMEOUT)
}

async fn read(fake: &FakeRoute53, id: &str, check: FakeHealthCheck) -> HealthCheckReading {
    fake.set_check(id, check);
    source(fake)
        .read(id)
        .await
        .unwrap_or_else(|e| panic!("read {id}: {e}\n{}", fake.describe_requests()))
}

async fn read_err(fake: &FakeRoute53, id: &str) -> Route53Error {
    match source(fake).read(id).await {
        Ok(r) => panic!("read {id} should fail, got {r:?}"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn all_checkers_succeed_is_healthy() {
    let fake = FakeRoute53::start();
    let r = read(&fake, "hc-all", FakeHealthCheck::healthy()).await;
    assert_eq!(
        r,
        HealthCheckReading {
            disabled: false,
            inverted: false,
            successes: 16,
            observations: 16,
            healthy: true,
        }
    );
    assert_eq!(fake.get_requests("hc-all"), 1);
    assert_eq!(fake.status_requests("hc-all"), 1);
    // Signed by the SDK for Route 53's global region.
    for req in fake.requests() {
        let auth = req.header("authorization").unwrap_or_default();
        assert!(
            auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/"))
                && auth.contains("/us-east-1/route53/aws4_request"),
            "{auth}"
        );
        assert!(!auth.contains(SECRET_KEY));
    }
}

#[tokio::test]
async fn one_of_sixteen_is_unhealthy() {
    let fake = FakeRoute53::start();
    let r = read(&fake, "hc-1of16", FakeHealthCheck::with_successes(1, 16)).await;
    assert_eq!((r.successes, r.observations, r.healthy), (1, 16, false));
}

#[tokio::test]
async fn two_of_sixteen_is_unhealthy() {
    // 12.5%.
    let fake = FakeRoute53::start();
    let r = read(&fake, "hc-2of16", FakeHealthCheck::with_successes(2, 16)).await;
    assert_eq!((r.successes, r.observations, r.healthy), (2, 16, false));
}

#[tokio::test]
async fn three_of_sixteen_is_healthy() {
    // 18.75%: just above Route 53's 18%.
    let fake = FakeRoute53::start();
    let r = read(&fake, "hc-3of16", FakeHealthCheck::with_successes(3, 16)).await;
    assert_eq!((r.successes, r.observations, r.healthy), (3, 16, true));
}

#[tokio::test]
async fn exactly_eighteen_percent_is_unhealthy() {
    let fake = FakeRoute53::start();
    let r = read(&fake, "hc-9of50", FakeHealthCheck::with_successes(9, 50)).await;
    assert_eq!((r.successes, r.observations, r.healthy), (9, 50, false));
}

#[tokio::test]
async fn inverted_with_all_failures_is_healthy() {
    let fake = FakeRoute53::start();
    let r = read(&fake, "hc-inv-fail", FakeHealthCheck::failing().inverted()).await;
    assert!(r.inverted && !r.disabled);
    assert_eq!((r.successes, r.observations, r.healthy), (0, 16, true));
}

#[tokio::test]
async fn inverted_with_successes_is_unhealthy() {
    let fake = FakeRoute53::start();
    let r = read(&fake, "hc-inv-ok", FakeHealthCheck::healthy().inverted()).await;
    assert!(r.inverted);
    assert_eq!((r.successes, r.observations, r.healthy), (16, 16, false));
}

#[tokio::test]
async fn disabled_is_healthy_without_a_status_call() {
    let fake = FakeRoute53::start();
    let r = read(&fake, "hc-off", FakeHealthCheck::failing().disabled()).await;
    assert_eq!(
        r,
        HealthCheckReading {
            disabled: true,
            inverted: false,
            successes: 0,
            observations: 0,
            healthy: true,
        }
    );
    assert_eq!(fake.get_requests("hc-off"), 1);
    assert_eq!(
        fake.status_requests("hc-off"),
        0,
        "{}",
        fake.describe_requests()
    );
}

#[tokio::test]
async fn disabled_between_the_two_calls_is_healthy() {
    let fake = FakeRoute53::start();
    let r = read(
        &fake,
        "hc-race",
        FakeHealthCheck::failing().disabled_after_get(),
    )
    .await;
    assert!(r.disabled && r.healthy, "{r:?}");
    assert_eq!(fake.status_requests("hc-race"), 1);
}

#[tokio::test]
async fn status_of_a_disabled_check_is_invalid_input() {
    // What the fake answers (and the reader relies on), seen through the
    // raw SDK client.
    let fake = FakeRoute53::start();
    fake.set_check("hc-off", FakeHealthCheck::healthy().disabled());
    let client = aws_sdk_route53::Client::new(&sdk_config(&fake.url()));
    let err = client
        .get_health_check_status()
        .health_check_id("hc-off")
        .send()
        .await
        .expect_err("status of a disabled check");
    let service = err.into_service_error();
    assert!(service.is_invalid_input(), "{service:?}");
    use aws_sdk_route53::error::ProvideErrorMetadata;
    assert!(service
        .message()
        .is_some_and(|m| m.contains("special status of always healthy")));
}

#[tokio::test]
async fn no_observations_is_an_error() {
    let fake = FakeRoute53::start();
    fake.set_check("hc-empty", FakeHealthCheck::default());
    let e = read_err(&fake, "hc-empty").await;
    assert!(matches!(e, Route53Error::NoObservations), "{e:?}");
    assert_eq!(e.reason(), "no_observations");
}

#[tokio::test]
async fn changes_are_seen_on_the_next_read() {
    let fake = FakeRoute53::start();
    let src: Arc<dyn HealthCheckSource> = Arc::new(source(&fake));
    fake.set_check("hc-flip", FakeHealthCheck::healthy());
    assert!(src.read("hc-flip").await.unwrap().healthy);
    fake.set_check("hc-flip", FakeHealthCheck::failing());
    assert!(!src.read("hc-flip").await.unwrap().healthy);
    fake.set_check("hc-flip", FakeHealthCheck::failing().disabled());
    assert!(src.read("hc-flip").await.unwrap().healthy);
    fake.remove_check("hc-flip");
    let e = src.read("hc-flip").await.unwrap_err();
    assert!(
        matches!(&e, Route53Error::Api { code, .. } if code == "NoSuchHealthCheck"),
        "{e:?}"
    );
}

#[tokio::test]
async fn throttling_is_throttled_after_one_retry() {
    let fake = FakeRoute53::start();
    fake.set_check("hc-t", FakeHealthCheck::healthy());
    fake.set_failure(Some(FakeFailure::Throttling));
    let e = read_err(&fake, "hc-t").await;
    match &e {
        Route53Error::Throttled(message) => assert_eq!(message, "Rate exceeded"),
        other => panic!("expected Throttled, got {other:?}"),
    }
    assert_eq!(e.reason(), "throttled");
    // At most 2 attempts.
    assert_eq!(fake.requests().len(), 2, "{}", fake.describe_requests());
}

#[tokio::test]
async fn internal_failure_is_an_api_error_after_one_retry() {
    let fake = FakeRoute53::start();
    fake.set_check("hc-500", FakeHealthCheck::healthy());
    fake.set_failure(Some(FakeFailure::Internal));
    let e = read_err(&fake, "hc-500").await;
    // The service answered with an error code: Api, not Transport.
    assert!(
        matches!(&e, Route53Error::Api { code, .. } if code == "InternalFailure"),
        "{e:?}"
    );
    assert_eq!(e.reason(), "api");
    assert_eq!(fake.requests().len(), 2, "{}", fake.describe_requests());
}

#[tokio::test]
async fn unknown_id_is_no_such_health_check() {
    let fake = FakeRoute53::start();
    let e = read_err(&fake, "hc-missing").await;
    match &e {
        Route53Error::Api { code, message } => {
            assert_eq!(code, "NoSuchHealthCheck");
            assert!(message.contains("hc-missing"), "{message}");
        }
        other => panic!("expected Api, got {other:?}"),
    }
    // Not retried.
    assert_eq!(fake.requests().len(), 1);
    assert_eq!(fake.status_requests("hc-missing"), 0);
}

#[tokio::test]
async fn hanging_endpoint_times_out_within_the_operation_timeout() {
    let fake = FakeRoute53::start();
    fake.set_check("hc-hang", FakeHealthCheck::healthy());
    fake.set_failure(Some(FakeFailure::Hang));
    let timeout = Duration::from_millis(800);
    let src = SdkHealthChecks::from_sdk_config(&sdk_config(&fake.url()), timeout);
    let started = Instant::now();
    let e = src.read("hc-hang").await.expect_err("hanging read");
    let elapsed = started.elapsed();
    assert!(matches!(e, Route53Error::Timeout), "{e:?}");
    assert_eq!(e.reason(), "timeout");
    assert!(
        elapsed >= timeout - Duration::from_millis(50),
        "{elapsed:?}"
    );
    assert!(
        // Slack for a loaded CI host; without the timeout this would wait
        // forever.
        elapsed < timeout + Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert!(!fake.requests().is_empty());
}

#[tokio::test]
async fn unreachable_endpoint_is_transport() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let src = SdkHealthChecks::from_sdk_config(&sdk_config(&url), TIMEOUT);
    let started = Instant::now();
    let e = src.read("hc-x").await.expect_err("nothing listens");
    assert!(matches!(e, Route53Error::Transport(_)), "{e:?}");
    assert_eq!(e.reason(), "transport");
    assert!(started.elapsed() < TIMEOUT);
}

#[tokio::test]
async fn errors_do_not_contain_the_secret() {
    let fake = FakeRoute53::start();
    fake.set_failure(Some(FakeFailure::Internal));
    let e = read_err(&fake, "hc-s").await;
    assert!(!format!("{e} {e:?}").contains(SECRET_KEY));
}

#[test]
fn unsigned_requests_are_refused() {
    use std::io::{Read, Write};
    let fake = FakeRoute53::start();
    fake.set_check("hc-u", FakeHealthCheck::healthy());
    let mut stream = std::net::TcpStream::connect(fake.addr()).unwrap();
    stream
        .write_all(b"GET /2013-04-01/healthcheck/hc-u HTTP/1.1\r\nHost: route53\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(answer.contains("<Code>MissingAuthenticationToken</Code>"));
}
