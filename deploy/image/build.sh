#!/usr/bin/env bash
# Builds the container image from ./Dockerfile on a machine without a Docker daemon or
# registry access, then runs it against the local Ceph pair.
#
#   deploy/image/build.sh            # build csi-rbd-replicator:<version>, then smoke-test it
#   deploy/image/build.sh --no-smoke # build only
#
# The Dockerfile names two base images, docker.io/library/rust:1.95.0-bookworm and
# docker.io/library/debian:12-slim. With no registry reachable, this script makes local
# images under those names and builds with `--pull=never`:
#   - debian:12-slim: a Debian 12 minbase root file system made with debootstrap from
#     deb.debian.org (the same archive the official image is made from), imported with
#     buildah, with the bookworm-updates and security suites as apt sources;
#   - rust:1.95.0-bookworm: that base plus gcc and libc6-dev, this machine's Rust
#     1.95.0 toolchain (the rustup toolchain directory) in /usr/local/rust, and the CA
#     certificates this machine added to its trust store (/usr/local/share/ca-certificates,
#     e.g. an egress proxy's). Unlike the official image it has no rustup; cargo and
#     rustc are 1.95.0 as the official ones.
# The Dockerfile itself is used unchanged: buildah runs its apt-get and cargo steps
# (crates from crates.io). The smoke test runs the image's binary inside the image
# (`buildah run`, chroot isolation, host network) as the image's unprivileged user:
# `--version`, then `serve` against site-a of the local pair, with Probe and
# GetCapabilities through grpcurl on its unix socket.
#
# The smoke test uses the pair in CSIRR_PAIR_DIR (default <repo>/.pair, as test.sh), bringing
# it up if needed (which, as for test.sh, stops a pair running elsewhere).
#
# Environment: CSIRR_IMAGE_WORK (work directory, default <repo>/.image, keeps the
# debootstrap root file system between runs), CSIRR_IMAGE_TAG (default
# csi-rbd-replicator:<crate version>), CSIRR_IMAGE_JOBS (cargo jobs in the build, default 2).
set -euo pipefail

cd "$(dirname "$0")/../.."
LOG_TAG=image
# shellcheck source=../dev/lib.sh
source deploy/dev/lib.sh

SMOKE=1
for a in "$@"; do
    case "$a" in
    --no-smoke) SMOKE=0 ;;
    -h | --help)
        sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument: $a" ;;
    esac
done

[[ $(id -u) == 0 ]] || die "run as root (buildah's storage and debootstrap need it)"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
WORK=${CSIRR_IMAGE_WORK:-$PWD/.image}
TAG=${CSIRR_IMAGE_TAG:-csi-rbd-replicator:$VERSION}
JOBS=${CSIRR_IMAGE_JOBS:-2}
MIRROR=http://deb.debian.org/debian
DEBIAN_BASE=docker.io/library/debian:12-slim
RUST_BASE=docker.io/library/rust:1.95.0-bookworm
TOOLCHAIN=$(rustup toolchain list -v 2>/dev/null | awk '/^1\.95\.0-/ {print $NF}')
[[ -n $TOOLCHAIN ]] || TOOLCHAIN=$HOME/.rustup/toolchains/1.95.0-x86_64-unknown-linux-gnu
TOOLCHAIN=$(readlink -f "$TOOLCHAIN")
[[ -x $TOOLCHAIN/bin/cargo ]] || die "no Rust 1.95.0 toolchain at $TOOLCHAIN"

need=()
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    log "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "${need[@]}"
fi
mkdir -p "$WORK"

# Containers made here are removed on exit, whatever happens.
CONTAINERS=()
SERVE_PID=
cleanup() {
    [[ -n $SERVE_PID ]] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
    for c in "${CONTAINERS[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
container_from() {
    local c
    c=$(buildah from --pull=never "$1")
    CONTAINERS+=("$c")
    echo "$c"
}

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# --- debian:12-slim ---------------------------------------------------------------
if ! have_image "$DEBIAN_BASE"; then
    rootfs=$WORK/bookworm-rootfs
    if [[ ! -e $rootfs/.done ]]; then
        log "debootstrap: Debian 12 minbase from $MIRROR into $rootfs"
        rm -rf "$rootfs"
        debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
            die "debootstrap failed, see $WORK/debootstrap.log"
        cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
        # What the slim image leaves out: apt lists, caches, docs and man pages.
        chroot "$rootfs" apt-get clean
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
            "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
        touch "$rootfs/.done"
    fi
    log "importing the root file system as $DEBIAN_BASE"
    tar --numeric-owner --exclude=./.done -C "$rootfs" -cf "$WORK/bookworm-rootfs.tar" .
    c=$(buildah from scratch)
    CONTAINERS+=("$c")
    buildah add "$c" "$WORK/bookworm-rootfs.tar" / >/dev/null
    buildah config --cmd /bin/bash \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --label org.opencontainers.image.description="Debian 12 minbase (debootstrap, $MIRROR)" "$c"
    buildah commit --rm "$c" "$DEBIAN_BASE" >/dev/null
    CONTAINERS=("${CONTAINERS[@]/$c/}")
    rm -f "$WORK/bookworm-rootfs.tar"
else
    log "$DEBIAN_BASE present"
fi

# --- rust:1.95.0-bookworm ---------------------------------------------------------
if ! have_image "$RUST_BASE"; then
    log "making $RUST_BASE: gcc, libc6-dev and the Rust toolchain at $TOOLCHAIN"
    c=$(container_from "$DEBIAN_BASE")
    buildah run --isolation chroot "$c" -- sh -c 'apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            gcc libc6-dev ca-certificates pkg-config >/dev/null &&
        rm -rf /var/lib/apt/lists/*'
    # The toolchain without its documentation (rustup's `rust-docs` component).
    buildah copy "$c" "$TOOLCHAIN/bin" /usr/local/rust/bin >/dev/null
    buildah copy "$c" "$TOOLCHAIN/lib" /usr/local/rust/lib >/dev/null
    if [[ -d $TOOLCHAIN/libexec ]]; then
        buildah copy "$c" "$TOOLCHAIN/libexec" /usr/local/rust/libexec >/dev/null
    fi
    # The build host's own CA certificates (e.g. of a TLS-inspecting egress proxy), so
    # that cargo in the build reaches crates.io the way it does on the host.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        buildah copy "$c" /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/ >/dev/null
        buildah run --isolation chroot "$c" -- update-ca-certificates >/dev/null
    fi
    buildah config \
        --env PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env CARGO_HOME=/usr/local/cargo --env CARGO_BUILD_JOBS="$JOBS" \
        --label org.opencontainers.image.description="Debian 12 with Rust 1.95.0 (local toolchain copy)" "$c"
    buildah run --isolation chroot "$c" -- cargo --version
    buildah commit --rm "$c" "$RUST_BASE" >/dev/null
    CONTAINERS=("${CONTAINERS[@]/$c/}")
else
    log "$RUST_BASE present"
fi

# --- the image ------------------------------------------------------------------------
log "building $TAG from ./Dockerfile (release build of the crate; this takes a while)"
start=$(date +%s)
buildah bud --pull=never --isolation chroot --layers -t "$TAG" -f Dockerfile . \
    >"$WORK/bud.log" 2>&1 || {
    tail -40 "$WORK/bud.log" >&2
    die "buildah bud failed, see $WORK/bud.log"
}
log "built $TAG in $(($(date +%s) - start)) s: $(buildah inspect --type image --format '{{.FromImageID}}' "$TAG" | cut -c1-12)," \
    "$(buildah images --format '{{.Size}}' "$TAG" | head -1)"

((SMOKE)) || exit 0

# --- smoke test -------------------------------------------------------------------------
c=$(container_from "$TAG")
user=$(buildah inspect --type container --format '{{.OCIv1.Config.User}}' "$c")
log "in the image, as user $user: csi-rbd-replicator --version"
buildah run --isolation chroot "$c" -- /usr/local/bin/csi-rbd-replicator --version

deploy/dev/ceph-pair.sh up >/dev/null
eval "$(deploy/dev/ceph-pair.sh env)"
install_grpcurl
run=$(mktemp -d "$WORK/smoke.XXXXXX")
mkdir -p "$run/secret" "$run/sock"
cp "$CSIRR_CSI_CONFIG" "$run/config.json"
cp "$CSIRR_CLUSTER_MAPPING" "$run/cluster-mapping.json"
cp "$CSIRR_SITE_A_SECRET_DIR"/userID "$CSIRR_SITE_A_SECRET_DIR"/userKey "$run/secret/"
# The files a pod would mount, readable by the image's user only.
chown -R "$user" "$run"
chmod 0700 "$run/secret"
chmod 0600 "$run/secret"/*

log "serve inside the image against site-a ($CSIRR_SITE_A_MON)"
buildah run --isolation chroot -v "$run:/run/csirr" "$c" -- \
    /usr/local/bin/csi-rbd-replicator serve --endpoint unix:///run/csirr/sock/csi-addons.sock \
    --drivername rbd.csi.ceph.com --cluster-id site-a --csi-config /run/csirr/config.json \
    --cluster-mapping /run/csirr/cluster-mapping.json --secret-dir /run/csirr/secret \
    --pools "$CSIRR_POOL" >"$WORK/smoke-serve.log" 2>&1 &
SERVE_PID=$!
sock=$run/sock/csi-addons.sock
probe=
for _ in $(seq 1 150); do
    probe=$(grpcurl -plaintext -unix -authority localhost "$sock" identity.Identity/Probe 2>/dev/null) || true
    [[ $(jq -r '.ready // false' <<<"${probe:-null}" 2>/dev/null) == true ]] && break
    kill -0 "$SERVE_PID" 2>/dev/null || {
        cat "$WORK/smoke-serve.log" >&2
        die "the sidecar in the image exited"
    }
    sleep 0.2
done
[[ $(jq -r '.ready // false' <<<"${probe:-null}") == true ]] || {
    tail -20 "$WORK/smoke-serve.log" >&2
    die "Probe did not say ready in 30 s: ${probe:-no answer}"
}
log "Probe: $(jq -c . <<<"$probe")"
caps=$(grpcurl -plaintext -unix -authority localhost "$sock" identity.Identity/GetCapabilities)
jq -e '.capabilities | length > 0' <<<"$caps" >/dev/null || die "no capabilities: $caps"
log "GetCapabilities: $(jq -c '[.capabilities[] | (.service.type // .volumeReplication.type // .)]' <<<"$caps")"
kill "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=
grep -q "$(cat "$CSIRR_SITE_A_SECRET_DIR/userKey")" "$WORK/smoke-serve.log" && die "the key is in the log"
rm -rf "$run"
log "smoke test passed: $TAG runs as $user, serves Probe (ready) and capabilities on site-a"
