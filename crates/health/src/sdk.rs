//! Settings shared by the AWS SDK clients the monitor polls with (Route 53
//! health checks, the RDS control plane).

use std::time::Duration;

use aws_sdk_route53::config::retry::RetryConfig;
use aws_sdk_route53::config::timeout::TimeoutConfig;

/// At most one retry: a monitor that polls again soon gains little from
/// more, and each attempt costs a share of the service's per-account rate.
const MAX_ATTEMPTS: u32 = 2;

/// The shared config's retry mode with at most [`MAX_ATTEMPTS`] (a lower
/// configured count is kept), and `operation_timeout` bounding each call;
/// the builder merges it with the shared connect/read timeouts.
pub(crate) fn polling_retry_and_timeout(
    config: &aws_types::SdkConfig,
    operation_timeout: Duration,
) -> (RetryConfig, TimeoutConfig) {
    let retry = config
        .retry_config()
        .cloned()
        .unwrap_or_else(RetryConfig::standard);
    let attempts = retry.max_attempts().clamp(1, MAX_ATTEMPTS);
    let timeout = TimeoutConfig::builder()
        .operation_timeout(operation_timeout)
        .build();
    (retry.with_max_attempts(attempts), timeout)
}
