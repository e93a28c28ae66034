//! Connection admission: a token bucket for the connection rate and a
//! counter for concurrent connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::RateLimit;

/// A token bucket: `burst` tokens, refilled at `per_second`.
#[derive(Debug)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `per_second == 0` means unlimited.
    pub fn new(limit: RateLimit) -> Self {
        Self::new_at(limit, Instant::now())
    }

    fn new_at(limit: RateLimit, now: Instant) -> Self {
        let burst = f64::from(limit.burst.max(1));
        Self {
            per_second: limit.per_second,
            burst,
            state: Mutex::new(BucketState {
                tokens: burst,
                last: now,
            }),
        }
    }

    /// Takes one token if there is one.
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_at(Instant::now())
    }

    fn try_acquire_at(&self, now: Instant) -> bool {
        if self.per_second <= 0.0 {
            return true;
        }
        // A poisoned lock only means a panic elsewhere mid-update; the two
        // numbers are still usable.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.per_second).min(self.burst);
        s.last = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts live connections against a maximum.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: usize,
    active: Arc<AtomicUsize>,
}

/// One admitted connection; releases its slot when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    active: Arc<AtomicUsize>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A slot, or `None` when `max` connections are already live.
    pub fn try_acquire(&self) -> Option<ConnectionSlot> {
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionSlot {
            active: Arc::clone(&self.active),
        })
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_refills() {
        let t0 = Instant::now();
        let b = TokenBucket::new_at(
            RateLimit {
                per_second: 1.0,
                burst: 2,
            },
            t0,
        );
        assert!(b.try_acquire_at(t0));
        assert!(b.try_acquire_at(t0));
        assert!(!b.try_acquire_at(t0));
        assert!(!b.try_acquire_at(t0 + Duration::from_millis(500)));
        assert!(b.try_acquire_at(t0 + Duration::from_millis(1000)));
        assert!(!b.try_acquire_at(t0 + Duration::from_millis(1000)));
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(100);
        assert!(b.try_acquire_at(later));
        assert!(b.try_acquire_at(later));
        assert!(!b.try_acquire_at(later));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let b = TokenBucket::new(RateLimit {
            per_second: 0.0,
            burst: 0,
        });
        assert!((0..10_000).all(|_| b.try_acquire()));
    }

    #[test]
    fn connection_limit_counts_slots() {
        let l = ConnectionLimit::new(2);
        let a = l.try_acquire().unwrap();
        let _b = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        assert_eq!(l.active(), 2);
        drop(a);
        assert!(l.try_acquire().is_some());
    }
}
