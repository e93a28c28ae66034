//! The selection rule: which endpoint new sessions use, and the order the
//! rest are tried in when a connect fails.
//!
//! 1. Eligible endpoints are those not marked down, not drained (admin
//!    API) and, under
//!    `route53 = "veto"`, not reported unhealthy by a fresh Route 53
//!    reading.
//! 2. With `prefer_region`, eligible endpoints of that Region rank first.
//! 3. Among eligible endpoints with a measured latency, those within
//!    `latency_tolerance` of the lowest count as equally fast; lower
//!    `priority` wins among them, then the current selection (so equal
//!    endpoints never flap), then lower latency, then config order. The
//!    others follow by latency; endpoints not yet measured come after, by
//!    priority.
//! 4. Ineligible endpoints come last, most recently healthy first: when
//!    nothing looks healthy the proxy's view may be wrong, so they are
//!    still tried.
//!
//! The selection moves at once when the selected endpoint becomes
//! ineligible (or has no measurement while the winner has one, or was only
//! chosen provisionally, before every endpoint had reported at startup);
//! otherwise a new winner must win `switch_after` consecutive probe rounds.

use std::cmp::Ordering;
use std::time::{Duration, Instant};

use dsql_proxy_config::Route53Policy;

use crate::{EndpointId, Liveness};

#[derive(Debug, Clone)]
pub struct SelectionPolicy {
    pub latency_tolerance: Duration,
    pub prefer_region: Option<String>,
    pub route53: Route53Policy,
    pub switch_after: u32,
}

/// What the rule needs to know about one endpoint.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub id: EndpointId,
    pub region: Option<&'a str>,
    pub priority: u32,
    pub liveness: Liveness,
    pub latency: Option<Duration>,
    /// Route 53's fresh verdict, if any.
    pub route53_healthy: Option<bool>,
    pub last_up: Option<Instant>,
    /// Drained through the admin API: ineligible, like an unhealthy one.
    pub drained: bool,
}

impl Candidate<'_> {
    pub fn eligible(&self, policy: &SelectionPolicy) -> bool {
        self.liveness != Liveness::Down
            && !self.drained
            && !(policy.route53 == Route53Policy::Veto && self.route53_healthy == Some(false))
    }
}

/// Why the selected endpoint is selected, for status and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectionReason {
    /// Pinned by `prefer_region`.
    PreferredRegion,
    /// Lowest latency (or within tolerance with the best priority).
    Fastest,
    /// No endpoint has a latency measurement yet: lowest priority.
    Priority,
    /// Still the selection: a better endpoint has not yet won enough rounds.
    Holding,
    /// Nothing is eligible; this is only the first to try.
    NoneHealthy,
}

impl SelectionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreferredRegion => "preferred_region",
            Self::Fastest => "fastest",
            Self::Priority => "priority",
            Self::Holding => "holding",
            Self::NoneHealthy => "none_healthy",
        }
    }
}

/// The result of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Every endpoint id, in the order connects try them.
    pub order: Vec<EndpointId>,
    /// How many leading entries of `order` are eligible.
    pub eligible: usize,
    pub reason: SelectionReason,
    /// True when the selected endpoint differs from the previous one.
    pub changed: bool,
}

impl Selection {
    pub fn selected(&self) -> Option<EndpointId> {
        (self.eligible > 0).then(|| self.order[0])
    }
}

/// Remembers the current selection and a challenger's winning streak.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    current: Option<EndpointId>,
    challenger: Option<(EndpointId, u32)>,
    /// The current selection was made on partial information (before every
    /// endpoint had reported): the next evaluation replaces it at once.
    provisional: bool,
}

impl Selector {
    pub fn current(&self) -> Option<EndpointId> {
        self.current
    }

    /// Marks the current selection as provisional: the next evaluation
    /// picks the winner at once instead of making it win `switch_after`
    /// rounds. The monitor calls this when the first complete set of
    /// measurements is in, so that the selection made while only some
    /// endpoints had reported does not hold off a better (or preferred,
    /// or higher-priority) endpoint for the first rounds.
    pub fn mark_provisional(&mut self) {
        self.provisional = true;
    }

    /// Evaluates the rule. `round` is true for the periodic evaluation that
    /// counts towards `switch_after`; event-driven evaluations (an endpoint
    /// went up or down) only move the selection when they must.
    pub fn evaluate(
        &mut self,
        candidates: &[Candidate<'_>],
        policy: &SelectionPolicy,
        round: bool,
    ) -> Selection {
        let provisional = std::mem::take(&mut self.provisional);
        let ranked = rank(candidates, policy, self.current);
        let eligible = ranked.iter().filter(|c| c.eligible(policy)).count();
        let mut order: Vec<EndpointId> = ranked.iter().map(|c| c.id).collect();
        let previous = self.current;
        if eligible == 0 {
            self.current = None;
            self.challenger = None;
            return Selection {
                order,
                eligible,
                reason: SelectionReason::NoneHealthy,
                changed: previous.is_some(),
            };
        }
        let winner = ranked[0];
        let winner_reason = reason_for(winner, policy);
        let current = self
            .current
            .and_then(|id| ranked[..eligible].iter().find(|c| c.id == id).copied());
        let (chosen, reason) = match current {
            None => (winner.id, winner_reason),
            Some(c) if c.id == winner.id => {
                self.challenger = None;
                (c.id, winner_reason)
            }
            // A measured winner replaces an unmeasured selection at once:
            // that is the first probe round after startup. So does any
            // winner a provisional selection.
            Some(c) if provisional || (c.latency.is_none() && winner.latency.is_some()) => {
                (winner.id, winner_reason)
            }
            Some(c) => {
                let streak = match self.challenger {
                    Some((id, n)) if id == winner.id => n + u32::from(round),
                    _ => u32::from(round),
                };
                if streak >= policy.switch_after {
                    (winner.id, winner_reason)
                } else {
                    self.challenger = Some((winner.id, streak));
                    (c.id, SelectionReason::Holding)
                }
            }
        };
        if chosen != winner.id {
            // Keep the held selection first in the connect order.
            if let Some(pos) = order.iter().position(|&id| id == chosen) {
                let id = order.remove(pos);
                order.insert(0, id);
            }
        } else {
            self.challenger = None;
        }
        self.current = Some(chosen);
        Selection {
            order,
            eligible,
            reason,
            changed: previous != Some(chosen),
        }
    }
}

fn reason_for(winner: &Candidate<'_>, policy: &SelectionPolicy) -> SelectionReason {
    let preferred = policy
        .prefer_region
        .as_deref()
        .is_some_and(|r| winner.region == Some(r));
    if preferred {
        SelectionReason::PreferredRegion
    } else if winner.latency.is_some() {
        SelectionReason::Fastest
    } else {
        SelectionReason::Priority
    }
}

/// Sorts candidates by the rule; ties within tolerance favour `current`.
fn rank<'c, 'a>(
    candidates: &'c [Candidate<'a>],
    policy: &SelectionPolicy,
    current: Option<EndpointId>,
) -> Vec<&'c Candidate<'a>> {
    let preferred = |c: &Candidate<'_>| {
        policy
            .prefer_region
            .as_deref()
            .is_some_and(|r| c.region == Some(r))
    };
    // Tolerance is measured from the best latency within the same
    // preference group, so a pinned Region is compared with itself.
    let best_latency = |want_preferred: bool| {
        candidates
            .iter()
            .filter(|c| c.eligible(policy) && preferred(c) == want_preferred)
            .filter_map(|c| c.latency)
            .min()
    };
    let best = [best_latency(false), best_latency(true)];
    let class = |c: &Candidate<'_>| -> u8 {
        if !c.eligible(policy) {
            return INELIGIBLE;
        }
        let group_best = best[usize::from(preferred(c))];
        let measured = match (c.latency, group_best) {
            (Some(l), Some(b)) if l <= b + policy.latency_tolerance => 0,
            (Some(_), _) => 1,
            (None, _) => 2,
        };
        if preferred(c) {
            measured
        } else {
            measured + 10
        }
    };
    const INELIGIBLE: u8 = 30;
    let mut ranked: Vec<&Candidate<'a>> = candidates.iter().collect();
    ranked.sort_by(|a, b| {
        let (ca, cb) = (class(a), class(b));
        ca.cmp(&cb).then_with(|| match ca {
            0 | 10 => a
                .priority
                .cmp(&b.priority)
                .then_with(|| (Some(b.id) == current).cmp(&(Some(a.id) == current)))
                .then_with(|| a.latency.cmp(&b.latency))
                .then_with(|| a.id.cmp(&b.id)),
            1 | 11 => a.latency.cmp(&b.latency).then_with(|| a.id.cmp(&b.id)),
            2 | 12 => a.priority.cmp(&b.priority).then_with(|| a.id.cmp(&b.id)),
            // Ineligible: most recently healthy first, never-healthy last.
            _ => match (a.last_up, b.last_up) {
                (Some(x), Some(y)) => y.cmp(&x),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            }
            .then_with(|| a.priority.cmp(&b.priority))
            .then_with(|| a.id.cmp(&b.id)),
        })
    });
    ranked
}

#[cfg(test)]
mod tests;
