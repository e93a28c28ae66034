//! Backpressure: endpoints that recently refused a connect for load
//! (53300 too many connections, 53400 configuration limit exceeded). Such
//! an endpoint is busy, not down: it keeps its sessions and its place in
//! the health state, but new connects try the other eligible endpoints
//! first until its cooldown ends. A successful connect to it ends the
//! cooldown early.
//!
//! One atomic deadline per endpoint, so the connect path reads it without a
//! lock; time is passed in, so the rule is tested without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::EndpointId;

/// Busy deadlines, indexed by endpoint id.
#[derive(Debug)]
pub struct Backpressure {
    cooldown: Duration,
    epoch: Instant,
    /// Nanoseconds since `epoch` until which the endpoint counts as busy;
    /// 0 when it is not.
    until: Vec<AtomicU64>,
}

impl Backpressure {
    pub fn new(endpoints: usize, cooldown: Duration, epoch: Instant) -> Self {
        Self {
            cooldown,
            epoch,
            until: (0..endpoints).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    fn nanos(&self, at: Instant) -> u64 {
        // +1 so that "busy until the epoch" is not confused with "not busy".
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// The endpoint refused a connect for load at `now`: busy for the
    /// cooldown from now. Returns true when it was not busy before.
    pub fn mark(&self, id: EndpointId, now: Instant) -> bool {
        let Some(slot) = self.until.get(id.index()) else {
            return false;
        };
        if self.cooldown.is_zero() {
            return false;
        }
        let until = self.nanos(now + self.cooldown);
        let before = slot.fetch_max(until, Ordering::AcqRel);
        before < self.nanos(now)
    }

    /// The endpoint took a connect: no longer busy.
    pub fn clear(&self, id: EndpointId) {
        if let Some(slot) = self.until.get(id.index()) {
            // Skip the write (and the cache-line traffic) in the usual case.
            if slot.load(Ordering::Acquire) != 0 {
                slot.store(0, Ordering::Release);
            }
        }
    }

    /// Time left in the endpoint's cooldown at `now`, if it is busy.
    pub fn remaining(&self, id: EndpointId, now: Instant) -> Option<Duration> {
        let until = self.until.get(id.index())?.load(Ordering::Acquire);
        let now = self.nanos(now);
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    pub fn is_busy(&self, id: EndpointId, now: Instant) -> bool {
        self.remaining(id, now).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: EndpointId = EndpointId(0);
    const B: EndpointId = EndpointId(1);

    #[test]
    fn busy_for_the_cooldown_then_not() {
        let t0 = Instant::now();
        let bp = Backpressure::new(2, Duration::from_secs(5), t0);
        assert!(!bp.is_busy(A, t0));
        assert!(bp.mark(A, t0), "first refusal starts a cooldown");
        assert!(bp.is_busy(A, t0 + Duration::from_secs(4)));
        assert!(!bp.is_busy(B, t0), "per endpoint");
        assert_eq!(
            bp.remaining(A, t0 + Duration::from_secs(1)),
            Some(Duration::from_secs(4))
        );
        assert!(!bp.is_busy(A, t0 + Duration::from_secs(5)));
    }

    #[test]
    fn another_refusal_extends_the_cooldown_and_is_not_new() {
        let t0 = Instant::now();
        let bp = Backpressure::new(1, Duration::from_secs(5), t0);
        bp.mark(A, t0);
        assert!(!bp.mark(A, t0 + Duration::from_secs(3)));
        assert!(bp.is_busy(A, t0 + Duration::from_secs(7)));
        // A refusal after the cooldown ended starts a new one.
        assert!(bp.mark(A, t0 + Duration::from_secs(9)));
    }

    #[test]
    fn an_older_refusal_never_shortens_the_cooldown() {
        let t0 = Instant::now();
        let bp = Backpressure::new(1, Duration::from_secs(5), t0);
        bp.mark(A, t0 + Duration::from_secs(3));
        bp.mark(A, t0);
        assert!(bp.is_busy(A, t0 + Duration::from_secs(7)));
    }

    #[test]
    fn a_successful_connect_clears_it() {
        let t0 = Instant::now();
        let bp = Backpressure::new(1, Duration::from_secs(5), t0);
        bp.mark(A, t0);
        bp.clear(A);
        assert!(!bp.is_busy(A, t0));
    }

    #[test]
    fn a_zero_cooldown_turns_it_off_and_unknown_ids_are_ignored() {
        let t0 = Instant::now();
        let bp = Backpressure::new(1, Duration::ZERO, t0);
        assert!(!bp.mark(A, t0));
        assert!(!bp.is_busy(A, t0));
        assert!(!bp.mark(EndpointId(7), t0));
        bp.clear(EndpointId(7));
        assert_eq!(bp.remaining(EndpointId(7), t0), None);
    }
}
