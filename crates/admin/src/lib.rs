//! The admin HTTP server (`[admin] address`): `/metrics` for Prometheus,
//! `/healthz`, `/startup` and `/readyz` for Kubernetes probes (none of them
//! dials the database), `/status` as JSON, and `POST /quitquitquit` to ask
//! for a graceful shutdown (batch Jobs).

mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use dsql_proxy_metrics::{Metrics, CONTENT_TYPE};
use dsql_proxy_routing::TableRouter;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

pub use status::status_json;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("cannot bind the admin server to {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// A hook that updates metric families just before they are rendered.
pub type MetricsRefresh = Box<dyn Fn(&Metrics) + Send + Sync>;

/// What the admin endpoints read.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub router: Arc<TableRouter>,
    /// Set once the listeners are bound and the first probe round is done.
    pub started: AtomicBool,
    /// Set when a graceful shutdown has begun.
    pub draining: AtomicBool,
    /// `[listen] max_client_connections`: at this many open client
    /// connections the proxy is not ready for more.
    pub client_limit: AtomicUsize,
    /// Notified by `POST /quitquitquit`.
    pub quit: Notify,
    /// The selection policy in words, for `/status`; replaced on reload.
    pub policy: ArcSwap<serde_json::Value>,
    /// Runs before each `/metrics` render: copies counters kept elsewhere
    /// (the IAM token cache's) into their families.
    pub before_render: Option<MetricsRefresh>,
}

pub struct AdminServer {
    listener: TcpListener,
}

impl AdminServer {
    pub async fn bind(address: SocketAddr) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| AdminError::Bind { address, source })?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the process ends; each connection on its own task.
    pub async fn serve(self, state: Arc<AdminState>) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(handle(&state, req)) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    debug!(client = %peer, error = %e, "admin connection ended with an error");
                }
            });
        }
    }
}

fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            if let Some(refresh) = &state.before_render {
                refresh(&state.metrics);
            }
            backpressure_gauges(state);
            reply(StatusCode::OK, CONTENT_TYPE, state.metrics.render())
        }
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/startup") => {
            if state.started.load(Ordering::Acquire) {
                text(StatusCode::OK, "started\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
            }
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            let (ready, why) = readiness(state);
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(code, &format!("{why}\n"))
        }
        (&Method::GET | &Method::HEAD, "/status") => {
            let router = &state.router;
            let body = status_json(
                &router.snapshot(),
                &state.metrics,
                &state.policy.load(),
                |id| router.busy_remaining(id),
            );
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&body).unwrap_or_default() + "\n",
            )
        }
        (&Method::POST, "/quitquitquit") => {
            info!("graceful shutdown requested through /quitquitquit");
            state.quit.notify_one();
            text(StatusCode::OK, "shutting down\n")
        }
        (_, "/metrics" | "/healthz" | "/startup" | "/readyz" | "/status" | "/quitquitquit") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Busy cooldowns end on their own, so their gauges are read when scraped.
fn backpressure_gauges(state: &AdminState) {
    let table = state.router.snapshot();
    for e in table.endpoints() {
        let busy = state.router.busy_remaining(e.id).is_some();
        state
            .metrics
            .endpoint_backpressure
            .with_label_values(&[e.name.as_str(), e.region_label()])
            .set(i64::from(busy));
    }
}

/// Ready means new sessions can be served: started, not draining, below
/// the client limit, and some endpoint routable. Nothing here dials the
/// database; the probes' last verdict is used.
fn readiness(state: &AdminState) -> (bool, &'static str) {
    if !state.started.load(Ordering::Acquire) {
        return (false, "starting");
    }
    if state.draining.load(Ordering::Acquire) {
        return (false, "draining");
    }
    let open = usize::try_from(state.metrics.client_connections_active.get()).unwrap_or(0);
    if open >= state.client_limit.load(Ordering::Acquire) {
        return (false, "at max_client_connections");
    }
    if state.router.snapshot().selected().is_none() {
        return (false, "no endpoint is routable");
    }
    (true, "ready")
}

fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    reply(code, "text/plain; charset=utf-8", body.to_owned())
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsql_proxy_routing::{Endpoint, RoutingTable};

    fn state(limit: usize) -> AdminState {
        let endpoint = Endpoint {
            id: dsql_proxy_routing::EndpointId(0),
            name: "a".into(),
            region: None,
            host: "db.example".into(),
            port: 5432,
            connect_address: None,
            priority: 1,
            route53_health_check_id: None,
        };
        AdminState {
            metrics: Arc::new(Metrics::new("test").unwrap()),
            router: Arc::new(TableRouter::new(RoutingTable::by_priority(vec![Arc::new(
                endpoint,
            )]))),
            started: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            client_limit: AtomicUsize::new(limit),
            quit: Notify::new(),
            policy: ArcSwap::from_pointee(serde_json::Value::Null),
            before_render: None,
        }
    }

    #[test]
    fn readiness_follows_startup_drain_and_the_client_limit() {
        let s = state(2);
        assert_eq!(readiness(&s), (true, "ready"));
        s.metrics.client_connections_active.set(2);
        assert_eq!(readiness(&s), (false, "at max_client_connections"));
        s.metrics.client_connections_active.set(1);
        assert!(readiness(&s).0);
        s.draining.store(true, Ordering::Release);
        assert_eq!(readiness(&s), (false, "draining"));
        s.started.store(false, Ordering::Release);
        assert_eq!(readiness(&s), (false, "starting"));
    }
}
