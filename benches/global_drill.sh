#!/usr/bin/env bash
# Global Database drill: promote a streaming standby while the old primary
# keeps running and a client writes continuously through dsql-proxy
# (kind = "aurora-global", probe_interval 250ms). Reports write
# unavailability (promotion to first write on the new writer; target
# <= 1s) and writes that reached the old primary after the proxy saw the
# promotion (target 0). The drill is tests/benches/global_drill.rs (real
# PostgreSQL servers, the real proxy binary). See benches/README.md.
#
# Env: DRILL_RUNS (3). Needs the PostgreSQL server binaries and psql; as
# root, an OS user 'postgres'. Exit status 0 even when a target is missed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
echo "== building dsql-proxy (debug: the binary the harness runs)"
cargo build -p dsql-proxy --bin dsql-proxy --quiet
echo "== global drill: ${DRILL_RUNS:-3} run(s)"
exec cargo bench -p dsql-proxy-tests --bench global_drill --quiet
