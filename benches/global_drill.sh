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
DRILL_NAME=global_drill.sh
# shellcheck source=benches/lib/drill.sh
source "$ROOT/benches/lib/drill.sh"

drill_require initdb pg_ctl postgres pg_basebackup
drill_build_and_run global_drill "global drill: $DRILL_RUNS run(s)"
