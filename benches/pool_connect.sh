#!/usr/bin/env bash
# Backend connection reuse: a client's connect-to-first-row time through
# dsql-proxy with a pool hit against a miss, with 40 ms of round trip between
# the proxy and the DSQL endpoint emulator. The measurement is the Rust bench
# target tests/benches/pool_connect.rs (real PostgreSQL behind the emulator,
# a latency relay, the real release proxy). See benches/README.md.
#
# Env: POOL_SESSIONS (200 per leg), POOL_DELAY_MS (20, each way),
#      QUICK=1 (smoke run: POOL_SESSIONS=20).
# Installs nothing. Exit status 0 unless something broke.
set -euo pipefail

if [[ "${QUICK:-0}" == 1 ]]; then
    : "${POOL_SESSIONS:=20}"
fi
: "${POOL_SESSIONS:=200}" "${POOL_DELAY_MS:=20}"
export POOL_SESSIONS POOL_DELAY_MS

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRILL_NAME=pool_connect.sh
# shellcheck source=benches/lib/drill.sh
source "$ROOT/benches/lib/drill.sh"

drill_require initdb pg_ctl postgres
ulimit -n 8192 2>/dev/null || ulimit -n 4096 2>/dev/null || true

drill_build_and_run pool_connect "pool connect: $POOL_SESSIONS sessions per leg, ${POOL_DELAY_MS} ms each way"
