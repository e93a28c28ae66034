#!/usr/bin/env bash
# Throughput/latency overhead of dsql-proxy against a local TLS PostgreSQL,
# plus proxy memory with many idle sessions. See benches/README.md.
#
# Env: ROUNDS (3), DURATION (10 s per run), MODE (prepared|extended|simple),
#      SCALE (10), CLIENTS ("1 8"), IDLE_SESSIONS (1000), WARMUP (3 s),
#      QUICK=1 (smoke run: DURATION=2 ROUNDS=1 IDLE_SESSIONS=100 WARMUP=1),
#      NICE (-10 as root, else 0: priority of server, proxy and pgbench),
#      PG_BIN (/usr/lib/postgresql/15/bin), KEEP_TMP=1 (keep the temp dir),
#      PROXY_BIN (a proxy binary built otherwise, e.g. with debug info
#      for perf; nothing is built then),
#      PROXY_ARGS (extra proxy arguments, e.g. "--worker-threads 2"),
#      CLIENT_LEG=unix (pgbench reaches the proxy and the reference through a
#      Unix socket instead of loopback TCP; the direct leg stays TLS over TCP),
#      REFERENCE=pgbouncer (also run every round through PgBouncer, session
#      pooling, TLS verify-full to the same server, for comparison),
#      CONNECT=1 (pgbench -C: a new connection per transaction, as a CGI
#      script or a serverless function makes them; what backend connection
#      reuse is for. Use with CLIENTS="4 8" REFERENCE=pgbouncer),
#      SESSION_LOGS=1 (per-connection log lines on both sides: the proxy's
#      default line per ended session, and PgBouncer's log_connections and
#      log_disconnections; by default both are off, which matters with
#      CONNECT=1),
#      CONTENTION=1 (then also: 8 clients incrementing one row at REPEATABLE
#      READ through the proxy; reports committed TPS and failed (conflicted)
#      transactions. Run once with DSQL_PROXY__RETRY__MAX_ATTEMPTS=10 in the
#      environment and once without to compare transparent retry on/off).
# Exit status is 0 even when a target is missed; non-zero means it broke.
set -euo pipefail

if [[ "${QUICK:-0}" == 1 ]]; then
    : "${DURATION:=2}" "${ROUNDS:=1}" "${IDLE_SESSIONS:=100}" "${WARMUP:=1}"
fi
: "${DURATION:=10}" "${ROUNDS:=3}" "${IDLE_SESSIONS:=1000}" "${WARMUP:=3}"
: "${MODE:=prepared}" "${SCALE:=10}" "${CLIENTS:=1 8}"
connect_args=()
[[ "${CONNECT:-0}" == 1 ]] && connect_args=(-C)
: "${PG_BIN:=/usr/lib/postgresql/15/bin}" "${REFERENCE:=}" "${CLIENT_LEG:=tcp}"
case "$CLIENT_LEG" in tcp | unix) ;; *)
    echo "CLIENT_LEG must be tcp or unix (got '$CLIENT_LEG')" >&2
    exit 2
    ;;
esac
case "$REFERENCE" in "" | pgbouncer) ;; *)
    echo "REFERENCE must be empty or pgbouncer (got '$REFERENCE')" >&2
    exit 2
    ;;
esac
if [[ -n "$REFERENCE" ]] && ! command -v pgbouncer >/dev/null; then
    echo "REFERENCE=pgbouncer needs the pgbouncer binary (Debian package pgbouncer)" >&2
    exit 2
fi
case "$MODE" in simple | extended | prepared) ;; *)
    echo "MODE must be simple, extended or prepared (got '$MODE')" >&2
    exit 2
    ;;
esac
# Both legs get the same boosted priority so unrelated work on a shared
# machine (builds, tests) skews the comparison less.
: "${NICE:=$([[ $EUID -eq 0 ]] && echo -10 || echo 0)}"
PASSWORD=bench-secret

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# PROXY_BIN: a binary built otherwise (e.g. with debug info for perf);
# the script then builds nothing.
PROXY_BIN_GIVEN="${PROXY_BIN:-}"
: "${PROXY_BIN:=$ROOT/target/release/dsql-proxy}"

log() { printf '%s\n' "$*"; }
die() {
    printf 'pgbench.sh: %s\n' "$*" >&2
    exit 1
}

# Each idle session holds a client socket and a backend socket in the proxy.
ulimit -n 8192 || die "cannot raise the open-file limit to 8192"

if [[ -z "$PROXY_BIN_GIVEN" ]]; then
    log "== building dsql-proxy (release)"
    (cd "$ROOT" && cargo build --release -p dsql-proxy --quiet) || die "build failed"
fi
[[ -x "$PROXY_BIN" ]] || die "no binary at $PROXY_BIN"
log "   commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    [[ -n "$(git -C "$ROOT" status --porcelain -- crates 2>/dev/null)" ]] && echo ' (crates/ modified)'
), $(nproc) cores, $("$PG_BIN/postgres" --version)"

# ---------------------------------------------------------------- temp dir
TMP="$(mktemp -d /tmp/dsql-proxy-bench.XXXXXX)"
PGDATA="$TMP/pgdata"
SOCKDIR="$TMP/sock"
PROXY_PID=""
PGBOUNCER_PID=""
SERVER_STARTED=0

# postgres refuses to run as root, so the server side runs as `postgres`.
if [[ $EUID -eq 0 ]]; then
    PG_USER=postgres
    as_pg() { nice -n "$NICE" runuser -u postgres -- "$@"; }
else
    PG_USER="$(id -un)"
    as_pg() { nice -n "$NICE" "$@"; }
fi

cleanup() {
    local rc=$?
    set +e
    if [[ -n "$PROXY_PID" ]] && kill -0 "$PROXY_PID" 2>/dev/null; then
        kill -TERM "$PROXY_PID"
        for _ in $(seq 50); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PROXY_PID" 2>/dev/null
        wait "$PROXY_PID" 2>/dev/null
    fi
    if [[ -n "$PGBOUNCER_PID" ]]; then
        kill -TERM "$PGBOUNCER_PID" 2>/dev/null
        wait "$PGBOUNCER_PID" 2>/dev/null
    fi
    if [[ $rc -ne 0 ]]; then
        echo "---- proxy log (last 40 lines) ----" >&2
        tail -n 40 "$TMP/proxy.log" >&2 2>/dev/null
        echo "---- server log (last 20 lines) ----" >&2
        tail -n 20 "$TMP/postgres.log" >&2 2>/dev/null
    fi
    if [[ $SERVER_STARTED == 1 ]]; then
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1
    fi
    if [[ "${KEEP_TMP:-0}" == 1 ]]; then
        echo "temp dir kept: $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The postgres user must be able to traverse into the temp dir.
chmod 0755 "$TMP"
cd "$TMP"
mkdir -p "$SOCKDIR" "$TMP/logs" "$TMP/out" "$TMP/tls"

read -r PG_PORT PROXY_PORT ADMIN_PORT PGBOUNCER_PORT < <(python3 - <<'PY'
import socket
# Hold all sockets open together so the ports differ.
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)

# ------------------------------------------------------------- certificates
log "== TLS material, initdb, server on 127.0.0.1:$PG_PORT"
(
    cd "$TMP/tls"
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout ca.key -out ca.pem -days 2 -subj "/CN=dsql-proxy bench CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout server.key -out server.csr -subj "/CN=localhost"
    # webpki only looks at subjectAltName, and rejects CA:TRUE leaf certs.
    printf '%s\n' "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
        "subjectAltName=DNS:localhost,IP:127.0.0.1" >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out server.pem -days 2 -extfile server.ext
) >"$TMP/tls/openssl.log" 2>&1 || { cat "$TMP/tls/openssl.log" >&2; die "openssl failed"; }
chmod 0644 "$TMP/tls/ca.pem" "$TMP/tls/server.pem"
chown "$PG_USER" "$TMP/tls/server.key" "$TMP/tls/server.pem"
chmod 0600 "$TMP/tls/server.key"

# ------------------------------------------------------------------ server
mkdir -p "$PGDATA"
chown "$PG_USER" "$PGDATA" "$SOCKDIR"
touch "$TMP/postgres.log" && chown "$PG_USER" "$TMP/postgres.log"
as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth-local=peer --auth-host=reject \
    -E UTF8 --locale=C >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }

cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$SOCKDIR'
ssl = on
ssl_cert_file = '$TMP/tls/server.pem'
ssl_key_file = '$TMP/tls/server.key'
password_encryption = scram-sha-256
max_connections = 1100
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
# TCP only over TLS with SCRAM; the unix socket is for setup as postgres.
cat >"$PGDATA/pg_hba.conf" <<EOF
local   all  postgres               peer
hostssl all  all       127.0.0.1/32 scram-sha-256
EOF

as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$TMP/postgres.log" -w -t 60 start >/dev/null ||
    die "server did not start"
SERVER_STARTED=1

as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$SOCKDIR" -p "$PG_PORT" -U postgres -d postgres \
    -c "CREATE ROLE bench LOGIN PASSWORD '$PASSWORD'" \
    -c "CREATE DATABASE bench OWNER bench" >/dev/null

# Client settings for the two legs; GSS probing off so neither pays for it.
direct_env=(PGHOST=127.0.0.1 PGPORT="$PG_PORT" PGUSER=bench PGDATABASE=bench
    PGPASSWORD="$PASSWORD" PGSSLMODE=require PGGSSENCMODE=disable)
# The client leg: loopback TCP, or a Unix socket in a directory of each's own.
CLIENT_HOST=127.0.0.1 PROXY_SOCKDIR="" PGBOUNCER_SOCKDIR=""
if [[ $CLIENT_LEG == unix ]]; then
    PROXY_SOCKDIR="$TMP/proxy-sock" PGBOUNCER_SOCKDIR="$TMP/pgbouncer-sock"
    mkdir -p "$PROXY_SOCKDIR" "$PGBOUNCER_SOCKDIR"
    chown "$PG_USER" "$PGBOUNCER_SOCKDIR"
fi
proxy_env=(PGHOST="${PROXY_SOCKDIR:-$CLIENT_HOST}" PGPORT="$PROXY_PORT" PGUSER=bench PGDATABASE=bench
    PGSSLMODE=disable PGGSSENCMODE=disable)
# shellcheck disable=SC2034 # used through a nameref in run_pgbench
pgbouncer_env=(PGHOST="${PGBOUNCER_SOCKDIR:-$CLIENT_HOST}" PGPORT="$PGBOUNCER_PORT" PGUSER=bench PGDATABASE=bench
    PGSSLMODE=disable PGGSSENCMODE=disable)

log "== pgbench -i -s $SCALE"
env "${direct_env[@]}" pgbench -i -q -s "$SCALE" >"$TMP/pgbench-init.log" 2>&1 ||
    { cat "$TMP/pgbench-init.log" >&2; die "pgbench -i failed"; }

# ------------------------------------------------------------------- proxy
PROXY_UNIX_LINE=""
[[ -z "$PROXY_SOCKDIR" ]] || PROXY_UNIX_LINE="unix_socket_dir = \"$PROXY_SOCKDIR\""
cat >"$TMP/proxy.toml" <<EOF
[listen]
address = "127.0.0.1:$PROXY_PORT"
max_client_connections = 10000
$PROXY_UNIX_LINE
[admin]
address = "127.0.0.1:$ADMIN_PORT"
[backend]
kind = "postgres"
auth = "password"
password = "$PASSWORD"
tls = "verify-full"
ca_file = "$TMP/tls/ca.pem"
connect_timeout = "5s"
[routing]
# The health probe logs in as a role that exists, so it keeps one
# connection and runs its check query on it, as it would in production.
probe_user = "bench"
probe_database = "bench"
[[endpoints]]
name = "local"
host = "localhost"
port = $PG_PORT
connect_address = "127.0.0.1:$PG_PORT"
EOF
# Per-connection log lines: both sides alike (PgBouncer's below follow
# SESSION_LOGS too).
SESSION_LOGS="${SESSION_LOGS:-0}"
proxy_log_args=()
[[ $SESSION_LOGS == 1 ]] || proxy_log_args=(--log-level "info,dsql_proxy::sessions=off")
# shellcheck disable=SC2086 # PROXY_ARGS is a list of words
nice -n "$NICE" "$PROXY_BIN" --config "$TMP/proxy.toml" "${proxy_log_args[@]}" ${PROXY_ARGS:-} 2>"$TMP/proxy.log" &
PROXY_PID=$!

proxy_alive() { kill -0 "$PROXY_PID" 2>/dev/null; }
proxy_query() { env "${proxy_env[@]}" psql -X -qtA -c "$1" 2>&1; }

for _ in $(seq 100); do
    proxy_alive || die "proxy exited at startup"
    [[ "$(proxy_query 'SELECT 1')" == 1 ]] && break
    sleep 0.1
done
[[ "$(proxy_query 'SELECT 1')" == 1 ]] || die "proxy does not answer on 127.0.0.1:$PROXY_PORT"
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$PROXY_PID/status"; }

# ------------------------------------------------------ reference: PgBouncer
# Same shape as the proxy leg: plain towards pgbench (trust), TLS verify-full
# and SCRAM towards the server, one server connection per client (session
# pooling). PgBouncer refuses to run as root, so it runs as the server user.
if [[ "$REFERENCE" == pgbouncer ]]; then
    mkdir -p "$TMP/pgbouncer"
    printf '"bench" "%s"\n' "$PASSWORD" >"$TMP/pgbouncer/userlist.txt"
    cat >"$TMP/pgbouncer/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir = $PGBOUNCER_SOCKDIR
auth_type = trust
auth_file = $TMP/pgbouncer/userlist.txt
pool_mode = session
max_client_conn = 2000
default_pool_size = 20
server_tls_sslmode = verify-full
server_tls_ca_file = $TMP/tls/ca.pem
logfile = $TMP/pgbouncer/pgbouncer.log
log_connections = $SESSION_LOGS
log_disconnections = $SESSION_LOGS
EOF
    chown -R "$PG_USER" "$TMP/pgbouncer"
    chmod 0600 "$TMP/pgbouncer/userlist.txt"
    as_pg pgbouncer "$TMP/pgbouncer/pgbouncer.ini" >/dev/null 2>&1 &
    PGBOUNCER_PID=$!
    PGBOUNCER_PROC=""
    for _ in $(seq 100); do
        [[ "$(env "${pgbouncer_env[@]}" psql -X -qtA -c 'SELECT 1' 2>/dev/null)" == 1 ]] && break
        sleep 0.1
    done
    PGBOUNCER_PROC="$(pgrep -n -x pgbouncer || true)"
    [[ -n "$PGBOUNCER_PROC" && "$(env "${pgbouncer_env[@]}" psql -X -qtA -c 'SELECT 1' 2>&1)" == 1 ]] || {
        cat "$TMP/pgbouncer/pgbouncer.log" >&2
        die "pgbouncer does not answer on 127.0.0.1:$PGBOUNCER_PORT"
    }
    log "== reference: $(pgbouncer --version | head -n 1) on 127.0.0.1:$PGBOUNCER_PORT (session pooling, backend TLS verify-full)"
fi
RSS_FRESH_KB="$(rss_kb)"
log "== proxy pid $PROXY_PID on 127.0.0.1:$PROXY_PORT${PROXY_SOCKDIR:+ and $PROXY_SOCKDIR}, pgbench over $CLIENT_LEG (backend TLS verify-full)${PROXY_ARGS:+, args: $PROXY_ARGS}"

# ---------------------------------------------------------------- pgbench
CLK_TCK="$(getconf CLK_TCK)"
NCPU="$(nproc)"
POSTMASTER_PID="$(head -n 1 "$PGDATA/postmaster.pid")"
# CPU ticks of a process (utime+stime, plus reaped children's with "all").
proc_ticks() {
    awk -v all="${2:-}" '{ sub(/^.*\) /, ""); print $12 + $13 + (all ? $14 + $15 : 0) }' "/proc/$1/stat"
}
# The server's CPU: the postmaster with its reaped backends, plus the live
# backends (PgBouncer keeps its server connections open between runs).
server_ticks() {
    local t c
    t=$(proc_ticks "$POSTMASTER_PID" all)
    for c in $(pgrep -P "$POSTMASTER_PID"); do
        t=$((t + $(proc_ticks "$c" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
# Busy ticks of the whole host (user nice system irq softirq steal): with
# tick-based accounting a task's stime includes the softirq work (loopback
# TCP) it ran, so that must be counted on the host side too.
host_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
# children_cpu VAR: CPU seconds of this shell's reaped children (pgbench).
# `times` would report a subshell's own children, so no $(...) around it.
children_cpu() {
    times >"$TMP/times"
    printf -v "$1" '%s' "$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) {
        split($i, a, "m"); t += a[1] * 60 + a[2] } print t }' "$TMP/times")"
}

# run_pgbench LEG CLIENTS TAG [extra pgbench args...]
# Appends "leg clients tag tps other_load_% proxy_cpu_us_per_txn" to results.
run_pgbench() {
    local leg=$1 clients=$2 tag=$3
    shift 3
    local jobs=$((clients < 2 ? clients : 2))
    local -n envv="${leg}_env"
    local out="$TMP/out/${leg}_c${clients}_${tag}.txt"
    local t0 h0 p0 m0 c0 t1 h1 p1 m1 c1
    # The process in the middle: the proxy (idle during direct runs), or
    # the reference.
    local mid=$PROXY_PID
    [[ $leg == pgbouncer ]] && mid=$PGBOUNCER_PROC
    proxy_alive || die "proxy is not running (before the $leg run, $clients clients, $tag)"
    t0=$(date +%s.%N) h0=$(host_ticks) p0=$(proc_ticks "$mid")
    m0=$(server_ticks)
    children_cpu c0
    nice -n "$NICE" env "${envv[@]}" pgbench -n -S -M "$MODE" -c "$clients" -j "$jobs" \
        -T "$DURATION" "${connect_args[@]}" "$@" bench >"$out" 2>&1 ||
        { cat "$out" >&2; die "pgbench failed: $leg, $clients clients, $tag"; }
    proxy_alive || die "proxy died during the $leg run, $clients clients, $tag"
    sleep 0.3 # lets the postmaster reap the backends, so their CPU is counted
    t1=$(date +%s.%N) h1=$(host_ticks) p1=$(proc_ticks "$mid")
    m1=$(server_ticks)
    children_cpu c1
    local tps xacts
    # With -C pgbench counts the connects in: "(including reconnection times)".
    tps="$(sed -n 's/^tps = \([0-9.]*\) (\(without initial connection\|including reconnection\) times*)$/\1/p' "$out")"
    xacts="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")"
    [[ -n "$tps" && -n "$xacts" ]] || { cat "$out" >&2; die "unexpected pgbench output"; }
    # Whatever the host did beyond server, proxy and pgbench is interference.
    local other proxy_us
    read -r other proxy_us < <(awk -v hz="$CLK_TCK" -v n="$NCPU" -v t0="$t0" -v t1="$t1" \
        -v host=$((h1 - h0)) -v prox=$((p1 - p0)) -v pm=$((m1 - m0)) -v kids="$c0 $c1" -v x="$xacts" \
        'BEGIN { split(kids, k, " "); ours = (prox + pm) / hz + (k[2] - k[1])
                 o = (host / hz - ours) / ((t1 - t0) * n) * 100; if (o < 0) o = 0
                 printf "%.0f %.1f\n", o, prox / hz * 1e6 / x }')
    [[ $leg != direct ]] || proxy_us=-
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$leg" "$clients" "$tag" "$tps" "$other" "$proxy_us" >>"$TMP/results.tsv"
    printf '  %-8s %-6s c=%-2s tps=%-10.1f other host load=%s%%\n' "$tag" "$leg" "$clients" "$tps" "$other"
}

log "== select-only$([[ ${#connect_args[@]} -gt 0 ]] && echo ", -C (a new connection per transaction)"), -M $MODE, ${ROUNDS} round(s) x ${DURATION} s per leg, nice $NICE, per-connection log lines $([[ $SESSION_LOGS == 1 ]] && echo on || echo off)"
# One unlogged pass per leg first: fills caches and faults in the proxy.
DURATION=$WARMUP run_pgbench direct 8 warmup | sed 's/^/  (warm-up) /'
DURATION=$WARMUP run_pgbench proxy 8 warmup | sed 's/^/  (warm-up) /'
if [[ -n "$REFERENCE" ]]; then
    DURATION=$WARMUP run_pgbench "$REFERENCE" 8 warmup | sed 's/^/  (warm-up) /'
fi
: >"$TMP/results.tsv"
for clients in $CLIENTS; do
    for round in $(seq "$ROUNDS"); do
        for leg in direct proxy $REFERENCE; do
            run_pgbench "$leg" "$clients" "round$round" \
                -l --log-prefix="$TMP/logs/${leg}_c${clients}_r${round}"
        done
    done
done

log ""
python3 - "$TMP" "$MODE" "$ROUNDS" "$DURATION" "$REFERENCE" $CLIENTS <<'PY'
import glob, math, os, statistics, sys

tmp, mode, rounds, duration, reference = sys.argv[1:6]
clients = sys.argv[6:]
targets = {"1": 0.85, "8": 0.80}

runs = {}  # (leg, clients) -> [(tps, other_load, proxy_cpu_us)]
for line in open(os.path.join(tmp, "results.tsv")):
    leg, c, _tag, tps, other, cpu = line.split()
    runs.setdefault((leg, c), []).append((float(tps), float(other), cpu))

def latencies(leg, c):
    # pgbench -l lines: client_id xact_no latency_us script_no epoch us ...
    out = []
    for path in glob.glob(os.path.join(tmp, "logs", f"{leg}_c{c}_r*")):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    out.append(int(parts[2]))
    if not out:
        sys.exit(f"no per-transaction log lines for {leg}, {c} clients")
    out.sort()
    return out

def pct(sorted_vals, p):  # nearest rank
    return sorted_vals[max(0, math.ceil(p / 100 * len(sorted_vals)) - 1)]

for c in clients:
    d, p = runs[("direct", c)], runs[("proxy", c)]
    d_tps, p_tps = statistics.median(r[0] for r in d), statistics.median(r[0] for r in p)
    d_lat, p_lat = latencies("direct", c), latencies("proxy", c)
    ratio = p_tps / d_tps
    print(f"--- {c} client(s), -j {min(int(c), 2)}, pgbench -S -M {mode}, "
          f"{rounds} x {duration} s per leg ---")
    print(f"{'':28}{'direct':>10}{'proxy':>10}{'added':>10}")
    print(f"{'TPS (median of rounds)':28}{d_tps:10.1f}{p_tps:10.1f}")
    target = targets.get(c)
    verdict = "" if target is None else \
        f"   target >= {target:.2f}  {'PASS' if ratio >= target else 'MISS'}"
    print(f"{'TPS ratio proxy/direct':28}{'':10}{ratio:10.3f}{verdict}")
    for q in (50, 99):
        dv, pv = pct(d_lat, q), pct(p_lat, q)
        print(f"{f'p{q} latency (us)':28}{dv:10d}{pv:10d}{pv - dv:10d}")
    print(f"{'TPS per round':28}{'direct ' + ', '.join(f'{r[0]:.0f}' for r in d)}"
          f" | proxy {', '.join(f'{r[0]:.0f}' for r in p)}")
    print(f"{'other host load per round':28}{'direct ' + ', '.join(f'{r[1]:.0f}%' for r in d)}"
          f" | proxy {', '.join(f'{r[1]:.0f}%' for r in p)}")
    print(f"{'proxy CPU per transaction':28}{statistics.median(float(r[2]) for r in p):.1f} us (median of rounds)")
    if reference:
        r = runs[(reference, c)]
        r_tps = statistics.median(x[0] for x in r)
        r_lat = latencies(reference, c)
        print(f"{'reference: ' + reference:28}TPS {r_tps:.1f} (rounds {', '.join(f'{x[0]:.0f}' for x in r)}),"
              f" ratio to direct {r_tps / d_tps:.3f}, added p50/p99"
              f" {pct(r_lat, 50) - pct(d_lat, 50)}/{pct(r_lat, 99) - pct(d_lat, 99)} us,"
              f" CPU per transaction {statistics.median(float(x[2]) for x in r):.1f} us")
    print()
PY

# The pool's view of the runs above (with CONNECT=1: how many connects
# reused a backend).
pool_line="$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null | awk '
    /^dsql_proxy_pool_checkouts_total/ { split($1, a, "\""); c[a[2]] += $NF }
    /^dsql_proxy_pool_discards_total/ && $NF > 0 { split($1, a, "\""); d = d " " a[2] "=" $NF }
    END { printf "checkouts: hit %d, miss %d; discards:%s", c["hit"], c["miss"], (d == "" ? " none" : d) }')"
log "--- proxy backend pool: $pool_line"
log ""

# ------------------------------------------------ contention (CONTENTION=1)
# Serialization conflicts as Aurora DSQL's optimistic concurrency makes
# them: every client updates the same row at REPEATABLE READ. pgbench
# counts a transaction that got 40001 as failed (it does not retry it).
if [[ "${CONTENTION:-0}" == 1 ]]; then
    as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$SOCKDIR" -p "$PG_PORT" -U postgres -d bench \
        -c "CREATE TABLE contention (id int PRIMARY KEY, n bigint NOT NULL)" \
        -c "INSERT INTO contention VALUES (1, 0)" \
        -c "ALTER TABLE contention OWNER TO bench" \
        -c "ALTER ROLE bench IN DATABASE bench SET default_transaction_isolation = 'repeatable read'" >/dev/null
    printf '%s\n' "UPDATE contention SET n = n + 1 WHERE id = 1;" >"$TMP/contention.sql"
    retry_setting="${DSQL_PROXY__RETRY__MAX_ATTEMPTS:-1}"
    log "== contention: 8 clients, one row, REPEATABLE READ, -M $MODE, $DURATION s, [retry] max_attempts = $retry_setting"
    out="$TMP/out/contention.txt"
    nice -n "$NICE" env "${proxy_env[@]}" pgbench -n -f "$TMP/contention.sql" -M "$MODE" -c 8 -j 2 -T "$DURATION" \
        --failures-detailed bench >"$out" 2>&1 || { cat "$out" >&2; die "contention pgbench failed"; }
    processed="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")"
    failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")"
    tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' "$out")"
    committed="$(as_pg psql -X -qtA -h "$SOCKDIR" -p "$PG_PORT" -U postgres -d bench \
        -c "SELECT n FROM contention WHERE id = 1")"
    retries="$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null |
        awk '/^dsql_proxy_retries_total/ { s += $NF } END { print s + 0 }')"
    awk -v p="${processed:-0}" -v f="${failed:-0}" -v t="${tps:-0}" -v c="$committed" -v r="$retries" 'BEGIN {
        printf "  committed %d, client-visible errors %d (%.2f%% of %d tries by pgbench), TPS %.1f, requests the proxy retried %d\n",
            c, f, (p + f) ? f * 100 / (p + f) : 0, p + f, t, r }'
    [[ "$committed" == "${processed:-x}" ]] || log "  NOTE: committed ($committed) differs from pgbench's processed count (${processed:-?})"
    log ""
fi

# ------------------------------------------------------- idle-session RSS
# When idle clients leave, the proxy must close their backends too, except
# those it keeps in its pool ([pool] max_idle per login).
wait_backends_released() {
    local left="" pooled=""
    for _ in $(seq 100); do
        left="$(env "${direct_env[@]}" psql -X -qtA -c \
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'idle-bench'")"
        pooled="$(curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null |
            awk '/^dsql_proxy_pool_idle[{ ]/ { s += $NF } END { print s + 0 }')"
        [[ -n "$left" && "$left" -le "${pooled:-0}" ]] && return 0
        sleep 0.2
    done
    log "WARNING: $left backend connections of closed idle sessions were not released ($pooled idle in the pool)"
    return 1
}

# Raw startup protocol, no client library: each session reaches
# ReadyForQuery through the proxy (so it also has a backend), then sits idle.
cat >"$TMP/idle_sessions.py" <<'PY'
import asyncio, struct, sys, time

host, port, n, pid, label, before_kb, out = sys.argv[1:8]
port, n, before_kb = int(port), int(n), int(before_kb)
PARALLEL = 32  # concurrent handshakes; each costs the proxy a TLS + SCRAM login

def rss_kb():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS for the proxy")

def error_text(body):
    fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
    return (fields.get(b"C", b"") + b" " + fields.get(b"M", b"")).decode(errors="replace")

async def open_session(sem):
    async with sem:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        params = b"user\0bench\0database\0bench\0application_name\0idle-bench\0\0"
        writer.write(struct.pack("!ii", 8 + len(params), 196608) + params)
        await writer.drain()
        while True:
            header = await asyncio.wait_for(reader.readexactly(5), 30)
            (length,) = struct.unpack("!i", header[1:])
            body = await reader.readexactly(length - 4)
            if header[:1] == b"E":
                raise RuntimeError("startup failed: " + error_text(body))
            if header[:1] == b"Z":
                return reader, writer

async def main():
    t0 = time.monotonic()
    sem = asyncio.Semaphore(PARALLEL)
    sessions = await asyncio.gather(*(open_session(sem) for _ in range(n)))
    opened_s = time.monotonic() - t0
    await asyncio.sleep(2)  # let the handshakes' transient memory go
    with_kb = rss_kb()
    for _, w in sessions:
        w.write(b"X\0\0\0\4")  # Terminate
        w.close()
    await asyncio.gather(*(w.wait_closed() for _, w in sessions), return_exceptions=True)
    await asyncio.sleep(2)
    after_kb = rss_kb()
    print(f"{f'{label}: with {n} sessions':34}{with_kb / 1024:8.1f} MB"
          f"   {(with_kb - before_kb) / n:5.1f} KB/session over idle"
          f"   opened in {opened_s:.1f} s   after close {after_kb / 1024:.1f} MB")
    with open(out, "a") as f:
        f.write(f"{with_kb}\n")

asyncio.run(main())
PY

log "--- proxy RSS with $IDLE_SESSIONS idle sessions ---"
RSS_BEFORE_KB="$(rss_kb)"
printf '%-34s%8.1f MB\n' "RSS fresh (just started)" "$(awk -v k="$RSS_FRESH_KB" 'BEGIN { print k / 1024 }')"
printf '%-34s%8.1f MB\n' "RSS idle, no sessions (before)" "$(awk -v k="$RSS_BEFORE_KB" 'BEGIN { print k / 1024 }')"
# A second burst shows the steady state: freed memory the allocator hands
# back to the next sessions gets touched, where the first burst's fresh
# pages partly stayed untouched.
for burst in 1 2; do
    python3 "$TMP/idle_sessions.py" 127.0.0.1 "$PROXY_PORT" "$IDLE_SESSIONS" "$PROXY_PID" \
        "burst $burst" "$RSS_BEFORE_KB" "$TMP/rss_with.txt" ||
        die "idle-session burst $burst failed"
    proxy_alive || die "proxy died during idle-session burst $burst"
    wait_backends_released || true
done
awk -v n="$IDLE_SESSIONS" '{ if ($1 > max) max = $1 }
    END { printf "%-34s%8.1f MB   target < 50 MB: %s\n", "worst burst with " n " sessions",
          max / 1024, (max < 50 * 1024 ? "PASS" : "MISS") }' "$TMP/rss_with.txt"
[[ "$(proxy_query 'SELECT 1')" == 1 ]] || die "proxy no longer answers queries"
log "proxy still answers after the bursts: yes"
