#!/usr/bin/env bash
# Global Database drill: promote a streaming standby while the old primary
# keeps running and a client writes continuously through dsql-proxy
# (kind = "aurora-global", probe_interval 250ms). Reports write
# unavailability (promotion to first write on the new writer; target
# <= 1s) and writes that reached the old primary after the proxy saw the
# promotion (target 0). The drill is tests/benches/global_drill.rs (real
# PostgreSQL servers, the real proxy binary). See benches/README.md.
#
# Env: DRILL_RUNS (3). Installs nothing. Exit status 0 even when a target
# is missed; non-zero means it broke (build, servers, proxy).
set -euo pipefail
: "${DRILL_RUNS:=3}"
export DRILL_RUNS

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
    printf 'global_drill.sh: %s\n' "$*" >&2
    exit 1
}

# ------------------------------------------------------- what is needed
missing=()
command -v cargo >/dev/null || missing+=("a Rust toolchain (cargo)")
has_server_bins() { [[ -x "$1/initdb" && -x "$1/pg_ctl" && -x "$1/postgres" && -x "$1/pg_basebackup" ]]; }
pg_bin=""
for dir in /usr/lib/postgresql/*/bin; do
    has_server_bins "$dir" && pg_bin="$dir"
done
if [[ -z "$pg_bin" ]] && command -v pg_config >/dev/null; then
    dir="$(pg_config --bindir)"
    has_server_bins "$dir" && pg_bin="$dir"
fi
[[ -n "$pg_bin" ]] ||
    missing+=("PostgreSQL server binaries: initdb, pg_ctl, postgres, pg_basebackup (Debian/Ubuntu: apt-get install postgresql)")
if [[ -z "$pg_bin" || ! -x "$pg_bin/psql" ]] && ! command -v psql >/dev/null; then
    missing+=("psql (Debian/Ubuntu: apt-get install postgresql-client)")
fi
# PostgreSQL refuses to run as root; the harness then runs it as `postgres`.
if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    missing+=("an OS user 'postgres' (running as root; the servers run as that user)")
fi
if ((${#missing[@]})); then
    printf 'global_drill.sh: missing:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
fi

# ------------------------------------------------------------------ build
# The drill runs the release build of the proxy (what users run): the
# harness takes it from DSQL_PROXY_BIN instead of building a debug one.
echo "== building dsql-proxy (release)"
(cd "$ROOT" && cargo build --release -p dsql-proxy --bin dsql-proxy --quiet) || die "build of dsql-proxy failed"
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$target_dir" = /* ]] || target_dir="$ROOT/$target_dir"
export DSQL_PROXY_BIN="$target_dir/release/dsql-proxy"
[[ -x "$DSQL_PROXY_BIN" ]] || die "no release binary at $DSQL_PROXY_BIN"
echo "== building the drill (cargo bench profile)"
(cd "$ROOT" && cargo bench -p dsql-proxy-tests --bench global_drill --no-run --quiet) ||
    die "build of the drill failed"
echo "   commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    [[ -n "$(git -C "$ROOT" status --porcelain -- crates 2>/dev/null)" ]] && echo ' (crates/ modified)'
), $(nproc) cores, $("$pg_bin/postgres" --version)"

# -------------------------------------------------------------------- run
echo "== global drill: $DRILL_RUNS run(s)"
cd "$ROOT"
exec cargo bench -p dsql-proxy-tests --bench global_drill --quiet
