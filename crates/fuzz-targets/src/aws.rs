//! The AWS status readers fed canned HTTP answers: the real SDK clients
//! (`aws-sdk-route53`, `aws-sdk-rds`) with an in-process HTTP client that
//! answers every request with the bytes under test, so the SDK's XML
//! deserializers and the proxy's reading of their output are both
//! exercised, without a socket.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::Credentials;
use aws_smithy_async::rt::sleep::default_async_sleep;
use aws_smithy_runtime_api::client::behavior_version::BehaviorVersion;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::retry::RetryConfig;
use aws_types::region::Region;
use aws_types::sdk_config::SdkConfig;
use dsql_proxy_health::control_plane::{GlobalClusterSource, SdkGlobalClusters};
use dsql_proxy_health::route53::{route53_verdict, HealthCheckSource, SdkHealthChecks};

/// An HTTP status and body.
type Answer = (u16, Vec<u8>);

/// Answers requests in order from a queue; an empty queue answers 500.
#[derive(Debug, Clone, Default)]
struct Canned(Arc<Mutex<VecDeque<Answer>>>);

impl Canned {
    fn load(&self, answers: impl IntoIterator<Item = Answer>) {
        let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
        queue.clear();
        queue.extend(answers);
    }
}

impl HttpConnector for Canned {
    fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
        let (status, body) = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .unwrap_or((500, Vec::new()));
        let status = StatusCode::try_from(status).unwrap_or_else(|_| {
            StatusCode::try_from(500).unwrap_or_else(|_| unreachable!("500 is a status"))
        });
        HttpConnectorFuture::ready(Ok(HttpResponse::new(status, SdkBody::from(body))))
    }
}

impl HttpClient for Canned {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

struct Clients {
    canned: Canned,
    route53: SdkHealthChecks,
    rds: SdkGlobalClusters,
    runtime: tokio::runtime::Runtime,
}

fn clients() -> &'static Clients {
    static CLIENTS: OnceLock<Clients> = OnceLock::new();
    CLIENTS.get_or_init(|| {
        let canned = Canned::default();
        let config = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::from_static("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "AKIDFUZZ",
                "fuzz-secret",
                None,
                None,
                "fuzz",
            )))
            .http_client(SharedHttpClient::new(canned.clone()))
            .sleep_impl(default_async_sleep().unwrap_or_else(|| unreachable!("rt-tokio")))
            // One attempt: a retry would only replay the next canned answer.
            .retry_config(RetryConfig::disabled())
            .build();
        let timeout = Duration::from_secs(5);
        Clients {
            route53: SdkHealthChecks::from_sdk_config(&config, timeout),
            rds: SdkGlobalClusters::from_sdk_config(&config, timeout, None),
            canned,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}")),
        }
    })
}

/// First byte: which service and the HTTP status of the first answer
/// (200 unless its top bits say otherwise); the rest split in two bodies.
pub(crate) fn check(data: &[u8]) {
    let Some((selector, rest)) = data.split_first() else {
        return;
    };
    let (first, second) = match rest.split_first() {
        Some((n, rest)) => rest.split_at((usize::from(*n) * 16).min(rest.len())),
        None => (&[][..], &[][..]),
    };
    let status = match selector >> 5 {
        0..=4 => 200,
        5 => 400,
        6 => 403,
        _ => 503,
    };
    let c = clients();
    if selector & 1 == 0 {
        c.canned
            .load([(status, first.to_vec()), (200, second.to_vec())]);
        let reading = c.runtime.block_on(c.route53.read("hc-fuzz"));
        if let Ok(r) = reading {
            assert!(r.successes <= r.observations);
            if !r.disabled {
                assert_eq!(
                    Some(r.healthy),
                    route53_verdict(r.successes, r.observations, r.inverted)
                );
            } else {
                assert_eq!(r.healthy, !r.inverted);
            }
        }
    } else {
        c.canned.load([(status, rest.to_vec())]);
        if let Ok(view) = c.runtime.block_on(c.rds.describe("g-fuzz")) {
            if let Some(region) = view.writer_region() {
                let writers: Vec<_> = view.members.iter().filter(|m| m.is_writer).collect();
                assert_eq!(writers.len(), 1);
                assert_eq!(writers[0].region.as_deref(), Some(region));
            }
            if let Some(failover) = &view.failover {
                assert!(!failover.is_empty());
            }
        }
    }
}
