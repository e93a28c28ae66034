//! The RDS control plane's view of an Aurora global database
//! (`DescribeGlobalClusters`): which member cluster is the writer
//! (`GlobalClusterMembers[].IsWriter`) and whether a failover or
//! switchover is under way (`FailoverState`). Under `kind =
//! "aurora-global"` with `[routing] global_cluster_id`, the monitor polls
//! it to prove which of two writable endpoints is the newer one, and treats
//! a set `FailoverState` as a failover window (no writer).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use aws_sdk_rds::config::{BehaviorVersion, Region};
use aws_sdk_rds::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_rds::Client;

/// One member cluster of the global database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMember {
    pub arn: String,
    /// The Region in the cluster's ARN (`arn:aws:rds:<region>:...`).
    pub region: Option<String>,
    pub is_writer: bool,
}

/// What `DescribeGlobalClusters` says about one global cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalClusterView {
    pub members: Vec<ClusterMember>,
    /// `FailoverState.Status` (`pending`, `failing-over`, `switching-over`,
    /// `cancelling`) while a failover or switchover is under way.
    pub failover: Option<String>,
}

impl GlobalClusterView {
    /// The Region of the one member marked `IsWriter`; `None` when there is
    /// no such member or more than one.
    pub fn writer_region(&self) -> Option<&str> {
        let mut writers = self.members.iter().filter(|m| m.is_writer);
        match (writers.next(), writers.next()) {
            (Some(only), None) => only.region.as_deref(),
            _ => None,
        }
    }
}

/// The Region field of an ARN.
pub fn arn_region(arn: &str) -> Option<String> {
    let mut parts = arn.split(':');
    match (parts.next(), parts.nth(2)) {
        (Some("arn"), Some(region)) if !region.is_empty() => Some(region.to_owned()),
        _ => None,
    }
}

/// Why the global cluster could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("global cluster {0} not found")]
    NotFound(String),
    #[error("RDS error {code}: {message}")]
    Api { code: String, message: String },
    #[error("RDS request failed: {0}")]
    Transport(String),
    #[error("RDS did not answer within the operation timeout")]
    Timeout,
}

pub type ViewFuture<'a> =
    Pin<Box<dyn Future<Output = Result<GlobalClusterView, ControlPlaneError>> + Send + 'a>>;

/// Seam for tests and the monitor.
pub trait GlobalClusterSource: Send + Sync + 'static {
    fn describe<'a>(&'a self, global_cluster_id: &'a str) -> ViewFuture<'a>;
}

/// The real thing: aws-sdk-rds.
#[derive(Clone)]
pub struct SdkGlobalClusters {
    client: Client,
}

// By hand: the client's Debug would print its credentials provider.
impl std::fmt::Debug for SdkGlobalClusters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdkGlobalClusters").finish_non_exhaustive()
    }
}

impl SdkGlobalClusters {
    /// From the standard AWS SDK environment (credentials chain,
    /// `AWS_ENDPOINT_URL_RDS` / `AWS_ENDPOINT_URL`, profiles...). The
    /// global cluster is visible from the Region of any member:
    /// `fallback_region` (an endpoint's) is used when none is configured.
    pub async fn from_env(operation_timeout: Duration, fallback_region: Option<&str>) -> Self {
        let sdk_config = aws_config::defaults(BehaviorVersion::latest()).load().await;
        Self::from_sdk_config(&sdk_config, operation_timeout, fallback_region)
    }

    /// From a prepared `SdkConfig` (tests, fuzzing).
    pub fn from_sdk_config(
        sdk_config: &aws_types::SdkConfig,
        operation_timeout: Duration,
        fallback_region: Option<&str>,
    ) -> Self {
        let mut builder = aws_sdk_rds::config::Builder::from(sdk_config);
        if sdk_config.region().is_none() {
            if let Some(region) = fallback_region {
                builder = builder.region(Region::new(region.to_owned()));
            }
        }
        let (retry, timeout) = crate::sdk::polling_retry_and_timeout(sdk_config, operation_timeout);
        let conf = builder.retry_config(retry).timeout_config(timeout).build();
        Self {
            client: Client::from_conf(conf),
        }
    }

    async fn describe_now(&self, id: &str) -> Result<GlobalClusterView, ControlPlaneError> {
        let out = self
            .client
            .describe_global_clusters()
            .global_cluster_identifier(id)
            .send()
            .await
            .map_err(|e| classify(e, id))?;
        let cluster = out
            .global_clusters()
            .iter()
            .find(|c| c.global_cluster_identifier() == Some(id))
            .or_else(|| out.global_clusters().first())
            .ok_or_else(|| ControlPlaneError::NotFound(id.to_owned()))?;
        let members = cluster
            .global_cluster_members()
            .iter()
            .map(|m| {
                let arn = m.db_cluster_arn().unwrap_or_default().to_owned();
                ClusterMember {
                    region: arn_region(&arn),
                    arn,
                    is_writer: m.is_writer().unwrap_or(false),
                }
            })
            .collect();
        let failover = cluster
            .failover_state()
            .and_then(|f| f.status())
            .map(|s| s.as_str().to_owned())
            .filter(|s| !s.is_empty());
        Ok(GlobalClusterView { members, failover })
    }
}

impl GlobalClusterSource for SdkGlobalClusters {
    fn describe<'a>(&'a self, global_cluster_id: &'a str) -> ViewFuture<'a> {
        Box::pin(self.describe_now(global_cluster_id))
    }
}

fn classify<E, R>(err: SdkError<E, R>, id: &str) -> ControlPlaneError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &err {
        SdkError::TimeoutError(_) => ControlPlaneError::Timeout,
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("Unknown").to_owned();
            if code == "GlobalClusterNotFoundFault" {
                return ControlPlaneError::NotFound(id.to_owned());
            }
            ControlPlaneError::Api {
                code,
                message: e.message().unwrap_or_default().to_owned(),
            }
        }
        _ => {
            ControlPlaneError::Transport(aws_sdk_rds::error::DisplayErrorContext(&err).to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(region: &str, is_writer: bool) -> ClusterMember {
        let arn = format!("arn:aws:rds:{region}:123456789012:cluster:app-{region}");
        ClusterMember {
            region: arn_region(&arn),
            arn,
            is_writer,
        }
    }

    #[test]
    fn the_writer_region_comes_from_the_one_writer_member() {
        let view = GlobalClusterView {
            members: vec![member("us-east-1", false), member("us-west-2", true)],
            failover: None,
        };
        assert_eq!(view.writer_region(), Some("us-west-2"));
        let two = GlobalClusterView {
            members: vec![member("us-east-1", true), member("us-west-2", true)],
            failover: None,
        };
        assert_eq!(two.writer_region(), None);
        assert_eq!(
            arn_region("arn:aws:rds:eu-west-1:1:cluster:x").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(arn_region("not-an-arn"), None);
        assert_eq!(arn_region("arn:aws:rds::1:global-cluster:x"), None);
    }
}
