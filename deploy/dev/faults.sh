#!/usr/bin/env bash
# deploy/dev/faults.sh: the fault loop, longer than CI's (tests/faults.rs).
#
#   deploy/dev/faults.sh [ITERATIONS] [SEED]     e.g. deploy/dev/faults.sh 30
#
# Each iteration kills a sidecar with SIGKILL at a seeded random point of a sync, a
# Demote/Promote relocation or a forced Promote, restarts it and checks that no
# acknowledged sync point is lost and that both sides converge (checksums). Prints the
# seed (rerun a failure with it) and `N passed, N failed` per fault class. Brings the
# Ceph pair up if it is not (it stays up; `deploy/dev/ceph-pair.sh down` stops it).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$SCRIPT_DIR/../.."
LOG_TAG=faults.sh
# shellcheck source=deploy/dev/lib.sh
source "$SCRIPT_DIR/lib.sh"

iterations=${1:-30}
seed=${2:-$(date +%s%N)}
install_packages
"$SCRIPT_DIR/ceph-pair.sh" up
eval "$("$SCRIPT_DIR/ceph-pair.sh" env)"
log "fault loop: $iterations iterations, seed $seed"
rc=0
CSIRR_FAULT_ITERATIONS=$iterations CSIRR_FAULT_SEED=$seed \
    cargo nextest run --profile faults --no-fail-fast --no-capture \
    -E 'test(fault_kill_loop)' 2>&1 | tee "${TMPDIR:-/tmp}/faults-$seed.log" |
    grep -E '^(fault loop|iteration [0-9]+|[a-z-]+: [0-9]+ passed, [0-9]+ failed)' || rc=$?
grep -qE 'test result: ok|1 passed' "${TMPDIR:-/tmp}/faults-$seed.log" || rc=1
log "full log: ${TMPDIR:-/tmp}/faults-$seed.log"
exit "$rc"
