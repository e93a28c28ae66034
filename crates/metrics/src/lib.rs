//! Every Prometheus metric family the proxy exports, registered once in a
//! private registry. Crates that count things get an `Arc<Metrics>`; label
//! sets are small and bounded (endpoint and Region names come from the
//! config, reasons from fixed lists).

use prometheus::{
    exponential_buckets, Counter, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use thiserror::Error;

/// Handle types, for crates that keep resolved label sets.
pub use prometheus::{Gauge, Histogram, IntCounter, IntGauge};

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("metric registration: {0}")]
    Register(#[from] prometheus::Error),
}

const PREFIX: &str = "dsql_proxy";

pub struct Metrics {
    registry: Registry,
    pub endpoint_up: IntGaugeVec,
    pub endpoint_latency_seconds: HistogramVec,
    pub endpoint_selected: IntGaugeVec,
    pub endpoint_drained: IntGaugeVec,
    pub route_changes_total: IntCounter,
    pub failovers_total: IntCounter,
    pub probe_failures_total: IntCounterVec,
    pub route53_healthy: IntGaugeVec,
    pub route53_errors_total: IntCounterVec,
    pub client_connections_total: IntCounter,
    pub client_connections_active: IntGauge,
    pub client_connections_rejected_total: IntCounterVec,
    pub backend_connect_seconds: HistogramVec,
    pub backend_connect_failures_total: IntCounterVec,
    pub backend_connect_rate_limited_total: IntCounter,
    pub backend_connect_queue_waiting: IntGauge,
    pub endpoint_backpressure: IntGaugeVec,
    pub sessions_active: IntGaugeVec,
    pub sessions_closed_total: IntCounterVec,
    pub session_duration_seconds: Histogram,
    pub sessions_moved_total: IntCounterVec,
    pub session_moves_failed_total: IntCounterVec,
    pub sessions_pinned: IntGaugeVec,
    pub session_move_seconds: Histogram,
    pub retries_total: IntCounterVec,
    pub retry_not_eligible_total: IntCounterVec,
    pub retry_tries: Histogram,
    pub pool_checkouts_total: IntCounterVec,
    pub pool_idle: IntGaugeVec,
    pub pool_discards_total: IntCounterVec,
    pub bytes_total: IntCounterVec,
    pub cancel_requests_total: IntCounter,
    pub token_generations_total: IntCounter,
    pub token_generation_failures_total: IntCounter,
    pub token_cache_hits_total: IntCounter,
    pub config_reloads_total: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub writer: IntGaugeVec,
    pub endpoint_fenced: IntGaugeVec,
    pub replica_lag_seconds: GaugeVec,
    pub writer_changes_total: IntCounter,
    pub no_writer_seconds_total: Counter,
}

const ENDPOINT: &[&str] = &["endpoint", "region"];

/// Why a probe or a connect attempt failed at the transport level (the
/// routing crate's `FailureKind` but `query`, tested to match).
pub const TRANSPORT_FAILURE_REASONS: [&str; 6] = [
    "connection",
    "timeout",
    "tls",
    "protocol",
    "unavailable",
    "busy",
];

/// `probe_failures_total{reason}`: the transport reasons and a failed
/// probe query.
pub fn probe_failure_reasons() -> impl Iterator<Item = &'static str> {
    TRANSPORT_FAILURE_REASONS.into_iter().chain(["query"])
}

/// `backend_connect_failures_total{reason}`: the transport reasons (the
/// connect moves to the next endpoint), a server's refusal passed to the
/// client (`backend_refused`), a credential failure (`rejected`), a
/// cleartext password request the proxy would not answer
/// (`backend_auth_declined`) and unusable TLS settings (`setup_error`).
pub fn connect_failure_reasons() -> impl Iterator<Item = &'static str> {
    TRANSPORT_FAILURE_REASONS.into_iter().chain([
        "backend_refused",
        "rejected",
        "backend_auth_declined",
        "setup_error",
    ])
}

/// `sessions_moved_total{reason}`: why a session left its backend.
pub const MOVE_REASONS: [&str; 5] = [
    "lifetime",
    "endpoint_down",
    "drained",
    "writer_changed",
    "backend_lost",
];

/// `session_moves_failed_total{cause}`: why a session that had to leave
/// its backend could not move (`connect`, `restore`: the new backend could
/// not be reached or refused the session's state; `busy`: inside a
/// transaction or a request in flight; `pinned`; `state_unknown`: the
/// backend was lost before its state was read).
pub const MOVE_FAILURE_CAUSES: [&str; 5] =
    ["connect", "restore", "busy", "pinned", "state_unknown"];

/// `sessions_pinned{cause}`: why a session cannot move (the protocol
/// crate's `Pins` labels, tested to match).
pub const PIN_CAUSES: [&str; 6] = [
    "listen",
    "hold_cursor",
    "temp_table",
    "advisory_lock",
    "state_too_large",
    "unclassifiable",
];

/// `retries_total{outcome}`: a retried request finally succeeded, or ran
/// out of tries (its client got the last error).
pub const RETRY_OUTCOMES: [&str; 2] = ["succeeded", "exhausted"];

/// `retry_not_eligible_total{cause}`: why a request whose answer carried a
/// retryable SQLSTATE was not retried (the protocol crate's `NotEligible`
/// labels, tested to match).
pub const RETRY_NOT_ELIGIBLE_CAUSES: [&str; 8] = [
    "pipelined",
    "too_large",
    "in_transaction",
    "transaction_control",
    "not_transactional",
    "protocol",
    "cancelled",
    "session_ending",
];

/// `pool_checkouts_total{result}`.
pub const POOL_CHECKOUT_RESULTS: [&str; 2] = ["hit", "miss"];

/// `pool_discards_total{reason}`: why a backend connection was closed
/// instead of pooled (`reset_failed`, `pinned`, `busy`: not idle when its
/// client left, `full`) or taken from the pool (`lifetime`,
/// `idle_timeout`, `endpoint_down`, `drained`, `closed`: the server
/// closed it while it waited, `shutdown`).
pub const POOL_DISCARD_REASONS: [&str; 10] = [
    "reset_failed",
    "pinned",
    "busy",
    "full",
    "lifetime",
    "idle_timeout",
    "endpoint_down",
    "drained",
    "closed",
    "shutdown",
];

impl Metrics {
    /// Checkouts by result, discards by reason and idle connections by
    /// endpoint, for `/status`.
    pub fn pool_counts(&self) -> [(&'static str, Vec<(String, u64)>); 3] {
        let counter = |vec: &IntCounterVec, label: &str| {
            vec.get_metric_with_label_values(&[label])
                .map_or(0, |c| c.get())
        };
        let idle = prometheus::core::Collector::collect(&self.pool_idle)
            .iter()
            .flat_map(|family| family.get_metric().to_vec())
            .map(|m| {
                let endpoint = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "endpoint")
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default();
                (endpoint, m.get_gauge().get_value().max(0.0) as u64)
            })
            .collect();
        [
            (
                "checkouts",
                POOL_CHECKOUT_RESULTS
                    .iter()
                    .map(|r| ((*r).to_owned(), counter(&self.pool_checkouts_total, r)))
                    .collect(),
            ),
            (
                "discards",
                POOL_DISCARD_REASONS
                    .iter()
                    .map(|r| ((*r).to_owned(), counter(&self.pool_discards_total, r)))
                    .collect(),
            ),
            ("idle", idle),
        ]
    }

    /// Creates the retry series for these SQLSTATEs at 0, so `rate()` and
    /// alerts see them before the first conflict. Idempotent.
    pub fn register_retry_sqlstates<'a>(&self, sqlstates: impl IntoIterator<Item = &'a str>) {
        for sqlstate in sqlstates {
            for outcome in RETRY_OUTCOMES {
                self.retries_total.with_label_values(&[sqlstate, outcome]);
            }
        }
    }

    /// Session moves, failed moves and pinned sessions by label, for
    /// `/status`.
    pub fn continuity_counts(&self) -> [(&'static str, Vec<(&'static str, u64)>); 3] {
        let counter = |vec: &IntCounterVec, label: &'static str| {
            (
                label,
                vec.get_metric_with_label_values(&[label])
                    .map_or(0, |c| c.get()),
            )
        };
        [
            (
                "moved",
                MOVE_REASONS
                    .iter()
                    .map(|r| counter(&self.sessions_moved_total, r))
                    .collect(),
            ),
            (
                "move_failures",
                MOVE_FAILURE_CAUSES
                    .iter()
                    .map(|c| counter(&self.session_moves_failed_total, c))
                    .collect(),
            ),
            (
                "pinned",
                PIN_CAUSES
                    .iter()
                    .map(|c| {
                        let n = self
                            .sessions_pinned
                            .get_metric_with_label_values(&[c])
                            .map_or(0, |g| g.get().max(0) as u64);
                        (*c, n)
                    })
                    .collect(),
            ),
        ]
    }
}

/// `route53_errors_total{reason}` (the health crate's `Route53Error`,
/// tested to match).
pub const ROUTE53_ERROR_REASONS: [&str; 6] = [
    "throttled",
    "api",
    "transport",
    "no_observations",
    "timeout",
    "credentials",
];

impl Metrics {
    pub fn new(version: &str) -> Result<Self, MetricsError> {
        let registry = Registry::new_custom(Some(PREFIX.to_owned()), None)?;
        let r = &registry;
        let latency_buckets = exponential_buckets(0.0005, 2.0, 14)?; // 0.5ms .. ~4s
        let m = Self {
            endpoint_up: gauge_vec(r, "endpoint_up", "1 while the endpoint is healthy (probes and, under veto, Route 53)", ENDPOINT)?,
            endpoint_latency_seconds: histogram_vec(
                r,
                "endpoint_latency_seconds",
                "Probe round-trip time (SELECT 1 on the persistent probe connection)",
                ENDPOINT,
                latency_buckets.clone(),
            )?,
            endpoint_selected: gauge_vec(r, "endpoint_selected", "1 for the endpoint new sessions go to first", ENDPOINT)?,
            endpoint_drained: gauge_vec(r, "endpoint_drained", "1 while the endpoint is drained through the admin API (no new sessions)", ENDPOINT)?,
            route_changes_total: counter(r, "route_changes_total", "Times the selected endpoint changed")?,
            failovers_total: counter(r, "failovers_total", "Route changes forced by the selected endpoint becoming unusable (down or vetoed)")?,
            probe_failures_total: counter_vec(r, "probe_failures_total", "Failed probes by reason", &["endpoint", "region", "reason"])?,
            route53_healthy: gauge_vec(r, "route53_healthy", "Route 53's verdict for the endpoint's health check (1 healthy, 0 unhealthy, -1 unknown or stale)", ENDPOINT)?,
            route53_errors_total: counter_vec(r, "route53_errors_total", "Failed Route 53 API reads by reason", &["endpoint", "region", "reason"])?,
            client_connections_total: counter(r, "client_connections_total", "Client connections accepted")?,
            client_connections_active: int_gauge(r, "client_connections_active", "Client connections open")?,
            client_connections_rejected_total: counter_vec(r, "client_connections_rejected_total", "Client connections refused by reason", &["reason"])?,
            backend_connect_seconds: histogram_vec(
                r,
                "backend_connect_seconds",
                "Time to a backend ReadyForQuery (credentials, TCP, TLS, startup, auth) for successful connects",
                ENDPOINT,
                latency_buckets,
            )?,
            backend_connect_failures_total: counter_vec(r, "backend_connect_failures_total", "Failed backend connect attempts by reason", &["endpoint", "region", "reason"])?,
            backend_connect_rate_limited_total: counter(r, "backend_connect_rate_limited_total", "Backend connects that waited for the connect rate limit ([backend] connect_rate)")?,
            backend_connect_queue_waiting: int_gauge(r, "backend_connect_queue_waiting", "Backend connects waiting for the connect rate limit now")?,
            endpoint_backpressure: gauge_vec(r, "endpoint_backpressure", "1 while the endpoint is tried after the others because it refused a connect for load (53300/53400)", ENDPOINT)?,
            sessions_active: gauge_vec(r, "sessions_active", "Sessions relaying to the endpoint", ENDPOINT)?,
            sessions_closed_total: counter_vec(r, "sessions_closed_total", "Relayed sessions ended, by reason", &["reason"])?,
            session_duration_seconds: histogram(
                r,
                "session_duration_seconds",
                "Length of relayed sessions",
                exponential_buckets(0.01, 4.0, 12)?, // 10ms .. ~12 days
            )?,
            sessions_moved_total: counter_vec(r, "sessions_moved_total", "Sessions moved to a new backend connection with their state, by reason", &["reason"])?,
            session_moves_failed_total: counter_vec(r, "session_moves_failed_total", "Sessions that had to leave their backend and could not move, by cause", &["cause"])?,
            sessions_pinned: gauge_vec(r, "sessions_pinned", "Open sessions that cannot move to another backend, by cause (a session may count under several)", &["cause"])?,
            session_move_seconds: histogram(
                r,
                "session_move_seconds",
                "Time a move held the session: from its decision (or the client's next message) to relaying on the new backend",
                exponential_buckets(0.0005, 2.0, 16)?, // 0.5ms .. ~16s
            )?,
            retries_total: counter_vec(r, "retries_total", "Requests the proxy sent again after a retryable error, by SQLSTATE and final outcome", &["sqlstate", "outcome"])?,
            retry_not_eligible_total: counter_vec(r, "retry_not_eligible_total", "Requests whose answer carried a retryable SQLSTATE but which could not be retried, by cause", &["cause"])?,
            retry_tries: histogram(
                r,
                "retry_tries",
                "Tries per retried request, the first included",
                vec![2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 50.0, 100.0],
            )?,
            pool_checkouts_total: counter_vec(r, "pool_checkouts_total", "Backend connections asked of the pool: hit (an idle connection was reused) or miss (a new one was made)", &["result"])?,
            pool_idle: gauge_vec(r, "pool_idle", "Idle backend connections in the pool", ENDPOINT)?,
            pool_discards_total: counter_vec(r, "pool_discards_total", "Backend connections closed instead of pooled or reused, by reason", &["reason"])?,
            bytes_total: counter_vec(r, "bytes_total", "Bytes relayed, counted when a session ends", &["direction"])?,
            cancel_requests_total: counter(r, "cancel_requests_total", "CancelRequests received")?,
            token_generations_total: counter(r, "token_generations_total", "IAM tokens signed")?,
            token_generation_failures_total: counter(r, "token_generation_failures_total", "IAM token signings that failed")?,
            token_cache_hits_total: counter(r, "token_cache_hits_total", "Connects served from the IAM token cache")?,
            config_reloads_total: counter_vec(r, "config_reloads_total", "Configuration reloads by result", &["result"])?,
            build_info: gauge_vec(r, "build_info", "Always 1; the version label identifies the build", &["version"])?,
            writer: gauge_vec(r, "writer", "aurora-global: 1 for the endpoint (and its Region) read-write sessions go to", ENDPOINT)?,
            endpoint_fenced: gauge_vec(r, "endpoint_fenced", "aurora-global: 1 while the endpoint is a fenced stale writer (no sessions)", ENDPOINT)?,
            replica_lag_seconds: float_gauge_vec(r, "replica_lag_seconds", "aurora-global: replica lag from the last probe (0 on the writer, -1 unknown)", ENDPOINT)?,
            writer_changes_total: counter(r, "writer_changes_total", "aurora-global: times the writer changed (to another endpoint or to none)")?,
            no_writer_seconds_total: float_counter(r, "no_writer_seconds_total", "aurora-global: time spent without a usable writer")?,
            registry,
        };
        m.build_info.with_label_values(&[version]).set(1);
        for reason in MOVE_REASONS {
            m.sessions_moved_total.with_label_values(&[reason]);
        }
        for cause in MOVE_FAILURE_CAUSES {
            m.session_moves_failed_total.with_label_values(&[cause]);
        }
        for cause in RETRY_NOT_ELIGIBLE_CAUSES {
            m.retry_not_eligible_total.with_label_values(&[cause]);
        }
        for result in POOL_CHECKOUT_RESULTS {
            m.pool_checkouts_total.with_label_values(&[result]);
        }
        for reason in POOL_DISCARD_REASONS {
            m.pool_discards_total.with_label_values(&[reason]);
        }
        Ok(m)
    }

    /// Creates every series labelled with this endpoint that is not a
    /// gauge the health monitor sets: the failure counters with each
    /// reason (Route 53's only when the endpoint has a health check), the
    /// connect-time histogram and the session gauge, all at 0, so alerts and
    /// `rate()` see the endpoint before its first failure. Idempotent.
    pub fn register_endpoint(&self, name: &str, region: &str, route53: bool) {
        for reason in probe_failure_reasons() {
            self.probe_failures_total
                .with_label_values(&[name, region, reason]);
        }
        for reason in connect_failure_reasons() {
            self.backend_connect_failures_total
                .with_label_values(&[name, region, reason]);
        }
        for reason in ROUTE53_ERROR_REASONS {
            if route53 {
                self.route53_errors_total
                    .with_label_values(&[name, region, reason]);
            } else {
                let _ = self
                    .route53_errors_total
                    .remove_label_values(&[name, region, reason]);
            }
        }
        self.backend_connect_seconds
            .with_label_values(&[name, region]);
        self.sessions_active.with_label_values(&[name, region]);
    }

    /// Removes what [`Self::register_endpoint`] created, for an endpoint a
    /// reload removed.
    pub fn forget_endpoint(&self, name: &str, region: &str) {
        for reason in probe_failure_reasons() {
            let _ = self
                .probe_failures_total
                .remove_label_values(&[name, region, reason]);
        }
        for reason in connect_failure_reasons() {
            let _ = self
                .backend_connect_failures_total
                .remove_label_values(&[name, region, reason]);
        }
        for reason in ROUTE53_ERROR_REASONS {
            let _ = self
                .route53_errors_total
                .remove_label_values(&[name, region, reason]);
        }
        let _ = self
            .backend_connect_seconds
            .remove_label_values(&[name, region]);
        let _ = self.sessions_active.remove_label_values(&[name, region]);
        let _ = self.pool_idle.remove_label_values(&[name, region]);
    }

    /// Removes the `endpoint_backpressure` series whose (endpoint, region)
    /// `keep` rejects: the gauge is set per scrape from the routing table,
    /// so an endpoint a reload removed must not linger in it.
    pub fn retain_backpressure(&self, keep: impl Fn(&str, &str) -> bool) {
        for family in prometheus::core::Collector::collect(&self.endpoint_backpressure) {
            for series in family.get_metric() {
                let label = |name: &str| {
                    series
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                let (name, region) = (label("endpoint"), label("region"));
                if !keep(&name, &region) {
                    let _ = self
                        .endpoint_backpressure
                        .remove_label_values(&[&name, &region]);
                }
            }
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a malformed family would
        // be a bug, shown in place of the metrics rather than a panic.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
    let c = IntCounter::with_opts(Opts::new(name, help))?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
    let g = IntGauge::with_opts(Opts::new(name, help))?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn float_gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<GaugeVec, MetricsError> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn float_counter(r: &Registry, name: &str, help: &str) -> Result<Counter, MetricsError> {
    let c = Counter::with_opts(Opts::new(name, help))?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, MetricsError> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> Result<HistogramVec, MetricsError> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_the_prefix() {
        let m = Metrics::new("1.2.3").unwrap();
        m.endpoint_up.with_label_values(&["a", "us-east-1"]).set(1);
        m.client_connections_total.inc();
        m.probe_failures_total
            .with_label_values(&["a", "us-east-1", "timeout"])
            .inc();
        let text = m.render();
        assert!(
            text.contains("dsql_proxy_build_info{version=\"1.2.3\"} 1"),
            "{text}"
        );
        assert!(text.contains("dsql_proxy_endpoint_up{endpoint=\"a\",region=\"us-east-1\"} 1"));
        assert!(text.contains("dsql_proxy_client_connections_total 1"));
        assert!(text.contains("# TYPE dsql_proxy_route_changes_total counter"));
    }

    #[test]
    fn endpoint_series_exist_at_zero_and_go_with_the_endpoint() {
        let m = Metrics::new("1").unwrap();
        m.register_endpoint("a", "us-east-1", true);
        m.register_endpoint("b", "us-west-2", false);
        let text = m.render();
        for reason in connect_failure_reasons() {
            let series = format!(
                "dsql_proxy_backend_connect_failures_total{{endpoint=\"a\",reason=\"{reason}\",region=\"us-east-1\"}} 0"
            );
            assert!(text.contains(&series), "{series}\n{text}");
        }
        assert!(text.contains(
            "dsql_proxy_probe_failures_total{endpoint=\"b\",reason=\"timeout\",region=\"us-west-2\"} 0"
        ));
        assert!(text.contains("dsql_proxy_route53_errors_total{endpoint=\"a\""));
        assert!(!text.contains("dsql_proxy_route53_errors_total{endpoint=\"b\""));
        assert!(text.contains("dsql_proxy_sessions_active{endpoint=\"b\",region=\"us-west-2\"} 0"));
        m.forget_endpoint("a", "us-east-1");
        let text = m.render();
        assert!(!text.contains("endpoint=\"a\""), "{text}");
        assert!(text.contains("endpoint=\"b\""));
    }
}
