//! Properties of the session tracker, with fixed seeds:
//! - every observable is the same however the byte streams are split;
//! - pipelining requests ahead of their answers ends in the same state;
//! - random and mutated byte streams never panic it, and what it reports
//!   stays consistent.

mod common;

use common::scenarios::{self, all};
use common::wire::*;
use common::{c, observe, run, s, tracker, Step};
use dsql_proxy_protocol::tracking::{ParameterValues, SessionTracker, TrackerLimits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Cuts `bytes` into random pieces (single bytes are likely).
fn pieces<'a>(rng: &mut StdRng, bytes: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let max = match rng.gen_range(0..4) {
            0 => 1,
            1 => 3,
            2 => 16,
            _ => bytes.len(),
        };
        let n = rng.gen_range(1..=max.min(bytes.len() - at));
        out.push(&bytes[at..at + n]);
        at += n;
    }
    out
}

#[test]
fn every_observable_is_the_same_however_the_streams_are_split() {
    let mut rng = StdRng::seed_from_u64(14);
    for (name, steps) in all() {
        // The reference: each step fed whole, observed after each step.
        let mut reference = Vec::new();
        let mut t = tracker();
        for step in &steps {
            common::feed(&mut t, std::slice::from_ref(step));
            reference.push(observe(&t));
        }
        for trial in 0..150 {
            let mut t = tracker();
            for (i, step) in steps.iter().enumerate() {
                for piece in pieces(&mut rng, &step.bytes) {
                    if step.client {
                        t.observe_client(piece);
                    } else {
                        t.observe_server(piece);
                    }
                }
                assert_eq!(observe(&t), reference[i], "{name}, trial {trial}, step {i}");
            }
        }
        // Consecutive steps of one direction merged, then split anywhere.
        let mut merged: Vec<Step> = Vec::new();
        for step in &steps {
            match merged.last_mut() {
                Some(last) if last.client == step.client => {
                    last.bytes.extend_from_slice(&step.bytes)
                }
                _ => merged.push(step.clone()),
            }
        }
        for trial in 0..50 {
            let mut t = tracker();
            for step in &merged {
                for piece in pieces(&mut rng, &step.bytes) {
                    if step.client {
                        t.observe_client(piece);
                    } else {
                        t.observe_server(piece);
                    }
                }
            }
            assert_eq!(
                observe(&t),
                *reference.last().unwrap(),
                "{name} merged, trial {trial}"
            );
        }
    }
}

/// Self-contained request/answer pairs that return to an idle point.
fn blocks() -> Vec<Vec<Step>> {
    vec![
        scenarios::pgbench_simple(1),
        scenarios::pgbench_prepared(1),
        scenarios::extended_unnamed(),
        scenarios::pipeline_with_error(),
        scenarios::duplicate_name(),
        scenarios::close_statement_and_portal(),
        scenarios::function_call_and_empty_query(),
        scenarios::failed_transaction(),
        scenarios::failed_implicit_transaction(),
        scenarios::failed_pipeline_with_begin(),
        scenarios::deallocate_through_sql(),
        scenarios::state_changes(),
        scenarios::unnamed_lifecycle().remove(0),
        scenarios::unnamed_lifecycle().remove(1),
        scenarios::unnamed_lifecycle().remove(2),
        scenarios::asynchronous_messages(),
        vec![
            c(&[query("LISTEN ch")]),
            s(&[command_complete("LISTEN"), ready(b'I')]),
        ],
    ]
}

#[test]
fn pipelining_ahead_of_answers_ends_in_the_same_state() {
    let mut rng = StdRng::seed_from_u64(16);
    let blocks = blocks();
    for trial in 0..300 {
        let chosen: Vec<&Vec<Step>> = (0..rng.gen_range(1..8))
            .map(|_| &blocks[rng.gen_range(0..blocks.len())])
            .collect();
        let interleaved: Vec<Step> = chosen.iter().flat_map(|b| b.iter().cloned()).collect();
        let stepwise = run(&interleaved);
        assert_eq!(stepwise.desync(), None, "trial {trial}");
        // All requests first, then all answers, in random pieces. Blocks
        // whose answers depend on seeing the previous answer are not in the
        // list, so this is a pipeline a server answers the same way.
        let client: Vec<u8> = interleaved
            .iter()
            .filter(|s| s.client)
            .flat_map(|s| s.bytes.clone())
            .collect();
        let server: Vec<u8> = interleaved
            .iter()
            .filter(|s| !s.client)
            .flat_map(|s| s.bytes.clone())
            .collect();
        let mut t = tracker();
        for piece in pieces(&mut rng, &client) {
            t.observe_client(piece);
        }
        assert!(!t.at_idle_point() || server.is_empty());
        for piece in pieces(&mut rng, &server) {
            t.observe_server(piece);
        }
        assert_eq!(observe(&t), observe(&stepwise), "trial {trial}");
        assert!(t.at_idle_point(), "trial {trial}");
    }
}

/// What the tracker reports must hang together whatever it was fed.
fn check_consistent(t: &SessionTracker, exact_size: bool) {
    if t.at_idle_point() {
        assert!(t.client_at_boundary() && t.server_at_boundary());
        assert_eq!(t.requests_pending(), 0);
        assert!(!t.batch_open());
        assert_eq!(t.transaction_status(), b'I');
        assert!(t.desync().is_none() && !t.is_broken());
    }
    for (at_boundary, to_boundary) in [
        (t.client_at_boundary(), t.client_bytes_to_boundary()),
        (t.server_at_boundary(), t.server_bytes_to_boundary()),
    ] {
        if at_boundary {
            assert_eq!(to_boundary, 0);
        } else if to_boundary == 0 {
            assert!(t.is_broken());
        }
    }
    if t.is_broken() {
        assert!(t.desync().is_some());
    }
    let statements: usize = t
        .named_statements()
        .map(|(n, s)| n.len() + s.size)
        .sum::<usize>()
        + t.unnamed_statement().map_or(0, |s| s.size);
    let custom: usize = t.custom_settings().map(|n| n.len() + 1).sum();
    let known = statements + t.parameters().byte_len() + custom;
    if exact_size {
        assert_eq!(t.state_bytes(), known);
    } else {
        assert!(t.state_bytes() >= known);
    }
    for (_, s) in t.named_statements() {
        if let Some(parse) = s.parse_message {
            assert_eq!(parse.len(), s.size);
            assert_eq!(parse[0], b'P');
        }
    }
}

fn mutate(rng: &mut StdRng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.gen_range(1..4) {
        match rng.gen_range(0..4) {
            0 if !v.is_empty() => {
                let at = rng.gen_range(0..v.len());
                v[at] = rng.gen();
            }
            1 => v.truncate(rng.gen_range(0..=v.len())),
            2 if !v.is_empty() => {
                let at = rng.gen_range(0..v.len());
                let n = rng.gen_range(0..=(v.len() - at).min(8));
                v.drain(at..at + n);
            }
            _ => {
                let at = rng.gen_range(0..=v.len());
                v.insert(at, rng.gen());
            }
        }
    }
    v
}

#[test]
fn random_streams_never_panic_and_stay_consistent() {
    let mut rng = StdRng::seed_from_u64(15);
    let valid: Vec<Vec<Step>> = all().into_iter().map(|(_, steps)| steps).collect();
    let tags = b"QPBDECSHFdcfXpZ123CDEGHWTNASIntsVKR";
    for round in 0..4000 {
        let small = round % 2 == 0;
        let limits = TrackerLimits {
            max_capture: if small { 24 } else { usize::MAX / 2 },
            max_custom_settings: if small { 1 } else { 64 },
        };
        let mut t = SessionTracker::new(limits, ParameterValues::new());
        let steps = &valid[rng.gen_range(0..valid.len())];
        for step in steps {
            let bytes = match rng.gen_range(0..3) {
                0 => step.bytes.clone(),
                1 => mutate(&mut rng, step.bytes.clone()),
                _ => {
                    // Plausible headers with random bodies.
                    let mut v = Vec::new();
                    for _ in 0..rng.gen_range(1..6) {
                        let len: usize = rng.gen_range(0..12);
                        v.push(tags[rng.gen_range(0..tags.len())]);
                        v.extend_from_slice(&((len + 4) as i32).to_be_bytes());
                        v.extend((0..len).map(|_| rng.gen::<u8>()));
                    }
                    v
                }
            };
            let client = if rng.gen_bool(0.1) {
                !step.client
            } else {
                step.client
            };
            for piece in pieces(&mut rng, &bytes) {
                if client {
                    t.observe_client(piece);
                } else {
                    t.observe_server(piece);
                }
                check_consistent(&t, !small);
            }
            let _ = observe(&t);
            if rng.gen_bool(0.2) {
                t.mark_clean();
                assert!(!t.is_dirty());
            }
        }
        // A desync never clears.
        if let Some(cause) = t.desync() {
            t.observe_client(&query("SELECT 1"));
            t.observe_server(&concat(&[command_complete("SELECT 1"), ready(b'I')]));
            assert_eq!(t.desync(), Some(cause));
            assert!(!t.at_idle_point());
        }
    }
}
