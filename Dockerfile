# syntax=docker/dockerfile:1
#
# dsql-proxy container image (README, "Container image").
#
#   docker build -t dsql-proxy .        # or: podman build --format docker ...
#   scripts/image.sh [--test]           # podman, offline, no registry
#   docker run --rm -v "$PWD/proxy.toml:/etc/dsql-proxy/proxy.toml:ro" \
#     -p 127.0.0.1:5432:5432 -p 127.0.0.1:9090:9090 dsql-proxy \
#     --listen 0.0.0.0:5432 --admin 0.0.0.0:9090
#
# Publishing the client port beyond the container's loopback needs
# [listen] trust_remote = true or auth = "scram-sha-256" (README, "Container
# image"). Multi-arch: docker buildx build --platform
# linux/amd64,linux/arm64 .

# Base images, replaceable with --build-arg (scripts/image.sh passes locally
# made equivalents, since it can reach no registry).
# Builder: the toolchain the project is tested with, on the same Debian
# release (glibc 2.36) as the runtime image.
ARG RUST_IMAGE=rust:1.95-bookworm
# Runtime: distroless "cc" (see the runtime stage).
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The target dir is a cache mount, so the binary is copied out in the same
# step. --no-default-features leaves out `dsql-proxy demo` (the emulator,
# latency relays, certificate generation); the release profile strips the
# binary. aws-lc-sys (rustls' one crypto provider, shared with the AWS SDK)
# builds with the image's C compiler.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dsql-proxy --bin dsql-proxy --no-default-features \
 && install -D -m 0755 target/release/dsql-proxy /out/dsql-proxy
# The shipped example config must be valid for the binary that ships it.
RUN /out/dsql-proxy check --config proxy.toml >/dev/null

# Runtime: distroless "cc" has glibc, libgcc_s (the binary's only shared
# libraries besides libc/libm) and the Debian CA bundle at
# /etc/ssl/certs/ca-certificates.crt, where rustls-native-certs looks (the
# backend's system roots and the AWS SDK's HTTPS client both use it). No
# shell, no package manager; the :nonroot variant runs as uid 65532.
FROM ${RUNTIME_IMAGE}
COPY --from=build /out/dsql-proxy /usr/local/bin/dsql-proxy
# A valid default config; mount your own over it (a ConfigMap in Kubernetes).
COPY --chmod=0644 proxy.toml /etc/dsql-proxy/proxy.toml
ENV DSQL_PROXY_CONFIG=/etc/dsql-proxy/proxy.toml
# Numeric, so Kubernetes' runAsNonRoot can verify it without runAsUser.
USER 65532:65532
# 5432: PostgreSQL clients; 9090: admin (metrics, health, status).
EXPOSE 5432 9090
# No curl in the image: the binary asks its own admin server for /healthz
# (`dsql-proxy healthcheck`, exit 0 when healthy, 1 otherwise).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/dsql-proxy", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/dsql-proxy"]
