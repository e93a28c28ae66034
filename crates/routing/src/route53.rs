//! What Route 53 last said about an endpoint, and whether that still counts.

use std::time::{Duration, Instant};

/// One successful reading of a Route 53 health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route53Reading {
    /// Route 53's verdict (disabled counts as healthy, inverted reverses).
    pub healthy: bool,
    pub disabled: bool,
    pub inverted: bool,
    pub successes: u32,
    pub observations: u32,
}

/// The last reading, its age, and the errors since.
#[derive(Debug, Clone, Default)]
pub struct Route53State {
    last: Option<(Route53Reading, Instant)>,
    last_error: Option<String>,
    errors_total: u64,
}

impl Route53State {
    pub fn record(&mut self, reading: Route53Reading, now: Instant) {
        self.last = Some((reading, now));
        self.last_error = None;
    }

    pub fn record_error(&mut self, error: String) {
        self.errors_total += 1;
        self.last_error = Some(error);
    }

    pub fn reading(&self) -> Option<&Route53Reading> {
        self.last.as_ref().map(|(r, _)| r)
    }

    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.last
            .as_ref()
            .map(|(_, at)| now.saturating_duration_since(*at))
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn errors_total(&self) -> u64 {
        self.errors_total
    }

    /// The verdict routing may use: the last reading while it is younger
    /// than `max_staleness`. A Route 53 outage must not take the database
    /// away, so a stale reading stops counting either way.
    pub fn effective(&self, now: Instant, max_staleness: Duration) -> Option<bool> {
        let (reading, at) = self.last.as_ref()?;
        (now.saturating_duration_since(*at) <= max_staleness).then_some(reading.healthy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_counts_until_it_is_stale() {
        let t0 = Instant::now();
        let mut s = Route53State::default();
        assert_eq!(s.effective(t0, Duration::from_secs(60)), None);
        s.record(
            Route53Reading {
                healthy: false,
                disabled: false,
                inverted: false,
                successes: 0,
                observations: 16,
            },
            t0,
        );
        s.record_error("Throttling".into());
        assert_eq!(
            s.effective(t0 + Duration::from_secs(59), Duration::from_secs(60)),
            Some(false)
        );
        assert_eq!(
            s.effective(t0 + Duration::from_secs(61), Duration::from_secs(60)),
            None
        );
        assert_eq!(s.errors_total(), 1);
    }
}
