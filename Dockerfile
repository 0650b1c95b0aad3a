# syntax=docker/dockerfile:1
#
# csi-rbd-replicator image: a Rust build on Debian 12 (bookworm) against librbd/librados,
# and a debian:12-slim runtime with the matching Ceph client libraries (16.2, Pacific,
# as Debian 12 packages them; the checked-in bindings in crates/ceph-sys/src/bindings.rs are for it).
#
#   docker build -t csi-rbd-replicator:0.1.0 .
#
# Built with the `kube` feature, so that `serve --watch-pvs` is available.

FROM docker.io/library/rust:1.95.0-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends librbd-dev librados-dev libradospp-dev g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them: the workspace's
# manifests and build scripts with empty crates (src/ stays for the real build).
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY crates/ceph-sys/Cargo.toml crates/ceph-sys/build.rs crates/ceph-sys/
COPY crates/ceph/Cargo.toml crates/ceph/
COPY crates/csi/Cargo.toml crates/csi/
COPY crates/metrics/Cargo.toml crates/metrics/
COPY crates/journal/Cargo.toml crates/journal/
COPY crates/omap/Cargo.toml crates/omap/
COPY crates/engine/Cargo.toml crates/engine/
COPY crates/grpc/Cargo.toml crates/grpc/build.rs crates/grpc/
COPY crates/grpc/proto ./crates/grpc/proto
# ceph-sys' build.rs compiles the C++ shim: it must be there for this build too.
COPY crates/ceph-sys/src/object_io.cc ./crates/ceph-sys/src/object_io.cc
RUN for d in crates/*/; do mkdir -p "$d/src" && touch "$d/src/lib.rs"; done \
    && mkdir -p src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --features kube \
    && rm -rf src crates/*/src/lib.rs
COPY src ./src
COPY crates ./crates
# Make sure the real sources are newer than the placeholder build.
RUN find src crates -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --features kube \
    && install -m 0755 target/release/csi-rbd-replicator /usr/local/bin/csi-rbd-replicator

FROM docker.io/library/debian:12-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends librbd1 librados2 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    # librados' default run and log directories, writable by the unprivileged user
    # (nothing else needs root). No client admin socket: none is configured here,
    # and the sidecar turns it off whatever a ceph.conf says (tests/manifests.rs).
    && mkdir -p /var/run/ceph /var/log/ceph \
    && chown 65532:65532 /var/run/ceph /var/log/ceph
COPY --from=builder /usr/local/bin/csi-rbd-replicator /usr/local/bin/csi-rbd-replicator
# A librados/librbd client needs no privilege: it only talks to the monitors and OSDs
# over the network (unlike ceph-csi's node plugin, which maps devices). The unix socket
# is created in the pod's shared emptyDir, which is world-writable.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/csi-rbd-replicator"]
CMD ["--help"]
