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
DRILL_NAME=failover_drill.sh
# shellcheck source=benches/lib/drill.sh
source "$ROOT/benches/lib/drill.sh"

drill_require initdb pg_ctl postgres
ulimit -n 8192 2>/dev/null || ulimit -n 4096 2>/dev/null || true

drill_build_and_run failover_drill "failover drill: $DRILL_RUNS run(s) of $DRILL_SCENARIOS"
