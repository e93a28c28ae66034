#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for FUZZ_SECONDS each (default 600),
# one after the other, and prints a line per target: executions, the corpus
# size and the crashes found (artifacts in fuzz/artifacts/<target>/).
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#   scripts/fuzz.sh                 # all targets, 10 minutes each
#   FUZZ_SECONDS=60 scripts/fuzz.sh startup_packet config_env
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-600}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
    # (lists every target, those needing --features status too)
fi
# Seeds from crates/fuzz-targets (valid inputs for each target), once.
[ -d fuzz/corpus ] ||
    cargo run -q -p dsql-proxy-fuzz-targets --example seed_corpus -- fuzz/corpus >/dev/null
# The two targets over the health crate need the AWS SDK built under the
# fuzzer's instrumentation (feature `status`, slow to build); the rest not.
features() {
    case "$1" in aurora_status | aws_status) echo --features=status ;; esac
}
mkdir -p fuzz/logs
for t in "${targets[@]}"; do
    log="fuzz/logs/$t.log"
    status=0
    # shellcheck disable=SC2046 # no or one word
    cargo +nightly fuzz run -O $(features "$t") "$t" -- -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    crashes=$(find "fuzz/artifacts/$t" -type f 2>/dev/null | wc -l)
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    echo "$t: ${execs} executions in ${seconds}s, corpus ${corpus}, crash artifacts ${crashes}, exit ${status}"
done
