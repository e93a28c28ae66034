# Shared by failover_drill.sh and global_drill.sh (sourced, not run): checks
# what a drill needs, builds the release proxy and the drill's bench target,
# then runs it. The caller sets ROOT and DRILL_NAME (for messages).

drill_die() {
    printf '%s: %s\n' "$DRILL_NAME" "$*" >&2
    exit 1
}

# drill_require SERVER_BIN...: a Rust toolchain, PostgreSQL server binaries
# (these, in one directory), psql, and under root an OS user `postgres`.
# Lists everything missing at once and exits 1; sets pg_bin.
drill_require() {
    local need=("$@") missing=() dir
    has_server_bins() {
        local b
        for b in "${need[@]}"; do [[ -x "$1/$b" ]] || return 1; done
    }
    command -v cargo >/dev/null || missing+=("a Rust toolchain (cargo)")
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
    local list="${need[*]}"
    [[ -n "$pg_bin" ]] ||
        missing+=("PostgreSQL server binaries: ${list// /, } (Debian/Ubuntu: apt-get install postgresql)")
    if [[ -z "$pg_bin" || ! -x "$pg_bin/psql" ]] && ! command -v psql >/dev/null; then
        missing+=("psql (Debian/Ubuntu: apt-get install postgresql-client)")
    fi
    # PostgreSQL refuses to run as root; the harness then runs it as `postgres`.
    if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        missing+=("an OS user 'postgres' (running as root; the servers run as that user)")
    fi
    if ((${#missing[@]})); then
        printf '%s: missing:\n' "$DRILL_NAME" >&2
        printf '  - %s\n' "${missing[@]}" >&2
        exit 1
    fi
}

# drill_build_and_run BENCH HEADLINE: the drill runs the release build of the
# proxy (what users run); the harness takes it from DSQL_PROXY_BIN instead
# of building a debug one. Replaces the shell with `cargo bench`.
drill_build_and_run() {
    local bench=$1 headline=$2 target_dir
    echo "== building dsql-proxy (release)"
    (cd "$ROOT" && cargo build --release -p dsql-proxy --bin dsql-proxy --quiet) ||
        drill_die "build of dsql-proxy failed"
    target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
    [[ "$target_dir" = /* ]] || target_dir="$ROOT/$target_dir"
    export DSQL_PROXY_BIN="$target_dir/release/dsql-proxy"
    [[ -x "$DSQL_PROXY_BIN" ]] || drill_die "no release binary at $DSQL_PROXY_BIN"
    echo "== building the drill (cargo bench profile)"
    (cd "$ROOT" && cargo bench -p dsql-proxy-tests --bench "$bench" --no-run --quiet) ||
        drill_die "build of the drill failed"
    echo "   commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
        [[ -n "$(git -C "$ROOT" status --porcelain -- crates 2>/dev/null)" ]] && echo ' (crates/ modified)'
    ), $(nproc) cores, $("$pg_bin/postgres" --version)"
    echo "== $headline"
    cd "$ROOT"
    exec cargo bench -p dsql-proxy-tests --bench "$bench" --quiet
}
