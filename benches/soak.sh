#!/usr/bin/env bash
# Soak: the release proxy in front of a local PostgreSQL server under
# session churn (pgbench, a new connection per transaction, plus steady
# sessions), cancels (psql interrupted mid-query), backend kills
# (pg_terminate_backend every few seconds, a server restart every minute)
# and configuration reloads (SIGHUP every few seconds, adding and removing
# an endpoint). It reports the proxy's RSS and open file descriptors,
# measured with no session open after a warm-up and again after the soak,
# and fails when either grew.
#
#   benches/soak.sh                       # 10 minutes
#   SOAK_SECONDS=120 benches/soak.sh      # shorter
#
# Settings (environment): SOAK_SECONDS (600), WARMUP_SECONDS (60),
# SOAK_CLIENTS (pgbench clients that reconnect per transaction, 4),
# DSQL_PROXY_BIN (a prebuilt binary instead of the release build),
# KEEP_TMP=1 keeps the temp dir. Needs PostgreSQL server binaries, psql,
# pgbench, curl and (as root) an OS user `postgres`.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SOAK_SECONDS=${SOAK_SECONDS:-600}
WARMUP_SECONDS=${WARMUP_SECONDS:-60}
CLIENTS=${SOAK_CLIENTS:-4}
PASSWORD=soak-password
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET_DIR" = /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
# DSQL_PROXY_BIN runs a binary already built (e.g. target/debug/dsql-proxy).
PROXY_BIN="${DSQL_PROXY_BIN:-$TARGET_DIR/release/dsql-proxy}"

log() { printf '%s\n' "$*"; }
die() {
    printf 'soak: %s\n' "$*" >&2
    exit 1
}

PG_BIN=""
for dir in /usr/lib/postgresql/*/bin; do [[ -x "$dir/initdb" ]] && PG_BIN="$dir"; done
[[ -n "$PG_BIN" ]] || { command -v pg_config >/dev/null && PG_BIN="$(pg_config --bindir)"; }
[[ -x "$PG_BIN/initdb" && -x "$PG_BIN/pg_ctl" ]] || die "PostgreSQL server binaries not found"
for tool in psql pgbench curl; do command -v "$tool" >/dev/null || die "$tool not found"; done

if [[ -z "${DSQL_PROXY_BIN:-}" ]]; then
    log "== building dsql-proxy (release)"
    (cd "$ROOT" && cargo build --release -p dsql-proxy --quiet) || die "build failed"
fi
[[ -x "$PROXY_BIN" ]] || die "no binary at $PROXY_BIN"

TMP="$(mktemp -d /tmp/dsql-proxy-soak.XXXXXX)"
PGDATA="$TMP/pgdata"
SOCKDIR="$TMP/sock"
PROXY_PID=""
SERVER_STARTED=0
WORKERS=()
if [[ $EUID -eq 0 ]]; then
    as_pg() { runuser -u postgres -- "$@"; }
    PG_USER=postgres
else
    as_pg() { "$@"; }
    PG_USER="$(id -un)"
fi

stop_workers() {
    local pid
    for pid in "${WORKERS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${WORKERS[@]}"; do wait "$pid" 2>/dev/null || true; done
    WORKERS=()
}

cleanup() {
    local rc=$?
    set +e
    stop_workers
    if [[ -n "$PROXY_PID" ]] && kill -0 "$PROXY_PID" 2>/dev/null; then
        kill -TERM "$PROXY_PID"
        wait "$PROXY_PID" 2>/dev/null
    fi
    if [[ $rc -ne 0 ]]; then
        echo "---- proxy log (last 30 lines) ----" >&2
        tail -n 30 "$TMP/proxy.log" >&2 2>/dev/null
    fi
    [[ $SERVER_STARTED == 1 ]] && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1
    if [[ "${KEEP_TMP:-0}" == 1 ]]; then echo "temp dir kept: $TMP" >&2; else rm -rf "$TMP"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

chmod 0755 "$TMP"
mkdir -p "$PGDATA" "$SOCKDIR"
chown "$PG_USER" "$PGDATA" "$SOCKDIR"
read -r PG_PORT PROXY_PORT ADMIN_PORT < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')

log "== server on 127.0.0.1:$PG_PORT ($("$PG_BIN/postgres" --version))"
as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
    -E UTF8 --locale=C >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$SOCKDIR'
password_encryption = scram-sha-256
max_connections = 300
fsync = off
synchronous_commit = off
EOF
touch "$TMP/postgres.log" && chown "$PG_USER" "$TMP/postgres.log"
pg_ctl() { as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$TMP/postgres.log" -w -t 60 "$@" >/dev/null; }
pg_ctl start || die "server did not start"
SERVER_STARTED=1
admin_sql() { as_pg psql -X -qtA -h "$SOCKDIR" -p "$PG_PORT" -U postgres -d postgres -c "$1"; }
admin_sql "CREATE ROLE soak LOGIN PASSWORD '$PASSWORD'" >/dev/null
admin_sql "CREATE DATABASE soak OWNER soak" >/dev/null
PGPASSWORD=$PASSWORD pgbench -i -q -s 1 -h 127.0.0.1 -p "$PG_PORT" -U soak soak >"$TMP/init.log" 2>&1 ||
    { cat "$TMP/init.log" >&2; die "pgbench -i failed"; }

# The config a reload alternates between: with and without a second
# endpoint (same server), and two probe intervals.
write_config() {
    local second=$1 interval=$2
    {
        cat <<EOF
[listen]
address = "127.0.0.1:$PROXY_PORT"
[admin]
address = "127.0.0.1:$ADMIN_PORT"
[backend]
kind = "postgres"
auth = "password"
password = "$PASSWORD"
tls = "disable"
connect_timeout = "5s"
[routing]
probe_user = "soak"
probe_database = "soak"
probe_interval = "$interval"
[shutdown]
max_drain = "5s"
[[endpoints]]
name = "local"
host = "127.0.0.1"
port = $PG_PORT
EOF
        if [[ $second == 1 ]]; then
            printf '[[endpoints]]\nname = "local-again"\nhost = "localhost"\nport = %s\npriority = 2\n' "$PG_PORT"
        fi
    } >"$TMP/proxy.toml.new"
    mv "$TMP/proxy.toml.new" "$TMP/proxy.toml"
}
write_config 0 250ms
"$PROXY_BIN" --config "$TMP/proxy.toml" --log-level warn 2>"$TMP/proxy.log" &
PROXY_PID=$!
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null || die "the proxy did not become ready"

client_env=(PGHOST=127.0.0.1 PGPORT="$PROXY_PORT" PGUSER=soak PGDATABASE=soak PGSSLMODE=disable
    PGGSSENCMODE=disable PGCONNECT_TIMEOUT=10)
metric() {
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$PROXY_PID/status"; }
fds() { find "/proc/$PROXY_PID/fd" -mindepth 1 -maxdepth 1 | wc -l; }

# Each worker loops until its deadline (pgbench gives up on a client whose
# connection broke, so it is restarted).
churn() {
    local end=$(($(date +%s) + $1)) left
    while (((left = end - $(date +%s)) > 0)); do
        env "${client_env[@]}" pgbench -n -C -S -c "$CLIENTS" -T "$left" >>"$TMP/churn.log" 2>&1 || true
    done
}
steady() {
    local end=$(($(date +%s) + $1)) left
    while (((left = end - $(date +%s)) > 0)); do
        env "${client_env[@]}" pgbench -n -c 2 -T "$left" >>"$TMP/steady.log" 2>&1 || true
    done
}
cancels() {
    local end=$(($(date +%s) + $1)) pid
    while (($(date +%s) < end)); do
        env "${client_env[@]}" psql -X -qc "select pg_sleep(30)" >/dev/null 2>&1 &
        pid=$!
        sleep 0.$((3 + RANDOM % 5))
        kill -INT "$pid" 2>/dev/null || true # psql sends a CancelRequest
        wait "$pid" 2>/dev/null || true
    done
}
kills() {
    local end=$(($(date +%s) + $1)) n=0
    while (($(date +%s) < end)); do
        sleep 3
        n=$((n + 1))
        if ((n % 20 == 0)); then
            pg_ctl restart -m fast || true
        else
            admin_sql "select count(pg_terminate_backend(pid)) from (select pid from pg_stat_activity
                where usename = 'soak' order by random() limit 3) s" >/dev/null 2>&1 || true
        fi
    done
}
reloads() {
    local end=$(($(date +%s) + $1)) n=0
    while (($(date +%s) < end)); do
        sleep 5
        n=$((n + 1))
        if ((n % 2)); then write_config 1 200ms; else write_config 0 250ms; fi
        kill -HUP "$PROXY_PID"
    done
}

run_load() {
    local secs=$1
    churn "$secs" & WORKERS+=($!)
    steady "$secs" & WORKERS+=($!)
    cancels "$secs" & WORKERS+=($!)
    kills "$secs" & WORKERS+=($!)
    reloads "$secs" & WORKERS+=($!)
    local pid
    for pid in "${WORKERS[@]}"; do wait "$pid" || true; done
    WORKERS=()
    kill -0 "$PROXY_PID" 2>/dev/null || die "the proxy died"
}

# No session open (pgbench's clients have all gone), then a few seconds for
# the sessions' last bytes.
quiesce() {
    write_config 0 250ms
    kill -HUP "$PROXY_PID"
    for _ in $(seq 300); do
        [[ "$(metric dsql_proxy_client_connections_active)" == 0 ]] && break
        sleep 0.1
    done
    [[ "$(metric dsql_proxy_client_connections_active)" == 0 ]] || die "sessions stay open after the load"
    sleep 3
}

log "== warm-up: ${WARMUP_SECONDS}s of churn, cancels, kills and reloads"
run_load "$WARMUP_SECONDS"
quiesce
start_rss=$(rss_kb) start_fds=$(fds)
start_sessions=$(metric dsql_proxy_client_connections_total)
log "   start: RSS $((start_rss / 1024)) MiB ($start_rss kB), $start_fds open file descriptors"

log "== soak: ${SOAK_SECONDS}s"
run_load "$SOAK_SECONDS"
quiesce
end_rss=$(rss_kb) end_fds=$(fds)
sessions=$(($(metric dsql_proxy_client_connections_total) - start_sessions))
log "   end:   RSS $((end_rss / 1024)) MiB ($end_rss kB), $end_fds open file descriptors"
log "   during the soak: $sessions client connections, $(metric dsql_proxy_cancel_requests_total) cancel requests," \
    "$(metric dsql_proxy_config_reloads_total) reloads, sessions closed by reason:"
curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | grep '^dsql_proxy_sessions_closed_total' | sed 's/^/     /'

# Allocator noise: a few percent of a small heap. File descriptors must
# come back exactly.
allowed_rss=$((start_rss + start_rss / 10 + 2048))
status=0
if ((end_fds > start_fds)); then
    log "FAIL: open file descriptors grew from $start_fds to $end_fds"
    status=1
fi
if ((end_rss > allowed_rss)); then
    log "FAIL: RSS grew from $start_rss kB to $end_rss kB (allowed up to $allowed_rss kB)"
    status=1
fi
((status == 0)) && log "soak passed: RSS and file descriptors did not grow"
exit $status
