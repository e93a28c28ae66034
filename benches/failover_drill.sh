#!/usr/bin/env bash
# Failover drill: kill -9, SIGSTOP and a network partition of the selected
# Region while a client opens 20 sessions/s through dsql-proxy; how fast new
# sessions land on the other Region, how many fail, connect latency during
# the switch, and recovery. The drill itself is the Rust bench target
# tests/benches/failover_drill.rs (it uses the integration-test harness:
# real PostgreSQL servers behind latency relays, the real proxy binary).
# See benches/README.md.
#
# Env: DRILL_RUNS (3 per scenario), DRILL_SCENARIOS (kill9,sigstop,partition),
#      QUICK=1 (smoke run: DRILL_RUNS=1), DRILL_TRACE=1 (per-session
#      timeline around T0 and the proxy's routing log lines),
#      DRILL_PROXY_LOG (proxy log filter), DRILL_ROUTING (extra [routing]
#      lines, ';'-separated, for experiments).
# Installs nothing. Exit status is 0 even when a target is missed; non-zero
# means it broke (build, servers, proxy).
set -euo pipefail

if [[ "${QUICK:-0}" == 1 ]]; then
    : "${DRILL_RUNS:=1}"
fi
: "${DRILL_RUNS:=3}" "${DRILL_SCENARIOS:=kill9,sigstop,partition}"
export DRILL_RUNS DRILL_SCENARIOS

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
    printf 'failover_drill.sh: %s\n' "$*" >&2
    exit 1
}

# ------------------------------------------------------- what is needed
missing=()
command -v cargo >/dev/null || missing+=("a Rust toolchain (cargo)")
has_server_bins() { [[ -x "$1/initdb" && -x "$1/pg_ctl" && -x "$1/postgres" ]]; }
pg_bin=""
for dir in /usr/lib/postgresql/*/bin; do
    has_server_bins "$dir" && pg_bin="$dir"
done
if [[ -z "$pg_bin" ]] && command -v pg_config >/dev/null; then
    dir="$(pg_config --bindir)"
    has_server_bins "$dir" && pg_bin="$dir"
fi
if [[ -z "$pg_bin" ]] && command -v initdb >/dev/null; then
    dir="$(dirname "$(command -v initdb)")"
    has_server_bins "$dir" && pg_bin="$dir"
fi
[[ -n "$pg_bin" ]] ||
    missing+=("PostgreSQL server binaries: initdb, pg_ctl, postgres (Debian/Ubuntu: apt-get install postgresql)")
if [[ -z "$pg_bin" || ! -x "$pg_bin/psql" ]] && ! command -v psql >/dev/null; then
    missing+=("psql (Debian/Ubuntu: apt-get install postgresql-client)")
fi
# PostgreSQL refuses to run as root; the harness then runs it as `postgres`.
if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    missing+=("an OS user 'postgres' (running as root; the servers run as that user)")
fi
if ((${#missing[@]})); then
    printf 'failover_drill.sh: missing:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
fi

ulimit -n 8192 2>/dev/null || ulimit -n 4096 2>/dev/null || true

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
(cd "$ROOT" && cargo bench -p dsql-proxy-tests --bench failover_drill --no-run --quiet) ||
    die "build of the drill failed"
echo "   commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    [[ -n "$(git -C "$ROOT" status --porcelain -- crates 2>/dev/null)" ]] && echo ' (crates/ modified)'
), $(nproc) cores, $("$pg_bin/postgres" --version)"

# -------------------------------------------------------------------- run
echo "== failover drill: $DRILL_RUNS run(s) of $DRILL_SCENARIOS"
cd "$ROOT"
exec cargo bench -p dsql-proxy-tests --bench failover_drill --quiet
