# mfa-gate container image.
#
#   docker build -t mfa-gate:0.1.0 .
#   docker run --rm -p 8080:8080 -v "$PWD/my.toml:/etc/mfa-gate/mfa-gate.toml:ro" mfa-gate:0.1.0
#
# Base images are pinned by tag. Pin them by digest too (`FROM image:tag@sha256:...`) when you
# mirror them: the digests could not be looked up where this file was written (no registry
# access), and a made-up digest would only break the build. (No `# syntax=` line on purpose:
# it would pull a Dockerfile frontend image by a floating tag; nothing here needs one.)
#
# Runtime image: gcr.io/distroless/cc-debian12:nonroot rather than static musl + scratch, because
#  - the binary links glibc dynamically; distroless/cc ships exactly glibc, libgcc_s (unwinding)
#    and CA certificates/tzdata, no shell, no package manager;
#  - musl's allocator is markedly slower under a multi-threaded tokio workload, and a static musl
#    build would need a second allocator (jemalloc/mimalloc) to compensate;
#  - the :nonroot variant has a passwd entry and home for uid/gid 65532 ("nonroot"), the user
#    the image runs as.
# TLS is rustls + ring (no OpenSSL), so nothing else is needed at run time. The builder is
# Debian 12 (bookworm) like the runtime, so the glibc the binary was linked against is there.
#
# The builder's toolchain (1.95.0) is the one the project is developed and tested with; the
# locked dependencies need at least 1.89 (uuid), whatever Cargo.toml's rust-version says.

# ---------------------------------------------------------------------------------------------
FROM rust:1.95.0-slim-bookworm AS build

ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

WORKDIR /src

# 1. Dependencies only: the manifest and lock file with placeholder crate roots. This layer is
#    rebuilt only when Cargo.toml or Cargo.lock change, not on every source edit. (The [[test]]
#    target's file is not needed for `cargo build`.)
COPY Cargo.toml Cargo.lock ./
# The allocator crate is a path dependency (and a workspace member): needed from the start.
COPY crates ./crates
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# 2. The real sources. Touch the crate roots so that cargo never mistakes the placeholder build
#    for an up-to-date one (COPY keeps the files' original, possibly older, mtimes).
COPY src ./src
COPY config ./config
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/mfa-gate /out/mfa-gate \
    && /out/mfa-gate check --config config/mfa-gate.toml > /dev/null

# ---------------------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="mfa-gate" \
      org.opencontainers.image.description="Authenticating reverse proxy that lets only IAM users with MFA through" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /out/mfa-gate /mfa-gate
# The commented example config: `docker run IMAGE` starts with it; mount your own over it (in
# Kubernetes, a ConfigMap at /etc/mfa-gate, see deploy/kubernetes/).
COPY config/mfa-gate.toml /etc/mfa-gate/mfa-gate.toml

# 8080: the gateway (server.listen). 9090: admin — /metrics, /healthz, /readyz, /admin/*
# (admin.listen; the example config binds it to 127.0.0.1, set "0.0.0.0:9090" to publish it).
EXPOSE 8080 9090

# The distroless "nonroot" user, numerically: Kubernetes' runAsNonRoot can only verify a numeric
# USER ("nonroot" would make the kubelet refuse to start the pod).
USER 65532:65532

# No shell or curl in the image: the binary probes its own admin listener. /healthz is liveness
# (200 while the process is up); /readyz turns 503 while draining and would mark a container
# that is shutting down cleanly as unhealthy. Kubernetes ignores HEALTHCHECK and uses the
# probes in deploy/kubernetes/deployment.yaml instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/mfa-gate", "health", "--url", "http://127.0.0.1:9090/healthz"]

ENTRYPOINT ["/mfa-gate"]
CMD ["run", "--config", "/etc/mfa-gate/mfa-gate.toml"]
