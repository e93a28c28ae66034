//! The workspace's binaries (`dsql-proxy`, `dsql-emulator`), which the
//! integration tests run as child processes.
//!
//! `cargo test` builds only the test crate's own dependencies, and these
//! are binaries, not library dependencies, so the harness builds them,
//! once per test process: `cargo build --workspace --bins`. The whole
//! workspace, not `-p <package>`, because cargo resolves features per
//! selection: building one package alone enables other features of shared
//! dependencies (futures-util, hyper) than `cargo test --workspace` does,
//! and recompiles everything above them (the AWS SDKs) a second and a
//! third time. `scripts/test.sh` runs the same command before the tests,
//! so this finds the binaries fresh; a test run by hand builds them here.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// The path of the workspace binary `name`, built if needed.
///
/// Target dir: `CARGO_TARGET_DIR` (relative paths are taken from the
/// workspace root) or `<workspace>/target`; passed explicitly with
/// `--target-dir` so the returned path is where cargo really put it.
pub(crate) fn workspace_binary(name: &str) -> PathBuf {
    static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = BIN_DIR.get_or_init(|| {
        let root = workspace_root();
        let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => root.join(dir),
            None => root.join("target"),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = cargo_command(&cargo)
            .args(["build", "--workspace", "--bins"])
            .arg("--target-dir")
            .arg(&target_dir)
            .current_dir(&root)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {cargo:?} build: {e}"));
        if !out.status.success() {
            panic!(
                "`cargo build --workspace --bins` failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        target_dir.join("debug")
    });
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "cargo build succeeded but {} does not exist",
        bin.display()
    );
    bin
}

/// `cargo` without the variables cargo set for the running test
/// (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...). Build scripts may
/// declare `rerun-if-env-changed` on some of them, so inheriting them
/// would make this build and the next `cargo test` rebuild each other's
/// dependencies every time.
fn cargo_command(cargo: &OsStr) -> Command {
    let mut command = Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("CARGO_PKG_")
            || matches!(
                key_text.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
            )
        {
            command.env_remove(&key);
        }
    }
    command
}
