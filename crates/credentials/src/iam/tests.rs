use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{future, ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_smithy_async::time::{SharedTimeSource, TimeSource};
use aws_types::region::Region;
use aws_types::SdkConfig;

use super::*;

/// 2024-08-27T00:00:00Z, the time of the SDKs' published test vectors.
const VECTOR_TIME: u64 = 1_724_716_800;

/// A clock tests move by hand; the token cache reads the SDK's time source.
#[derive(Debug, Clone)]
struct TestClock(Arc<AtomicU64>);

impl TestClock {
    fn at(secs: u64) -> Self {
        Self(Arc::new(AtomicU64::new(secs * 1000)))
    }
    fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl TimeSource for TestClock {
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.0.load(Ordering::SeqCst))
    }
}

/// Credentials that tests can swap or break while the cache runs.
#[derive(Debug, Clone)]
struct Swappable(Arc<std::sync::Mutex<Option<Credentials>>>, Arc<AtomicU64>);

impl Swappable {
    fn new(c: Option<Credentials>) -> Self {
        Self(
            Arc::new(std::sync::Mutex::new(c)),
            Arc::new(AtomicU64::new(0)),
        )
    }
    fn set(&self, c: Option<Credentials>) {
        *self.0.lock().unwrap() = c;
    }
    fn calls(&self) -> u64 {
        self.1.load(Ordering::SeqCst)
    }
}

impl ProvideCredentials for Swappable {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        self.1.fetch_add(1, Ordering::SeqCst);
        let result = self.0.lock().unwrap().clone().ok_or_else(|| {
            CredentialsError::not_loaded("no providers in chain provided credentials")
        });
        future::ProvideCredentials::ready(result)
    }
}

fn sdk(creds: impl ProvideCredentials + 'static, clock: &TestClock) -> SdkConfig {
    SdkConfig::builder()
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(creds))
        .time_source(SharedTimeSource::new(clock.clone()))
        .build()
}

fn request<'a>(host: &'a str, user: &'a str) -> CredentialRequest<'a> {
    CredentialRequest {
        endpoint_host: host,
        endpoint_port: 5432,
        region: Some("us-east-1"),
        user,
        client_password: None,
    }
}

fn signature(token: &str) -> &str {
    token
        .split('&')
        .find_map(|p| p.strip_prefix("X-Amz-Signature="))
        .expect("token has a signature")
}

#[tokio::test]
async fn dsql_tokens_match_the_sdk_vectors() {
    let clock = TestClock::at(VECTOR_TIME);
    let creds = Credentials::new("akid", "secret", None, None, "test");
    let tokens = IamTokens::new(
        TokenFlavor::Dsql,
        sdk(creds, &clock),
        Duration::from_secs(450),
    );
    let host = "peccy.dsql.us-east-1.on.aws";
    let user_token = tokens.password(request(host, "app")).await.unwrap();
    assert_eq!(
        signature(user_token.expose()),
        "f5f2ad764ca5df44045d4ab6ccecba0eef941b0007e5765885a0b6ed3702a3f8"
    );
    assert!(user_token
        .expose()
        .starts_with("peccy.dsql.us-east-1.on.aws/?Action=DbConnect&"));
    let admin_token = tokens.password(request(host, "admin")).await.unwrap();
    assert_eq!(
        signature(admin_token.expose()),
        "267cf8d04d84444f7a62d5bdb40c44bfc6cb13dd6c64fa7f772df6bbaa90fff1"
    );

    let clock = TestClock::at(VECTOR_TIME);
    let creds = Credentials::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        None,
        None,
        "test",
    );
    let tokens = IamTokens::new(
        TokenFlavor::Dsql,
        sdk(creds, &clock),
        Duration::from_secs(900),
    );
    let token = tokens
        .password(request(
            "abcdefghijklmnopqrst.dsql.us-east-1.on.aws",
            "admin",
        ))
        .await
        .unwrap();
    assert_eq!(
        signature(token.expose()),
        "3f2c875dfc306cfc997a0493eb0657812b253f307c783c412492232d36459b3f"
    );
}

#[tokio::test]
async fn rds_tokens_sign_host_port_and_user() {
    let clock = TestClock::at(VECTOR_TIME);
    let creds = Credentials::new(
        "AKIDEXAMPLE",
        "secret",
        Some("session-token".into()),
        None,
        "test",
    );
    let tokens = IamTokens::new(
        TokenFlavor::Rds,
        sdk(creds, &clock),
        Duration::from_secs(900),
    );
    let mut req = request("db.cluster-abc.us-east-1.rds.amazonaws.com", "app_user");
    req.endpoint_port = 5433;
    let token = tokens.password(req).await.unwrap();
    let t = token.expose();
    assert!(
        t.starts_with(
            "db.cluster-abc.us-east-1.rds.amazonaws.com:5433/?Action=connect&DBUser=app_user&"
        ),
        "{t}"
    );
    for part in [
        "X-Amz-Algorithm=AWS4-HMAC-SHA256",
        "X-Amz-Credential=AKIDEXAMPLE%2F20240827%2Fus-east-1%2Frds-db%2Faws4_request",
        "X-Amz-Date=20240827T000000Z",
        "X-Amz-Expires=900",
        "X-Amz-SignedHeaders=host",
        "X-Amz-Security-Token=session-token",
    ] {
        assert!(t.contains(part), "{part} missing from {t}");
    }
    assert_eq!(signature(t).len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_share_one_signature_and_hits_do_not_sign() {
    let clock = TestClock::at(VECTOR_TIME);
    let provider = Swappable::new(Some(Credentials::new("a", "s", None, None, "t")));
    let tokens = Arc::new(IamTokens::new(
        TokenFlavor::Dsql,
        sdk(provider.clone(), &clock),
        Duration::from_secs(900),
    ));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let tokens = Arc::clone(&tokens);
        tasks.push(tokio::spawn(async move {
            tokens
                .password(request("c.dsql.us-east-1.on.aws", "app"))
                .await
                .unwrap()
                .expose()
                .to_owned()
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap());
    }
    assert_eq!(seen.len(), 1, "all connects got the same token");
    assert_eq!(tokens.stats().generations.load(Ordering::SeqCst), 1);
    assert_eq!(provider.calls(), 1);
    // Admin and non-admin roles are separate cache entries.
    tokens
        .password(request("c.dsql.us-east-1.on.aws", "admin"))
        .await
        .unwrap();
    tokens
        .password(request("c.dsql.us-east-1.on.aws", "other_role"))
        .await
        .unwrap();
    assert_eq!(tokens.stats().generations.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_in_the_background_and_never_serves_expired_tokens() {
    let clock = TestClock::at(VECTOR_TIME);
    let provider = Swappable::new(Some(Credentials::new("a", "s", None, None, "t")));
    let tokens = IamTokens::new(
        TokenFlavor::Dsql,
        sdk(provider.clone(), &clock),
        Duration::from_secs(100),
    );
    let host = "c.dsql.us-east-1.on.aws";
    let first = tokens.password(request(host, "app")).await.unwrap();

    // Before 80% of the lifetime: a plain hit.
    clock.advance(Duration::from_secs(70));
    assert_eq!(tokens.password(request(host, "app")).await.unwrap(), first);
    assert_eq!(tokens.stats().generations.load(Ordering::SeqCst), 1);

    // Past 80%: still served from the cache, and a refresh starts.
    clock.advance(Duration::from_secs(15));
    assert_eq!(tokens.password(request(host, "app")).await.unwrap(), first);
    for _ in 0..100 {
        if tokens.stats().generations.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        tokens.stats().generations.load(Ordering::SeqCst),
        2,
        "background refresh"
    );
    let refreshed = tokens.password(request(host, "app")).await.unwrap();
    assert_ne!(refreshed, first);

    // Credentials gone and the token expired: an error, not a stale token.
    provider.set(None);
    clock.advance(Duration::from_secs(200));
    let err = tokens.password(request(host, "app")).await.unwrap_err();
    assert!(
        matches!(err, CredentialError::NoAwsCredentials(_)),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("no AWS credentials found"),
        "{err}"
    );
}

#[tokio::test]
async fn token_life_is_capped_by_the_credentials_expiry() {
    let clock = TestClock::at(VECTOR_TIME);
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(VECTOR_TIME + 60);
    let provider = Swappable::new(Some(Credentials::new(
        "a",
        "s",
        Some("tok".into()),
        Some(expiry),
        "t",
    )));
    let tokens = IamTokens::new(
        TokenFlavor::Dsql,
        sdk(provider.clone(), &clock),
        Duration::from_secs(3600),
    );
    let host = "c.dsql.us-east-1.on.aws";
    tokens.password(request(host, "app")).await.unwrap();
    // 70 s later the session token is dead, so the cached token is too.
    clock.advance(Duration::from_secs(70));
    let err = tokens.password(request(host, "app")).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    // Rotated credentials are picked up on the next signing.
    provider.set(Some(Credentials::new("b", "s2", None, None, "t")));
    let token = tokens.password(request(host, "app")).await.unwrap();
    assert!(
        token.expose().contains("X-Amz-Credential=b%2F"),
        "{}",
        token.expose()
    );
}

/// `rds-iam` keys carry client-chosen user names: the cache stays within
/// MAX_CACHED_KEYS however many a client tries, keeps the users in use,
/// and forgets a user whose token the server refused.
#[tokio::test]
async fn the_rds_token_cache_is_bounded_and_evicts() {
    let clock = TestClock::at(VECTOR_TIME);
    let creds = Credentials::new("akid", "secret", None, None, "test");
    let tokens = IamTokens::new(
        TokenFlavor::Rds,
        sdk(creds, &clock),
        Duration::from_secs(900),
    );
    let host = "db.cluster-x.us-east-1.rds.amazonaws.com";
    tokens.password(request(host, "app")).await.unwrap();
    for i in 0..MAX_CACHED_KEYS + 200 {
        clock.advance(Duration::from_millis(10));
        let user = format!("guess-{i}");
        tokens.password(request(host, &user)).await.unwrap();
        if i % 100 == 0 {
            // The application's own user stays in use, so it stays cached.
            clock.advance(Duration::from_secs(1));
            tokens.password(request(host, "app")).await.unwrap();
        }
        assert!(tokens.cached_keys() <= MAX_CACHED_KEYS);
    }
    assert_eq!(tokens.cached_keys(), MAX_CACHED_KEYS);
    let signed = tokens.stats().generations.load(Ordering::SeqCst);
    tokens.password(request(host, "app")).await.unwrap();
    assert_eq!(
        tokens.stats().generations.load(Ordering::SeqCst),
        signed,
        "the user in use was kept"
    );
    tokens.password(request(host, "guess-0")).await.unwrap();
    assert_eq!(
        tokens.stats().generations.load(Ordering::SeqCst),
        signed + 1,
        "the oldest guess was evicted"
    );
    // A refused user leaves the cache at once.
    let before = tokens.cached_keys();
    tokens.rejected(request(host, "guess-0"));
    assert_eq!(tokens.cached_keys(), before - 1);
}
