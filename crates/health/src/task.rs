//! The probe task: one per endpoint, never on the connect path.
//!
//! Every `interval` it runs one check on a persistent connection. A check
//! that has not answered within `timeout` is abandoned (its connection with
//! it) and replaced by a fresh connect; and while the endpoint stays silent
//! past `timeout`, every tick reports a timeout failure. So a hung endpoint
//! is reported `timeout` after it stopped answering and then once per
//! interval, like missed heartbeats, rather than once per timeout.

use std::sync::Arc;
use std::time::Duration;

use dsql_proxy_routing::{EndpointId, FailureKind, ProbeOutcome};
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior};

use crate::probe::{CheckFuture, Probe, ProbeConnection};
use crate::Event;

pub(crate) struct ProbeTask<P> {
    pub id: EndpointId,
    pub probe: Arc<P>,
    pub interval: Duration,
    pub timeout: Duration,
    pub events: mpsc::Sender<Event>,
    /// Passive failure reports wake the probe for a fresh connect.
    pub wake: Arc<Notify>,
}

impl<P: Probe> ProbeTask<P> {
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut conn: Option<ProbeConnection> = None;
        let mut check: Option<(CheckFuture, Instant)> = None;
        // Start of the current silence: the oldest check still unanswered.
        let mut silent_since: Option<Instant> = None;
        let mut fresh = false;
        loop {
            tokio::select! {
                (outcome, back) = async {
                    match check.as_mut() {
                        Some((fut, _)) => fut.await,
                        None => std::future::pending().await,
                    }
                } => {
                    check = None;
                    silent_since = None;
                    conn = back;
                    if self.events.send(Event::Probe(self.id, outcome)).await.is_err() {
                        return;
                    }
                }
                scheduled = ticker.tick() => {
                    // The tick's own instant, not the time this task got to
                    // run: silence is then measured on the probe's schedule
                    // and a timeout is reported on the first tick at or past
                    // `timeout`, however late the runtime polled us.
                    let now = scheduled;
                    if silent_since.is_some_and(|s| now - s >= self.timeout) {
                        let outcome = ProbeOutcome::Failure {
                            kind: FailureKind::Timeout,
                            detail: format!("no answer to the probe within {:?}", self.timeout),
                        };
                        if self.events.send(Event::Probe(self.id, outcome)).await.is_err() {
                            return;
                        }
                    }
                    match &check {
                        Some((_, started)) if now - *started >= self.timeout => {
                            // Abandon it (its connection goes with it).
                            check = Some((Arc::clone(&self.probe).check(None), now));
                        }
                        Some(_) => {}
                        None => {
                            let reuse = if std::mem::take(&mut fresh) { None } else { conn.take() };
                            conn = None;
                            check = Some((Arc::clone(&self.probe).check(reuse), now));
                            silent_since.get_or_insert(now);
                        }
                    }
                }
                _ = self.wake.notified() => {
                    // The data path saw a failure: check with a new
                    // connection now, as a session would.
                    if check.is_none() {
                        let now = Instant::now();
                        conn = None;
                        check = Some((Arc::clone(&self.probe).check(None), now));
                        silent_since.get_or_insert(now);
                    } else {
                        fresh = true;
                    }
                }
            }
        }
    }
}
