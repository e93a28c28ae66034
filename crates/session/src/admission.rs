//! Admission control for backend connects: a rate limiter shared by every
//! session of the proxy (one cluster), so the proxy never opens backend
//! connections faster than the database allows (Aurora DSQL: 100 per second
//! per cluster, burst 1,000).
//!
//! The limiter is GCRA (the generic cell rate algorithm, a token bucket kept
//! as one number): a "theoretical arrival time" `tat` in nanoseconds since
//! the limiter's epoch, advanced by one emission interval per admitted
//! connect with a compare-and-swap, so it takes no lock. A connect that
//! arrives at `now` gets the slot `max(now, tat - tolerance)`, where the
//! tolerance lets `burst` connects through at once; a later slot means
//! waiting. Waiting connects are counted, and bounded by the queue size.
//!
//! Time is passed in ([`ConnectLimiter::reserve`]) so the arithmetic is
//! tested without sleeping; [`ConnectLimiter::admit`] is the async wrapper
//! on the real clock.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Settings of one limiter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Connects per second; must be positive.
    pub rate: f64,
    /// Connects admitted at once; at least 1.
    pub burst: u32,
    /// Connects that may wait for their slot at once.
    pub queue: usize,
}

/// Why a connect was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `queue` connects are already waiting.
    QueueFull { queue: usize },
    /// The connect's slot is further away than it may wait.
    OverBudget { wait: Duration },
}

/// An admitted connect: dial after `wait`. While it waits it holds a place
/// in the queue, released when this is dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    pub wait: Duration,
    _place: Option<QueuePlace<'a>>,
}

#[derive(Debug)]
struct QueuePlace<'a>(&'a AtomicUsize);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A lock-free GCRA rate limiter with a bounded wait queue.
#[derive(Debug)]
pub struct ConnectLimiter {
    limit: RateLimit,
    /// Nanoseconds between two connects at the steady rate.
    interval: u64,
    /// How far `tat` may run ahead of now before connects wait:
    /// `(burst - 1) * interval`.
    tolerance: u64,
    /// Theoretical arrival time, nanoseconds since `epoch`.
    tat: AtomicU64,
    waiting: AtomicUsize,
    epoch: Instant,
}

impl ConnectLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let interval = ((1e9 / limit.rate).round() as u64).max(1);
        let burst = u64::from(limit.burst.max(1));
        Self {
            limit,
            interval,
            tolerance: (burst - 1).saturating_mul(interval),
            tat: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Connects waiting for their slot right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Claims the next slot for a connect arriving `now` (nanoseconds since
    /// the epoch) that may wait at most `max_wait`. A refused connect
    /// claims nothing, so it does not delay the ones after it.
    pub fn reserve(&self, now: u64, max_wait: Duration) -> Result<Reservation<'_>, Refusal> {
        let max_wait_ns = u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX);
        let mut place = None;
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let slot = now.max(tat.saturating_sub(self.tolerance));
            let wait = slot - now;
            if wait > max_wait_ns {
                return Err(Refusal::OverBudget {
                    wait: Duration::from_nanos(wait),
                });
            }
            // Take a place in the queue before claiming a slot that needs
            // waiting, so a full queue refuses without claiming anything.
            if wait > 0 && place.is_none() {
                place = Some(self.enter_queue()?);
            }
            let next = now.max(tat).saturating_add(self.interval);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Reservation {
                        wait: Duration::from_nanos(wait),
                        // A retry may have found a free slot after all.
                        _place: if wait > 0 { place } else { None },
                    });
                }
                Err(actual) => tat = actual,
            }
        }
    }

    fn enter_queue(&self) -> Result<QueuePlace<'_>, Refusal> {
        let queue = self.limit.queue;
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < queue).then_some(n + 1)
            })
            .map(|_| QueuePlace(&self.waiting))
            .map_err(|_| Refusal::QueueFull { queue })
    }

    /// Nanoseconds since the epoch on the tokio clock.
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Reserves a slot on the real clock; the caller sleeps for `wait`
    /// while holding the reservation (see [`Reservation`]).
    pub fn admit(&self, max_wait: Duration) -> Result<Reservation<'_>, Refusal> {
        self.reserve(self.now(), max_wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const FOREVER: Duration = Duration::from_secs(3600);

    fn limiter(rate: f64, burst: u32, queue: usize) -> ConnectLimiter {
        ConnectLimiter::new(RateLimit { rate, burst, queue })
    }

    /// Reserves at `now` and keeps the reservation (its queue place).
    fn wait_at<'a>(l: &'a ConnectLimiter, now: u64, held: &mut Vec<Reservation<'a>>) -> u64 {
        let r = l.reserve(now, FOREVER).expect("admitted");
        let w = r.wait.as_nanos() as u64;
        held.push(r);
        w
    }

    #[test]
    fn a_burst_passes_at_once_then_the_rate_applies() {
        let l = limiter(10.0, 5, 100);
        let mut held = Vec::new();
        let t0 = 7 * SEC;
        for _ in 0..5 {
            assert_eq!(wait_at(&l, t0, &mut held), 0);
        }
        assert_eq!(l.waiting(), 0, "burst connects never queue");
        // The next ones are spaced by the interval (100ms).
        for k in 1..=5u64 {
            assert_eq!(wait_at(&l, t0, &mut held), k * SEC / 10);
        }
        assert_eq!(l.waiting(), 5);
        held.clear();
        assert_eq!(l.waiting(), 0, "dropping a reservation leaves the queue");
    }

    #[test]
    fn the_steady_rate_is_kept_and_idle_time_refills_the_burst() {
        let l = limiter(10.0, 3, 100);
        let mut held = Vec::new();
        // One connect every interval never waits.
        for k in 0..50u64 {
            assert_eq!(wait_at(&l, SEC + k * SEC / 10, &mut held), 0);
        }
        // Twice the rate: every second connect waits longer.
        let start = 20 * SEC;
        let mut last = 0;
        for k in 0..40u64 {
            let now = start + k * SEC / 20;
            let w = wait_at(&l, now, &mut held);
            last = now + w;
        }
        // 40 connects at 10/s with a burst of 3 end (40 - 3) intervals in.
        assert_eq!(last, start + 37 * SEC / 10);
        held.clear();
        // After a pause of burst intervals the whole burst is back.
        let later = last + 3 * SEC / 10;
        for _ in 0..3 {
            assert_eq!(wait_at(&l, later, &mut held), 0);
        }
        assert!(wait_at(&l, later, &mut held) > 0);
    }

    #[test]
    fn a_long_idle_period_does_not_bank_more_than_the_burst() {
        let l = limiter(100.0, 2, 100);
        let mut held = Vec::new();
        let now = 3600 * SEC;
        assert_eq!(wait_at(&l, now, &mut held), 0);
        assert_eq!(wait_at(&l, now, &mut held), 0);
        assert_eq!(wait_at(&l, now, &mut held), SEC / 100);
    }

    #[test]
    fn the_queue_bound_refuses_without_claiming_a_slot() {
        let l = limiter(1.0, 1, 2);
        let mut held = Vec::new();
        assert_eq!(wait_at(&l, SEC, &mut held), 0);
        assert_eq!(wait_at(&l, SEC, &mut held), SEC);
        assert_eq!(wait_at(&l, SEC, &mut held), 2 * SEC);
        assert_eq!(
            l.reserve(SEC, FOREVER).unwrap_err(),
            Refusal::QueueFull { queue: 2 }
        );
        // The refusal claimed nothing: once a waiter leaves, the next
        // connect gets the slot right after the last admitted one.
        held.pop();
        assert_eq!(wait_at(&l, SEC, &mut held), 3 * SEC);
    }

    #[test]
    fn a_slot_beyond_the_budget_is_refused_at_once() {
        let l = limiter(1.0, 1, 100);
        let mut held = Vec::new();
        assert_eq!(wait_at(&l, SEC, &mut held), 0);
        let refused = l.reserve(SEC, Duration::from_millis(500)).unwrap_err();
        assert_eq!(
            refused,
            Refusal::OverBudget {
                wait: Duration::from_secs(1)
            }
        );
        assert_eq!(l.waiting(), 0);
        // Nothing was claimed: a patient connect still gets the 1s slot.
        let r = l.reserve(SEC, Duration::from_secs(1)).unwrap();
        assert_eq!(r.wait, Duration::from_secs(1));
    }

    #[test]
    fn a_queue_of_zero_admits_only_connects_that_need_not_wait() {
        let l = limiter(1.0, 2, 0);
        assert_eq!(l.reserve(SEC, FOREVER).unwrap().wait, Duration::ZERO);
        assert_eq!(l.reserve(SEC, FOREVER).unwrap().wait, Duration::ZERO);
        assert_eq!(
            l.reserve(SEC, FOREVER).unwrap_err(),
            Refusal::QueueFull { queue: 0 }
        );
    }

    #[test]
    fn the_first_connects_after_start_get_the_whole_burst() {
        // `now` is tiny right after the epoch: no underflow, full burst.
        let l = limiter(100.0, 3, 10);
        let mut held = Vec::new();
        for _ in 0..3 {
            assert_eq!(wait_at(&l, 1, &mut held), 0);
        }
        assert_eq!(wait_at(&l, 1, &mut held), SEC / 100);
    }

    #[test]
    fn concurrent_connects_are_never_over_admitted() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 500;
        const BURST: u32 = 50;
        let l = limiter(1000.0, BURST, THREADS * PER_THREAD);
        let now = 5 * SEC;
        let interval = SEC / 1000;
        let mut slots: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::with_capacity(PER_THREAD);
                        for _ in 0..PER_THREAD {
                            let r = l.reserve(now, FOREVER).expect("queue is big enough");
                            mine.push(now + r.wait.as_nanos() as u64);
                            std::mem::forget(r);
                        }
                        mine
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        slots.sort_unstable();
        assert_eq!(slots.len(), THREADS * PER_THREAD);
        // Exactly the burst at once, then one connect per interval: the
        // k-th connect (0-based) is never earlier than its GCRA slot.
        for (k, slot) in slots.iter().enumerate() {
            let earliest = now + (k as u64).saturating_sub(u64::from(BURST) - 1) * interval;
            assert_eq!(*slot, earliest, "connect {k}");
        }
    }
}
