//! The admin HTTP server (`[admin] address`): `/metrics` for Prometheus,
//! `/healthz`, `/startup` and `/readyz` for Kubernetes probes (none of them
//! dials the database), `/status` as JSON, `POST /quitquitquit` to ask
//! for a graceful shutdown (batch Jobs; only with `[admin] quitquitquit`),
//! `POST /endpoints/<name>/drain` and `/undrain` to take an endpoint out of
//! (and back into) rotation for new sessions, and, only under `dsql-proxy
//! demo`, `POST /demo/...` (see [`DemoControl`]).
//!
//! Security model ([`access`]): the read-only routes answer anyone who can
//! reach the address; the mutating ones only a loopback peer, or a request
//! with the bearer token from `[admin] token_file`. A browser page cannot
//! use either: requests with a cross-site `Origin` or `Sec-Fetch-Site` are
//! refused, and a loopback peer must name the server by address or
//! `localhost` (a DNS-rebound name is refused). At most
//! `[admin] max_connections` connections are served at once.

pub mod access;
mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use dsql_proxy_metrics::{Metrics, CONTENT_TYPE};
use dsql_proxy_routing::{RouteError, TableRouter};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

pub use status::status_json;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("cannot bind the admin server to {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    /// A demo command named something that does not exist (HTTP 404).
    #[error("{0}")]
    DemoUnknown(String),
    /// A demo command with bad arguments (HTTP 400).
    #[error("{0}")]
    DemoInvalid(String),
}

/// The demo's control commands over HTTP: `POST /demo/<command>/<args>...`
/// (e.g. `/demo/fail/us-east-1`, `/demo/slow/us-east-1/120`). The admin
/// server only routes; `dsql-proxy demo` fills this in, and without it
/// every `/demo/` path is 404.
pub trait DemoControl: Send + Sync {
    /// Runs one command; the answer text, or [`AdminError::DemoUnknown`] /
    /// [`AdminError::DemoInvalid`].
    fn command(&self, command: &str, args: &[&str]) -> Result<String, AdminError>;
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
    /// Set only by `dsql-proxy demo`: serves `POST /demo/...`.
    pub demo: Option<Arc<dyn DemoControl>>,
    /// Who may use the mutating routes.
    pub access: AdminAccess,
}

/// `[admin]`'s rules for the mutating routes.
#[derive(Debug, Clone, Default)]
pub struct AdminAccess {
    /// The bearer token non-loopback peers must present, read from this
    /// file on each request that presents one (so a rotated Secret works
    /// without a restart or reload).
    pub token_file: Option<PathBuf>,
    /// Serve `POST /quitquitquit`.
    pub quitquitquit: bool,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
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

    /// Serves until the process ends; each connection on its own task, at
    /// most `[admin] max_connections` at once (more are closed at once: a
    /// flood of idle connections cannot starve the kubelet's probes for
    /// longer than it keeps them open, and never holds more tasks).
    pub async fn serve(self, state: Arc<AdminState>) {
        let permits = Arc::new(Semaphore::new(state.access.max_connections.max(1)));
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                debug!(client = %peer, limit = state.access.max_connections, "admin connection limit reached; connection closed");
                continue;
            };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(handle(&state, peer, req)) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    debug!(client = %peer, error = %e, "admin connection ended with an error");
                }
                drop(permit);
            });
        }
    }
}

fn handle(state: &AdminState, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(why) = access::cross_site(req.headers()) {
        debug!(client = %peer, why, "admin request refused: cross-site");
        return text(
            StatusCode::FORBIDDEN,
            &format!("forbidden: {why}; the admin API takes no requests from web pages\n"),
        );
    }
    let path = req.uri().path();
    let mutating = access::is_mutating(req.method(), path);
    if mutating && path == "/quitquitquit" && !state.access.quitquitquit {
        return text(
            StatusCode::NOT_FOUND,
            "not found: POST /quitquitquit is off; set [admin] quitquitquit = true to serve it\n",
        );
    }
    if mutating {
        if let Err(refusal) =
            access::authorize(state.access.token_file.as_deref(), peer, req.headers())
        {
            warn!(client = %peer, method = %req.method(), path, reason = %refusal, "admin request refused");
            return text(refusal.status(), &format!("{refusal}\n"));
        }
    }
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
                |id| router.manual().is_drained(id),
            );
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&body).unwrap_or_default() + "\n",
            )
        }
        (&Method::POST, "/quitquitquit") => {
            info!(client = %peer, "graceful shutdown requested through /quitquitquit");
            state.quit.notify_one();
            text(StatusCode::OK, "shutting down\n")
        }
        (_, "/metrics" | "/healthz" | "/startup" | "/readyz" | "/status" | "/quitquitquit") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        (method, path) => {
            if let Some(rest) = path.strip_prefix("/endpoints/") {
                drain_route(state, method, rest)
            } else if let Some(rest) = path.strip_prefix("/demo/") {
                demo_route(state, method, rest)
            } else {
                text(StatusCode::NOT_FOUND, "not found\n")
            }
        }
    }
}

/// `POST /endpoints/<name>/drain` and `/undrain`.
fn drain_route(state: &AdminState, method: &Method, rest: &str) -> Response<Full<Bytes>> {
    let (name, drained) = match rest.rsplit_once('/') {
        Some((name, "drain")) if !name.is_empty() => (name, true),
        Some((name, "undrain")) if !name.is_empty() => (name, false),
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if method != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use POST\n",
        );
    }
    match state.router.set_drained(name, drained) {
        Ok((_, changed)) => {
            let what = if drained { "drained" } else { "restored" };
            if changed {
                info!(endpoint = name, "endpoint {what} through the admin API");
            }
            let answer = match (drained, changed) {
                (true, true) => format!("endpoint {name} drained: new sessions go to other endpoints; with [routing] on_endpoint_down = \"move\" (the default) open sessions move at their next idle point, otherwise they are left alone\n"),
                (true, false) => format!("endpoint {name} was already drained\n"),
                (false, true) => format!("endpoint {name} restored: it takes new sessions again when the selection picks it\n"),
                (false, false) => format!("endpoint {name} was not drained\n"),
            };
            text(StatusCode::OK, &answer)
        }
        Err(e @ RouteError::UnknownEndpoint { .. }) => {
            text(StatusCode::NOT_FOUND, &format!("{e}\n"))
        }
        Err(e) => text(StatusCode::CONFLICT, &format!("{e}\n")),
    }
}

/// `POST /demo/<command>/<args>...`, when the demo is running.
fn demo_route(state: &AdminState, method: &Method, rest: &str) -> Response<Full<Bytes>> {
    let Some(demo) = &state.demo else {
        return text(
            StatusCode::NOT_FOUND,
            "not found: /demo/ routes exist only under `dsql-proxy demo`\n",
        );
    };
    if method != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use POST\n",
        );
    }
    let mut parts = rest.split('/').filter(|p| !p.is_empty());
    let Some(command) = parts.next() else {
        return text(
            StatusCode::NOT_FOUND,
            "not found: POST /demo/<command>/<args>\n",
        );
    };
    let args: Vec<&str> = parts.collect();
    match demo.command(command, &args) {
        Ok(answer) => text(StatusCode::OK, &format!("{}\n", answer.trim_end())),
        Err(e @ AdminError::DemoInvalid(_)) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        Err(e) => text(StatusCode::NOT_FOUND, &format!("{e}\n")),
    }
}

/// Busy cooldowns end on their own, so their gauges are read when scraped;
/// series of endpoints no longer in the table (a reload removed them) go.
fn backpressure_gauges(state: &AdminState) {
    let table = state.router.snapshot();
    let gauges = &state.metrics.endpoint_backpressure;
    for e in table.endpoints() {
        let busy = state.router.busy_remaining(e.id).is_some();
        gauges
            .with_label_values(&[e.name.as_str(), e.region_label()])
            .set(i64::from(busy));
    }
    state.metrics.retain_backpressure(|name, region| {
        table
            .endpoints()
            .iter()
            .any(|e| e.name == name && e.region_label() == region)
    });
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
            demo: None,
            access: AdminAccess::default(),
        }
    }

    fn body(response: Response<Full<Bytes>>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let code = response.status();
        let bytes = futures_lite_block(response.into_body().collect());
        (
            code,
            String::from_utf8_lossy(&bytes.map(|b| b.to_bytes()).unwrap_or_default()).into_owned(),
        )
    }

    /// The bodies here are `Full`: ready on the first poll.
    fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn drain_routes_name_endpoints_and_need_post() {
        let mut s = state(10);
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let table = s.router.snapshot().as_ref().clone();
        s.router = Arc::new(TableRouter::new(table).with_reports(tx));
        let (code, text) = body(drain_route(&s, &Method::POST, "nope/drain"));
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert!(
            text.contains("no endpoint is named \"nope\" (endpoints: a)"),
            "{text}"
        );
        let (code, text) = body(drain_route(&s, &Method::POST, "a/drain"));
        assert_eq!(code, StatusCode::OK, "{text}");
        assert!(s
            .router
            .manual()
            .is_drained(dsql_proxy_routing::EndpointId(0)));
        assert_eq!(
            body(drain_route(&s, &Method::GET, "a/drain")).0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            body(drain_route(&s, &Method::POST, "a/flood")).0,
            StatusCode::NOT_FOUND
        );
        let (code, _) = body(drain_route(&s, &Method::POST, "a/undrain"));
        assert_eq!(code, StatusCode::OK);
        assert!(!s
            .router
            .manual()
            .is_drained(dsql_proxy_routing::EndpointId(0)));
    }

    struct Echo;
    impl DemoControl for Echo {
        fn command(&self, command: &str, args: &[&str]) -> Result<String, AdminError> {
            match command {
                "echo" => Ok(args.join(" ")),
                "bad" => Err(AdminError::DemoInvalid("bad arguments".into())),
                other => Err(AdminError::DemoUnknown(format!("no command {other}"))),
            }
        }
    }

    #[test]
    fn demo_routes_are_404_unless_the_demo_fills_them() {
        let mut s = state(10);
        let (code, text) = body(demo_route(&s, &Method::POST, "fail/a"));
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert!(text.contains("dsql-proxy demo"), "{text}");
        s.demo = Some(Arc::new(Echo));
        assert_eq!(
            body(demo_route(&s, &Method::POST, "echo/x/1")),
            (StatusCode::OK, "x 1\n".to_owned())
        );
        assert_eq!(
            body(demo_route(&s, &Method::POST, "bad")).0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            body(demo_route(&s, &Method::POST, "zap")).0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            body(demo_route(&s, &Method::GET, "echo")).0,
            StatusCode::METHOD_NOT_ALLOWED
        );
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
