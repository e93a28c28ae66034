//! Transparent retry in the data path (`[retry]`). The relay hands every
//! chunk it reads to [`Retry`] while retry is on: an autocommit request is
//! recorded and its response held until ReadyForQuery; a response that
//! ends in a listed SQLSTATE with nothing committed is dropped and the
//! request sent again after a jittered backoff. The decisions themselves
//! are the protocol crate's ([`RetryCandidate`]); this module owns the
//! phases, the timer, the output buffers and the metrics.
//!
//! Everything here runs inside the relay's poll: no locks, no tasks, and
//! the buffers are reused from request to request.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use dsql_proxy_config::RetryConfig;
use dsql_proxy_metrics::Metrics;
use dsql_proxy_protocol::messages;
use dsql_proxy_protocol::retry::{
    NotEligible, RequestProgress, ResponseProgress, RetryCandidate, SqlState, Verdict,
};
use dsql_proxy_protocol::tracking::SessionTracker;
use rand::Rng;

use crate::cancel::CancelSignal;
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};

/// `[retry]`, resolved.
#[derive(Debug, Clone)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub max_buffered: usize,
    pub sqlstates: Vec<SqlState>,
}

impl RetrySettings {
    /// `None` when retry is off (`max_attempts = 1`). The config was
    /// validated, so every SQLSTATE parses.
    pub fn from_config(config: &RetryConfig) -> Option<Self> {
        config.enabled().then(|| Self {
            max_attempts: config.max_attempts,
            base_delay: config.base_delay.get(),
            max_delay: config.max_delay.get(),
            max_buffered: config.max_buffered.get(),
            sqlstates: config
                .sqlstates
                .iter()
                .filter_map(|code| SqlState::parse(code))
                .collect(),
        })
    }

    /// The wait before try `next_try` (2 or more): uniform between zero
    /// and `base_delay · 2^(next_try − 2)`, capped at `max_delay` (full
    /// jitter, so conflicting clients spread out instead of colliding
    /// again in step).
    pub fn backoff(&self, next_try: u32) -> Duration {
        let doublings = next_try.saturating_sub(2).min(20);
        let cap = self
            .base_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay);
        let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::thread_rng().gen_range(0..=cap_us))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests: the next one that starts while the session is
    /// idle becomes a candidate.
    Quiet,
    /// A candidate: its bytes are recorded, its response held.
    Holding,
    /// A try failed with a listed SQLSTATE; its response is held while the
    /// backoff runs.
    Backoff,
    /// Writing the request (again) to the backend.
    Resending,
    /// Writing held bytes to the client; then `Quiet` (the response was
    /// whole) or `Passing`.
    Releasing { then_passing: bool },
    /// Relaying as usual until the session rests again; a request that
    /// ends in a listed SQLSTATE meanwhile is counted under `watch`.
    Passing,
}

/// A request relayed without retry, watched to count it when its answer
/// carries a listed SQLSTATE.
#[derive(Debug, Clone, Copy)]
struct Watch {
    errors_at_start: u64,
    cause: NotEligible,
}

/// What the relay does with a chunk read from the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerChunk {
    /// Write it to the client as usual.
    Forward,
    /// Kept here: write nothing now.
    Held,
}

/// How a backoff ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackoffEnd {
    /// The request is to be sent again: observe [`Retry::resend_bytes`],
    /// then drive [`Retry::poll_resend`].
    Resend,
    /// The held response goes to the client after all.
    Released,
}

pub struct Retry {
    settings: Arc<RetrySettings>,
    metrics: Arc<Metrics>,
    /// CancelRequests that matched the session's key.
    cancels: Arc<CancelSignal>,
    candidate: RetryCandidate,
    phase: Phase,
    /// Tries of the current candidate so far.
    tries: u32,
    /// The SQLSTATE the last failed try ended in.
    retried_on: Option<SqlState>,
    cancels_at_start: u64,
    watch: Option<Watch>,
    /// The session is ending: nothing is sent again.
    ending: bool,
    /// A NOTICE written before a released response (tries ran out).
    notice: BytesMut,
    /// How much of the notice, then of the response, was written.
    written: usize,
    resend: Vec<u8>,
    resent: usize,
    timer: Option<Pin<Box<Sleep>>>,
    /// Output became due outside the relay's downstream loop: poll again.
    kick: bool,
}

impl Retry {
    pub fn new(
        settings: Arc<RetrySettings>,
        metrics: Arc<Metrics>,
        cancels: Arc<CancelSignal>,
    ) -> Self {
        let candidate = RetryCandidate::new(settings.max_buffered);
        Self {
            settings,
            metrics,
            cancels,
            candidate,
            phase: Phase::Quiet,
            tries: 0,
            retried_on: None,
            cancels_at_start: 0,
            watch: None,
            ending: false,
            notice: BytesMut::new(),
            written: 0,
            resend: Vec::new(),
            resent: 0,
            timer: None,
            kick: false,
        }
    }

    /// Nothing held, nothing to write, nothing to send: the relay may treat
    /// the session as the trackers see it.
    pub fn is_quiet(&self) -> bool {
        matches!(self.phase, Phase::Quiet | Phase::Passing)
    }

    /// Held bytes wait for the client (or will, once a try is judged).
    pub fn holds_client_bytes(&self) -> bool {
        !self.is_quiet()
    }

    pub fn is_resending(&self) -> bool {
        self.phase == Phase::Resending
    }

    pub fn has_output(&self) -> bool {
        matches!(self.phase, Phase::Releasing { .. })
    }

    /// Output became due where the relay will not poll it this time round.
    pub fn take_kick(&mut self) -> bool {
        std::mem::take(&mut self.kick)
    }

    /// A chunk read from the client, after the session tracker saw it.
    /// `was_idle`: the tracker was at an idle point before it;
    /// `status_before`: the transaction status then.
    pub fn on_client_chunk(
        &mut self,
        was_idle: bool,
        status_before: u8,
        bytes: &[u8],
        tracker: &SessionTracker,
    ) {
        match self.phase {
            Phase::Quiet | Phase::Passing => {
                if self.phase == Phase::Passing {
                    self.finish_watch(tracker);
                }
                if was_idle && !self.ending {
                    self.begin(tracker);
                    self.after_request_bytes(bytes, tracker);
                } else {
                    let cause = (status_before != b'I' && tracker.requests_pending() <= 1)
                        .then_some(NotEligible::InTransaction);
                    self.pass(tracker, cause);
                }
            }
            Phase::Holding => self.after_request_bytes(bytes, tracker),
            Phase::Backoff => {
                // More from the client before it has its answer: the failed
                // try's response is the answer, and nothing is sent again.
                self.count_not_eligible(NotEligible::Pipelined);
                self.finish_tries(false);
                self.release(true);
                self.kick = true;
            }
            Phase::Releasing { .. } => self.phase = Phase::Releasing { then_passing: true },
            // Not read while resending.
            Phase::Resending => {}
        }
    }

    fn begin(&mut self, tracker: &SessionTracker) {
        self.candidate.begin();
        self.phase = Phase::Holding;
        self.tries = 1;
        self.retried_on = None;
        self.cancels_at_start = self.cancels.count();
        self.watch = Some(Watch {
            errors_at_start: tracker.errors_seen(),
            cause: NotEligible::Protocol,
        });
    }

    fn after_request_bytes(&mut self, bytes: &[u8], tracker: &SessionTracker) {
        match self.candidate.push_request(bytes) {
            RequestProgress::Complete => {}
            RequestProgress::Incomplete if self.candidate.client_may_wait() => {
                self.stop_holding(NotEligible::Protocol, tracker);
            }
            RequestProgress::Incomplete => {}
            RequestProgress::NotEligible(cause) => self.stop_holding(cause, tracker),
        }
    }

    /// The candidate is relayed without retry from here: what is held goes
    /// out first.
    fn stop_holding(&mut self, cause: NotEligible, tracker: &SessionTracker) {
        let errors_at_start = self
            .watch
            .map_or(tracker.errors_seen(), |w| w.errors_at_start);
        self.finish_tries(false);
        self.watch = Some(Watch {
            errors_at_start,
            cause,
        });
        self.release(true);
        self.kick = true;
    }

    fn pass(&mut self, tracker: &SessionTracker, cause: Option<NotEligible>) {
        self.phase = Phase::Passing;
        self.watch = cause.map(|cause| Watch {
            errors_at_start: tracker.errors_seen(),
            cause,
        });
    }

    /// A chunk read from the backend, after the session tracker saw it.
    pub fn on_server_chunk(&mut self, bytes: &[u8], tracker: &SessionTracker) -> ServerChunk {
        match self.phase {
            Phase::Quiet => ServerChunk::Forward,
            Phase::Passing => {
                if tracker.requests_pending() == 0 && tracker.server_at_boundary() {
                    self.finish_watch(tracker);
                    self.phase = Phase::Quiet;
                }
                ServerChunk::Forward
            }
            Phase::Holding | Phase::Resending => {
                match self.candidate.push_response(bytes) {
                    ResponseProgress::Pending => {}
                    ResponseProgress::Ready if !self.candidate.request_complete() => {
                        self.stop_holding(NotEligible::Protocol, tracker)
                    }
                    ResponseProgress::Ready => self.judge(),
                    ResponseProgress::NotEligible(cause) => self.stop_holding(cause, tracker),
                }
                ServerChunk::Held
            }
            Phase::Backoff => {
                // The backend spoke while idle (a notice, a FATAL before it
                // closes): the failed try's answer goes first, as is.
                self.candidate.push_response(bytes);
                self.count_not_eligible(NotEligible::SessionEnding);
                self.finish_tries(false);
                self.release(false);
                ServerChunk::Held
            }
            // Not read while releasing.
            Phase::Releasing { .. } => ServerChunk::Forward,
        }
    }

    fn judge(&mut self) {
        match self.candidate.judge(&self.settings.sqlstates) {
            Verdict::Retry(sqlstate) => {
                self.retried_on = Some(sqlstate);
                if self.tries >= self.settings.max_attempts {
                    let tries = self.tries;
                    self.finish_tries(false);
                    self.add_exhausted_notice(sqlstate, tries);
                    self.release(false);
                } else if self.ending {
                    self.count_not_eligible(NotEligible::SessionEnding);
                    self.finish_tries(false);
                    self.release(false);
                } else {
                    self.tries += 1;
                    let wait = self.settings.backoff(self.tries);
                    let deadline = Instant::now() + wait;
                    match &mut self.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    self.phase = Phase::Backoff;
                }
            }
            Verdict::Forward(None) => {
                self.finish_tries(true);
                self.release(false);
            }
            Verdict::Forward(Some((sqlstate, cause))) => {
                self.retried_on.get_or_insert(sqlstate);
                self.count_not_eligible(cause);
                self.finish_tries(false);
                self.release(false);
            }
        }
    }

    /// Records the outcome of a retried request (one tried more than once).
    fn finish_tries(&mut self, succeeded: bool) {
        if self.tries > 1 {
            if let Some(sqlstate) = self.retried_on {
                let outcome = if succeeded { "succeeded" } else { "exhausted" };
                self.metrics
                    .retries_total
                    .with_label_values(&[sqlstate.as_str(), outcome])
                    .inc();
                self.metrics.retry_tries.observe(f64::from(self.tries));
            }
        }
        self.tries = 0;
        self.watch = None;
    }

    /// The client gets the last error unchanged, after a NOTICE saying how
    /// often the request was tried.
    fn add_exhausted_notice(&mut self, sqlstate: SqlState, tries: u32) {
        self.notice.clear();
        messages::notice(
            &mut self.notice,
            &[
                (b'S', "NOTICE".into()),
                (b'V', "NOTICE".into()),
                (b'C', "00000".into()),
                (
                    b'M',
                    format!(
                        "dsql-proxy tried this request {tries} times; every try failed with \
                         SQLSTATE {} (the last error follows)",
                        sqlstate.as_str()
                    ),
                ),
            ],
        );
    }

    fn count_not_eligible(&self, cause: NotEligible) {
        self.metrics
            .retry_not_eligible_total
            .with_label_values(&[cause.label()])
            .inc();
    }

    /// Counts a watched request whose answer carried a listed SQLSTATE.
    fn finish_watch(&mut self, tracker: &SessionTracker) {
        let Some(watch) = self.watch.take() else {
            return;
        };
        let listed = tracker.last_error().is_some_and(|error| {
            SqlState::parse(error.sqlstate()).is_some_and(|s| self.settings.sqlstates.contains(&s))
        });
        if tracker.errors_seen() > watch.errors_at_start && listed {
            self.count_not_eligible(watch.cause);
        }
    }

    /// Everything held goes to the client next; the relay writes it before
    /// reading the backend again.
    fn release(&mut self, then_passing: bool) {
        self.written = 0;
        self.phase = Phase::Releasing { then_passing };
    }

    /// Stops retrying for good (the session is ending): held bytes go out
    /// now, a resend under way completes and its answer is relayed.
    pub fn give_up(&mut self) {
        self.ending = true;
        match self.phase {
            Phase::Holding => {
                let watch = self.watch;
                self.finish_tries(false);
                self.watch = watch;
                self.release(true);
            }
            Phase::Backoff => {
                self.count_not_eligible(NotEligible::SessionEnding);
                self.finish_tries(false);
                self.release(false);
            }
            _ => {}
        }
    }

    /// Writes the released bytes (a notice first, when there is one) to
    /// the client.
    pub fn poll_output<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        let Phase::Releasing { then_passing } = self.phase else {
            return Poll::Ready(Ok(()));
        };
        loop {
            let notice_len = self.notice.len();
            let out = if self.written < notice_len {
                &self.notice[self.written..]
            } else {
                let response = self.candidate.response_for_client();
                match response.get(self.written - notice_len..) {
                    Some(rest) if !rest.is_empty() => rest,
                    _ => break,
                }
            };
            let n = ready!(writer.as_mut().poll_write(cx, out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        ready!(writer.as_mut().poll_flush(cx))?;
        self.notice.clear();
        self.written = 0;
        self.phase = if then_passing {
            Phase::Passing
        } else {
            Phase::Quiet
        };
        Poll::Ready(Ok(()))
    }

    /// Drives the backoff timer.
    pub fn poll_backoff(&mut self, cx: &mut Context<'_>) -> Poll<BackoffEnd> {
        if self.phase != Phase::Backoff {
            return Poll::Pending;
        }
        // A cancel ends the wait at once.
        self.cancels.register(cx.waker());
        let cancelled = self.cancels.count() != self.cancels_at_start;
        if !cancelled {
            if let Some(timer) = &mut self.timer {
                ready!(timer.as_mut().poll(cx));
            }
        }
        if cancelled {
            // The client cancelled while it waited: it gets the last
            // error, and the request is not run again.
            self.count_not_eligible(NotEligible::Cancelled);
            self.finish_tries(false);
            self.release(false);
            self.kick = true;
            return Poll::Ready(BackoffEnd::Released);
        }
        if self.ending {
            self.count_not_eligible(NotEligible::SessionEnding);
            self.finish_tries(false);
            self.release(false);
            self.kick = true;
            return Poll::Ready(BackoffEnd::Released);
        }
        self.candidate.prepare_resend(&mut self.resend);
        self.resent = 0;
        self.phase = Phase::Resending;
        Poll::Ready(BackoffEnd::Resend)
    }

    /// What a resend sends, for the trackers to see before it is written.
    pub fn resend_bytes(&self) -> &[u8] {
        &self.resend
    }

    /// Writes the resend to the backend; then its answer is held again.
    pub fn poll_resend<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        if self.phase != Phase::Resending {
            return Poll::Ready(Ok(()));
        }
        while self.resent < self.resend.len() {
            let n = ready!(writer.as_mut().poll_write(cx, &self.resend[self.resent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.resent += n;
        }
        ready!(writer.as_mut().poll_flush(cx))?;
        self.phase = Phase::Holding;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(base_ms: u64, max_ms: u64) -> RetrySettings {
        RetrySettings {
            max_attempts: 10,
            base_delay: Duration::from_millis(base_ms),
            max_delay: Duration::from_millis(max_ms),
            max_buffered: 1024,
            sqlstates: vec![SqlState(*b"40001")],
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let s = settings(2, 100);
        for _ in 0..200 {
            assert!(s.backoff(2) <= Duration::from_millis(2));
            assert!(s.backoff(3) <= Duration::from_millis(4));
            assert!(s.backoff(9) <= Duration::from_millis(100));
            assert!(s.backoff(u32::MAX) <= Duration::from_millis(100));
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| s.backoff(9)).collect();
        assert!(spread.len() > 10, "jittered: {spread:?}");
    }

    #[test]
    fn the_metrics_crate_names_every_cause_a_request_is_not_retried_for() {
        let labels: Vec<&str> = NotEligible::ALL.iter().map(|c| c.label()).collect();
        assert_eq!(labels, dsql_proxy_metrics::RETRY_NOT_ELIGIBLE_CAUSES);
    }

    #[test]
    fn settings_come_from_the_config_only_when_on() {
        let mut config = RetryConfig::default();
        assert!(RetrySettings::from_config(&config).is_none());
        config.max_attempts = 5;
        let s = RetrySettings::from_config(&config).expect("on");
        assert_eq!(s.sqlstates, [SqlState(*b"40001"), SqlState(*b"40P01")]);
        assert_eq!(s.max_buffered, 256 * 1024);
    }
}
