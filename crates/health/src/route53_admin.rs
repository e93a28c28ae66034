//! Managing the Route 53 health checks the proxy reads: what
//! `dsql-proxy route53 setup | teardown | status` call.
//!
//! One TCP health check per endpoint. Each is created with a deterministic
//! `CallerReference` ([`HealthCheckSpec::caller_reference`]): a prefix that
//! names the endpoint (name, host, port), a digest of the settings, and a
//! generation for re-creating a check after a teardown (Route 53 refuses a
//! `CallerReference` that a deleted check used, with
//! `HealthCheckAlreadyExists`). Setup lists the account's checks first and
//! reuses one with the endpoint's prefix and the same settings, so running
//! it again creates nothing.

use std::time::Duration;

use aws_sdk_route53::config::retry::RetryConfig;
use aws_sdk_route53::config::timeout::TimeoutConfig;
use aws_sdk_route53::config::{BehaviorVersion, ProvideCredentials, Region};
use aws_sdk_route53::error::ProvideErrorMetadata;
use aws_sdk_route53::primitives::DateTimeFormat;
use aws_sdk_route53::types::{HealthCheckConfig, HealthCheckType, Tag, TagResourceType};
use aws_sdk_route53::Client;
use sha2::{Digest, Sha256};

use crate::route53::{classify, Route53Error, GLOBAL_REGION};

/// Every `CallerReference` setup uses starts with this.
pub const CALLER_REFERENCE_PREFIX: &str = "dsqlproxy-";
/// Tag keys setup puts on each check (besides `Name`).
pub const TAG_ENDPOINT: &str = "dsql-proxy:endpoint";
pub const TAG_CLUSTER: &str = "dsql-proxy:cluster";
pub const TAG_REGION: &str = "dsql-proxy:region";
pub const TAG_HOST: &str = "dsql-proxy:host";

/// Generations tried before giving up on `HealthCheckAlreadyExists`.
const MAX_GENERATION: u32 = 20;

/// The health check one endpoint should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSpec {
    /// The `[[endpoints]] name`.
    pub endpoint: String,
    pub region: Option<String>,
    /// The DSQL cluster id (first label of a `*.dsql.*` host), if any.
    pub cluster: Option<String>,
    /// `FullyQualifiedDomainName`: the endpoint's host.
    pub host: String,
    pub port: u16,
    /// Seconds between checks by each checker: 10 or 30.
    pub request_interval: u32,
    /// Consecutive failures (1-10) before a checker calls it unhealthy.
    pub failure_threshold: u32,
}

/// Aurora DSQL endpoint host names: `<cluster id>.dsql.<region>.on.aws`
/// (and `.dsql-<suffix>.` for the ones with a suffix). Returns the cluster id
/// and the Region.
pub fn dsql_host_parts(host: &str) -> Option<(&str, &str)> {
    let mut labels = host.split('.');
    let cluster = labels.next().filter(|s| !s.is_empty())?;
    let service = labels.next()?;
    let region = labels.next().filter(|s| !s.is_empty())?;
    (service == "dsql" || service.starts_with("dsql-")).then_some((cluster, region))
}

fn hex_digest(text: &str, chars: usize) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(chars);
    for byte in digest.iter() {
        if out.len() >= chars {
            break;
        }
        out.push_str(&format!("{byte:02x}"));
    }
    out.truncate(chars);
    out
}

impl HealthCheckSpec {
    /// `dsqlproxy-<16 hex of SHA-256(endpoint name, host, port)>`: shared by
    /// every check setup ever made for this endpoint, whatever its settings.
    pub fn reference_prefix(&self) -> String {
        let identity = format!("{}\n{}\n{}", self.endpoint, self.host, self.port);
        format!("{CALLER_REFERENCE_PREFIX}{}", hex_digest(&identity, 16))
    }

    /// `<prefix>-<8 hex of SHA-256(settings)>`, plus `-g<N>` from the second
    /// generation on; at most 40 characters (Route 53 allows 64).
    pub fn caller_reference(&self, generation: u32) -> String {
        let settings = format!(
            "TCP\n{}\n{}\n{}\n{}",
            self.host, self.port, self.request_interval, self.failure_threshold
        );
        let base = format!("{}-{}", self.reference_prefix(), hex_digest(&settings, 8));
        match generation {
            0 | 1 => base,
            n => format!("{base}-g{n}"),
        }
    }

    /// Whether setup made `check` for this endpoint (any settings).
    pub fn owns(&self, check: &ExistingCheck) -> bool {
        check
            .caller_reference
            .strip_prefix(&self.reference_prefix())
            .is_some_and(|rest| rest.starts_with('-'))
    }

    /// Whether `check` is the TCP check this spec describes.
    pub fn matches(&self, check: &ExistingCheck) -> bool {
        check.kind == "TCP"
            && check.host.as_deref() == Some(self.host.as_str())
            && check.port == Some(self.port)
            && check.request_interval == Some(self.request_interval)
            && check.failure_threshold == Some(self.failure_threshold)
    }

    /// The tags setup puts on the check, `Name` first.
    pub fn tags(&self) -> Vec<(String, String)> {
        let mut tags = vec![
            (
                "Name".to_owned(),
                format!("dsql-proxy {} ({}:{})", self.endpoint, self.host, self.port),
            ),
            (TAG_ENDPOINT.to_owned(), self.endpoint.clone()),
            (TAG_HOST.to_owned(), self.host.clone()),
        ];
        if let Some(cluster) = &self.cluster {
            tags.push((TAG_CLUSTER.to_owned(), cluster.clone()));
        }
        if let Some(region) = &self.region {
            tags.push((TAG_REGION.to_owned(), region.clone()));
        }
        tags
    }
}

/// A health check as `ListHealthChecks` / `GetHealthCheck` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingCheck {
    pub id: String,
    pub caller_reference: String,
    /// `TCP`, `HTTPS`, ...
    pub kind: String,
    pub host: Option<String>,
    pub ip_address: Option<String>,
    pub port: Option<u16>,
    pub request_interval: Option<u32>,
    pub failure_threshold: Option<u32>,
    pub disabled: bool,
    pub inverted: bool,
}

impl ExistingCheck {
    fn from_sdk(check: &aws_sdk_route53::types::HealthCheck) -> Self {
        let config = check.health_check_config();
        let positive = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok());
        Self {
            id: check.id().to_owned(),
            caller_reference: check.caller_reference().to_owned(),
            kind: config
                .map(|c| c.r#type().as_str().to_owned())
                .unwrap_or_default(),
            host: config
                .and_then(|c| c.fully_qualified_domain_name())
                .map(str::to_owned),
            ip_address: config.and_then(|c| c.ip_address()).map(str::to_owned),
            port: config
                .and_then(|c| c.port())
                .and_then(|p| u16::try_from(p).ok()),
            request_interval: positive(config.and_then(|c| c.request_interval())),
            failure_threshold: positive(config.and_then(|c| c.failure_threshold())),
            disabled: config.and_then(|c| c.disabled()).unwrap_or(false),
            inverted: config.and_then(|c| c.inverted()).unwrap_or(false),
        }
    }
}

/// What setup found or did for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// A check with the same settings was there already.
    Existing(ExistingCheck),
    /// Created now; `generation` > 1 when earlier `CallerReference`s were
    /// taken by deleted or changed checks.
    Created {
        check: ExistingCheck,
        generation: u32,
    },
}

impl Ensured {
    pub fn check(&self) -> &ExistingCheck {
        match self {
            Ensured::Existing(c) | Ensured::Created { check: c, .. } => c,
        }
    }
}

/// One checker's observation (`GetHealthCheckStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The checker's Region, e.g. `us-east-1`.
    pub region: String,
    pub ip_address: String,
    /// Route 53's status text, e.g. `Success: TCP connection established`.
    pub status: String,
    /// RFC 3339, as Route 53 gave it; empty when missing.
    pub checked_at: String,
    /// Seconds since epoch of `checked_at`, when known.
    pub checked_epoch: Option<i64>,
}

impl Observation {
    /// Route 53 counts a checker's report as healthy when it starts with
    /// "Success".
    pub fn is_success(&self) -> bool {
        self.status.starts_with("Success")
    }
}

/// Whether a check was deleted now or was gone already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Now,
    AlreadyGone,
}

/// An `aws-sdk-route53` client for managing health checks.
#[derive(Clone)]
pub struct Route53Admin {
    client: Client,
}

// By hand: the client's Debug would print its credentials provider.
impl std::fmt::Debug for Route53Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route53Admin").finish_non_exhaustive()
    }
}

impl Route53Admin {
    /// From the standard AWS SDK environment (credential chain, profiles,
    /// `AWS_ENDPOINT_URL_ROUTE_53` / `AWS_ENDPOINT_URL`), signed for
    /// us-east-1 unless a region is configured. Fails at once, naming the
    /// cause, when no credentials can be had: nothing is sent then.
    /// `operation_timeout` bounds each call, retries included.
    pub async fn from_env(operation_timeout: Duration) -> Result<Self, Route53Error> {
        let sdk_config = aws_config::defaults(BehaviorVersion::latest()).load().await;
        let provider = sdk_config.credentials_provider().ok_or_else(|| {
            Route53Error::Credentials("no AWS credential provider is configured".into())
        })?;
        if let Err(e) = provider.provide_credentials().await {
            return Err(Route53Error::Credentials(crate::route53::error_chain(&e)));
        }
        let mut builder = aws_sdk_route53::config::Builder::from(&sdk_config);
        if sdk_config.region().is_none() {
            builder = builder.region(Region::from_static(GLOBAL_REGION));
        }
        let retry = sdk_config
            .retry_config()
            .cloned()
            .unwrap_or_else(RetryConfig::standard);
        let conf = builder
            .retry_config(retry)
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(operation_timeout)
                    .build(),
            )
            .build();
        Ok(Self {
            client: Client::from_conf(conf),
        })
    }

    /// Every health check of the account (all pages).
    pub async fn list(&self) -> Result<Vec<ExistingCheck>, Route53Error> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_health_checks()
                .set_marker(marker.take())
                .send()
                .await
                .map_err(classify)?;
            out.extend(page.health_checks().iter().map(ExistingCheck::from_sdk));
            match page.next_marker() {
                Some(next) if page.is_truncated() && !next.is_empty() => {
                    marker = Some(next.to_owned());
                }
                _ => return Ok(out),
            }
        }
    }

    /// The check `spec` describes: reused from `existing` (the account's
    /// checks, from [`list`](Self::list)) when one with the endpoint's
    /// prefix has the same settings, otherwise created, with its tags.
    /// A `CallerReference` Route 53 refuses as already used (by a deleted
    /// check) moves on to the next generation.
    pub async fn ensure(
        &self,
        spec: &HealthCheckSpec,
        existing: &[ExistingCheck],
    ) -> Result<Ensured, Route53Error> {
        if let Some(found) = existing.iter().find(|c| spec.owns(c) && spec.matches(c)) {
            self.ensure_tags(&found.id, spec).await?;
            return Ok(Ensured::Existing(found.clone()));
        }
        let config = HealthCheckConfig::builder()
            .r#type(HealthCheckType::Tcp)
            .fully_qualified_domain_name(&spec.host)
            .port(i32::from(spec.port))
            .request_interval(i32::try_from(spec.request_interval).unwrap_or(30))
            .failure_threshold(i32::try_from(spec.failure_threshold).unwrap_or(3))
            .build()
            .map_err(|e| Route53Error::Transport(format!("cannot build the request: {e}")))?;
        for generation in 1..=MAX_GENERATION {
            let reference = spec.caller_reference(generation);
            // Taken by a live check whose settings were changed since.
            if existing.iter().any(|c| c.caller_reference == reference) {
                continue;
            }
            let created = self
                .client
                .create_health_check()
                .caller_reference(&reference)
                .health_check_config(config.clone())
                .send()
                .await;
            match created {
                Ok(out) => {
                    let check =
                        out.health_check()
                            .map(ExistingCheck::from_sdk)
                            .ok_or_else(|| Route53Error::Api {
                                code: "InvalidResponse".into(),
                                message: "CreateHealthCheck answered without a health check".into(),
                            })?;
                    self.ensure_tags(&check.id, spec).await?;
                    return Ok(Ensured::Created { check, generation });
                }
                Err(e) if e.code() == Some("HealthCheckAlreadyExists") => {
                    tracing::info!(
                        caller_reference = %reference,
                        "CallerReference already used by a deleted or changed health check; trying the next generation"
                    );
                }
                Err(e) => return Err(classify(e)),
            }
        }
        Err(Route53Error::Api {
            code: "HealthCheckAlreadyExists".into(),
            message: format!(
                "CallerReferences {} to -g{MAX_GENERATION} are all taken by deleted or changed health checks",
                spec.caller_reference(1)
            ),
        })
    }

    /// Adds or corrects the spec's tags (other tags are left alone).
    async fn ensure_tags(&self, id: &str, spec: &HealthCheckSpec) -> Result<(), Route53Error> {
        let current = self.tags(id).await?;
        let missing: Vec<Tag> = spec
            .tags()
            .into_iter()
            .filter(|(k, v)| !current.iter().any(|(ck, cv)| ck == k && cv == v))
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.client
            .change_tags_for_resource()
            .resource_type(TagResourceType::Healthcheck)
            .resource_id(id)
            .set_add_tags(Some(missing))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// A check's tags as (key, value).
    pub async fn tags(&self, id: &str) -> Result<Vec<(String, String)>, Route53Error> {
        let out = self
            .client
            .list_tags_for_resource()
            .resource_type(TagResourceType::Healthcheck)
            .resource_id(id)
            .send()
            .await
            .map_err(classify)?;
        Ok(out
            .resource_tag_set()
            .map(|set| {
                set.tags()
                    .iter()
                    .map(|t| {
                        (
                            t.key().unwrap_or_default().to_owned(),
                            t.value().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `UpdateHealthCheck` with only `Inverted` set: an inverted check
    /// reports the opposite of what its checkers see, which Route 53
    /// documents for taking a resource out of rotation (the failover
    /// drill's `--method route53`).
    pub async fn set_inverted(&self, id: &str, inverted: bool) -> Result<(), Route53Error> {
        self.client
            .update_health_check()
            .health_check_id(id)
            .inverted(inverted)
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// `GetHealthCheck`; `None` when there is no such check.
    pub async fn get(&self, id: &str) -> Result<Option<ExistingCheck>, Route53Error> {
        match self
            .client
            .get_health_check()
            .health_check_id(id)
            .send()
            .await
        {
            Ok(out) => Ok(out.health_check().map(ExistingCheck::from_sdk)),
            Err(e) if e.code() == Some("NoSuchHealthCheck") => Ok(None),
            Err(e) => Err(classify(e)),
        }
    }

    /// `GetHealthCheckStatus`: one observation per checker.
    pub async fn observations(&self, id: &str) -> Result<Vec<Observation>, Route53Error> {
        let out = self
            .client
            .get_health_check_status()
            .health_check_id(id)
            .send()
            .await
            .map_err(classify)?;
        Ok(out
            .health_check_observations()
            .iter()
            .map(|o| {
                let report = o.status_report();
                let time = report.and_then(|r| r.checked_time());
                Observation {
                    region: o
                        .region()
                        .map(|r| r.as_str().to_owned())
                        .unwrap_or_default(),
                    ip_address: o.ip_address().unwrap_or_default().to_owned(),
                    status: report
                        .and_then(|r| r.status())
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                    checked_at: time
                        .and_then(|t| t.fmt(DateTimeFormat::DateTime).ok())
                        .unwrap_or_default(),
                    checked_epoch: time.map(|t| t.secs()),
                }
            })
            .collect())
    }

    /// Deletes a check; one that does not exist (any more) is fine.
    pub async fn delete(&self, id: &str) -> Result<Deleted, Route53Error> {
        match self
            .client
            .delete_health_check()
            .health_check_id(id)
            .send()
            .await
        {
            Ok(_) => Ok(Deleted::Now),
            Err(e) if e.code() == Some("NoSuchHealthCheck") => Ok(Deleted::AlreadyGone),
            Err(e) => Err(classify(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HealthCheckSpec {
        HealthCheckSpec {
            endpoint: "use1".into(),
            region: Some("us-east-1".into()),
            cluster: Some("abc".into()),
            host: "abc.dsql.us-east-1.on.aws".into(),
            port: 5432,
            request_interval: 10,
            failure_threshold: 3,
        }
    }

    fn existing(spec: &HealthCheckSpec, reference: String) -> ExistingCheck {
        ExistingCheck {
            id: "id".into(),
            caller_reference: reference,
            kind: "TCP".into(),
            host: Some(spec.host.clone()),
            ip_address: None,
            port: Some(spec.port),
            request_interval: Some(spec.request_interval),
            failure_threshold: Some(spec.failure_threshold),
            disabled: false,
            inverted: false,
        }
    }

    #[test]
    fn caller_references_are_deterministic_and_short() {
        let s = spec();
        let r = s.caller_reference(1);
        assert_eq!(r, spec().caller_reference(1));
        assert_eq!(r, s.caller_reference(0));
        assert!(r.starts_with(&format!("{}-", s.reference_prefix())), "{r}");
        assert!(r.starts_with(CALLER_REFERENCE_PREFIX));
        assert_eq!(r.len(), CALLER_REFERENCE_PREFIX.len() + 16 + 1 + 8);
        assert_eq!(s.caller_reference(2), format!("{r}-g2"));
        assert!(s.caller_reference(MAX_GENERATION).len() <= 64);
        // Pinned: a new scheme would orphan every check made before it.
        assert_eq!(
            s.reference_prefix(),
            "dsqlproxy-".to_owned() + &hex_digest("use1\nabc.dsql.us-east-1.on.aws\n5432", 16)
        );
    }

    #[test]
    fn settings_change_the_reference_but_not_the_prefix() {
        let a = spec();
        let mut b = spec();
        b.failure_threshold = 5;
        assert_ne!(a.caller_reference(1), b.caller_reference(1));
        assert_eq!(a.reference_prefix(), b.reference_prefix());
        // Tags and Region are not part of it.
        b = spec();
        b.region = None;
        b.cluster = None;
        assert_eq!(a.caller_reference(1), b.caller_reference(1));
        // Identity is.
        for change in [
            |s: &mut HealthCheckSpec| s.endpoint = "other".into(),
            |s: &mut HealthCheckSpec| s.host = "x.dsql.us-east-1.on.aws".into(),
            |s: &mut HealthCheckSpec| s.port = 5433,
        ] {
            let mut c = spec();
            change(&mut c);
            assert_ne!(a.reference_prefix(), c.reference_prefix());
        }
    }

    #[test]
    fn owns_and_matches() {
        let s = spec();
        let mine = existing(&s, s.caller_reference(3));
        assert!(s.owns(&mine) && s.matches(&mine));
        let mut changed = mine.clone();
        changed.failure_threshold = Some(4);
        assert!(s.owns(&changed) && !s.matches(&changed));
        let foreign = existing(&s, "console-made".into());
        assert!(!s.owns(&foreign) && s.matches(&foreign));
        // A prefix that merely starts the same is not ours.
        let lookalike = existing(&s, format!("{}0-x", s.reference_prefix()));
        assert!(!s.owns(&lookalike));
        let mut http = mine;
        http.kind = "HTTPS".into();
        assert!(!s.matches(&http));
    }

    #[test]
    fn tags_name_the_endpoint_cluster_and_region() {
        let tags = spec().tags();
        assert_eq!(tags[0].0, "Name");
        assert!(tags[0].1.contains("use1"), "{tags:?}");
        for (k, v) in [
            (TAG_ENDPOINT, "use1"),
            (TAG_CLUSTER, "abc"),
            (TAG_REGION, "us-east-1"),
            (TAG_HOST, "abc.dsql.us-east-1.on.aws"),
        ] {
            assert!(tags.contains(&(k.to_owned(), v.to_owned())), "{tags:?}");
        }
        let mut s = spec();
        s.cluster = None;
        s.region = None;
        assert_eq!(s.tags().len(), 3);
    }

    #[test]
    fn dsql_hosts() {
        assert_eq!(
            dsql_host_parts("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws"),
            Some(("abcdefghijklmnopqrstuvwxyz", "us-east-1"))
        );
        assert_eq!(
            dsql_host_parts("abc.dsql-fnh4.us-east-2.on.aws"),
            Some(("abc", "us-east-2"))
        );
        assert_eq!(dsql_host_parts("db.internal.example"), None);
        assert_eq!(dsql_host_parts("localhost"), None);
    }
}
