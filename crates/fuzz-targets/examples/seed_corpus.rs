//! Writes every target's seeds as a starting corpus:
//! `cargo run -p dsql-proxy-fuzz-targets --example seed_corpus -- fuzz/corpus`
//! makes `fuzz/corpus/<target>/seed-<n>` (cargo-fuzz's default corpus).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    for (name, _) in dsql_proxy_fuzz_targets::TARGETS {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        for (i, seed) in dsql_proxy_fuzz_targets::seeds(name).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed)?;
        }
        println!("{}", dir.display());
    }
    Ok(())
}
