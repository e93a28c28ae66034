#!/usr/bin/env bash
# The project's one test command (README "Quick start"; CI runs exactly this).
# Installs what the tests need when it is missing, then runs formatting and
# lint checks and every unit and integration test. Integration tests start
# their own throwaway PostgreSQL servers, so a PostgreSQL server install
# (initdb, pg_ctl, postgres) plus psql and pgbench must be present (and curl,
# which deploy_manifests.rs runs as the batch Job example does), and
# Python 3 with moto's server (pip) for the route53 command tests.
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
  # A distribution's own Python may refuse user installs (PEP 668).
  python3 -m pip install --quiet 'moto[server]' \
    || python3 -m pip install --quiet --break-system-packages 'moto[server]'
  if ! have_moto; then
    echo "moto's server is required for the route53 tests: python3 -m pip install 'moto[server]'" >&2
    exit 1
  fi
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The container image's build: the binary without the default `demo` feature.
cargo clippy -p dsql-proxy --no-default-features --all-targets --locked -- -D warnings
echo "==> cargo test"
# Servers and proxies are real processes; two test threads suit 2-core CI.
cargo test --workspace --locked --no-fail-fast -- --test-threads "${TEST_THREADS:-2}"

# The container image, built with podman and run like the sidecar. Opt-in:
# a first run builds the release binary inside the container, which would
# push CI past its time budget (README, "Container image").
if [ "${TEST_IMAGE:-0}" = 1 ]; then
  echo "==> container image (scripts/image.sh --test)"
  scripts/image.sh --test
fi
