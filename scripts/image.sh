#!/usr/bin/env bash
# Builds the container image from the repository's Dockerfile with podman,
# offline and without any registry, into localhost/dsql-proxy:dev in
# podman's default image storage (README, "Container image").
#
#   scripts/image.sh          build the image
#   scripts/image.sh --test   build it, then run it the way the Kubernetes
#                             manifests do (uid 65532, read-only root
#                             filesystem, config mounted read-only) in front
#                             of a local PostgreSQL, and check it
#
# Base images cannot be pulled here, so the two the Dockerfile names are made
# locally the first time and kept in podman's storage (its ARGs point the
# build at them):
#   - the builder: Debian 12 minbase (mmdebstrap) with gcc and the host's
#     Rust toolchain, laid out like the official rust image;
#   - the runtime: distroless-like, FROM scratch: the files of libc6,
#     libgcc-s1, ca-certificates (its CA bundle) and netbase, and the
#     nonroot user 65532.
# Crates come from `cargo vendor` on the host, mounted into the build, which
# runs with no network.
#
# Needs a Debian 12 (bookworm) host with apt: podman, runc, mmdebstrap;
# with --test also PostgreSQL's server binaries, psql, curl, openssl and
# python3. As root, missing packages are installed with apt-get; otherwise
# the script names them and stops. Podman runs with runc and cgroupfs and
# fixed ulimits (a containers.conf in the cache directory, passed with
# CONTAINERS_CONF), which works on hosts where crun or raising limits does
# not. Cache: $DSQL_PROXY_IMAGE_CACHE, default ~/.cache/dsql-proxy-image.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

IMAGE=localhost/dsql-proxy:dev
CACHE=${DSQL_PROXY_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dsql-proxy-image}
TEST=false
case "${1:-}" in
  "") ;;
  --test) TEST=true ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "usage: scripts/image.sh [--test]" >&2
    exit 2
    ;;
esac

step() { echo "==> $*"; }
die() {
  echo "image.sh: $*" >&2
  exit 1
}
is_root() { [ "$(id -u)" = 0 ]; }

# --- requirements -----------------------------------------------------------

have_pg_server() {
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null
}

# Debian packages for whatever is missing, one per line.
missing_packages() {
  command -v podman >/dev/null || echo podman
  command -v runc >/dev/null || echo runc
  command -v mmdebstrap >/dev/null || echo mmdebstrap
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || echo apt
  if $TEST; then
    have_pg_server || echo postgresql
    command -v psql >/dev/null || echo postgresql-client
    command -v curl >/dev/null || echo curl
    command -v openssl >/dev/null || echo openssl
    command -v python3 >/dev/null || echo python3
  fi
}

ensure_requirements() {
  [ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] ||
    die "unsupported architecture $(uname -m)"
  command -v cargo >/dev/null && command -v rustc >/dev/null ||
    die "cargo and rustc are required (the builder image uses the host's Rust toolchain): https://rustup.rs"
  local missing
  missing=$(missing_packages)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # one word per package
    set -- $missing
    if is_root && command -v apt-get >/dev/null; then
      step "installing $* (apt-get)"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      # policy-rc.d keeps a PostgreSQL package from starting its own cluster.
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      apt-get install -y -qq --no-install-recommends "$@" >/dev/null
      rm -f /usr/sbin/policy-rc.d
    else
      echo "image.sh: missing: $*" >&2
      echo "  Debian 12: sudo apt-get install -y --no-install-recommends $*" >&2
      echo "  (or run this script as root, which installs them)" >&2
      exit 1
    fi
  fi
  # The base images are Debian 12, made from the host's apt sources.
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ "$codename" = bookworm ] ||
    die "the local base images are made from the host's Debian 12 (bookworm) apt sources; this host is '${codename:-unknown}'. Build with docker or podman and the Dockerfile's public base images instead (README, \"Container image\")."
  is_root || die "podman builds and runs here as root (rootful storage, runc, mmdebstrap's root mode); run as root"
}

write_containers_conf() {
  mkdir -p "$CACHE"
  cat >"$CACHE/containers.conf" <<'EOF'
# Written by scripts/image.sh, used through CONTAINERS_CONF.
[containers]
# Raising the limits is not permitted on some hosts; fixed, generous ones.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun refuses hybrid cgroup layouts that runc handles; no systemd here.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  export CONTAINERS_CONF="$CACHE/containers.conf"
}

# --- base images ------------------------------------------------------------

# The host's apt sources (the files apt itself reads), for mmdebstrap.
apt_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && echo "$f"
  done
  return 0
}

RUST_VERSION=$(rustc --version | awk '{print $2}')
BUILDER_IMAGE=localhost/dsql-proxy-base/rust:$RUST_VERSION-bookworm
RUNTIME_IMAGE=localhost/dsql-proxy-base/cc-debian12:nonroot

# Debian 12 minbase, gcc and libc6-dev (aws-lc-sys compiles C), and
# the host's toolchain at /usr/local/rust; CARGO_HOME=/usr/local/cargo and
# PATH as in the official rust image, so the Dockerfile runs unchanged.
make_builder_image() {
  local sysroot sources
  sysroot=$(rustc --print sysroot)
  mapfile -t sources < <(apt_sources)
  [ "${#sources[@]}" -gt 0 ] || die "no apt sources on this host"
  step "making $BUILDER_IMAGE (Debian 12 minbase, gcc, Rust $RUST_VERSION from $sysroot)"
  mmdebstrap --quiet --variant=minbase --include=gcc,libc6-dev \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='mkdir -p "$1/usr/local/rust" "$1/usr/local/cargo"' \
    --customize-hook="tar -C '$sysroot' --exclude=./share/doc -cf - . | tar -C \"\$1/usr/local/rust\" -xf -" \
    bookworm - "${sources[@]}" |
    podman import \
      --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV CARGO_HOME=/usr/local/cargo' \
      --change 'CMD ["/bin/bash"]' \
      --quiet - "$BUILDER_IMAGE" >/dev/null
}

# FROM scratch: glibc and libgcc_s (the binary's only shared libraries), the
# Debian CA bundle at /etc/ssl/certs/ca-certificates.crt (where
# rustls-native-certs looks), /etc/services and /etc/protocols, and the
# nonroot user: what gcr.io/distroless/cc-debian12:nonroot provides to this
# binary. No shell, no package manager.
make_runtime_image() {
  step "making $RUNTIME_IMAGE (libc6, libgcc-s1, ca-certificates, netbase; uid 65532)"
  local work pkg
  work=$(mktemp -d "$CACHE/runtime.XXXXXX")
  mkdir "$work/debs" "$work/rootfs"
  local packages=(libc6 libgcc-s1 ca-certificates netbase)
  if ! (cd "$work/debs" && apt-get download -qq "${packages[@]}" 2>/dev/null); then
    apt-get update -qq
    (cd "$work/debs" && apt-get download -qq "${packages[@]}")
  fi
  for pkg in "$work"/debs/*.deb; do
    dpkg-deb -x "$pkg" "$work/rootfs"
  done
  local r=$work/rootfs
  # update-ca-certificates' bundle, without running maintainer scripts.
  mkdir -p "$r/etc/ssl/certs"
  cat "$r"/usr/share/ca-certificates/mozilla/*.crt >"$r/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$r/usr/share/ca-certificates" "$r/usr/sbin" "$r/usr/share/doc" "$r/usr/share/lintian" \
    "$r/usr/share/man" "$r/usr/share/locale" "$r/usr/lib/x86_64-linux-gnu/gconv" \
    "$r/usr/lib/aarch64-linux-gnu/gconv"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$r/etc/group"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$r/etc/nsswitch.conf"
  mkdir -p "$r/tmp" "$r/home/nonroot" "$r/root"
  chmod 1777 "$r/tmp"
  chmod 0700 "$r/root"
  chown 65532:65532 "$r/home/nonroot"
  tar -C "$r" --numeric-owner -cf - . |
    podman import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
      --change 'USER 65532' \
      --change 'WORKDIR /home/nonroot' \
      --quiet - "$RUNTIME_IMAGE" >/dev/null
  rm -rf "$work"
}

ensure_base_images() {
  if podman image exists "$BUILDER_IMAGE"; then
    echo "    cached: $BUILDER_IMAGE"
  else
    make_builder_image
  fi
  if podman image exists "$RUNTIME_IMAGE"; then
    echo "    cached: $RUNTIME_IMAGE"
  else
    make_runtime_image
  fi
}

# --- build ------------------------------------------------------------------

# The build container has no network: crates come from `cargo vendor`,
# mounted with a cargo config at $CARGO_HOME (the Dockerfile is unchanged).
vendor_crates() {
  step "cargo vendor (offline crates for the build)"
  cargo vendor --locked --versioned-dirs --quiet "$CACHE/vendor" >/dev/null
  cat >"$CACHE/cargo-config.toml" <<'EOF'
# Written by scripts/image.sh: the build uses the vendored crates, offline.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "/usr/local/cargo/vendor"

[net]
offline = true
EOF
}

build_image() {
  step "podman build -> $IMAGE (builder $BUILDER_IMAGE, runtime $RUNTIME_IMAGE)"
  local started=$SECONDS
  # --format docker keeps HEALTHCHECK (OCI images have no such field).
  podman build --format docker --network none \
    --build-arg "RUST_IMAGE=$BUILDER_IMAGE" \
    --build-arg "RUNTIME_IMAGE=$RUNTIME_IMAGE" \
    --volume "$CACHE/vendor:/usr/local/cargo/vendor:ro" \
    --volume "$CACHE/cargo-config.toml:/usr/local/cargo/config.toml:ro" \
    --tag "$IMAGE" --file Dockerfile "$ROOT"
  BUILD_SECONDS=$((SECONDS - started))
}

report_sizes() {
  local ctr bin_bytes image_bytes
  ctr=$(podman create --no-healthcheck "$IMAGE")
  bin_bytes=$(podman cp "$ctr:/usr/local/bin/dsql-proxy" - | tar -xOf - dsql-proxy | wc -c)
  podman rm "$ctr" >/dev/null
  image_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
  local mb='{ printf "%.1f MB", $1 / 1000000 }'
  echo "image: $IMAGE, $(echo "$image_bytes" | awk "$mb") ($image_bytes bytes)"
  echo "binary: /usr/local/bin/dsql-proxy, $(echo "$bin_bytes" | awk "$mb") ($bin_bytes bytes)"
  echo "build: ${BUILD_SECONDS}s (podman build)"
}

# --- test -------------------------------------------------------------------

TEST_DIR=
CONTAINER=dsql-proxy-image-test-$$
PG_BIN=
pg_as_postgres() {
  if is_root; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

cleanup() {
  podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
  if [ -n "$TEST_DIR" ]; then
    [ -f "$TEST_DIR/pg/data/postmaster.pid" ] &&
      pg_as_postgres "$PG_BIN/pg_ctl" -D "$TEST_DIR/pg/data" -m immediate stop >/dev/null 2>&1
    rm -rf "$TEST_DIR"
  fi
  return 0
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

fail() {
  echo "image.sh --test: FAILED: $*" >&2
  if podman container exists "$CONTAINER" 2>/dev/null; then
    echo "--- proxy log" >&2
    podman logs "$CONTAINER" 2>&1 | tail -40 >&2
  fi
  exit 1
}

ok() { echo "    ok: $*"; }

# Waits (up to 30 s) until the command succeeds.
wait_until() {
  local what=$1 i
  shift
  for i in $(seq 1 300); do
    "$@" >/dev/null 2>&1 && return 0
    podman container exists "$CONTAINER" && [ "$(podman inspect --format '{{.State.Running}}' "$CONTAINER")" = true ] ||
      fail "the proxy container exited while waiting for $what"
    sleep 0.1
  done
  fail "timed out waiting for $what"
}

# A PostgreSQL server with TLS (a certificate for localhost from a fresh CA)
# and a password-authenticated role `app`.
start_postgres() {
  PG_BIN=$(dirname "$(compgen -G "/usr/lib/postgresql/*/bin/initdb" | sort -V | tail -1 || command -v initdb)")
  local pg=$TEST_DIR/pg
  mkdir -p "$pg"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=image-test-ca \
    -keyout "$pg/ca.key" -out "$TEST_DIR/etc/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
    -keyout "$pg/server.key" -out "$pg/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$pg/ext.cnf"
  openssl x509 -req -in "$pg/server.csr" -CA "$TEST_DIR/etc/ca.crt" -CAkey "$pg/ca.key" \
    -CAcreateserial -days 1 -extfile "$pg/ext.cnf" -out "$pg/server.crt" 2>/dev/null
  chmod 0600 "$pg/server.key"
  echo "$PG_PASSWORD" >"$pg/pwfile"
  is_root && chown -R postgres:postgres "$pg"
  pg_as_postgres "$PG_BIN/initdb" -D "$pg/data" -U postgres --auth-local=trust \
    --auth-host=scram-sha-256 --pwfile="$pg/pwfile" >/dev/null
  cat >>"$pg/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$pg'
ssl = on
ssl_cert_file = '$pg/server.crt'
ssl_key_file = '$pg/server.key'
EOF
  pg_as_postgres "$PG_BIN/pg_ctl" -D "$pg/data" -l "$pg/log" -w start >/dev/null ||
    fail "PostgreSQL did not start: $(tail -5 "$pg/log")"
  pg_as_postgres "$PG_BIN/psql" -h "$pg" -p "$PG_PORT" -U postgres -d postgres -qAt \
    -c "CREATE ROLE app LOGIN PASSWORD '$PG_PASSWORD'" -c "CREATE DATABASE app OWNER app" >/dev/null
}

# The proxy's config, as a ConfigMap would mount it at /etc/dsql-proxy: the
# backend is the local PostgreSQL (verify-full against the test CA), the
# password comes from a file (a Secret), and the probes log in as `app`.
write_proxy_config() {
  printf '%s\n' "$PG_PASSWORD" >"$TEST_DIR/etc/db-password"
  cat >"$TEST_DIR/etc/proxy.toml" <<EOF
[listen]
address = "127.0.0.1:$PROXY_PORT"
auth = "trust"

[admin]
address = "127.0.0.1:$ADMIN_PORT"

[backend]
kind = "postgres"
auth = "password"
password_file = "/etc/dsql-proxy/db-password"
tls = "verify-full"
ca_file = "/etc/dsql-proxy/ca.crt"

[routing]
probe_user = "app"
probe_database = "app"
probe_interval = "500ms"

[shutdown]
max_drain = "${MAX_DRAIN_SECS}s"
request_grace = "${REQUEST_GRACE_SECS}s"

[[endpoints]]
name = "local"
host = "localhost"
port = $PG_PORT
connect_address = "127.0.0.1:$PG_PORT"
EOF
  chmod 0755 "$TEST_DIR/etc"
  chmod 0644 "$TEST_DIR/etc"/*
}

# The session held open through the shutdown has reached PostgreSQL.
held_session_running() {
  [ "$(pg_as_postgres "$PG_BIN/psql" -h "$TEST_DIR/pg" -p "$PG_PORT" -U postgres -d postgres -qAt \
    -c "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(600)'")" = 1 ]
}

# Like the Kubernetes manifests' securityContext: uid/gid 65532, read-only
# root filesystem (no tmpfs either), no capabilities, no privilege
# escalation; the config directory mounted read-only.
SIDECAR_FLAGS=(--user 65532:65532 --read-only --read-only-tmpfs=false --cap-drop ALL
  --security-opt no-new-privileges)

run_test() {
  trap cleanup EXIT
  TEST_DIR=$(mktemp -d /tmp/dsql-proxy-image-test.XXXXXX)
  chmod 0755 "$TEST_DIR"
  mkdir "$TEST_DIR/etc"
  PG_PASSWORD=image-test-$$-$RANDOM
  PG_PORT=$(free_port)
  PROXY_PORT=$(free_port)
  ADMIN_PORT=$(free_port)
  MAX_DRAIN_SECS=5
  REQUEST_GRACE_SECS=2

  step "test: --version and check of the shipped proxy.toml"
  local out
  # One-off commands: no health check, which podman would try to schedule.
  local once=(podman run --rm --no-healthcheck "${SIDECAR_FLAGS[@]}" "$IMAGE")
  out=$("${once[@]}" --version) || fail "--version"
  ok "$out"
  "${once[@]}" check >/dev/null 2>"$TEST_DIR/check.err" ||
    fail "check of /etc/dsql-proxy/proxy.toml: $(cat "$TEST_DIR/check.err")"
  ok "$(tail -1 "$TEST_DIR/check.err")"
  out=$("${once[@]}" demo 2>&1) &&
    fail "the image's binary has the demo command (built without the demo feature?)"
  ok "no demo command in the image ($(echo "$out" | head -1))"

  start_postgres
  write_proxy_config
  step "test: the proxy in front of $("$PG_BIN/postgres" --version) (host network)"
  # Podman cannot schedule the image's health check without systemd and
  # says so on stderr; the check itself runs on demand below.
  podman run -d --name "$CONTAINER" "${SIDECAR_FLAGS[@]}" --network host \
    -v "$TEST_DIR/etc:/etc/dsql-proxy:ro" \
    -e DSQL_PROXY_LOG_FORMAT=json "$IMAGE" >/dev/null 2>"$TEST_DIR/run.err" ||
    fail "podman run: $(cat "$TEST_DIR/run.err")"
  local admin=http://127.0.0.1:$ADMIN_PORT
  wait_until "/readyz" curl -fsS "$admin/readyz"
  ok "/readyz 200 (endpoint probed through verify-full TLS as role app)"

  out=$(psql "host=127.0.0.1 port=$PROXY_PORT user=app dbname=app sslmode=disable" -v ON_ERROR_STOP=1 -qAt \
    -c "CREATE TABLE t (id int PRIMARY KEY, v text)" \
    -c "INSERT INTO t SELECT i, 'row ' || i FROM generate_series(1, 100) i" \
    -c "SELECT count(*), max(v) FROM t WHERE id > 50" \
    -c "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()" 2>&1) ||
    fail "psql through the proxy: $out"
  [ "$out" = $'50|row 99\nt' ] || fail "psql through the proxy returned: $out"
  ok "psql through the proxy (query results as expected, backend session on TLS)"

  curl -fsS "$admin/healthz" >/dev/null || fail "/healthz"
  ok "/healthz 200"
  curl -fsS "$admin/metrics" >"$TEST_DIR/metrics" || fail "/metrics"
  grep -Eq '^dsql_proxy_build_info\{' "$TEST_DIR/metrics" || fail "/metrics has no dsql_proxy_build_info"
  grep -Eq '^dsql_proxy_client_connections_total(\{[^}]*\})? [1-9]' "$TEST_DIR/metrics" ||
    fail "/metrics does not count the psql session: $(grep client_connections "$TEST_DIR/metrics")"
  grep -Eq '^dsql_proxy_endpoint_up\{endpoint="local"[^}]*\} 1$' "$TEST_DIR/metrics" ||
    fail "/metrics: endpoint local is not up: $(grep endpoint_up "$TEST_DIR/metrics")"
  ok "/metrics ($(grep -c '^# TYPE' "$TEST_DIR/metrics") families; endpoint up, the psql session counted)"

  out=$(podman healthcheck run "$CONTAINER" 2>&1) || fail "podman healthcheck run: $out"
  ok "podman healthcheck run: ${out:-healthy}"

  # A session still open at SIGTERM, its query in flight: the proxy drains
  # for max_drain, gives the query request_grace to answer, then ends the
  # session with FATAL 57P01 and exits 0, within podman's grace period (as
  # terminationGracePeriodSeconds must cover both in Kubernetes).
  psql "host=127.0.0.1 port=$PROXY_PORT user=app dbname=app sslmode=disable" -v VERBOSITY=verbose -qAt \
    -c "SELECT pg_sleep(600)" >"$TEST_DIR/held.out" 2>&1 &
  local held=$!
  wait_until "the held session" held_session_running
  step "test: podman stop (max_drain ${MAX_DRAIN_SECS}s, request_grace ${REQUEST_GRACE_SECS}s, one query in flight)"
  local grace=$((MAX_DRAIN_SECS + REQUEST_GRACE_SECS + 5)) started took code
  started=$(date +%s%N)
  podman stop -t "$grace" "$CONTAINER" >/dev/null 2>"$TEST_DIR/stop.err" ||
    fail "podman stop: $(cat "$TEST_DIR/stop.err")"
  took=$(awk -v ns=$(($(date +%s%N) - started)) 'BEGIN { printf "%.1f", ns / 1e9 }')
  code=$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")
  [ "$code" = 0 ] || fail "the proxy exited with $code after SIGTERM (137: killed after ${grace}s)"
  wait "$held" && fail "the held session survived the shutdown: $(cat "$TEST_DIR/held.out")"
  grep -q 57P01 "$TEST_DIR/held.out" || fail "the held session did not get 57P01: $(cat "$TEST_DIR/held.out")"
  ok "exit code 0 after ${took}s (max_drain ${MAX_DRAIN_SECS}s + request_grace ${REQUEST_GRACE_SECS}s; podman stop -t $grace); the open session got FATAL 57P01"
  echo "image.sh --test: all checks passed"
}

# --- main -------------------------------------------------------------------

TOTAL_STARTED=$SECONDS
ensure_requirements
write_containers_conf
ensure_base_images
vendor_crates
build_image
report_sizes
if $TEST; then
  run_test
fi
echo "image.sh: done in $((SECONDS - TOTAL_STARTED))s"
