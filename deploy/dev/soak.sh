#!/usr/bin/env bash
# deploy/dev/soak.sh: the load soak, longer than CI's (tests/soak.rs).
#
#   deploy/dev/soak.sh [MINUTES] [VOLUMES] [CALLERS]     default: 30 200 50
#
# One sidecar per site replicates VOLUMES small volumes (16 MiB, 1 MiB written, each
# enabled with schedulingInterval $CSIRR_SOAK_INTERVAL, default 2m here) in a pool of its
# own, while CALLERS concurrent gRPC callers drive the csi-addons controller's mix for
# MINUTES (80% GetVolumeReplicationInfo, 8% EnableVolumeReplication and 6% PromoteVolume
# on the primary, 6% ResyncVolume on the replica; each caller pauses 0-400 ms between
# calls), a writer changes a random primary every 300 ms, and one of the first three
# volumes is relocated (Demote, planned Promote, Resync) every 20 s. Every call carries a
# 30 s deadline (the sidecars answer within 20 s: --rpc-timeout/--promote-timeout).
#
# Prints per RPC method: count, latency p50/p99/max and the answers by code; deadline
# misses; each sidecar's RSS and open fds at start, warm-up peak (first fifth of the load,
# at least 10 s), peak and end; and whether every volume converged (a sync point taken
# after the last write on both sides, equal `rbd export` checksums). Fails on a deadline
# miss, an unexpected answer, RSS growing past warm-up peak + 32 MiB + 20% or fds past
# warm-up peak + 16, or a volume that did not converge.
#
# The other knobs (CSIRR_SOAK_THINK_MS, CSIRR_SOAK_RELOCATE_EVERY, CSIRR_SOAK_SEED) are
# documented in tests/soak.rs. Brings the Ceph pair up if it is not (it stays up). CI
# runs the bounded version (30 volumes, 10 callers, 60 s) in test.sh's serial pass.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$SCRIPT_DIR/../.."
LOG_TAG=soak.sh
# shellcheck source=deploy/dev/lib.sh
source "$SCRIPT_DIR/lib.sh"

minutes=${1:-30}
volumes=${2:-200}
callers=${3:-50}
install_packages
"$SCRIPT_DIR/ceph-pair.sh" up
eval "$("$SCRIPT_DIR/ceph-pair.sh" env)"
log_file="${TMPDIR:-/tmp}/soak-$(date +%Y%m%d-%H%M%S).log"
log "soak: $volumes volumes, $callers callers, $minutes min; full log: $log_file"
rc=0
CSIRR_SOAK_VOLUMES=$volumes CSIRR_SOAK_CALLERS=$callers \
    CSIRR_SOAK_SECONDS=$((minutes * 60)) CSIRR_SOAK_INTERVAL=${CSIRR_SOAK_INTERVAL:-2m} \
    cargo nextest run --profile soak --no-fail-fast --no-capture \
    -E 'test(exclusive_soak_many_volumes_and_callers)' >"$log_file" 2>&1 || rc=$?
# The report, from the test's output.
sed -n '/^soak: /p;/^setup: /p;/^== soak report/,/^soak passed/p' "$log_file"
grep -qE '^soak passed' "$log_file" || rc=1
((rc == 0)) || grep -E 'panicked|deadline misses|growth|not converged|unexpected' "$log_file" | head -40
log "full log: $log_file"
exit "$rc"
