//! The fuzz targets on stable: each over a fixed number of inputs, random
//! and mutated from its seeds, from a fixed seed (override with
//! `DSQL_PROXY_PROPERTY_SEED=<n>`; a failure prints the seed and the input
//! so it reproduces, also under `cargo fuzz run <target> <file>`).

use dsql_proxy_fuzz_targets::{seeds, Target, TARGETS};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const DEFAULT_SEED: u64 = 0x5eed_d5a1;

fn seed() -> u64 {
    std::env::var("DSQL_PROXY_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED)
}

/// Bytes a decoder's edge cases hinge on.
const INTERESTING: &[&[u8]] = &[
    &[0],
    &[0xff],
    &[0, 0, 0, 0],
    &[0, 0, 0, 4],
    &[0xff, 0xff, 0xff, 0xff],
    &[0x7f, 0xff, 0xff, 0xff],
    &[0x40, 0, 0, 0],
    &[0, 0, 0x27, 0x11],
    b"=",
    b",",
    b"\n",
    b"\"",
    b"password = ",
    b"$$",
    b"[backend]\n",
];

fn mutate(rng: &mut StdRng, base: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.gen_range(1..6) {
        let at = rng.gen_range(0..=v.len());
        match rng.gen_range(0..7) {
            0 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] = rng.gen();
            }
            1 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            2 => v.truncate(at),
            3 => {
                let piece = INTERESTING[rng.gen_range(0..INTERESTING.len())];
                v.splice(at..at, piece.iter().copied());
            }
            4 if !v.is_empty() => {
                let end = rng.gen_range(at..=v.len());
                v.drain(at..end);
            }
            5 if !pool.is_empty() => {
                // Splice in part of another seed.
                let other = &pool[rng.gen_range(0..pool.len())];
                let from = rng.gen_range(0..=other.len());
                let to = rng.gen_range(from..=other.len());
                v.splice(at..at, other[from..to].iter().copied());
            }
            _ => v.insert(at, rng.gen()),
        }
    }
    v
}

fn run(name: &str, target: Target, count: usize) {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed ^ name.len() as u64);
    let pool = seeds(name);
    assert!(!pool.is_empty(), "{name} has no seeds");
    for i in 0..count {
        let input = match (i % 4, pool.is_empty()) {
            (0, _) | (_, true) => {
                let mut v = vec![0u8; rng.gen_range(0..256)];
                rng.fill_bytes(&mut v);
                v
            }
            (1, false) => pool[i / 4 % pool.len()].clone(),
            _ => {
                let base = pool[rng.gen_range(0..pool.len())].clone();
                mutate(&mut rng, &base, &pool)
            }
        };
        let outcome = std::panic::catch_unwind(|| target(&input));
        if let Err(panic) = outcome {
            let dir = std::env::temp_dir().join(format!("dsql-proxy-property-{name}-{seed}-{i}"));
            let _ = std::fs::write(&dir, &input);
            eprintln!(
                "target {name} failed on input {i} (seed {seed}; input saved to {}): {input:?}",
                dir.display()
            );
            std::panic::resume_unwind(panic);
        }
    }
}

fn target(name: &str) -> Target {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .unwrap_or_else(|| panic!("no target {name}"))
}

macro_rules! property {
    ($name:ident, $count:expr) => {
        #[test]
        fn $name() {
            run(stringify!($name), target(stringify!($name)), $count);
        }
    };
}

property!(startup_packet, 50_000);
property!(backend_messages, 50_000);
property!(frontend_messages, 50_000);
property!(scram_client, 20_000);
property!(scram_server, 20_000);
property!(query_messages, 50_000);
property!(aurora_status, 50_000);
property!(aws_status, 4_000);
property!(config_env, 20_000);
property!(boundary_tracker, 30_000);

#[test]
fn every_target_has_a_property_test_and_a_fuzz_target() {
    let here = include_str!("properties.rs");
    let fuzz_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/fuzz_targets");
    for (name, _) in TARGETS {
        assert!(here.contains(&format!("property!({name},")), "{name}");
        let file = fuzz_dir.join(format!("{name}.rs"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains(&format!("dsql_proxy_fuzz_targets::{name}(")),
            "{}",
            file.display()
        );
    }
}

/// Inputs cargo-fuzz found crashing a target (`tests/crashes/<target>-<id>`),
/// kept so they stay fixed. Both were wrong expectations in the targets,
/// not the decoders: a query value decoded lossily may be longer than its
/// bytes, and an override's variable name (no secret) may be echoed.
#[test]
fn inputs_that_once_crashed_a_fuzz_target() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crashes");
    let mut ran = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/crashes") {
        let path = entry.expect("directory entry").path();
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let (name, _) = file.rsplit_once('-').expect("<target>-<id>");
        let input = std::fs::read(&path).expect("read a crash input");
        target(name)(&input);
        ran += 1;
    }
    assert!(ran >= 2, "{ran} inputs in {}", dir.display());
}
