# syntax=docker/dockerfile:1
#
# csi-rbd-replicator image: a Rust build on Debian 12 (bookworm) against librbd/librados,
# and a debian:12-slim runtime with the matching Ceph client libraries (16.2, Pacific,
# as Debian 12 packages them; the checked-in bindings in src/ceph/sys.rs are for it).
#
#   docker build -t csi-rbd-replicator:0.1.0 .
#
# Built with the `kube` feature, so that `serve --watch-pvs` is available.

FROM docker.io/library/rust:1.95.0-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends librbd-dev librados-dev libradospp-dev g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock rust-toolchain.toml build.rs ./
COPY proto ./proto
# build.rs compiles the C++ shim: it must be there for the dependency build too.
COPY src/ceph/object_io.cc ./src/ceph/object_io.cc
RUN echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --features kube \
    && rm -rf src
COPY src ./src
# Make sure the real sources are newer than the placeholder build.
RUN touch src/main.rs src/lib.rs \
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
