//! IAM authentication tokens: Aurora DSQL (`dsql-iam`) and RDS/Aurora
//! PostgreSQL (`rds-iam`), signed with credentials from the AWS SDK's
//! default chain and cached per (host, region, role).
//!
//! The connect path only reads the cache. A token past 80% of its life is
//! re-signed in the background, once (single-flight); a miss signs on the
//! connect path, also once for all concurrent connects of the same key. A
//! token is never handed out within a small margin of its expiry, which is
//! the earlier of the signing time plus `token_expires_in` and the expiry of
//! the credentials that signed it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    self, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_types::region::Region;
use aws_types::SdkConfig;
use dsql_proxy_config::Secret;
use tracing::{info, warn};

use crate::{CredentialError, CredentialFuture, CredentialRequest, CredentialSource};

/// Which kind of token to sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenFlavor {
    /// Aurora DSQL: action DbConnect, or DbConnectAdmin for role `admin`.
    Dsql,
    /// RDS IAM: service `rds-db`, action `connect`, host:port and user signed.
    Rds,
}

/// DSQL's limit on a token's lifetime.
pub const DSQL_MAX_EXPIRES_IN: Duration = Duration::from_secs(7 * 24 * 3600);
/// RDS IAM tokens are valid for at most 15 minutes.
pub const RDS_MAX_EXPIRES_IN: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    host: String,
    port: u16,
    region: String,
    /// DSQL: the action (the token does not name the role). RDS: the user.
    principal: String,
}

struct Token {
    secret: Secret,
    refresh_at: SystemTime,
    expires_at: SystemTime,
}

#[derive(Default)]
struct Slot {
    current: Mutex<Option<Arc<Token>>>,
    /// Held while signing: concurrent misses wait for one signature.
    signing: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
    /// Milliseconds since the epoch of the last connect that asked for
    /// it, for eviction.
    last_used: AtomicU64,
}

/// Token keys cached at once. Under `rds-iam` a key includes the user
/// name, which clients choose: without a bound, a client cycling through
/// names would grow the cache for ever. Beyond it, keys whose token is
/// gone (expired, refused) go first, then the least recently used.
pub const MAX_CACHED_KEYS: usize = 1024;

impl Slot {
    fn usable(&self, now: SystemTime) -> Option<Arc<Token>> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current
            .as_ref()
            .filter(|t| now + margin(t) < t.expires_at)
            .cloned()
    }
    fn store(&self, token: Token) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(token));
    }
}

/// A token must have this much life left to be handed out: enough to finish
/// a connect. Short lifetimes (tests) get a proportionally short margin.
fn margin(t: &Token) -> Duration {
    let life = t
        .expires_at
        .duration_since(t.refresh_at)
        .unwrap_or_default()
        * 5;
    (life / 10).min(Duration::from_secs(10))
}

/// Counters for the operations work's metrics and for tests.
#[derive(Debug, Default)]
pub struct TokenStats {
    pub generations: AtomicU64,
    pub failures: AtomicU64,
    pub cache_hits: AtomicU64,
}

/// Where signing credentials come from.
pub enum CredentialChain {
    /// Rebuild the AWS SDK's default chain for every signing. aws-config
    /// reads shared config/credentials files once per chain, so a chain
    /// kept for the process would never see a rotated or late-written
    /// profile file. Signing is rare (once per key per ~80% of a token's
    /// life, or after a refusal), so the rebuild costs nothing that matters.
    DefaultChain,
    /// Use this configuration's provider as is (tests, benchmarks, embedders).
    Fixed,
}

struct Signer {
    flavor: TokenFlavor,
    /// Region fallback, clock and (for `Fixed`) credentials.
    sdk: SdkConfig,
    chain: CredentialChain,
    expires_in: Duration,
    stats: TokenStats,
}

/// A [`CredentialSource`] that answers with IAM tokens.
pub struct IamTokens {
    signer: Arc<Signer>,
    slots: Mutex<HashMap<TokenKey, Arc<Slot>>>,
}

impl IamTokens {
    /// `sdk` supplies credentials, the default region and the clock.
    pub fn new(flavor: TokenFlavor, sdk: SdkConfig, expires_in: Duration) -> Self {
        Self::with_chain(flavor, sdk, CredentialChain::Fixed, expires_in)
    }

    /// Like [`Self::new`], choosing how credentials are found at signing.
    pub fn with_chain(
        flavor: TokenFlavor,
        sdk: SdkConfig,
        chain: CredentialChain,
        expires_in: Duration,
    ) -> Self {
        Self {
            signer: Arc::new(Signer {
                flavor,
                sdk,
                chain,
                expires_in,
                stats: TokenStats::default(),
            }),
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn stats(&self) -> &TokenStats {
        &self.signer.stats
    }

    fn key(&self, request: &CredentialRequest<'_>) -> Result<TokenKey, CredentialError> {
        let region = request
            .region
            .map(str::to_owned)
            .or_else(|| self.signer.sdk.region().map(|r| r.to_string()))
            .ok_or_else(|| {
                CredentialError::Unavailable(format!(
                    "no AWS region for endpoint {}: set the endpoint's region or AWS_REGION",
                    request.endpoint_host
                ))
            })?;
        let principal = match self.signer.flavor {
            TokenFlavor::Dsql => dsql_action(request.user).to_owned(),
            TokenFlavor::Rds => request.user.to_owned(),
        };
        Ok(TokenKey {
            host: request.endpoint_host.to_owned(),
            port: request.endpoint_port,
            region,
            principal,
        })
    }

    fn slot(&self, key: &TokenKey) -> Arc<Slot> {
        let now = self.signer.now();
        let stamp = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if !slots.contains_key(key) && slots.len() >= MAX_CACHED_KEYS {
            evict(&mut slots, now);
        }
        let slot = Arc::clone(slots.entry(key.clone()).or_default());
        slot.last_used.store(stamp, Ordering::Relaxed);
        slot
    }

    /// Keys cached now (at most [`MAX_CACHED_KEYS`]).
    pub fn cached_keys(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    async fn token(&self, request: CredentialRequest<'_>) -> Result<Secret, CredentialError> {
        let key = self.key(&request)?;
        let slot = self.slot(&key);
        let now = self.signer.now();
        if let Some(token) = slot.usable(now) {
            self.signer.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            if now >= token.refresh_at && !slot.refreshing.swap(true, Ordering::AcqRel) {
                let (signer, slot, key) = (Arc::clone(&self.signer), Arc::clone(&slot), key);
                tokio::spawn(async move {
                    let _signing = slot.signing.lock().await;
                    match signer.sign(&key).await {
                        Ok(token) => slot.store(token),
                        // The current token stays usable until it expires;
                        // the next connect after that retries on its path.
                        Err(e) => {
                            warn!(host = %key.host, error = %e, "background IAM token refresh failed")
                        }
                    }
                    slot.refreshing.store(false, Ordering::Release);
                });
            }
            return Ok(token.secret.clone());
        }
        let _signing = slot.signing.lock().await;
        // Another connect may have signed while we waited.
        if let Some(token) = slot.usable(self.signer.now()) {
            self.signer.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(token.secret.clone());
        }
        let token = self.signer.sign(&key).await?;
        let secret = token.secret.clone();
        slot.store(token);
        Ok(secret)
    }
}

impl CredentialSource for IamTokens {
    fn password<'a>(&'a self, request: CredentialRequest<'a>) -> CredentialFuture<'a> {
        Box::pin(self.token(request))
    }
    fn rejected(&self, request: CredentialRequest<'_>) {
        if let Ok(key) = self.key(&request) {
            // Dropped with its key: a refused user name takes no room.
            let removed = self
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            if let Some(slot) = removed {
                *slot.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            info!(host = %key.host, principal = %key.principal, "the server refused an IAM token; it will be re-signed");
        }
    }
    fn kind(&self) -> &'static str {
        match self.signer.flavor {
            TokenFlavor::Dsql => "dsql-iam",
            TokenFlavor::Rds => "rds-iam",
        }
    }

    fn token_counts(&self) -> Option<crate::TokenCounts> {
        let s = self.stats();
        Some(crate::TokenCounts {
            generations: s.generations.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            cache_hits: s.cache_hits.load(Ordering::Relaxed),
        })
    }
}

/// Makes room for one more key: drops every slot with no usable token that
/// no connect is using (signing or about to), then, if still full, the
/// least recently used one.
fn evict(slots: &mut HashMap<TokenKey, Arc<Slot>>, now: SystemTime) {
    slots.retain(|_, slot| Arc::strong_count(slot) > 1 || slot.usable(now).is_some());
    while slots.len() >= MAX_CACHED_KEYS {
        let Some(oldest) = slots
            .iter()
            .min_by_key(|(_, slot)| slot.last_used.load(Ordering::Relaxed))
            .map(|(key, _)| key.clone())
        else {
            return;
        };
        slots.remove(&oldest);
    }
}

/// DSQL's role to action rule: only the `admin` role uses DbConnectAdmin.
pub fn dsql_action(user: &str) -> &'static str {
    if user == "admin" {
        "DbConnectAdmin"
    } else {
        "DbConnect"
    }
}

impl Signer {
    fn now(&self) -> SystemTime {
        self.sdk
            .time_source()
            .map(|t| t.now())
            .unwrap_or_else(SystemTime::now)
    }

    async fn sign(&self, key: &TokenKey) -> Result<Token, CredentialError> {
        let result = self.sign_inner(key).await;
        match &result {
            Ok(_) => {
                self.stats.generations.fetch_add(1, Ordering::Relaxed);
                info!(host = %key.host, region = %key.region, principal = %key.principal, "signed a new IAM token");
            }
            Err(_) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    async fn sign_inner(&self, key: &TokenKey) -> Result<Token, CredentialError> {
        let provider = match self.chain {
            CredentialChain::Fixed => self.sdk.credentials_provider(),
            CredentialChain::DefaultChain => {
                aws_config::load_defaults(aws_config::BehaviorVersion::latest())
                    .await
                    .credentials_provider()
            }
        }
        .ok_or_else(|| {
            CredentialError::NoAwsCredentials("no AWS credentials provider is configured".into())
        })?;
        let credentials = provider.provide_credentials().await.map_err(describe)?;
        let now = self.now();
        if let Some(expiry) = credentials.expiry() {
            if expiry <= now {
                return Err(CredentialError::NoAwsCredentials(format!(
                    "the AWS credentials expired {}s ago",
                    now.duration_since(expiry).unwrap_or_default().as_secs()
                )));
            }
        }
        let token = match self.flavor {
            TokenFlavor::Dsql => self.sign_dsql(key, credentials.clone()).await?,
            TokenFlavor::Rds => sign_rds(key, &credentials, now, self.expires_in)?,
        };
        let mut expires_at = now + self.expires_in;
        if let Some(expiry) = credentials.expiry() {
            expires_at = expires_at.min(expiry);
        }
        let life = expires_at.duration_since(now).unwrap_or_default();
        Ok(Token {
            secret: Secret::new(token),
            refresh_at: now + life * 4 / 5,
            expires_at,
        })
    }

    async fn sign_dsql(
        &self,
        key: &TokenKey,
        credentials: Credentials,
    ) -> Result<String, CredentialError> {
        use aws_sdk_dsql::auth_token::{AuthTokenGenerator, Config};
        let config = Config::builder()
            .hostname(&key.host)
            .region(Region::new(key.region.clone()))
            .expires_in(self.expires_in.as_secs())
            // The credentials just fetched, so their expiry is the one we
            // recorded for the cache.
            .credentials(credentials)
            .build()
            .map_err(|e| CredentialError::Signing(e.to_string()))?;
        let generator = AuthTokenGenerator::new(config);
        let token = if key.principal == "DbConnectAdmin" {
            generator.db_connect_admin_auth_token(&self.sdk).await
        } else {
            generator.db_connect_auth_token(&self.sdk).await
        };
        token
            .map(|t| t.as_str().to_owned())
            .map_err(|e| CredentialError::Signing(e.to_string()))
    }
}

/// An RDS IAM token, as the RDS SDK's generator builds it: a presigned
/// `GET https://host:port/?Action=connect&DBUser=user` for service `rds-db`.
fn sign_rds(
    key: &TokenKey,
    credentials: &Credentials,
    now: SystemTime,
    expires_in: Duration,
) -> Result<String, CredentialError> {
    let signing = |e: &dyn std::fmt::Display| CredentialError::Signing(e.to_string());
    let identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.expires_in = Some(expires_in);
    settings.signature_location = SignatureLocation::QueryParams;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&key.region)
        .name("rds-db")
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| signing(&e))?;
    let mut url = url::Url::parse(&format!(
        "https://{}:{}/?Action=connect",
        key.host, key.port
    ))
    .map_err(|e| signing(&e))?;
    url.query_pairs_mut().append_pair("DBUser", &key.principal);
    let signable = SignableRequest::new(
        "GET",
        url.as_str(),
        std::iter::empty(),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| signing(&e))?;
    let (instructions, _) = http_request::sign(signable, &params.into())
        .map_err(|e| signing(&e))?
        .into_parts();
    for (name, value) in instructions.params() {
        url.query_pairs_mut().append_pair(name, value);
    }
    Ok(url.as_str().trim_start_matches("https://").to_owned())
}

/// Turns the SDK's credential errors into the causes an operator acts on.
fn describe(e: CredentialsError) -> CredentialError {
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    match e {
        CredentialsError::CredentialsNotLoaded(_) => CredentialError::NoAwsCredentials(format!(
            "no AWS credentials found (environment, shared config and credentials files, web identity, \
             container and instance metadata were tried): {chain}"
        )),
        CredentialsError::ProviderTimedOut(_) => {
            CredentialError::AwsProvider(format!("the AWS credentials provider timed out: {chain}"))
        }
        CredentialsError::InvalidConfiguration(_) => {
            CredentialError::NoAwsCredentials(format!("invalid AWS credentials configuration: {chain}"))
        }
        _ => CredentialError::AwsProvider(format!("the AWS credentials provider failed: {chain}")),
    }
}

#[cfg(test)]
mod tests;
