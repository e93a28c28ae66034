#!/usr/bin/env bash
# The project's one test command (README "Quick start"; CI runs exactly this).
# Installs what the tests need when it is missing, then runs formatting and
# lint checks, builds the binaries the integration tests run, and runs every
# unit and integration test; at the end it prints the wall time of every
# step and of every test binary, and fails if any test failed. Integration
# tests start their own throwaway PostgreSQL servers, so a PostgreSQL server
# install (initdb, pg_ctl, postgres) plus psql and pgbench must be present
# (and curl, which deploy_manifests.rs runs as the batch Job example does),
# and Python 3 with moto's server (pip) for the route53 command tests
# and psycopg (pip) for the continuity tests.
# TEST_IMAGE=1 also builds and tests the container image (scripts/image.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

have_server() {
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null
}

if ! have_server || ! command -v psql >/dev/null || ! command -v pgbench >/dev/null || ! command -v openssl >/dev/null || ! command -v curl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing PostgreSQL server and clients (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps the package from starting its own cluster on 5432.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends postgresql postgresql-contrib openssl curl >/dev/null
    rm -f /usr/sbin/policy-rc.d
  else
    echo "PostgreSQL server binaries (initdb, pg_ctl, postgres), psql and pgbench are required:" >&2
    echo "  Debian/Ubuntu: sudo apt-get install -y postgresql postgresql-contrib" >&2
    exit 1
  fi
fi
# initdb refuses to run as root; the tests run servers as this user.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/sh postgres
fi

# Installs a Python package; a distribution's own Python may refuse user
# installs (PEP 668).
pip_install() {
  python3 -m pip install --quiet "$1" \
    || python3 -m pip install --quiet --break-system-packages "$1"
}

# tests/tests/route53_cli.rs runs moto's server as a local Route 53.
have_moto() {
  python3 -c "import moto.server" >/dev/null 2>&1
}
if ! have_moto; then
  if ! command -v python3 >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing Python 3 and pip (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-pip >/dev/null
  fi
  echo "==> installing moto[server] (pip)"
  pip_install 'moto[server]'
  if ! have_moto; then
    echo "moto's server is required for the route53 tests: python3 -m pip install 'moto[server]'" >&2
    exit 1
  fi
fi

# tests/tests/continuity.rs drives a psycopg session (libpq in its binary
# wheel) through session moves.
have_psycopg() {
  python3 -c "import psycopg; psycopg.pq.version()" >/dev/null 2>&1
}
if ! have_psycopg; then
  echo "==> installing psycopg[binary] (pip)"
  pip_install 'psycopg[binary]'
  if ! have_psycopg; then
    echo "psycopg is required for the continuity tests: python3 -m pip install 'psycopg[binary]'" >&2
    exit 1
  fi
fi

# The wall time of every step and of every test binary is printed at the
# end, slowest first, so a slow one stands out. Lines: seconds, tab, name.
steps=$(mktemp)
binaries=$(mktemp)
trap 'rm -f "$steps" "$binaries"' EXIT
# Seconds since $1 (an $EPOCHREALTIME), one decimal.
elapsed() {
  awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}
# Runs a step: "step NAME COMMAND...".
step() {
  local name=$1 start=$EPOCHREALTIME
  shift
  echo "==> $name"
  "$@"
  printf '%s\t%s\n' "$(elapsed "$start")" "$name" >>"$steps"
}
script_start=$EPOCHREALTIME

step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# The container image's build: the binary without the default `demo` feature.
step "cargo clippy (no default features)" \
  cargo clippy -p dsql-proxy --no-default-features --all-targets --locked -- -D warnings

# The integration tests run the real binaries. The harness builds them when
# a test first needs one (tests/src/build.rs), which would bill the build to
# that test binary. Built here first with the harness's own command (same
# package selection, hence the same features, target dir and profile), the
# harness finds them fresh.
step "cargo build --workspace --bins" cargo build --workspace --bins --locked
# Compiled apart too, so each test binary's time is its run alone.
step "cargo test --no-run" cargo test --workspace --locked --no-run

# Passes cargo test's output through and times each test binary, from its
# "Running" or "Doc-tests" line to the next one (or the end), appending
# "seconds, tab, result, tab, binary" lines to $binaries.
binary= result= started=
end_binary() {
  if [ -n "$binary" ]; then
    printf '%s\t%s\t%s\n' "$(elapsed "$started")" "${result:-no result}" "$binary" >>"$binaries"
  fi
  binary=
}
time_binaries() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    printf '%s\n' "$line"
    case $line in
      "     Running "* | "   Doc-tests "*)
        end_binary
        started=$EPOCHREALTIME
        result=
        # "Running tests/admin.rs (target/debug/deps/admin-0f3c...)" becomes
        # "admin (tests/admin.rs)": the binary without its hash, its source.
        binary=$(sed -E 's@^ *Running +(unittests )?(.*) \([^(]*/([^/ ]+)-[0-9a-f]+\)$@\3 (\2)@; s/^ *Doc-tests +/doc-tests /' <<<"$line")
        ;;
      "test result: ok."*) result=ok ;;
      "test result: FAILED."*) result=FAILED ;;
    esac
  done
  end_binary
}

echo "==> cargo test"
test_start=$EPOCHREALTIME
# Servers and proxies are real processes; two test threads suit 2-core CI.
set +e
cargo test --workspace --locked --no-fail-fast -- --test-threads "${TEST_THREADS:-2}" 2>&1 | time_binaries
status=${PIPESTATUS[0]}
set -e
printf '%s\t%s\n' "$(elapsed "$test_start")" "cargo test" >>"$steps"

echo
echo "==> wall time per test binary, slowest first"
sort -t $'\t' -k1,1 -rn "$binaries" | awk -F '\t' '
  { sum += $1; printf "%8.1fs  %-9s  %s\n", $1, $2, $3 }
  END { printf "%8.1fs  all %d test binaries\n", sum, NR }'
echo "==> wall time per step"
awk -F '\t' '{ printf "%8.1fs  %s\n", $1, $2 }' "$steps"
printf '%8.1fs  scripts/test.sh\n' "$(elapsed "$script_start")"
if [ "$status" -ne 0 ]; then
  echo "==> cargo test failed (exit $status); failing test binaries:" >&2
  awk -F '\t' '$2 != "ok" { print "  " $3 " (" $2 ")" }' "$binaries" >&2
fi

# The container image, built with podman and run like the sidecar. Opt-in:
# a first run builds the release binary inside the container, which would
# push CI past its time budget (README, "Container image").
if [ "$status" -eq 0 ] && [ "${TEST_IMAGE:-0}" = 1 ]; then
  echo "==> container image (scripts/image.sh --test)"
  scripts/image.sh --test
fi
exit "$status"
