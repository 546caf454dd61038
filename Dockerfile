# syntax=docker/dockerfile:1
#
# One image for all three binaries: cache-api (default), cache-invalidator, cachectl.
#
#   docker build -t redis-mongo-cache:local .
#   docker run --rm redis-mongo-cache:local cachectl --help
#
# Stages:
#   chef     rust toolchain + cargo-chef
#   planner  turns the workspace manifests into recipe.json (only manifests matter)
#   builder  cooks (compiles) the dependencies from the recipe — this layer stays
#            cached until Cargo.toml/Cargo.lock change — then builds our crates once
#   runtime  debian slim + the three binaries, non-root

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

############################ chef ############################
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
ARG CARGO_CHEF_VERSION=0.1.78
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}" \
    && rm -rf "${CARGO_HOME}/registry" "${CARGO_HOME}/git"
WORKDIR /app

############################ planner ############################
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

############################ builder ############################
FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies only: rebuilt when the recipe (manifests, lockfile) changes.
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
# All three binaries in one cargo invocation, so shared crates compile once.
RUN cargo build --release --locked \
        --bin cache-api \
        --bin cache-invalidator \
        --bin cachectl

############################ runtime ############################
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

# ca-certificates: TLS to managed Redis/MongoDB (rediss://, mongodb+srv://).
# curl: container health checks (GET /api/health/, GET /health).
# The binaries use rustls (no OpenSSL), so nothing else is needed.
# Versions are not pinned on purpose: the image should pick up Debian security
# updates on every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin app

COPY --from=builder \
    /app/target/release/cache-api \
    /app/target/release/cache-invalidator \
    /app/target/release/cachectl \
    /usr/local/bin/

LABEL org.opencontainers.image.title="redis-mongo-cache" \
      org.opencontainers.image.description="cache-api, cache-invalidator and cachectl: MongoDB documents cached in Redis and an in-process near cache" \
      org.opencontainers.image.licenses="MIT"

USER 10001:10001

# cache-api listens on 8000 (HTTP_ADDR); cache-invalidator serves /health and
# /metrics on 9100.
EXPOSE 8000 9100

# Matches the default command (cache-api on its default port). Liveness only
# (/livez): a Redis or MongoDB outage must not get every replica restarted;
# readiness is /readyz. Compose overrides it per service (the invalidator
# checks :9100/livez; one-shot cachectl runs disable it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/livez"]

CMD ["cache-api"]
