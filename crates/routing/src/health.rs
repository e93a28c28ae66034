//! Per-endpoint health as a pure state machine: probe outcomes and passive
//! signals in, up/down transitions and a smoothed latency out. Time is
//! passed in, so every rule is unit-tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::writer::RoleObservation;

/// Whether an endpoint takes sessions, as far as the proxy knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// No verdict yet (just started, or only authentication failures seen).
    Unknown,
    Up,
    Down,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// Why a probe or a connect failed, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// Connection refused or reset, or the peer closed unexpectedly.
    Connection,
    /// No answer within the time allowed.
    Timeout,
    /// TLS handshake or certificate failure.
    Tls,
    /// The server answered with something that is not PostgreSQL.
    Protocol,
    /// The server refused the session for its state (57P03 starting up or
    /// shutting down, 57P01, 08xxx).
    Unavailable,
    /// The server refused the session for load (53300, 53400): worth trying
    /// elsewhere, but no sign of an outage.
    Busy,
    /// The query on the probe connection failed.
    Query,
}

impl FailureKind {
    pub const ALL: [FailureKind; 7] = [
        Self::Connection,
        Self::Timeout,
        Self::Tls,
        Self::Protocol,
        Self::Unavailable,
        Self::Busy,
        Self::Query,
    ];

    /// Position in [`Self::ALL`], for per-kind counters.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Timeout => "timeout",
            Self::Tls => "tls",
            Self::Protocol => "protocol",
            Self::Unavailable => "unavailable",
            Self::Busy => "busy",
            Self::Query => "query",
        }
    }
}

/// The result of one probe round for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The trivial query answered. `connect_time` is set when the probe had
    /// to (re)open its connection: TCP + TLS + authentication.
    Success {
        rtt: Duration,
        connect_time: Option<Duration>,
        /// The endpoint's role, when the probe asks for it
        /// (`kind = "aurora-global"`).
        role: Option<RoleObservation>,
    },
    Failure {
        kind: FailureKind,
        detail: String,
    },
    /// The endpoint answered but refused the probe's credentials (or the
    /// proxy declined to send them). That says nothing about the Region's
    /// health, so it moves no traffic; the refusal's round trip, when
    /// there was one, is still a latency sample.
    AuthFailure {
        detail: String,
        rtt: Option<Duration>,
    },
    /// The endpoint refused the probe's login for load (53300/53400): busy,
    /// not down, so neither streak moves; the refusal's round trip is a
    /// latency sample.
    Busy {
        detail: String,
        rtt: Duration,
    },
}

/// A failure the data path saw, reported without waiting for a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassiveSignal {
    /// A session's connect attempt failed at the transport level.
    ConnectFailed { kind: FailureKind, detail: String },
    /// A live session's backend connection broke without an ErrorResponse.
    SessionBroken { detail: String },
}

/// Thresholds for the up/down hysteresis.
#[derive(Debug, Clone, Copy)]
pub struct Hysteresis {
    pub down_after: u32,
    pub up_after: u32,
}

/// Smoothed latency: the median of the last [`LATENCY_WINDOW`] probe round
/// trips. A median ignores a single slow probe (a GC pause, a retransmit)
/// that would drag an average, and follows a real change within
/// `LATENCY_WINDOW / 2 + 1` probes.
pub const LATENCY_WINDOW: usize = 5;

#[derive(Debug, Clone, Default)]
struct LatencyWindow {
    samples: VecDeque<Duration>,
}

impl LatencyWindow {
    fn push(&mut self, rtt: Duration) {
        if self.samples.len() == LATENCY_WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(rtt);
    }

    fn median(&self) -> Option<Duration> {
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted = [Duration::ZERO; LATENCY_WINDOW];
        let n = self.samples.len();
        for (slot, s) in sorted.iter_mut().zip(&self.samples) {
            *slot = *s;
        }
        sorted[..n].sort_unstable();
        Some(sorted[n / 2])
    }
}

/// An up/down transition the caller must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
}

/// Everything the proxy knows about one endpoint's health.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    liveness: Liveness,
    consecutive_failures: u32,
    consecutive_successes: u32,
    latency: LatencyWindow,
    last_rtt: Option<Duration>,
    connect_time: Option<Duration>,
    last_up: Option<Instant>,
    last_failure: Option<(FailureKind, String)>,
    auth_failure: Option<String>,
}

impl Default for HealthTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthTracker {
    pub fn new() -> Self {
        Self {
            liveness: Liveness::Unknown,
            consecutive_failures: 0,
            consecutive_successes: 0,
            latency: LatencyWindow::default(),
            last_rtt: None,
            connect_time: None,
            last_up: None,
            last_failure: None,
            auth_failure: None,
        }
    }

    pub fn liveness(&self) -> Liveness {
        self.liveness
    }

    /// Median probe round trip; `None` until a probe succeeded (and again
    /// after the endpoint went down, since old samples say nothing then).
    pub fn latency(&self) -> Option<Duration> {
        self.latency.median()
    }

    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    pub fn connect_time(&self) -> Option<Duration> {
        self.connect_time
    }

    /// When the endpoint was last seen up; orders the fallback list when
    /// nothing is healthy.
    pub fn last_up(&self) -> Option<Instant> {
        self.last_up
    }

    pub fn last_failure(&self) -> Option<&(FailureKind, String)> {
        self.last_failure.as_ref()
    }

    /// Set while the probe's credentials are refused.
    pub fn auth_failure(&self) -> Option<&str> {
        self.auth_failure.as_deref()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn consecutive_successes(&self) -> u32 {
        self.consecutive_successes
    }

    pub fn observe(
        &mut self,
        outcome: ProbeOutcome,
        now: Instant,
        rules: Hysteresis,
    ) -> Option<Transition> {
        match outcome {
            ProbeOutcome::Success {
                rtt, connect_time, ..
            } => {
                self.auth_failure = None;
                self.consecutive_failures = 0;
                self.consecutive_successes = self.consecutive_successes.saturating_add(1);
                self.sample(rtt);
                if connect_time.is_some() {
                    self.connect_time = connect_time;
                }
                let up = match self.liveness {
                    // The first verdict needs no history.
                    Liveness::Unknown => true,
                    Liveness::Down => self.consecutive_successes >= rules.up_after,
                    Liveness::Up => false,
                };
                if self.liveness != Liveness::Down || up {
                    self.last_up = Some(now);
                }
                if up {
                    self.liveness = Liveness::Up;
                    return Some(Transition::WentUp);
                }
                None
            }
            ProbeOutcome::Failure { kind, detail } => {
                self.consecutive_successes = 0;
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_failure = Some((kind, detail));
                if self.liveness != Liveness::Down && self.consecutive_failures >= rules.down_after
                {
                    return Some(self.go_down());
                }
                None
            }
            ProbeOutcome::AuthFailure { detail, rtt } => {
                // The Region answered, so this is not an outage; neither
                // streak moves.
                self.auth_failure = Some(detail);
                if let Some(rtt) = rtt {
                    self.sample(rtt);
                }
                None
            }
            ProbeOutcome::Busy { detail, rtt } => {
                // Over its connection limits, not down: the connect path
                // treats busy the same way.
                self.last_failure = Some((FailureKind::Busy, detail));
                self.sample(rtt);
                None
            }
        }
    }

    fn sample(&mut self, rtt: Duration) {
        self.latency.push(rtt);
        self.last_rtt = Some(rtt);
    }

    /// A failure seen by the data path demotes at once: clients are already
    /// paying for it.
    pub fn passive(&mut self, signal: PassiveSignal) -> Option<Transition> {
        let failure = match signal {
            PassiveSignal::ConnectFailed { kind, detail } => (kind, detail),
            PassiveSignal::SessionBroken { detail } => (FailureKind::Connection, detail),
        };
        self.consecutive_successes = 0;
        self.last_failure = Some(failure);
        if self.liveness == Liveness::Down {
            return None;
        }
        Some(self.go_down())
    }

    fn go_down(&mut self) -> Transition {
        self.liveness = Liveness::Down;
        self.latency = LatencyWindow::default();
        Transition::WentDown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Hysteresis = Hysteresis {
        down_after: 3,
        up_after: 2,
    };

    fn ok(ms: u64) -> ProbeOutcome {
        ProbeOutcome::Success {
            rtt: Duration::from_millis(ms),
            connect_time: None,
            role: None,
        }
    }

    fn fail() -> ProbeOutcome {
        ProbeOutcome::Failure {
            kind: FailureKind::Timeout,
            detail: "no answer".into(),
        }
    }

    #[test]
    fn first_success_is_up_then_down_after_n_and_up_after_m() {
        let now = Instant::now();
        let mut h = HealthTracker::new();
        assert_eq!(h.liveness(), Liveness::Unknown);
        assert_eq!(h.observe(ok(10), now, RULES), Some(Transition::WentUp));
        assert_eq!(h.observe(fail(), now, RULES), None);
        assert_eq!(h.observe(fail(), now, RULES), None);
        assert_eq!(h.observe(fail(), now, RULES), Some(Transition::WentDown));
        assert_eq!(h.latency(), None);
        assert_eq!(h.observe(fail(), now, RULES), None);
        assert_eq!(h.observe(ok(10), now, RULES), None);
        assert_eq!(h.liveness(), Liveness::Down);
        assert_eq!(h.observe(ok(10), now, RULES), Some(Transition::WentUp));
    }

    #[test]
    fn kinds_index_their_position_in_all() {
        for (i, k) in FailureKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }

    #[test]
    fn a_flapping_link_does_not_flap_the_state() {
        let now = Instant::now();
        let mut h = HealthTracker::new();
        h.observe(ok(10), now, RULES);
        for _ in 0..20 {
            assert_eq!(h.observe(fail(), now, RULES), None);
            assert_eq!(h.observe(ok(10), now, RULES), None);
        }
        assert_eq!(h.liveness(), Liveness::Up);
    }

    #[test]
    fn passive_failure_demotes_at_once() {
        let now = Instant::now();
        let mut h = HealthTracker::new();
        h.observe(ok(10), now, RULES);
        let t = h.passive(PassiveSignal::ConnectFailed {
            kind: FailureKind::Connection,
            detail: "refused".into(),
        });
        assert_eq!(t, Some(Transition::WentDown));
        assert_eq!(
            h.passive(PassiveSignal::SessionBroken {
                detail: "reset".into()
            }),
            None
        );
    }

    #[test]
    fn auth_failures_move_nothing() {
        let now = Instant::now();
        let mut h = HealthTracker::new();
        h.observe(ok(10), now, RULES);
        for _ in 0..10 {
            let t = h.observe(
                ProbeOutcome::AuthFailure {
                    detail: "28P01".into(),
                    rtt: None,
                },
                now,
                RULES,
            );
            assert_eq!(t, None);
        }
        assert_eq!(h.liveness(), Liveness::Up);
        assert!(h.auth_failure().is_some());
        h.observe(ok(10), now, RULES);
        assert!(h.auth_failure().is_none());
    }

    #[test]
    fn a_refused_login_still_yields_a_latency_sample() {
        let now = Instant::now();
        let mut h = HealthTracker::new();
        for ms in [40, 42, 41] {
            let refused = ProbeOutcome::AuthFailure {
                detail: "28P01 wrong probe_user".into(),
                rtt: Some(Duration::from_millis(ms)),
            };
            assert_eq!(h.observe(refused, now, RULES), None);
        }
        assert_eq!(h.latency(), Some(Duration::from_millis(41)));
        assert_eq!(h.last_rtt(), Some(Duration::from_millis(41)));
        assert_eq!(h.liveness(), Liveness::Unknown, "not a health verdict");
    }

    #[test]
    fn busy_probes_never_count_towards_down_after() {
        let now = Instant::now();
        let mut h = HealthTracker::new();
        h.observe(ok(10), now, RULES);
        h.observe(fail(), now, RULES);
        for _ in 0..10 {
            let busy = ProbeOutcome::Busy {
                detail: "53300 too many connections".into(),
                rtt: Duration::from_millis(12),
            };
            assert_eq!(h.observe(busy, now, RULES), None);
        }
        assert_eq!(h.liveness(), Liveness::Up);
        assert_eq!(h.consecutive_failures(), 1, "busy answers are not failures");
        assert_eq!(h.last_failure().map(|(k, _)| *k), Some(FailureKind::Busy));
        assert_eq!(h.last_rtt(), Some(Duration::from_millis(12)));
        // Two more real failures make three: down.
        h.observe(fail(), now, RULES);
        assert_eq!(h.observe(fail(), now, RULES), Some(Transition::WentDown));
    }

    #[test]
    fn latency_is_the_median_of_the_window() {
        let now = Instant::now();
        let mut h = HealthTracker::new();
        for ms in [10, 11, 500, 12, 10] {
            h.observe(ok(ms), now, RULES);
        }
        assert_eq!(h.latency(), Some(Duration::from_millis(11)));
        for ms in [50, 50, 50] {
            h.observe(ok(ms), now, RULES);
        }
        assert_eq!(h.latency(), Some(Duration::from_millis(50)));
    }
}
