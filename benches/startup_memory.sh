#!/usr/bin/env bash
# Memory held by clients stuck in their startup phase: N half-open clients
# each claim a large message and send nothing more, and the proxy's RSS is
# read before and after. Two kinds:
#   startup  a startup packet's length word claiming 10,000 bytes;
#   auth     a full startup packet, then (asked for a SCRAM message) a
#            message header claiming 65,535 bytes.
#
#   benches/startup_memory.sh [CLIENTS]          # default 2000
#   DSQL_PROXY_BIN=/path/to/dsql-proxy benches/startup_memory.sh
#
# Without DSQL_PROXY_BIN it builds and runs the release binary. No database
# is needed: no client gets as far as a backend.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CLIENTS=${1:-2000}
if [[ -z "${DSQL_PROXY_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --release -p dsql-proxy --quiet)
    DSQL_PROXY_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/dsql-proxy"
fi
ulimit -n "$((CLIENTS * 2 + 256))"
TMP="$(mktemp -d /tmp/dsql-proxy-startup-memory.XXXXXX)"
PROXY_PID=""
cleanup() {
    [[ -n "$PROXY_PID" ]] && kill -KILL "$PROXY_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

read -r PORT ADMIN DEAD < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')
cat >"$TMP/proxy.toml" <<EOF
[listen]
address = "127.0.0.1:$PORT"
max_client_connections = $((CLIENTS + 100))
startup_timeout = "300s"
auth = "scram-sha-256"
password = "local-secret"
[admin]
address = "127.0.0.1:$ADMIN"
[backend]
kind = "postgres"
auth = "password"
password = "unused"
tls = "disable"
[routing]
probes = false
[[endpoints]]
name = "nowhere"
host = "127.0.0.1"
port = $DEAD
EOF

for kind in startup auth; do
    "$DSQL_PROXY_BIN" --config "$TMP/proxy.toml" --log-level error 2>"$TMP/proxy.log" &
    PROXY_PID=$!
    python3 - "$PORT" "$CLIENTS" "$kind" "$PROXY_PID" <<'PY'
import socket, struct, sys, time
port, n, kind, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def status_kb(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
def rss_kb():
    return status_kb("VmRSS")
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port)).close()
        break
    except OSError:
        time.sleep(0.1)
time.sleep(0.5)
before, before_data = rss_kb(), status_kb("VmData")
socks = []
startup = b"user\0app\0database\0app\0\0"
startup = struct.pack("!II", 8 + len(startup), 196608) + startup
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if kind == "startup":
        s.sendall(struct.pack("!I", 10000))
    else:
        s.sendall(startup)
    socks.append(s)
if kind == "auth":
    # Each client gets its SASL request (those waiting for a startup turn
    # get it later), then claims a 65,535-byte SASLInitialResponse.
    for s in socks:
        s.settimeout(0.05)
        try:
            s.recv(1024)
        except OSError:
            pass
        s.sendall(b"p" + struct.pack("!I", 65535))
time.sleep(3)
after, after_data = rss_kb(), status_kb("VmData")
print(f"{kind:8} {n} half-open clients: RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB "
      f"(+{(after - before) * 1024 / n:.0f} bytes per client), heap and stacks (VmData) "
      f"{before_data / 1024:.1f} -> {after_data / 1024:.1f} MiB "
      f"(+{(after_data - before_data) * 1024 / n:.0f} bytes per client)")
PY
    kill -KILL "$PROXY_PID"
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=""
done
