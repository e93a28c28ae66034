//! Opt-in adaptive busy polling for the single-threaded runtime.
//!
//! Every hop through the proxy costs a sleep and a wake-up: the runtime
//! parks in `epoll_wait`, and the peer whose bytes arrive pays to wake it
//! (an inter-processor interrupt, which in a VM is an exit to the host).
//! On loopback that is most of the proxy's cost. With busy polling on, a
//! poller task keeps the runtime checking its sockets for up to a window
//! after the last relay activity instead of parking, yielding the CPU to
//! any other runnable thread on each turn.
//!
//! The window adapts the way the kernel's haltpoll cpuidle governor does:
//! it grows while idle spells end within the configured maximum (polling
//! would have caught the next event) and shrinks to zero when they last
//! longer, so a proxy in front of a database milliseconds away, or an idle
//! one, does not poll at all. Polling also stops as soon as a thread yield
//! comes back late: another thread wanted this CPU, and on a saturated
//! machine polling would take from the application or the database. The
//! relay pays one atomic add and one load per poll; nothing is timed unless
//! the poller is parked.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Largest window accepted: beyond a millisecond, polling costs more CPU
/// than any wake-up it saves.
pub const MAX_WINDOW: Duration = Duration::from_millis(1);

/// A thread yield taking this long means another thread ran meanwhile.
const CONTENDED_YIELD: Duration = Duration::from_micros(20);

/// Shared between the relays (which report activity) and the poller task.
#[derive(Debug)]
pub struct BusyPoll {
    max_ns: u64,
    /// Current window; 0 until idle spells show polling would pay.
    window_ns: AtomicU64,
    /// Bumped by every relay poll; the poller watches it change.
    activity: AtomicU64,
    /// The poller gave up and parked; the next relay poll wakes it.
    parked: AtomicBool,
    /// When the idle spell that ended in parking began (ns since `epoch`).
    idle_since_ns: AtomicU64,
    epoch: Instant,
    wake: Notify,
}

impl BusyPoll {
    /// `max` is the longest the poller keeps the runtime polling after the
    /// last activity; it must be in `(0, MAX_WINDOW]`.
    pub fn new(max: Duration) -> Result<Arc<Self>, String> {
        if max.is_zero() || max > MAX_WINDOW {
            return Err(format!(
                "busy-poll window must be between 1us and {}us (got {}us)",
                MAX_WINDOW.as_micros(),
                max.as_micros()
            ));
        }
        Ok(Arc::new(Self {
            max_ns: u64::try_from(max.as_nanos()).unwrap_or(u64::MAX),
            window_ns: AtomicU64::new(0),
            activity: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            idle_since_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            wake: Notify::new(),
        }))
    }

    /// The window the poller currently uses.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Relaxed))
    }

    /// Called by the relay on every poll: cheap unless the poller is parked.
    #[inline]
    pub fn note_activity(&self) {
        self.activity.fetch_add(1, Relaxed);
        if self.parked.load(Relaxed) {
            self.unpark();
        }
    }

    #[cold]
    fn unpark(&self) {
        if !self.parked.swap(false, Relaxed) {
            return;
        }
        let idle_ns = self
            .nanos_since_epoch(Instant::now())
            .saturating_sub(self.idle_since_ns.load(Relaxed));
        let window = next_window(self.window_ns.load(Relaxed), idle_ns, self.max_ns);
        self.window_ns.store(window, Relaxed);
        self.wake.notify_one();
    }

    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The poller: runs for the life of the runtime. Each turn yields to
    /// the scheduler, which then polls the I/O driver without blocking
    /// (tokio runs yielded tasks only after a driver poll), and then yields
    /// the thread, so a runnable peer on this CPU is not held up.
    pub async fn run(self: Arc<Self>) {
        loop {
            let mut seen = self.activity.load(Relaxed);
            let mut idle_since = Instant::now();
            loop {
                tokio::task::yield_now().await;
                let now = self.activity.load(Relaxed);
                if now != seen {
                    seen = now;
                    idle_since = Instant::now();
                    continue;
                }
                let turn = Instant::now();
                if turn.duration_since(idle_since) >= self.window() {
                    break;
                }
                std::thread::yield_now();
                // A yield that took long ran someone else: this CPU is
                // wanted, and polling on would take from them.
                if turn.elapsed() >= CONTENDED_YIELD {
                    break;
                }
            }
            // Nothing within the window: park until a relay is active again.
            // A notify_one before `notified` is polled is kept as a permit,
            // so no wake-up is lost between these lines.
            self.idle_since_ns
                .store(self.nanos_since_epoch(idle_since), Relaxed);
            self.parked.store(true, Relaxed);
            self.wake.notified().await;
        }
    }
}

/// The haltpoll rule: after an idle spell of `idle_ns` that the window
/// `window_ns` did not cover, grow it (doubling, from an eighth of the
/// maximum) if polling up to `max_ns` would have covered it, otherwise
/// halve it, down to 0.
pub fn next_window(window_ns: u64, idle_ns: u64, max_ns: u64) -> u64 {
    let start = (max_ns / 8).max(1);
    if idle_ns <= max_ns {
        if idle_ns > window_ns {
            window_ns.saturating_mul(2).max(start).min(max_ns)
        } else {
            window_ns
        }
    } else {
        let halved = window_ns / 2;
        if halved < start {
            0
        } else {
            halved
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 200_000;

    #[test]
    fn short_idle_spells_grow_the_window_to_the_maximum() {
        let mut w = 0;
        let mut seen = Vec::new();
        for _ in 0..5 {
            w = next_window(w, 150_000, MAX);
            seen.push(w);
        }
        assert_eq!(seen, [25_000, 50_000, 100_000, 200_000, 200_000]);
    }

    #[test]
    fn long_idle_spells_shrink_it_to_zero() {
        let mut w = MAX;
        let mut seen = Vec::new();
        for _ in 0..4 {
            w = next_window(w, 5_000_000, MAX);
            seen.push(w);
        }
        assert_eq!(seen, [100_000, 50_000, 25_000, 0]);
    }

    #[test]
    fn a_spell_the_window_covered_leaves_it_alone() {
        assert_eq!(next_window(100_000, 80_000, MAX), 100_000);
    }

    #[test]
    fn windows_out_of_range_are_refused() {
        assert!(BusyPoll::new(Duration::ZERO).is_err());
        assert!(BusyPoll::new(Duration::from_millis(2)).is_err());
        assert!(BusyPoll::new(Duration::from_micros(200)).is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_poller_parks_when_idle_and_adapts_on_activity() {
        let poll = BusyPoll::new(Duration::from_micros(200)).unwrap();
        let task = tokio::spawn(Arc::clone(&poll).run());
        // With a zero window the poller parks at its first idle turn.
        for _ in 0..100 {
            if poll.parked.load(Relaxed) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(poll.parked.load(Relaxed), "an idle poller parks");
        poll.note_activity();
        assert!(!poll.parked.load(Relaxed), "activity wakes it");
        // At the maximum window, a spell far beyond it halves the window.
        poll.window_ns.store(200_000, Relaxed);
        for _ in 0..10_000 {
            if poll.parked.load(Relaxed) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(poll.parked.load(Relaxed));
        tokio::time::sleep(Duration::from_millis(5)).await;
        poll.note_activity();
        assert_eq!(poll.window(), Duration::from_micros(100));
        task.abort();
    }
}
