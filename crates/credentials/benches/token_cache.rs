//! Cost of the credential lookup on the connect path: a cached IAM token
//! against a configured password. Run: `cargo bench -p dsql-proxy-credentials`.
//! Target (IAM issue): the cached token path adds under 50 µs per connection.

use std::time::{Duration, Instant};

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::Credentials;
use aws_types::region::Region;
use aws_types::SdkConfig;
use dsql_proxy_config::{PasswordSource, Secret};
use dsql_proxy_credentials::{
    CredentialRequest, CredentialSource, IamTokens, StaticPassword, TokenFlavor,
};

const CALLS: u32 = 200_000;

fn request() -> CredentialRequest<'static> {
    CredentialRequest {
        endpoint_host: "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws",
        endpoint_port: 5432,
        region: Some("us-east-1"),
        user: "admin",
        client_password: None,
    }
}

async fn per_call(source: &dyn CredentialSource) -> Duration {
    // Warm: the first IAM call signs; every later one is a cache hit.
    source.password(request()).await.expect("credentials");
    let started = Instant::now();
    for _ in 0..CALLS {
        let secret = source.password(request()).await.expect("credentials");
        std::hint::black_box(secret);
    }
    started.elapsed() / CALLS
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let iam = IamTokens::new(TokenFlavor::Dsql, iam_sdk(), Duration::from_secs(900));
        let password = StaticPassword::new(PasswordSource::Inline(Secret::new("bench-secret")));

        let sign_started = Instant::now();
        let fresh = IamTokens::new(TokenFlavor::Dsql, iam_sdk(), Duration::from_secs(900));
        fresh.password(request()).await.expect("sign");
        let signing = sign_started.elapsed();

        let iam_cost = per_call(&iam).await;
        let password_cost = per_call(&password).await;
        let added = iam_cost.saturating_sub(password_cost);
        println!("credential lookup per connect ({CALLS} calls each)");
        println!(
            "  password (inline)        {:>10.3} us",
            password_cost.as_secs_f64() * 1e6
        );
        println!(
            "  dsql-iam (cached token)  {:>10.3} us",
            iam_cost.as_secs_f64() * 1e6
        );
        println!(
            "  added by the cached IAM path: {:.3} us   target < 50 us: {}",
            added.as_secs_f64() * 1e6,
            if added < Duration::from_micros(50) {
                "PASS"
            } else {
                "MISS"
            }
        );
        println!(
            "  one signing (cache miss, static credentials): {:.1} us",
            signing.as_secs_f64() * 1e6
        );
    });
}

fn iam_sdk() -> SdkConfig {
    SdkConfig::builder()
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "AKIDEXAMPLE",
            "secret",
            None,
            None,
            "bench",
        )))
        .time_source(aws_smithy_async::time::SystemTimeSource::new())
        .build()
}
