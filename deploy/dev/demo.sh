#!/usr/bin/env bash
# deploy/dev/demo.sh: the main job on one machine, end to end.
#
# Starts the two-cluster Ceph pair (site-a, site-b), one sidecar per site,
# creates a volume on site-a the way ceph-csi's CreateVolume leaves it (image
# csi-vol-<uuid> plus its omap journal), writes data into it, enables
# replication through the sidecar's gRPC socket exactly as the csi-addons
# sidecar would, waits for the replica on site-b, compares checksums of the
# sync snapshot on both sides and prints the replication status.
#
# The pair stays up afterwards so you can look around:
#   eval "$(deploy/dev/ceph-pair.sh env)"; rbd -c "$CSIRR_SITE_B_CONF" ls replicapool
#   deploy/dev/ceph-pair.sh down          # when done
#
# Environment: DEMO_SIZE_MB (default 1024), DEMO_WRITE_MB (default 512).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
cd "$REPO_ROOT"
LOG_TAG=demo
# shellcheck source=deploy/dev/lib.sh
source "$SCRIPT_DIR/lib.sh"

SIZE_MB=${DEMO_SIZE_MB:-1024}
WRITE_MB=${DEMO_WRITE_MB:-512}
DRIVER=rook-ceph.rbd.csi.ceph.com

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Installing what is missing"
install_packages
command -v cargo >/dev/null || die "cargo not found: install Rust (rust-toolchain.toml pins 1.95.0)"

step "Building csi-rbd-replicator (release)"
cargo build --release --quiet
BIN=$REPO_ROOT/target/release/csi-rbd-replicator

step "Starting the two Ceph clusters (site-a mon :3300, site-b mon :3301)"
"$SCRIPT_DIR/ceph-pair.sh" up
eval "$("$SCRIPT_DIR/ceph-pair.sh" env)"
POOL=$CSIRR_POOL
A=(-c "$CSIRR_SITE_A_CONF" --keyring "$CSIRR_SITE_A_KEYRING")
B=(-c "$CSIRR_SITE_B_CONF" --keyring "$CSIRR_SITE_B_KEYRING")

DEMO_DIR=$CSIRR_PAIR_DIR/demo
mkdir -p "$DEMO_DIR"
SIDECARS=()
cleanup() {
    local p
    for p in "${SIDECARS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${SIDECARS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

start_sidecar() { # SITE SECRET_DIR
    local site=$1 secret=$2
    "$BIN" serve \
        --endpoint "unix://$DEMO_DIR/$site.sock" \
        --drivername "$DRIVER" \
        --csi-config "$CSIRR_CSI_CONFIG" \
        --cluster-mapping "$CSIRR_CLUSTER_MAPPING" \
        --cluster-id "$site" \
        --secret-dir "$secret" \
        --poll-interval 2s \
        >"$DEMO_DIR/$site.log" 2>&1 &
    SIDECARS+=($!)
}
call() { # SITE METHOD JSON
    grpcurl -plaintext -unix -authority localhost -d "$3" "$DEMO_DIR/$1.sock" "$2"
}

step "Starting one sidecar per site (logs in $DEMO_DIR)"
start_sidecar site-a "$CSIRR_SITE_A_SECRET_DIR"
start_sidecar site-b "$CSIRR_SITE_B_SECRET_DIR"
for site in site-a site-b; do
    for _ in $(seq 100); do
        if call "$site" identity.Identity/Probe '{}' 2>/dev/null | grep -q '"ready": true'; then
            break
        fi
        sleep 0.2
    done
    call "$site" identity.Identity/Probe '{}' | grep -q '"ready": true' ||
        die "sidecar $site did not become ready; see $DEMO_DIR/$site.log"
    echo "$site: $(call "$site" identity.Identity/GetIdentity '{}' | jq -c '{name, vendorVersion}')"
done

step "Creating a ceph-csi style volume on site-a (${SIZE_MB} MiB)"
UUID=$(cat /proc/sys/kernel/random/uuid)
IMAGE=csi-vol-$UUID
PV=pvc-${UUID:0:8}
rbd "${A[@]}" create "$POOL/$IMAGE" --size "${SIZE_MB}M" \
    --image-feature layering,exclusive-lock,object-map,fast-diff,deep-flatten
IMAGE_ID=$(rbd "${A[@]}" info "$POOL/$IMAGE" --format json | jq -r .id)
rados "${A[@]}" -p "$POOL" setomapval csi.volumes.default "csi.volume.$PV" "$UUID"
for kv in "csi.volname=$PV" "csi.imagename=$IMAGE" "csi.imageid=$IMAGE_ID" "csi.volume.owner=demo"; do
    rados "${A[@]}" -p "$POOL" setomapval "csi.volume.$UUID" "${kv%%=*}" "${kv#*=}"
done
POOL_ID=$(ceph "${A[@]}" osd pool ls detail --format json | jq -r ".[] | select(.pool_name==\"$POOL\") | .pool_id")
HANDLE=$(printf '0001-%04x-%s-%016x-%s' 6 site-a "$POOL_ID" "$UUID")
echo "volume handle: $HANDLE"
echo "image:         $POOL/$IMAGE (id $IMAGE_ID)"

step "Writing ${WRITE_MB} MiB into it (sequential 4 MiB writes, plus 16 MiB of random 64 KiB writes)"
rbd "${A[@]}" bench --io-type write --io-pattern seq --io-size 4M --io-total "${WRITE_MB}M" "$POOL/$IMAGE" | tail -1
rbd "${A[@]}" bench --io-type write --io-pattern rand --io-size 64K --io-total 16M "$POOL/$IMAGE" | tail -1

step "EnableVolumeReplication on site-a (as the csi-addons sidecar calls it)"
SECRET_A=$(jq -n --arg u "$(cat "$CSIRR_SITE_A_SECRET_DIR/userID")" --arg k "$(cat "$CSIRR_SITE_A_SECRET_DIR/userKey")" '{userID: $u, userKey: $k}')
REQ=$(jq -n --arg v "$HANDLE" --argjson s "$SECRET_A" \
    '{replication_source: {volume: {volume_id: $v}}, parameters: {mirroringMode: "snapshot", schedulingInterval: "5m"}, secrets: $s}')
T0=$(date +%s.%N)
call site-a replication.Controller/EnableVolumeReplication "$REQ"

step "Waiting for the first complete replica on site-b"
INFO_REQ=$(jq -n --arg v "$HANDLE" --argjson s "$SECRET_A" '{replication_source: {volume: {volume_id: $v}}, secrets: $s}')
for _ in $(seq 600); do
    # No lastSyncTime until the first sync point is complete (never invented).
    if INFO=$(call site-a replication.Controller/GetVolumeReplicationInfo "$INFO_REQ" 2>/dev/null) &&
        grep -q lastSyncTime <<<"$INFO"; then
        break
    fi
    INFO=
    sleep 0.5
done
[[ -n ${INFO:-} ]] || die "no complete sync after 5 minutes; see $DEMO_DIR/site-b.log"
T1=$(date +%s.%N)
printf 'replica complete %.1f s after EnableVolumeReplication\n' "$(echo "$T1 - $T0" | bc)"

step "GetVolumeReplicationInfo on site-a"
echo "$INFO"

step "Checking the replica byte for byte"
# The sync point is reported once its data is flushed; the replica's snapshot of it
# follows within about a second.
SNAP=$(rbd "${A[@]}" snap ls "$POOL/$IMAGE" --format json | jq -r '[.[] | select(.name | startswith("csirr-sync."))] | last | .name')
for _ in $(seq 60); do
    rbd "${B[@]}" snap ls "$POOL/$IMAGE" --format json | jq -e --arg s "$SNAP" 'any(.[]; .name == $s)' >/dev/null && break
    sleep 0.5
done
SUM_A=$(rbd "${A[@]}" export --no-progress "$POOL/$IMAGE@$SNAP" - | sha256sum | cut -d' ' -f1)
SUM_B=$(rbd "${B[@]}" export --no-progress "$POOL/$IMAGE@$SNAP" - | sha256sum | cut -d' ' -f1)
echo "site-a $POOL/$IMAGE@$SNAP sha256 $SUM_A"
echo "site-b $POOL/$IMAGE@$SNAP sha256 $SUM_B"
[[ $SUM_A == "$SUM_B" ]] || die "checksums differ"
echo "identical"
rbd "${B[@]}" info "$POOL/$IMAGE" | sed 's/^/  /'
rbd "${B[@]}" du "$POOL/$IMAGE" 2>/dev/null | sed 's/^/  /'

step "The replica is protected: a write from another client fails"
if rbd "${B[@]}" bench --io-type write --io-total 4K "$POOL/$IMAGE" >/dev/null 2>&1; then
    die "a foreign write to the replica succeeded"
fi
echo "write refused (Read-only file system), as expected"

step "Done"
echo "The pair is still running. Explore with:"
echo "  eval \"\$(deploy/dev/ceph-pair.sh env)\""
echo "  rbd -c \"\$CSIRR_SITE_B_CONF\" ls -l $POOL"
echo "Stop it with: deploy/dev/ceph-pair.sh down"
