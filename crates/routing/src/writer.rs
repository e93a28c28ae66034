//! Aurora Global Database (and plain PostgreSQL replication): which
//! endpoint is the writer, which stale writers are fenced, and the order
//! read-only sessions try replicas in. Pure: role observations in,
//! decisions out; the monitor owns the state and acts on the result.
//!
//! The writer rule never trusts a stale writer:
//! 1. A fenced endpoint is released only once it is seen read-only (it
//!    rejoined as a replica).
//! 2. The writable set is every unfenced endpoint whose last observation
//!    accepts writes, reachable or not: an unreachable old primary may
//!    still be taking writes from someone.
//! 3. One writable endpoint is the writer. With several, the one with a
//!    strictly higher timeline is proven newer and the others (lower,
//!    known timelines) are fenced; when the newest is not unique or a
//!    timeline is unknown, there is no writer (split brain: writes go
//!    nowhere rather than to the wrong primary).
//! 4. The winner must be reachable now; otherwise there is no writer and
//!    read-write sessions wait for one.

use std::time::Duration;

use crate::EndpointId;

/// What a probe learned about one endpoint's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleObservation {
    /// In recovery (a streaming standby, an Aurora secondary): no writes.
    pub read_only: bool,
    /// The endpoint's timeline: higher is newer after a promotion.
    pub timeline: Option<u32>,
    /// How far a replica's visible data is behind; `None` when unknown.
    /// Zero on a writer.
    pub lag: Option<Duration>,
    /// What Aurora's own functions report, when the endpoint is Aurora.
    pub aurora: Option<AuroraStatus>,
}

/// An Aurora endpoint's view of its global database, from
/// `aurora_global_db_instance_status()` and `aurora_global_db_status()`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuroraStatus {
    /// The Region of the instance the probe is connected to.
    pub region: Option<String>,
    /// The Region of the instance holding `MASTER_SESSION_ID` (the writer),
    /// as this endpoint sees it.
    pub writer_region: Option<String>,
    /// This Region's RPO lag (`rpo_lag_in_msec`); `None` on the primary
    /// Region (where Aurora reports -1) or when unknown.
    pub rpo_lag: Option<Duration>,
}

/// One endpoint as the writer rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct RoleInput<'a> {
    pub id: EndpointId,
    /// Probes say it answers (not marked down).
    pub reachable: bool,
    /// The last role observed, however old.
    pub role: Option<&'a RoleObservation>,
}

/// Why there is no writer, for the client's error and `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoWriter {
    /// Every endpoint is read-only, fenced or unobserved.
    NoneWritable,
    /// Several endpoints accept writes and none is proven newer.
    SplitBrain(Vec<EndpointId>),
    /// The newest writer does not answer probes.
    Unreachable(EndpointId),
    /// The RDS control plane reports a failover or switchover under way
    /// (`FailoverState.Status`).
    FailoverInProgress(String),
}

/// The RDS control plane's word (`DescribeGlobalClusters`), mapped to
/// endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlInput {
    /// The endpoint in the Region of the member marked `IsWriter`.
    pub writer: Option<EndpointId>,
    /// `FailoverState.Status` while a failover or switchover runs.
    pub failover: Option<String>,
}

impl NoWriter {
    /// In words, with endpoint names from `endpoints`.
    pub fn describe<E: std::ops::Deref<Target = crate::Endpoint>>(
        &self,
        endpoints: &[E],
    ) -> String {
        let name = |id: EndpointId| {
            endpoints
                .iter()
                .find(|e| e.id == id)
                .map_or_else(|| format!("#{}", id.0), |e| e.name.clone())
        };
        match self {
            Self::NoneWritable => "no endpoint accepts writes".to_owned(),
            Self::SplitBrain(ids) => format!(
                "{} all accept writes and none is proven newer (split brain)",
                ids.iter()
                    .map(|&id| name(id))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::Unreachable(id) => {
                format!("the newest writer {} does not answer probes", name(*id))
            }
            Self::FailoverInProgress(status) => format!(
                "the RDS control plane reports a global database failover or switchover in progress (FailoverState {status})"
            ),
        }
    }
}

/// The result of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterDecision {
    pub writer: Result<EndpointId, NoWriter>,
    /// The writer before this evaluation, when it changed.
    pub moved_from: Option<Option<EndpointId>>,
    /// Endpoints fenced by this evaluation.
    pub newly_fenced: Vec<EndpointId>,
    /// Endpoints released by this evaluation (seen read-only).
    pub released: Vec<EndpointId>,
}

/// The writer and the fenced set, across evaluations.
#[derive(Debug, Clone, Default)]
pub struct WriterTracker {
    writer: Option<EndpointId>,
    /// Ids, not positions: a reload changes the endpoint set.
    fenced: Vec<EndpointId>,
}

impl WriterTracker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn writer(&self) -> Option<EndpointId> {
        self.writer
    }

    pub fn is_fenced(&self, id: EndpointId) -> bool {
        self.fenced.contains(&id)
    }

    /// The fenced endpoints.
    pub fn fenced(&self) -> &[EndpointId] {
        &self.fenced
    }

    /// Forgets endpoints no longer configured (ids are never reused, so a
    /// changed endpoint starts unfenced under its new id).
    pub fn retain(&mut self, keep: impl Fn(EndpointId) -> bool) {
        self.fenced.retain(|&id| keep(id));
        if self.writer.is_some_and(|w| !keep(w)) {
            self.writer = None;
        }
    }

    /// Applies the rule to the latest observations; `control` is the RDS
    /// control plane's view when one is configured and fresh.
    pub fn evaluate(
        &mut self,
        inputs: &[RoleInput<'_>],
        control: Option<&ControlInput>,
    ) -> WriterDecision {
        let mut released = Vec::new();
        for input in inputs {
            if self.is_fenced(input.id)
                && input.reachable
                && input.role.is_some_and(|r| r.read_only)
            {
                self.fenced.retain(|&id| id != input.id);
                released.push(input.id);
            }
        }
        let writable: Vec<&RoleInput<'_>> = inputs
            .iter()
            .filter(|x| !self.is_fenced(x.id) && x.role.is_some_and(|r| !r.read_only))
            .collect();
        let mut newly_fenced = Vec::new();
        // The control plane proves a writer newer when timelines cannot
        // (Aurora has none to compare across Regions).
        let winner = match writable.as_slice() {
            [] => Err(NoWriter::NoneWritable),
            [only] => Ok(*only),
            several => newest(several)
                .or_else(|| named_by_control(several, control))
                .ok_or_else(|| NoWriter::SplitBrain(several.iter().map(|x| x.id).collect())),
        };
        if let Some(status) = control.and_then(|c| c.failover.as_ref()) {
            // A failover window: roles are in flux, so nobody is fenced
            // now and writes wait for the control plane to finish.
            let writer = Err(NoWriter::FailoverInProgress(status.clone()));
            let moved_from = self.writer.is_some().then_some(self.writer);
            self.writer = None;
            return WriterDecision {
                writer,
                moved_from,
                newly_fenced,
                released,
            };
        }
        if let Ok(w) = winner {
            for x in &writable {
                if x.id != w.id {
                    self.fenced.push(x.id);
                    newly_fenced.push(x.id);
                }
            }
        }
        let writer = match winner {
            Ok(w) if w.reachable => Ok(w.id),
            Ok(w) => Err(NoWriter::Unreachable(w.id)),
            Err(e) => Err(e),
        };
        let now = writer.as_ref().ok().copied();
        let moved_from = (now != self.writer).then_some(self.writer);
        self.writer = now;
        WriterDecision {
            writer,
            moved_from,
            newly_fenced,
            released,
        }
    }
}

/// The writable endpoint the control plane marks as the writer.
fn named_by_control<'a, 'b>(
    several: &[&'a RoleInput<'b>],
    control: Option<&ControlInput>,
) -> Option<&'a RoleInput<'b>> {
    let id = control?.writer?;
    several.iter().find(|x| x.id == id).copied()
}

/// The one endpoint with a strictly higher timeline than every other, when
/// every timeline is known.
fn newest<'a, 'b>(several: &[&'a RoleInput<'b>]) -> Option<&'a RoleInput<'b>> {
    let timeline = |x: &RoleInput<'_>| x.role.and_then(|r| r.timeline);
    let mut best: Option<(&RoleInput<'_>, u32)> = None;
    let mut tied = false;
    for x in several {
        let t = timeline(x)?;
        match best {
            Some((_, b)) if t < b => {}
            Some((_, b)) if t == b => tied = true,
            _ => {
                best = Some((x, t));
                tied = false;
            }
        }
    }
    if tied {
        return None;
    }
    best.map(|(x, _)| x)
}

/// One endpoint as the read-only order sees it.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaInput {
    pub id: EndpointId,
    pub reachable: bool,
    pub fenced: bool,
    pub read_only: bool,
    pub lag: Option<Duration>,
    pub latency: Option<Duration>,
    pub priority: u32,
}

/// The endpoints a read-only session tries, best first: reachable,
/// unfenced replicas whose lag is known and within `max_lag`, nearest
/// (lowest probe latency, then priority, then config order) first; then the
/// writer.
pub fn read_only_order(
    inputs: &[ReplicaInput],
    writer: Option<EndpointId>,
    max_lag: Duration,
) -> Vec<EndpointId> {
    let mut replicas: Vec<&ReplicaInput> = inputs
        .iter()
        .filter(|x| x.reachable && !x.fenced && x.read_only && x.lag.is_some_and(|l| l <= max_lag))
        .collect();
    replicas.sort_by_key(|x| (x.latency.unwrap_or(Duration::MAX), x.priority, x.id));
    let mut order: Vec<EndpointId> = replicas.iter().map(|x| x.id).collect();
    order.extend(writer);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(t: &mut WriterTracker, inputs: &[RoleInput<'_>]) -> WriterDecision {
        t.evaluate(inputs, None)
    }

    fn primary(timeline: u32) -> RoleObservation {
        RoleObservation {
            read_only: false,
            timeline: Some(timeline),
            lag: Some(Duration::ZERO),
            aurora: None,
        }
    }

    fn standby(timeline: u32) -> RoleObservation {
        RoleObservation {
            read_only: true,
            timeline: Some(timeline),
            lag: Some(Duration::ZERO),
            aurora: None,
        }
    }

    fn input(id: u32, reachable: bool, role: Option<&RoleObservation>) -> RoleInput<'_> {
        RoleInput {
            id: EndpointId(id),
            reachable,
            role,
        }
    }

    const A: EndpointId = EndpointId(0);
    const B: EndpointId = EndpointId(1);

    #[test]
    fn the_one_writable_endpoint_is_the_writer() {
        let mut t = WriterTracker::new();
        let (p, s) = (primary(1), standby(1));
        let d = eval(
            &mut t,
            &[input(0, true, Some(&p)), input(1, true, Some(&s))],
        );
        assert_eq!(d.writer, Ok(A));
        assert_eq!(d.moved_from, Some(None));
        assert!(d.newly_fenced.is_empty());
        let d = eval(
            &mut t,
            &[input(0, true, Some(&p)), input(1, true, Some(&s))],
        );
        assert_eq!(d.moved_from, None);
    }

    #[test]
    fn a_promotion_with_the_old_primary_still_up_fences_it() {
        let mut t = WriterTracker::new();
        let (old, promoted) = (primary(1), primary(2));
        eval(
            &mut t,
            &[
                input(0, true, Some(&old)),
                input(1, true, Some(&standby(1))),
            ],
        );
        let d = eval(
            &mut t,
            &[input(0, true, Some(&old)), input(1, true, Some(&promoted))],
        );
        assert_eq!(d.writer, Ok(B));
        assert_eq!(d.moved_from, Some(Some(A)));
        assert_eq!(d.newly_fenced, vec![A]);
        assert!(t.is_fenced(A));
        // Still writable: stays fenced, and is not fenced "again".
        let d = eval(
            &mut t,
            &[input(0, true, Some(&old)), input(1, true, Some(&promoted))],
        );
        assert_eq!(d.writer, Ok(B));
        assert!(d.newly_fenced.is_empty() && d.moved_from.is_none());
        // Unreachable: stays fenced.
        eval(
            &mut t,
            &[
                input(0, false, Some(&standby(2))),
                input(1, true, Some(&promoted)),
            ],
        );
        assert!(t.is_fenced(A));
        // Rejoined as a replica: released, and B stays the writer.
        let d = eval(
            &mut t,
            &[
                input(0, true, Some(&standby(2))),
                input(1, true, Some(&promoted)),
            ],
        );
        assert_eq!(d.released, vec![A]);
        assert!(!t.is_fenced(A));
        assert_eq!(d.writer, Ok(B));
    }

    #[test]
    fn two_writers_with_equal_or_unknown_timelines_get_no_writes() {
        let mut t = WriterTracker::new();
        let p = primary(1);
        eval(
            &mut t,
            &[input(0, true, Some(&p)), input(1, true, Some(&standby(1)))],
        );
        let d = eval(
            &mut t,
            &[input(0, true, Some(&p)), input(1, true, Some(&primary(1)))],
        );
        assert_eq!(d.writer, Err(NoWriter::SplitBrain(vec![A, B])));
        assert_eq!(d.moved_from, Some(Some(A)));
        assert!(d.newly_fenced.is_empty());
        let unknown = RoleObservation {
            timeline: None,
            ..primary(9)
        };
        let d = eval(
            &mut t,
            &[input(0, true, Some(&p)), input(1, true, Some(&unknown))],
        );
        assert!(matches!(d.writer, Err(NoWriter::SplitBrain(_))));
        assert!(!t.is_fenced(A) && !t.is_fenced(B));
    }

    #[test]
    fn an_unreachable_old_primary_still_counts_until_proven_older() {
        let mut t = WriterTracker::new();
        let old = primary(1);
        eval(
            &mut t,
            &[
                input(0, true, Some(&old)),
                input(1, true, Some(&standby(1))),
            ],
        );
        // The primary dies; nothing was promoted: no writer, nothing fenced.
        let d = eval(
            &mut t,
            &[
                input(0, false, Some(&old)),
                input(1, true, Some(&standby(1))),
            ],
        );
        assert_eq!(d.writer, Err(NoWriter::Unreachable(A)));
        assert_eq!(d.moved_from, Some(Some(A)));
        // The standby is promoted: it is newer, so the dead one is fenced
        // and cannot take writes when it comes back.
        let d = eval(
            &mut t,
            &[
                input(0, false, Some(&old)),
                input(1, true, Some(&primary(2))),
            ],
        );
        assert_eq!(d.writer, Ok(B));
        assert_eq!(d.newly_fenced, vec![A]);
        let d = eval(
            &mut t,
            &[
                input(0, true, Some(&old)),
                input(1, true, Some(&primary(2))),
            ],
        );
        assert_eq!(d.writer, Ok(B));
        assert!(t.is_fenced(A));
    }

    #[test]
    fn a_newer_writer_that_is_unreachable_is_not_used() {
        let mut t = WriterTracker::new();
        let d = eval(
            &mut t,
            &[
                input(0, true, Some(&primary(1))),
                input(1, false, Some(&primary(2))),
            ],
        );
        assert_eq!(d.writer, Err(NoWriter::Unreachable(B)));
        assert_eq!(d.newly_fenced, vec![A]);
    }

    #[test]
    fn nothing_writable_is_no_writer() {
        let mut t = WriterTracker::new();
        let d = eval(
            &mut t,
            &[input(0, true, Some(&standby(1))), input(1, true, None)],
        );
        assert_eq!(d.writer, Err(NoWriter::NoneWritable));
        assert_eq!(d.moved_from, None);
    }

    fn replica(id: u32, lag_ms: Option<u64>, latency_ms: u64) -> ReplicaInput {
        ReplicaInput {
            id: EndpointId(id),
            reachable: true,
            fenced: false,
            read_only: true,
            lag: lag_ms.map(Duration::from_millis),
            latency: Some(Duration::from_millis(latency_ms)),
            priority: 1,
        }
    }

    #[test]
    fn read_only_sessions_prefer_near_replicas_within_the_lag_bound() {
        let max = Duration::from_secs(1);
        let writer = ReplicaInput {
            read_only: false,
            ..replica(0, Some(0), 1)
        };
        let inputs = [
            writer,
            replica(1, Some(10), 30),
            replica(2, Some(20), 5),
            replica(3, Some(5000), 1),
            replica(4, None, 1),
            ReplicaInput {
                reachable: false,
                ..replica(5, Some(0), 1)
            },
            ReplicaInput {
                fenced: true,
                ..replica(6, Some(0), 1)
            },
        ];
        let order = read_only_order(&inputs, Some(EndpointId(0)), max);
        assert_eq!(order, vec![EndpointId(2), EndpointId(1), EndpointId(0)]);
        assert_eq!(read_only_order(&inputs[3..4], None, max), vec![]);
    }

    #[test]
    fn the_control_plane_settles_a_split_brain_without_timelines() {
        // Aurora: no timelines; both Regions' clusters accept writes.
        let aurora = RoleObservation {
            timeline: None,
            ..primary(1)
        };
        let inputs = [input(0, true, Some(&aurora)), input(1, true, Some(&aurora))];
        let mut t = WriterTracker::new();
        assert!(matches!(
            eval(&mut t, &inputs).writer,
            Err(NoWriter::SplitBrain(_))
        ));
        let control = ControlInput {
            writer: Some(B),
            failover: None,
        };
        let d = t.evaluate(&inputs, Some(&control));
        assert_eq!(d.writer, Ok(B));
        assert_eq!(d.newly_fenced, [A]);
        // A control plane naming an endpoint that is not writable proves
        // nothing.
        let s1 = standby(1);
        let mut t = WriterTracker::new();
        let standby_b = [input(0, true, Some(&aurora)), input(1, true, Some(&s1))];
        let wrong = ControlInput {
            writer: Some(B),
            failover: None,
        };
        assert_eq!(t.evaluate(&standby_b, Some(&wrong)).writer, Ok(A));
    }

    #[test]
    fn a_failover_in_progress_means_no_writer_and_no_fencing() {
        let (p1, s1, p2) = (primary(1), standby(1), primary(2));
        let mut t = WriterTracker::new();
        let inputs = [input(0, true, Some(&p1)), input(1, true, Some(&s1))];
        assert_eq!(eval(&mut t, &inputs).writer, Ok(A));
        let control = ControlInput {
            writer: Some(A),
            failover: Some("failing-over".into()),
        };
        let both = [input(0, true, Some(&p1)), input(1, true, Some(&p2))];
        let d = t.evaluate(&both, Some(&control));
        assert_eq!(
            d.writer,
            Err(NoWriter::FailoverInProgress("failing-over".into()))
        );
        assert_eq!(d.moved_from, Some(Some(A)));
        assert!(d.newly_fenced.is_empty() && !t.is_fenced(A));
        // Once it is over, the rule applies again: B is newer.
        let d = t.evaluate(&both, Some(&ControlInput::default()));
        assert_eq!(d.writer, Ok(B));
        assert_eq!(d.newly_fenced, [A]);
    }
}
