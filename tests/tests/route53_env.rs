//! `SdkHealthChecks::from_env` reads the standard AWS SDK environment:
//! `AWS_ENDPOINT_URL_ROUTE_53` wins over `AWS_ENDPOINT_URL`, credentials
//! come from the environment, and with no region configured requests are
//! signed for us-east-1 (Route 53 is global).
//!
//! Environment variables are process-wide, so this binary holds exactly one
//! test and sets them before starting any runtime.

use std::time::Duration;

use dsql_proxy_health::route53::{HealthCheckSource, SdkHealthChecks};
use dsql_proxy_tests::free_port;
use dsql_proxy_tests::route53::{FakeHealthCheck, FakeRoute53};

const ACCESS_KEY: &str = "AKIDROUTE53ENVTEST";

#[test]
fn from_env_honours_the_route53_endpoint_and_defaults_the_region() {
    // Nothing from the host's AWS setup may leak in.
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") {
            std::env::remove_var(key);
        }
    }
    let isolated = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", "route53-env-test-secret"),
        ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        ),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    for (k, v) in isolated {
        std::env::set_var(k, v);
    }
    // The generic endpoint goes nowhere: only the service-specific one can
    // make the reads succeed.
    std::env::set_var(
        "AWS_ENDPOINT_URL",
        format!("http://127.0.0.1:{}", free_port()),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    // No region configured: Route 53's global region.
    let fake = FakeRoute53::start();
    fake.set_check("hc-env", FakeHealthCheck::with_successes(3, 16));
    std::env::set_var("AWS_ENDPOINT_URL_ROUTE_53", fake.url());
    let reading = rt.block_on(async {
        let src = SdkHealthChecks::from_env(Duration::from_secs(10)).await;
        src.read("hc-env").await
    });
    let reading = reading.unwrap_or_else(|e| panic!("{e}\n{}", fake.describe_requests()));
    assert!(reading.healthy);
    assert_eq!((reading.successes, reading.observations), (3, 16));
    assert_eq!(fake.status_requests("hc-env"), 1);
    for req in fake.requests() {
        let auth = req.header("authorization").unwrap_or_default();
        assert!(
            auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/"))
                && auth.contains("/us-east-1/route53/aws4_request"),
            "{auth}"
        );
    }

    // With AWS_REGION set, the service-specific endpoint still wins.
    let other = FakeRoute53::start();
    other.set_check("hc-env2", FakeHealthCheck::healthy().disabled());
    std::env::set_var("AWS_ENDPOINT_URL_ROUTE_53", other.url());
    std::env::set_var("AWS_REGION", "us-east-1");
    let reading = rt.block_on(async {
        let src = SdkHealthChecks::from_env(Duration::from_secs(10)).await;
        src.read("hc-env2").await
    });
    let reading = reading.unwrap_or_else(|e| panic!("{e}\n{}", other.describe_requests()));
    assert!(reading.disabled && reading.healthy);
    assert_eq!(other.get_requests("hc-env2"), 1);
    assert_eq!(
        fake.requests().len(),
        2,
        "the first fake got no more requests"
    );
}
