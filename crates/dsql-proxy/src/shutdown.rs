//! Graceful shutdown, in order: a stop request (SIGTERM, SIGINT or
//! `POST /quitquitquit`) → `/readyz` answers 503 → new sessions are still
//! accepted for `min_accept` → the listeners close → sessions get until
//! `max_drain` (counted from the request) to end → every remaining session
//! gets FATAL 57P01 at a message boundary → the process exits 0.
//! A second stop request skips the rest of the waiting and goes straight to
//! the 57P01 step (like PgBouncer's immediate shutdown); a third one exits
//! without waiting for sessions to finish saying goodbye.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dsql_proxy_admin::AdminState;
use dsql_proxy_config::{DurationStr, ShutdownConfig};
use dsql_proxy_session::BoundProxy;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tracing::{info, warn};

/// How long closed sessions get to send their FATAL and close their
/// sockets, on top of `request_grace` (a session with a request in flight
/// waits that long for its answer first): each step of a session's goodbye
/// is bounded by `EVICTION_FLUSH`, so this only cuts off peers that stopped
/// reading.
const FINAL_CLOSE: Duration = Duration::from_secs(3);

/// SIGTERM, SIGINT and `POST /quitquitquit` as one stream of requests.
/// Installed at startup so a signal that arrives early is not lost (nor
/// fatal: the handlers replace the default action).
pub struct StopRequests {
    term: Option<Signal>,
    int: Option<Signal>,
    admin: Arc<AdminState>,
}

impl StopRequests {
    pub fn install(admin: Arc<AdminState>) -> Self {
        let install = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot handle {name}; stop the proxy with POST /quitquitquit");
                None
            }
        };
        Self {
            term: install(SignalKind::terminate(), "SIGTERM"),
            int: install(SignalKind::interrupt(), "SIGINT"),
            admin,
        }
    }

    /// The next stop request, by name.
    pub async fn next(&mut self) -> &'static str {
        async fn recv(s: &mut Option<Signal>) -> Option<()> {
            match s {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            Some(()) = recv(&mut self.term) => "SIGTERM",
            Some(()) = recv(&mut self.int) => "SIGINT",
            () = self.admin.quit.notified() => "POST /quitquitquit",
        }
    }
}

/// Serves until a stop request, then drains as described above.
pub async fn serve_until_stopped(
    proxy: BoundProxy,
    settings: &ShutdownConfig,
    mut stops: StopRequests,
    admin: &AdminState,
) {
    let drain = proxy.drain();
    let mut drain_deadline = Instant::now();
    let mut hurry = false;
    proxy
        .serve(async {
            let trigger = stops.next().await;
            admin.draining.store(true, Ordering::Release);
            drain_deadline = Instant::now() + settings.max_drain.get();
            info!(
                trigger,
                sessions = drain.active(),
                min_accept = %settings.min_accept,
                max_drain = %settings.max_drain,
                "graceful shutdown: /readyz now answers 503"
            );
            if !settings.min_accept.get().is_zero() {
                tokio::select! {
                    () = sleep(settings.min_accept.get()) => {}
                    second = stops.next() => {
                        hurry = true;
                        info!(trigger = second, "second stop request: closing sessions now");
                    }
                }
            }
        })
        .await;
    if !hurry {
        let left = drain.active();
        if left > 0 {
            info!(
                sessions = left,
                "waiting for sessions to end (until max_drain)"
            );
        }
        tokio::select! {
            () = drain.idle() => {
                info!("every session ended");
                return;
            }
            () = sleep_until(drain_deadline) => {
                info!(sessions = drain.active(), max_drain = %settings.max_drain, "max_drain reached");
            }
            second = stops.next() => {
                info!(trigger = second, sessions = drain.active(), "second stop request: skipping the rest of the drain");
            }
        }
    }
    let left = drain.active();
    if left == 0 {
        return;
    }
    info!(
        sessions = left,
        "closing the remaining sessions with FATAL 57P01"
    );
    drain.close_all();
    let wait = settings.request_grace.get() + FINAL_CLOSE;
    tokio::select! {
        done = timeout(wait, drain.idle()) => if done.is_err() {
            warn!(sessions = drain.active(), wait = %DurationStr(wait), "sessions did not finish closing; exiting anyway");
        },
        third = stops.next() => {
            info!(trigger = third, sessions = drain.active(), "third stop request: exiting now");
        }
    }
}
