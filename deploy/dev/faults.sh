#!/usr/bin/env bash
# deploy/dev/faults.sh: every fault class of the fault suite against real clusters, with
# `N passed, N failed` per class.
#
#   deploy/dev/faults.sh [ITERATIONS] [SEED]   the long run, e.g. deploy/dev/faults.sh 30
#   deploy/dev/faults.sh --short               the bounded run test.sh (CI) does
#
# Fault classes (each checks, after the fault heals: no acknowledged sync point lost, the
# replica equal to a sync point of the primary (rbd export checksums), the engine resumes
# by itself, RPCs during the fault answered within their deadline with OK or a retry
# code, Probe ready=false instead of an error, no sidecar crash or panic):
#   kill loop            tests/faults.rs: kill -9 of a sidecar at a seeded random point of
#                        a sync, a Demote/Promote relocation, a journal-mode replay (a
#                        writer creating and removing snapshots; the replica must reach
#                        the primary's head and snapshots without a new bootstrap) or a
#                        forced Promote; ITERATIONS iterations (default 30; --short: 3, a
#                        sync, a relocation and a journal replay; 4 cover every kind;
#                        CSIRR_FAULT_CLASS=journal keeps the kill loop to one kind), SEED
#                        printed
#   OSD hang             tests/osd_hang.rs: the replica's OSD SIGSTOPped during a
#                        direct-write copy
#   mon hang/kill        tests/mon_faults.rs: the peer's monitor SIGSTOPped, then killed,
#                        during a copy
#   local-cluster hang   tests/mon_faults.rs: the local monitor and OSD SIGSTOPped together
#   partition            tests/partition.rs: the link between the sites cut (during a copy;
#                        during Demote + Promote), on the netns pair
# The long run repeats each class but the kill loop CSIRR_FAULT_REPEAT times (default 5);
# --short (CI, about 6 minutes) runs one case of each class once: the partition during a
# relocation only.
#
# The default pair (CSIRR_PAIR_DIR; brought up if needed and left up) serves every class
# but the partition, which brings up a netns pair (CSIRR_PAIR_NETNS=1 ceph-pair.sh) in
# CSIRR_NETNS_PAIR_DIR (default <repo>/.pair-netns) and takes it down afterwards. The
# daemon faults stop daemons of the pair: other users of the same pair must wait (the
# helper sessions hold `flock -x` on its lock). Needs root (network namespaces).
# With CSIRR_PAIR_NETNS=1 and CSIRR_PAIR_DIR = CSIRR_NETNS_PAIR_DIR every class runs on the
# netns pair alone (no shared pair is touched); it is taken down at the end.
# Full output: ${TMPDIR:-/tmp}/faults-<seed>.log. Exit status 0 only if every class passed.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$SCRIPT_DIR/../.."
REPO_ROOT=$PWD
LOG_TAG=faults.sh
# shellcheck source=deploy/dev/lib.sh
source "$SCRIPT_DIR/lib.sh"

short=0
if [[ ${1:-} == --short ]]; then
    short=1
    shift
fi
if ((short)); then
    iterations=3
    repeat=1
    partition_tests=(exclusive_netns_partition_during_relocation)
else
    iterations=${1:-30}
    repeat=${CSIRR_FAULT_REPEAT:-5}
    partition_tests=(exclusive_netns_partition_during_copy exclusive_netns_partition_during_relocation)
fi
seed=${2:-$(date +%s%N)}
out="${TMPDIR:-/tmp}/faults-$seed.log"
: >"$out"

install_packages
"$SCRIPT_DIR/ceph-pair.sh" up
eval "$("$SCRIPT_DIR/ceph-pair.sh" env)"
# Build once, outside the timed classes.
cargo nextest run --features failpoints --no-run >>"$out" 2>&1 || die "build failed (see $out)"

CLASSES=()
declare -A PASSED FAILED DETAIL SECS
record() { # CLASS PASSED FAILED [DETAIL]
    [[ -v "PASSED[$1]" ]] || CLASSES+=("$1")
    PASSED[$1]=$((${PASSED[$1]:-0} + $2))
    FAILED[$1]=$((${FAILED[$1]:-0} + $3))
    [[ -n ${4:-} ]] && DETAIL[$1]=$4
    return 0
}

# One nextest run of the tests matching FILTER; true if all passed.
run_filter() {
    cargo nextest run --features failpoints --profile faults --no-fail-fast --no-capture --test-threads 1 \
        -E "$1" >>"$out" 2>&1
}

# CLASS FILTER: REPEAT runs, each counted once.
run_class() {
    local class=$1 filter=$2 i t0=$SECONDS
    for ((i = 1; i <= repeat; i++)); do
        log "$class: run $i of $repeat"
        if run_filter "$filter"; then
            record "$class" 1 0
        else
            record "$class" 0 1
            log "$class: run $i FAILED (see $out)"
        fi
    done
    SECS[$class]=$((SECONDS - t0))
}

log "fault suite: kill loop $iterations iterations (seed $seed), other classes x$repeat; log $out"

# kill loop: the test prints `KIND: N passed, N failed` per kind of fault point.
t0=$SECONDS
rc=0
CSIRR_FAULT_ITERATIONS=$iterations CSIRR_FAULT_SEED=$seed run_filter 'test(fault_kill_loop)' || rc=$?
kinds=$(grep -E '^(sync|relocate|journal|forced-promote): [0-9]+ passed, [0-9]+ failed' "$out" || true)
p=$(awk '{s += $2} END {print s + 0}' <<<"$kinds")
f=$(awk '{s += $4} END {print s + 0}' <<<"$kinds")
if ((rc != 0 && f == 0)); then f=$((iterations - p)); fi # died before its summary
record "kill loop" "$p" "$f" "$(tr '\n' ';' <<<"$kinds" | sed 's/;$//; s/;/; /g')"
SECS["kill loop"]=$((SECONDS - t0))

run_class "OSD hang" 'binary(osd_hang) & test(/^exclusive_/)'
run_class "mon hang/kill" 'test(exclusive_peer_mon_hung_and_killed_during_replication)'
run_class "local-cluster hang" 'test(exclusive_local_mon_and_osd_hung_probe_not_ready)'

# partition: its own pair, in network namespaces.
t0=$SECONDS
netns_dir=${CSIRR_NETNS_PAIR_DIR:-$REPO_ROOT/.pair-netns}
netns_pair() { CSIRR_PAIR_NETNS=1 CSIRR_PAIR_DIR=$netns_dir "$SCRIPT_DIR/ceph-pair.sh" "$@"; }
# Down also when interrupted.
trap 'netns_pair down >>"$out" 2>&1 || true' EXIT
if netns_pair up >>"$out" 2>&1; then
    (
        eval "$(netns_pair env)"
        for ((i = 1; i <= repeat; i++)); do
            for t in "${partition_tests[@]}"; do
                log "partition: $t, run $i of $repeat"
                if run_filter "test($t)"; then echo pass; else echo fail; fi
            done
        done
    ) >"$out.partition"
    netns_pair down >>"$out" 2>&1 || log "warning: the netns pair did not go down cleanly"
    trap - EXIT
    record partition "$(grep -c '^pass' "$out.partition" || true)" "$(grep -c '^fail' "$out.partition" || true)"
else
    log "partition: the netns pair did not come up (see $out)"
    netns_pair down >>"$out" 2>&1 || true
    record partition 0 $((${#partition_tests[@]} * repeat))
fi
rm -f "$out.partition"
SECS[partition]=$((SECONDS - t0))

echo
status=0
for c in "${CLASSES[@]}"; do
    printf '%-20s %s passed, %s failed  (%ss)%s\n' "$c:" "${PASSED[$c]}" "${FAILED[$c]}" \
        "${SECS[$c]:-?}" "${DETAIL[$c]:+  [${DETAIL[$c]}]}"
    ((FAILED[$c] == 0 && PASSED[$c] > 0)) || status=1
done
log "seed $seed; full log: $out"
exit "$status"
