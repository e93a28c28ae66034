//! Cost of the session tracker on the relay's hot path, against the two
//! header-only `BoundaryTracker`s the relay uses today. Feeds the recorded
//! `pgbench -S` sessions in `tests/fixtures` (simple and prepared protocol,
//! each record one read() as it came off the socket), then a DataRow-heavy
//! result in 8 KiB reads. Run: `cargo bench -p dsql-proxy-protocol --bench
//! session_tracker`. A measurement, not a test: it prints, it asserts only
//! that the tracker ends idle.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{recording, wire, Step};
use dsql_proxy_protocol::relay::BoundaryTracker;
use dsql_proxy_protocol::tracking::SessionTracker;

const ROUNDS: usize = 5;
const LOOPS: usize = 20_000;

/// Best of `ROUNDS` runs of `f`, which does `units` units of work.
fn best(units: usize, mut f: impl FnMut()) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        f();
        best = best.min(started.elapsed());
    }
    best.as_nanos() as f64 / units as f64
}

fn tracker_pass(t: &mut SessionTracker, steps: &[Step]) {
    for step in steps {
        if step.client {
            t.observe_client(black_box(&step.bytes));
        } else {
            t.observe_server(black_box(&step.bytes));
        }
    }
}

fn boundary_pass(up: &mut BoundaryTracker, down: &mut BoundaryTracker, steps: &[Step]) {
    for step in steps {
        if step.client {
            up.observe(black_box(&step.bytes));
        } else {
            down.observe(black_box(&step.bytes));
        }
    }
}

fn transactions(name: &str) {
    let steps = recording(name);
    // The prepared session's first exchange is its one Parse.
    let setup = steps
        .iter()
        .position(|s| s.client && s.bytes[0] != b'P')
        .unwrap_or(0);
    let loop_steps = &steps[setup..];
    let per_loop = loop_steps.iter().filter(|s| s.client).count();

    let mut t = common::tracker();
    tracker_pass(&mut t, &steps[..setup]);
    let tracker_ns = best(LOOPS * per_loop, || {
        for _ in 0..LOOPS {
            tracker_pass(&mut t, loop_steps);
        }
    });
    assert!(t.at_idle_point() && t.desync().is_none() && !t.is_dirty());

    let (mut up, mut down) = (BoundaryTracker::default(), BoundaryTracker::default());
    let boundary_ns = best(LOOPS * per_loop, || {
        for _ in 0..LOOPS {
            boundary_pass(&mut up, &mut down, loop_steps);
        }
    });
    assert!(up.at_boundary() && down.at_boundary());
    println!(
        "{name:<26} SessionTracker {tracker_ns:>7.1} ns/transaction   \
         2 x BoundaryTracker {boundary_ns:>7.1} ns/transaction   (+{:.1} ns)",
        tracker_ns - boundary_ns
    );
}

fn data_rows() {
    let row = wire::data_row(&[Some("12345"), Some(&"x".repeat(90))]);
    let rows = 10_000;
    let mut answer = wire::row_description(&["id", "filler"]);
    for _ in 0..rows {
        answer.extend_from_slice(&row);
    }
    answer.extend_from_slice(&wire::command_complete("SELECT 10000"));
    answer.extend_from_slice(&wire::ready(b'I'));
    let query = wire::query("SELECT id, filler FROM big");
    let reads: Vec<&[u8]> = answer.chunks(8192).collect();
    let loops = 200;

    let mut t = common::tracker();
    let tracker_ns = best(loops * rows, || {
        for _ in 0..loops {
            t.observe_client(&query);
            for read in &reads {
                t.observe_server(black_box(read));
            }
        }
    });
    assert!(t.at_idle_point());
    let (mut up, mut down) = (BoundaryTracker::default(), BoundaryTracker::default());
    let boundary_ns = best(loops * rows, || {
        for _ in 0..loops {
            up.observe(&query);
            for read in &reads {
                down.observe(black_box(read));
            }
        }
    });
    let gbps = |ns_per_row: f64| row.len() as f64 / ns_per_row;
    println!(
        "{:<26} SessionTracker {tracker_ns:>7.1} ns/row ({:.1} GB/s)   \
         2 x BoundaryTracker {boundary_ns:>7.1} ns/row ({:.1} GB/s)",
        format!("DataRow x{rows}, {} B each", row.len()),
        gbps(tracker_ns),
        gbps(boundary_ns)
    );
}

fn main() {
    println!("session tracker against today's boundary trackers (best of {ROUNDS} runs)");
    transactions("pgbench_select_simple");
    transactions("pgbench_select_prepared");
    data_rows();
}
