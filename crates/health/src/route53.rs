//! Route 53 health checks: `GetHealthCheck` for the Disabled / Inverted
//! flags and `GetHealthCheckStatus` for the checkers' observations, judged
//! with Route 53's own rule (more than 18% of checkers report success).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use aws_sdk_route53::config::{BehaviorVersion, Region};
use aws_sdk_route53::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_route53::Client;

/// Route 53 is a global service signed for us-east-1.
pub(crate) const GLOBAL_REGION: &str = "us-east-1";

/// Error codes Route 53 (and the SDK's retry classifier) use for
/// throttling; Route 53 answers them with HTTP 400, others with 429.
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "PriorRequestNotComplete",
];

/// What Route 53 says about one health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckReading {
    pub disabled: bool,
    pub inverted: bool,
    /// Checker observations whose status starts with "Success", and the total.
    pub successes: u32,
    pub observations: u32,
    /// Route 53's verdict: more than 18% of observations succeed, reversed
    /// when inverted; a disabled check counts as healthy (and as unhealthy
    /// when also inverted: Route 53 documents inverting a disabled check as
    /// the way to stop routing to its resource).
    pub healthy: bool,
}

impl HealthCheckReading {
    /// Route 53 treats a disabled check as healthy ("always healthy") and
    /// has no observations for it; Inverted still applies.
    fn disabled(inverted: bool) -> Self {
        Self {
            disabled: true,
            inverted,
            successes: 0,
            observations: 0,
            healthy: !inverted,
        }
    }
}

/// Why a health check could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Route53Error {
    #[error("Route 53 throttled the request: {0}")]
    Throttled(String),
    #[error("Route 53 error {code}: {message}")]
    Api { code: String, message: String },
    #[error("Route 53 request failed: {0}")]
    Transport(String),
    #[error("Route 53 returned no checker observations for an enabled health check")]
    NoObservations,
    #[error("Route 53 did not answer within the operation timeout")]
    Timeout,
    /// No AWS credentials could be had (`route53` commands check first).
    #[error("no AWS credentials: {0}")]
    Credentials(String),
}

impl Route53Error {
    /// Bounded metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Route53Error::Throttled(_) => "throttled",
            Route53Error::Api { .. } => "api",
            Route53Error::Transport(_) => "transport",
            Route53Error::NoObservations => "no_observations",
            Route53Error::Timeout => "timeout",
            Route53Error::Credentials(_) => "credentials",
        }
    }
}

/// Route 53's rule, pure: more than 18% of observations report success;
/// `inverted` reverses. Zero observations => None.
pub fn route53_verdict(successes: u32, observations: u32, inverted: bool) -> Option<bool> {
    if observations == 0 {
        return None;
    }
    // Integer form of successes / observations > 0.18, exact at the
    // boundary (floats would make "exactly 18%" depend on rounding).
    let healthy = u64::from(successes) * 100 > u64::from(observations) * 18;
    Some(healthy != inverted)
}

pub type ReadingFuture<'a> =
    Pin<Box<dyn Future<Output = Result<HealthCheckReading, Route53Error>> + Send + 'a>>;

/// Seam for tests and the monitor.
pub trait HealthCheckSource: Send + Sync + 'static {
    fn read<'a>(&'a self, health_check_id: &'a str) -> ReadingFuture<'a>;
}

/// The real thing: aws-sdk-route53.
#[derive(Clone)]
pub struct SdkHealthChecks {
    client: Client,
    operation_timeout: Duration,
}

// By hand: the client's Debug would print its credentials provider.
impl std::fmt::Debug for SdkHealthChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdkHealthChecks")
            .field("operation_timeout", &self.operation_timeout)
            .finish_non_exhaustive()
    }
}

impl SdkHealthChecks {
    /// From the standard AWS SDK environment (credentials chain,
    /// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_ROUTE_53`, profiles...).
    /// Route 53 is a global service: region us-east-1 when none is
    /// configured. At most 2 attempts; `operation_timeout` bounds each read.
    pub async fn from_env(operation_timeout: Duration) -> Self {
        let sdk_config = aws_config::defaults(BehaviorVersion::latest()).load().await;
        Self::from_sdk_config(&sdk_config, operation_timeout)
    }

    /// From a prepared `SdkConfig` (tests).
    pub fn from_sdk_config(config: &aws_types::SdkConfig, operation_timeout: Duration) -> Self {
        // `From<&SdkConfig>` resolves the service-specific endpoint
        // (`AWS_ENDPOINT_URL_ROUTE_53`, `endpoint_url` in a profile's
        // `route_53` section) before the generic one.
        let mut builder = aws_sdk_route53::config::Builder::from(config);
        if config.region().is_none() {
            builder = builder.region(Region::from_static(GLOBAL_REGION));
        }
        let (retry, timeout) = crate::sdk::polling_retry_and_timeout(config, operation_timeout);
        let conf = builder.retry_config(retry).timeout_config(timeout).build();
        Self {
            client: Client::from_conf(conf),
            operation_timeout,
        }
    }

    async fn read_now(&self, id: &str) -> Result<HealthCheckReading, Route53Error> {
        let check = self
            .client
            .get_health_check()
            .health_check_id(id)
            .send()
            .await
            .map_err(classify)?;
        let config = check.health_check().and_then(|h| h.health_check_config());
        let disabled = config.and_then(|c| c.disabled()).unwrap_or(false);
        let inverted = config.and_then(|c| c.inverted()).unwrap_or(false);
        if disabled {
            // Route 53 has no status for a disabled check (it answers
            // InvalidInput); its verdict is "healthy".
            return Ok(HealthCheckReading::disabled(inverted));
        }

        let status = match self
            .client
            .get_health_check_status()
            .health_check_id(id)
            .send()
            .await
        {
            Ok(status) => status,
            // Disabled between the two calls.
            Err(e) if says_always_healthy(&e) => {
                return Ok(HealthCheckReading::disabled(inverted));
            }
            Err(e) => return Err(classify(e)),
        };
        let observations = status.health_check_observations();
        let successes = observations
            .iter()
            .filter(|o| {
                o.status_report()
                    .and_then(|r| r.status())
                    .is_some_and(|s| s.starts_with("Success"))
            })
            .count();
        let successes = u32::try_from(successes).unwrap_or(u32::MAX);
        let total = u32::try_from(observations.len()).unwrap_or(u32::MAX);
        let healthy =
            route53_verdict(successes, total, inverted).ok_or(Route53Error::NoObservations)?;
        tracing::debug!(
            health_check_id = id,
            successes,
            observations = total,
            inverted,
            healthy,
            "read Route 53 health check"
        );
        Ok(HealthCheckReading {
            disabled: false,
            inverted,
            successes,
            observations: total,
            healthy,
        })
    }
}

impl HealthCheckSource for SdkHealthChecks {
    fn read<'a>(&'a self, health_check_id: &'a str) -> ReadingFuture<'a> {
        Box::pin(async move {
            // The SDK's operation timeout bounds each of the two calls; this
            // bounds the read as a whole.
            tokio::time::timeout(self.operation_timeout, self.read_now(health_check_id))
                .await
                .unwrap_or(Err(Route53Error::Timeout))
        })
    }
}

/// GetHealthCheckStatus on a disabled check: `InvalidInput` whose message
/// mentions the special status "always healthy".
fn says_always_healthy<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    let Some(e) = err.as_service_error() else {
        return false;
    };
    e.code() == Some("InvalidInput")
        && e.message()
            .is_some_and(|m| m.to_ascii_lowercase().contains("always healthy"))
}

/// Maps an SDK failure to the crate's error. Service errors keep Route 53's
/// code and message (they name the check, never credentials).
pub(crate) fn classify<E>(err: SdkError<E>) -> Route53Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => {
            let e = ctx.err();
            let status = ctx.raw().status().as_u16();
            let code = e.code().map(str::to_owned);
            let message = e.message().unwrap_or_default().to_owned();
            let throttled = status == 429
                || code
                    .as_deref()
                    .is_some_and(|c| THROTTLING_CODES.contains(&c));
            if throttled {
                let text = if message.is_empty() {
                    code.unwrap_or_else(|| format!("HTTP {status}"))
                } else {
                    message
                };
                return Route53Error::Throttled(text);
            }
            Route53Error::Api {
                // An error body without a code (a proxy's HTML page, say)
                // still names the HTTP status.
                code: code.unwrap_or_else(|| format!("HTTP {status}")),
                message,
            }
        }
        SdkError::TimeoutError(_) => Route53Error::Timeout,
        SdkError::DispatchFailure(f) if f.is_timeout() => Route53Error::Timeout,
        // Dispatch (connect, TLS, IO; also "no credentials", which the
        // orchestrator reports as a dispatch failure), unparseable
        // responses, and requests that could not be built.
        _ => Route53Error::Transport(error_chain(&err)),
    }
}

/// `err: source: source...`, for a log line. (`DisplayErrorContext` also
/// appends the whole `Debug` form, too noisy for a log line or a metric.)
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let part = e.to_string();
        // Wrappers often repeat their source's text.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_18_percent_is_unhealthy() {
        // 9 of 50 is exactly 18%.
        assert_eq!(route53_verdict(9, 50, false), Some(false));
        assert_eq!(route53_verdict(18, 100, false), Some(false));
    }

    #[test]
    fn just_above_18_percent_is_healthy() {
        assert_eq!(route53_verdict(10, 50, false), Some(true));
        assert_eq!(route53_verdict(181, 1000, false), Some(true));
        // 3 of 16 = 18.75%.
        assert_eq!(route53_verdict(3, 16, false), Some(true));
        assert_eq!(route53_verdict(2, 16, false), Some(false));
    }

    #[test]
    fn all_and_none() {
        assert_eq!(route53_verdict(16, 16, false), Some(true));
        assert_eq!(route53_verdict(0, 16, false), Some(false));
    }

    #[test]
    fn inverted_reverses() {
        assert_eq!(route53_verdict(16, 16, true), Some(false));
        assert_eq!(route53_verdict(0, 16, true), Some(true));
        assert_eq!(route53_verdict(9, 50, true), Some(true));
        assert_eq!(route53_verdict(10, 50, true), Some(false));
    }

    #[test]
    fn zero_observations_has_no_verdict() {
        assert_eq!(route53_verdict(0, 0, false), None);
        assert_eq!(route53_verdict(0, 0, true), None);
    }

    #[test]
    fn large_counts_do_not_overflow() {
        assert_eq!(route53_verdict(u32::MAX, u32::MAX, false), Some(true));
        assert_eq!(route53_verdict(0, u32::MAX, false), Some(false));
    }

    #[test]
    fn reasons_are_bounded_labels() {
        let labels: Vec<_> = [
            Route53Error::Throttled("Rate exceeded".into()),
            Route53Error::Api {
                code: "NoSuchHealthCheck".into(),
                message: "x".into(),
            },
            Route53Error::Transport("refused".into()),
            Route53Error::NoObservations,
            Route53Error::Timeout,
            Route53Error::Credentials("none".into()),
        ]
        .iter()
        .map(Route53Error::reason)
        .collect();
        // The metrics crate creates exactly these series for every endpoint.
        assert_eq!(labels, dsql_proxy_metrics::ROUTE53_ERROR_REASONS);
    }

    #[test]
    fn disabled_reading_is_healthy_unless_inverted() {
        let r = HealthCheckReading::disabled(false);
        assert!(r.healthy && r.disabled && !r.inverted);
        assert_eq!((r.successes, r.observations), (0, 0));
        let r = HealthCheckReading::disabled(true);
        assert!(!r.healthy && r.disabled && r.inverted);
    }
}
