use super::*;

fn policy() -> SelectionPolicy {
    SelectionPolicy {
        latency_tolerance: Duration::from_millis(5),
        prefer_region: None,
        route53: Route53Policy::Veto,
        switch_after: 3,
    }
}

fn up(id: u32, ms: u64, priority: u32) -> Candidate<'static> {
    Candidate {
        id: EndpointId(id),
        region: None,
        priority,
        liveness: Liveness::Up,
        latency: Some(Duration::from_millis(ms)),
        route53_healthy: None,
        last_up: None,
        drained: false,
    }
}

fn ids(s: &Selection) -> Vec<u32> {
    s.order.iter().map(|i| i.0).collect()
}

#[test]
fn fastest_wins_and_tolerance_lets_priority_decide() {
    let mut sel = Selector::default();
    let s = sel.evaluate(&[up(0, 30, 1), up(1, 10, 1)], &policy(), true);
    assert_eq!(s.selected(), Some(EndpointId(1)));
    assert_eq!(s.reason, SelectionReason::Fastest);

    // Within 5ms: priority decides, even against the slightly faster one.
    let mut sel = Selector::default();
    let s = sel.evaluate(&[up(0, 14, 1), up(1, 10, 2)], &policy(), true);
    assert_eq!(s.selected(), Some(EndpointId(0)));
    // Outside tolerance, priority is only a tie-break: latency wins.
    let mut sel = Selector::default();
    let s = sel.evaluate(&[up(0, 16, 1), up(1, 10, 2)], &policy(), true);
    assert_eq!(s.selected(), Some(EndpointId(1)));
}

#[test]
fn switching_needs_several_rounds_but_down_moves_at_once() {
    let p = policy();
    let mut sel = Selector::default();
    assert_eq!(
        sel.evaluate(&[up(0, 10, 1), up(1, 30, 1)], &p, true)
            .selected(),
        Some(EndpointId(0))
    );
    let swapped = [up(0, 30, 1), up(1, 10, 1)];
    let s = sel.evaluate(&swapped, &p, true);
    assert_eq!(
        (s.selected(), s.reason),
        (Some(EndpointId(0)), SelectionReason::Holding)
    );
    assert_eq!(ids(&s), [0, 1]);
    // Event-driven evaluations do not count as rounds.
    assert_eq!(
        sel.evaluate(&swapped, &p, false).selected(),
        Some(EndpointId(0))
    );
    assert_eq!(
        sel.evaluate(&swapped, &p, true).selected(),
        Some(EndpointId(0))
    );
    let s = sel.evaluate(&swapped, &p, true);
    assert_eq!(s.selected(), Some(EndpointId(1)));
    assert!(s.changed);

    let mut down = up(1, 10, 1);
    down.liveness = Liveness::Down;
    let s = sel.evaluate(&[up(0, 30, 1), down], &p, false);
    assert_eq!(s.selected(), Some(EndpointId(0)));
    assert!(s.changed);
    assert_eq!(s.eligible, 1);
}

#[test]
fn an_interrupted_streak_starts_over() {
    let p = policy();
    let mut sel = Selector::default();
    sel.evaluate(&[up(0, 10, 1), up(1, 30, 1)], &p, true);
    let swapped = [up(0, 30, 1), up(1, 10, 1)];
    sel.evaluate(&swapped, &p, true);
    sel.evaluate(&swapped, &p, true);
    sel.evaluate(&[up(0, 10, 1), up(1, 30, 1)], &p, true);
    assert_eq!(
        sel.evaluate(&swapped, &p, true).selected(),
        Some(EndpointId(0))
    );
}

#[test]
fn equal_endpoints_do_not_flap() {
    let p = policy();
    let mut sel = Selector::default();
    let mut changes = 0;
    for i in 0..100u64 {
        // Jitter within tolerance, alternating which one is faster.
        let (a, b) = if i % 2 == 0 { (10, 12) } else { (12, 10) };
        let s = sel.evaluate(&[up(0, a, 1), up(1, b, 1)], &p, true);
        changes += u32::from(s.changed);
    }
    assert_eq!(changes, 1, "only the initial selection");
}

#[test]
fn prefer_region_pins_while_healthy() {
    let mut p = policy();
    p.prefer_region = Some("us-west-2".into());
    let mut far = up(0, 80, 2);
    far.region = Some("us-west-2");
    let near = up(1, 5, 1);
    let mut sel = Selector::default();
    let s = sel.evaluate(&[far.clone(), near.clone()], &p, true);
    assert_eq!(
        (s.selected(), s.reason),
        (Some(EndpointId(0)), SelectionReason::PreferredRegion)
    );
    far.liveness = Liveness::Down;
    let s = sel.evaluate(&[far, near], &p, false);
    assert_eq!(s.selected(), Some(EndpointId(1)));
}

#[test]
fn route53_veto_and_advisory() {
    let mut vetoed = up(0, 5, 1);
    vetoed.route53_healthy = Some(false);
    let other = up(1, 50, 1);
    let mut sel = Selector::default();
    let s = sel.evaluate(&[vetoed.clone(), other.clone()], &policy(), true);
    assert_eq!(s.selected(), Some(EndpointId(1)));
    assert_eq!(ids(&s), [1, 0], "a vetoed endpoint stays a last resort");

    let mut p = policy();
    p.route53 = Route53Policy::Advisory;
    let mut sel = Selector::default();
    assert_eq!(
        sel.evaluate(&[vetoed, other], &p, true).selected(),
        Some(EndpointId(0))
    );
}

#[test]
fn nothing_healthy_orders_by_most_recently_up() {
    let now = Instant::now();
    let mut cands = Vec::new();
    for (id, ago) in [(0u32, Some(30u64)), (1, Some(5)), (2, None)] {
        let mut c = up(id, 10, 1);
        c.liveness = Liveness::Down;
        c.latency = None;
        c.last_up = ago.map(|s| now - Duration::from_secs(s));
        cands.push(c);
    }
    let mut sel = Selector::default();
    let s = sel.evaluate(&cands, &policy(), true);
    assert_eq!(s.selected(), None);
    assert_eq!(s.reason, SelectionReason::NoneHealthy);
    assert_eq!(ids(&s), [1, 0, 2]);
}

#[test]
fn unmeasured_endpoints_rank_by_priority_and_yield_to_a_measured_one() {
    let mut a = up(0, 0, 2);
    a.latency = None;
    a.liveness = Liveness::Unknown;
    let mut b = up(1, 0, 1);
    b.latency = None;
    b.liveness = Liveness::Unknown;
    let mut sel = Selector::default();
    let s = sel.evaluate(&[a.clone(), b], &policy(), true);
    assert_eq!(
        (s.selected(), s.reason),
        (Some(EndpointId(1)), SelectionReason::Priority)
    );
    let s = sel.evaluate(&[a, up(1, 20, 1)], &policy(), false);
    assert_eq!(s.selected(), Some(EndpointId(1)));
    // A measured winner replaces an unmeasured selection without waiting.
    let mut sel = Selector::default();
    let mut c = up(1, 0, 1);
    c.latency = None;
    sel.evaluate(&[up(0, 20, 2), c.clone()], &policy(), true);
    assert_eq!(sel.current(), Some(EndpointId(0)));
}

#[test]
fn a_provisional_selection_yields_at_once() {
    let p = policy();
    let mut sel = Selector::default();
    // Only endpoint 0 has reported so far.
    let mut unmeasured = up(1, 0, 1);
    unmeasured.latency = None;
    unmeasured.liveness = Liveness::Unknown;
    let s = sel.evaluate(&[up(0, 10, 2), unmeasured], &p, false);
    assert_eq!(s.selected(), Some(EndpointId(0)));
    // Everyone has reported: 1 wins on priority within tolerance and is
    // taken at once, not after switch_after rounds.
    sel.mark_provisional();
    let both = [up(0, 10, 2), up(1, 12, 1)];
    let s = sel.evaluate(&both, &p, false);
    assert_eq!((s.selected(), s.changed), (Some(EndpointId(1)), true));
    // The mark is used up: later challengers need their rounds again.
    let swapped = [up(0, 10, 1), up(1, 40, 1)];
    let s = sel.evaluate(&swapped, &p, true);
    assert_eq!(
        (s.selected(), s.reason),
        (Some(EndpointId(1)), SelectionReason::Holding)
    );
}

#[test]
fn a_drained_endpoint_is_skipped_like_a_down_one_and_comes_back() {
    let mut sel = Selector::default();
    let s = sel.evaluate(&[up(0, 10, 1), up(1, 30, 1)], &policy(), true);
    assert_eq!(s.selected(), Some(EndpointId(0)));
    let mut drained = up(0, 10, 1);
    drained.drained = true;
    // An event-driven evaluation moves at once, as for an endpoint going down.
    let s = sel.evaluate(&[drained.clone(), up(1, 30, 1)], &policy(), false);
    assert_eq!(s.selected(), Some(EndpointId(1)));
    assert_eq!((ids(&s), s.eligible), (vec![1, 0], 1));
    // Restored, it wins back after switch_after rounds like any faster one.
    for _ in 0..2 {
        let s = sel.evaluate(&[up(0, 10, 1), up(1, 30, 1)], &policy(), true);
        assert_eq!(s.selected(), Some(EndpointId(1)));
    }
    let s = sel.evaluate(&[up(0, 10, 1), up(1, 30, 1)], &policy(), true);
    assert_eq!(s.selected(), Some(EndpointId(0)));
}
