//! Graceful shutdown support inside the session layer: a count of the
//! sessions still running (so the binary can wait for them to end) and the
//! proxy-wide "close every session now" signal, the last step of a drain.
//! The binary decides *when* (see `crates/dsql-proxy/src/shutdown.rs`);
//! sessions decide *how* (at a message boundary, with FATAL 57P01).

use std::future::pending;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

/// Process-unique session ids for log spans, starting at 1.
static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// The next session id; every accepted connection gets one.
pub fn next_session_id() -> u64 {
    NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed)
}

/// Shared by the accept loop (counts sessions in), every session task
/// (counted out on drop, watches the close signal) and the binary's shutdown
/// sequence (waits for zero, then closes what is left).
pub struct Drain {
    close: watch::Sender<bool>,
    sessions: AtomicUsize,
    idle: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            close: watch::Sender::new(false),
            sessions: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }
}

impl Drain {
    /// Counts one session in until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>) -> SessionGuard {
        self.sessions.fetch_add(1, Ordering::AcqRel);
        SessionGuard {
            drain: Arc::clone(self),
        }
    }

    /// Sessions (including ones still in startup) that have not ended.
    pub fn active(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// Resolves once no session is running.
    pub async fn idle(&self) {
        loop {
            // Created before the check so a wake-up in between is not lost
            // (`notify_waiters` reaches futures created before it).
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Tells every session, running or still starting, to end now with
    /// FATAL 57P01. Sessions that start later end at once too.
    pub fn close_all(&self) {
        self.close.send_replace(true);
    }

    /// The receiving half of [`Self::close_all`], one per session.
    pub fn close_signal(&self) -> CloseSignal {
        CloseSignal(self.close.subscribe())
    }
}

/// Held by a session task for its whole life.
pub struct SessionGuard {
    drain: Arc<Drain>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.drain.sessions.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drain.idle.notify_waiters();
        }
    }
}

/// A session's view of [`Drain::close_all`]. Waiting on it costs an atomic
/// version check per poll, like the endpoint down-watch.
#[derive(Clone)]
pub struct CloseSignal(watch::Receiver<bool>);

impl CloseSignal {
    /// Resolves once the proxy closes every session (at once if it already
    /// has); never if the proxy is gone without closing.
    pub async fn closed(&mut self) {
        if self.0.wait_for(|closing| *closing).await.is_err() {
            pending::<()>().await;
        }
    }

    pub fn is_closed(&self) -> bool {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_the_last_guard() {
        let drain = Arc::new(Drain::default());
        drain.idle().await; // nothing running: at once
        let a = drain.enter();
        let b = drain.enter();
        assert_eq!(drain.active(), 2);
        let waiter = tokio::spawn({
            let drain = Arc::clone(&drain);
            async move { drain.idle().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("idle resolves when the last session ends")
            .unwrap();
        assert_eq!(drain.active(), 0);
    }

    #[tokio::test]
    async fn close_reaches_current_and_later_sessions() {
        let drain = Drain::default();
        let mut early = drain.close_signal();
        assert!(!early.is_closed());
        let waiter = tokio::spawn(async move { early.closed().await });
        drain.close_all();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        let mut late = drain.close_signal();
        assert!(late.is_closed());
        tokio::time::timeout(Duration::from_secs(1), late.closed())
            .await
            .expect("already closed resolves at once");
    }

    #[test]
    fn session_ids_are_unique() {
        let a = next_session_id();
        let b = next_session_id();
        assert!(b > a);
    }
}
