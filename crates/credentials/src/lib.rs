//! Credential sources: where the password (or token) the proxy presents to a
//! backend comes from. The session asks a [`CredentialSource`] once per
//! backend connection; IAM token sources plug in here behind the same trait.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use dsql_proxy_config::{BackendAuth, Config, PasswordSource, Secret};
use thiserror::Error;

pub mod iam;

pub use iam::{CredentialChain, IamTokens, TokenFlavor};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CredentialError {
    /// The configured secret cannot be read (unset variable, missing file).
    #[error("no backend credentials: {0}")]
    Unavailable(String),
    /// Passthrough needs the client's password and the client sent none.
    #[error("the client did not supply a password to pass through")]
    MissingClientPassword,
    /// No usable AWS credentials: none found, expired, or misconfigured.
    #[error("{0}")]
    NoAwsCredentials(String),
    /// The credentials provider (STS, SSO, metadata service) failed.
    #[error("{0}")]
    AwsProvider(String),
    #[error("cannot sign an IAM token: {0}")]
    Signing(String),
}

/// Who the proxy is about to authenticate as, and where.
#[derive(Debug, Clone, Copy)]
pub struct CredentialRequest<'a> {
    pub endpoint_host: &'a str,
    pub endpoint_port: u16,
    pub region: Option<&'a str>,
    pub user: &'a str,
    /// The password the client gave the proxy, when the proxy asked for one.
    pub client_password: Option<&'a Secret>,
}

pub type CredentialFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Secret, CredentialError>> + Send + 'a>>;

pub trait CredentialSource: Send + Sync + 'static {
    /// The password to answer the backend's challenge with.
    fn password<'a>(&'a self, request: CredentialRequest<'a>) -> CredentialFuture<'a>;

    /// The backend refused the secret this source gave for `request`
    /// (an invalid authorization): forget it so the next connect fetches a
    /// fresh one, for example after credentials were rotated.
    fn rejected(&self, _request: CredentialRequest<'_>) {}

    /// True when the proxy must ask each client for its own password.
    fn needs_client_password(&self) -> bool {
        false
    }

    /// A short name for logs and status.
    fn kind(&self) -> &'static str;

    /// IAM token counters (signed, failed signings, cache hits), for
    /// sources that sign tokens.
    fn token_counts(&self) -> Option<TokenCounts> {
        None
    }
}

/// A snapshot of an IAM token source's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub generations: u64,
    pub failures: u64,
    pub cache_hits: u64,
}

/// A fixed password from the config, an environment variable or a file.
/// Variables and files are read on every connect so rotation needs no restart.
pub struct StaticPassword {
    source: PasswordSource,
}

impl StaticPassword {
    pub fn new(source: PasswordSource) -> Self {
        Self { source }
    }
}

impl CredentialSource for StaticPassword {
    fn password<'a>(&'a self, _request: CredentialRequest<'a>) -> CredentialFuture<'a> {
        let result = self.source.read().map_err(CredentialError::Unavailable);
        Box::pin(std::future::ready(result))
    }
    fn kind(&self) -> &'static str {
        "password"
    }
}

/// The client's own password, forwarded to the backend.
pub struct Passthrough;

impl CredentialSource for Passthrough {
    fn password<'a>(&'a self, request: CredentialRequest<'a>) -> CredentialFuture<'a> {
        let result = request
            .client_password
            .cloned()
            .ok_or(CredentialError::MissingClientPassword);
        Box::pin(std::future::ready(result))
    }
    fn needs_client_password(&self) -> bool {
        true
    }
    fn kind(&self) -> &'static str {
        "passthrough"
    }
}

/// Builds the source `[backend] auth` names. A password source is checked
/// once here so a missing variable or file fails at startup, not on the
/// first client. IAM sources load the AWS SDK's default configuration
/// (region, credentials chain); credentials themselves are fetched lazily,
/// so a proxy can start before its credentials are available.
pub async fn from_config(config: &Config) -> Result<Arc<dyn CredentialSource>, CredentialError> {
    match config.backend.auth {
        BackendAuth::Password => {
            let source = config
                .backend_password()
                .map_err(|e| CredentialError::Unavailable(e.to_string()))?
                .ok_or_else(|| CredentialError::Unavailable("no password configured".into()))?;
            source.read().map_err(CredentialError::Unavailable)?;
            Ok(Arc::new(StaticPassword::new(source)))
        }
        BackendAuth::Passthrough => Ok(Arc::new(Passthrough)),
        auth @ (BackendAuth::DsqlIam | BackendAuth::RdsIam) => {
            let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let flavor = if auth == BackendAuth::DsqlIam {
                TokenFlavor::Dsql
            } else {
                TokenFlavor::Rds
            };
            Ok(Arc::new(IamTokens::with_chain(
                flavor,
                sdk,
                iam::CredentialChain::DefaultChain,
                config.backend.token_expires_in.get(),
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(client_password: Option<&Secret>) -> CredentialRequest<'_> {
        CredentialRequest {
            endpoint_host: "h",
            endpoint_port: 5432,
            region: None,
            user: "u",
            client_password,
        }
    }

    #[tokio::test]
    async fn static_password_rereads_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "one\n").unwrap();
        let source = StaticPassword::new(PasswordSource::File(path.clone()));
        assert_eq!(
            source.password(request(None)).await.unwrap().expose(),
            "one"
        );
        std::fs::write(&path, "two").unwrap();
        assert_eq!(
            source.password(request(None)).await.unwrap().expose(),
            "two"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            source.password(request(None)).await,
            Err(CredentialError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn passthrough_uses_the_client_password() {
        let secret = Secret::new("client-pw");
        assert_eq!(
            Passthrough
                .password(request(Some(&secret)))
                .await
                .unwrap()
                .expose(),
            "client-pw"
        );
        assert_eq!(
            Passthrough.password(request(None)).await,
            Err(CredentialError::MissingClientPassword)
        );
    }
}
