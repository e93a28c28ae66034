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
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::EndpointId;

/// Busy deadlines, one per endpoint id. The slot list is replaced (never
/// edited) when a reload changes the endpoint set; kept endpoints keep
/// their slot, so a cooldown survives the reload.
#[derive(Debug)]
pub struct Backpressure {
    cooldown: Duration,
    epoch: Instant,
    slots: ArcSwap<Vec<BusySlot>>,
}

#[derive(Debug, Clone)]
struct BusySlot {
    id: EndpointId,
    /// Nanoseconds since `epoch` until which the endpoint counts as busy;
    /// 0 when it is not.
    until: Arc<AtomicU64>,
}

impl Backpressure {
    pub fn new(
        ids: impl IntoIterator<Item = EndpointId>,
        cooldown: Duration,
        epoch: Instant,
    ) -> Self {
        let slots = ids
            .into_iter()
            .map(|id| BusySlot {
                id,
                until: Arc::new(AtomicU64::new(0)),
            })
            .collect();
        Self {
            cooldown,
            epoch,
            slots: ArcSwap::from_pointee(slots),
        }
    }

    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// Follows a new endpoint set: slots of kept ids carry over, new ids
    /// start not busy, gone ids are dropped.
    pub fn set_endpoints(&self, ids: impl IntoIterator<Item = EndpointId>) {
        let current = self.slots.load();
        let slots = ids
            .into_iter()
            .map(|id| {
                current
                    .iter()
                    .find(|s| s.id == id)
                    .cloned()
                    .unwrap_or_else(|| BusySlot {
                        id,
                        until: Arc::new(AtomicU64::new(0)),
                    })
            })
            .collect();
        self.slots.store(Arc::new(slots));
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
        if self.cooldown.is_zero() {
            return false;
        }
        let slots = self.slots.load();
        let Some(slot) = slots.iter().find(|s| s.id == id) else {
            return false;
        };
        let until = self.nanos(now + self.cooldown);
        let before = slot.until.fetch_max(until, Ordering::AcqRel);
        before < self.nanos(now)
    }

    /// The endpoint took a connect: no longer busy.
    pub fn clear(&self, id: EndpointId) {
        let slots = self.slots.load();
        if let Some(s) = slots.iter().find(|s| s.id == id) {
            // Skip the write (and the cache-line traffic) in the usual case.
            if s.until.load(Ordering::Acquire) != 0 {
                s.until.store(0, Ordering::Release);
            }
        }
    }

    /// Time left in the endpoint's cooldown at `now`, if it is busy.
    pub fn remaining(&self, id: EndpointId, now: Instant) -> Option<Duration> {
        let until = self
            .slots
            .load()
            .iter()
            .find(|s| s.id == id)?
            .until
            .load(Ordering::Acquire);
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
        let bp = Backpressure::new([A, B], Duration::from_secs(5), t0);
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
        let bp = Backpressure::new([A], Duration::from_secs(5), t0);
        bp.mark(A, t0);
        assert!(!bp.mark(A, t0 + Duration::from_secs(3)));
        assert!(bp.is_busy(A, t0 + Duration::from_secs(7)));
        // A refusal after the cooldown ended starts a new one.
        assert!(bp.mark(A, t0 + Duration::from_secs(9)));
    }

    #[test]
    fn an_older_refusal_never_shortens_the_cooldown() {
        let t0 = Instant::now();
        let bp = Backpressure::new([A], Duration::from_secs(5), t0);
        bp.mark(A, t0 + Duration::from_secs(3));
        bp.mark(A, t0);
        assert!(bp.is_busy(A, t0 + Duration::from_secs(7)));
    }

    #[test]
    fn a_successful_connect_clears_it() {
        let t0 = Instant::now();
        let bp = Backpressure::new([A], Duration::from_secs(5), t0);
        bp.mark(A, t0);
        bp.clear(A);
        assert!(!bp.is_busy(A, t0));
    }

    #[test]
    fn a_zero_cooldown_turns_it_off_and_unknown_ids_are_ignored() {
        let t0 = Instant::now();
        let bp = Backpressure::new([A], Duration::ZERO, t0);
        assert!(!bp.mark(A, t0));
        assert!(!bp.is_busy(A, t0));
        assert!(!bp.mark(EndpointId(7), t0));
        bp.clear(EndpointId(7));
        assert_eq!(bp.remaining(EndpointId(7), t0), None);
    }

    #[test]
    fn a_new_endpoint_set_keeps_the_cooldown_of_kept_ids() {
        let t0 = Instant::now();
        let bp = Backpressure::new([A, B], Duration::from_secs(5), t0);
        bp.mark(A, t0);
        bp.mark(B, t0);
        let c = EndpointId(2);
        bp.set_endpoints([A, c]);
        assert!(bp.is_busy(A, t0), "kept");
        assert!(!bp.is_busy(B, t0), "gone");
        assert!(!bp.is_busy(c, t0), "new");
        assert!(bp.mark(c, t0));
    }
}
