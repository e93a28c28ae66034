//! `[listen] max_client_connections`: a count of open client connections
//! checked against the limit of the context each connection is accepted
//! with, so a reload changes the limit for new connections while the
//! count of those already open carries over.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub(crate) struct ClientLimit {
    open: AtomicUsize,
}

/// One open client connection; dropping it frees its place.
#[derive(Debug)]
pub(crate) struct ClientPermit(Arc<ClientLimit>);

impl ClientLimit {
    /// A place under `max`, or `None` when `max` connections are open. A
    /// lowered limit closes nothing: it refuses new connections until
    /// enough have ended.
    pub(crate) fn try_acquire(self: &Arc<Self>, max: usize) -> Option<ClientPermit> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| ClientPermit(Arc::clone(self)))
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_limit_holds_until_enough_connections_end() {
        let limit = Arc::new(ClientLimit::default());
        let mut held: Vec<ClientPermit> = (0..3).filter_map(|_| limit.try_acquire(3)).collect();
        assert_eq!(held.len(), 3);
        assert!(limit.try_acquire(3).is_none());
        // Raised: room at once.
        held.push(limit.try_acquire(5).unwrap());
        // Lowered below what is open: nothing closes, nothing new enters.
        assert!(limit.try_acquire(2).is_none());
        held.truncate(2);
        assert_eq!(limit.open(), 2);
        assert!(limit.try_acquire(2).is_none());
        held.pop();
        assert!(limit.try_acquire(2).is_some());
        assert_eq!(limit.open(), 1, "the permit above was dropped at once");
    }
}
