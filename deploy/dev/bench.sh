#!/usr/bin/env bash
# deploy/dev/bench.sh: replication benchmark on the local two-cluster pair, side by side:
# this engine (csi-rbd-replicator), native rbd-mirror in snapshot mode, and
# `rbd export-diff | rbd import-diff` (issue 3, item 9).
#
#   deploy/dev/bench.sh                      all three tools, ~10 min on the 2-core VM
#   BENCH_TOOLS="engine" deploy/dev/bench.sh only some tools (engine rbd-mirror export-diff)
#
# Scenarios (each tool runs them in phases, (a)+(b), (c), (d) and (d) serial, each in a fresh pool
# $BENCH_POOL on both sites with mirroring in image mode and the peers bootstrapped, with
# the tool's own image names; the pool is deleted after the phase, which removes its
# images and all mirror state, and its daemons run only during their phases):
#   (a) 1 GiB image written sequentially (rbd bench, 4 MiB writes): first full sync,
#       from "enable" to "replica complete"
#   (b) then 64 MiB of random 64 KiB writes on it: from "sync point taken" to "replica
#       complete"; $BENCH_B_ROUNDS rounds (default 3), median and range reported, also
#       counted from the moment the primary's snapshot exists ("from snap existing")
#   (c) 4 GiB image with 256 MiB written as random 64 KiB writes (sparse inside objects):
#       first full sync
#   (d) 20 images of 64 MiB (fully written) enabled at once: until all are complete
#   (d) serial: the same 20 images (a fresh phase "ds") called one after another, as a
#       script or a controller working through VolumeReplications does: per image
#       EnableVolumeReplication then PromoteVolume (rbd-mirror: `mirror image enable`,
#       then the mirror info ceph-csi's Promote reads on a primary), until all are
#       complete; per-call latency p50/p99/max of each call (and of
#       GetVolumeReplicationInfo / mirror image status after completion) is printed
#   (e) memory flat in image size: a 1 GiB and a 1 TiB image (phases m1, mt), each with
#       the same 64 MiB in 256 writes spread over the whole image: first sync time and
#       the replaying process's peak RSS (a fresh process per phase)
#   (f) 200 images of 4 MiB (phase n, $BENCH_MANY) enabled at once: until all complete
#   (g) engine only (Ceph 16 has no group mirroring): a volume group of 10 images of
#       64 MiB (fully written), made with CreateVolumeGroup before t0; t0 = just before
#       EnableVolumeReplication of the group, end = GetVolumeReplicationInfo of the group
#       (polled every 50 ms) reports a last sync time: the first crash-consistent cut
#       complete on every member's replica. Beside (d), 20 independent images.
#   (j) journal mode (engine: mirroringMode journal; rbd-mirror: `mirror image enable IMG
#       journal`; export-diff has none): a 256 MiB image with exclusive-lock and
#       journaling and $BENCH_J_IDLE (10) idle 16 MiB ones, enabled and caught up, then
#       (j0) CPU of the replaying process over $BENCH_J_IDLE_SECONDS (20) s with all of
#       them idle; (j1) $BENCH_J_WRITES (20) single 4 KiB writes at rest, 0.1-0.3 s apart,
#       from one librbd client that keeps the image open: each write+flush returned on
#       the primary (its ack: librbd acks a journaled write once its journal entry is
#       safe) -> the data read back on the replica (a fresh uncached librbd read every
#       2 ms), median, p99 and max, and the same for 6 writes 2.5-3.5 s apart; (j2) `rbd bench --io-type write --io-pattern rand
#       --io-size 4K --io-threads 16 --io-total $BENCH_J_TOTAL` (64M) on the primary,
#       the replica's entries (engine: also bytes) behind sampled every second (engine:
#       csi_rbd_replicator_journal_behind_entries/_bytes, refreshed every 2 s;
#       rbd-mirror: entries_behind_primary of `mirror image status`, computed from the
#       primary's commit position, which librbd updates every 5 s), then a marker write
#       from a new client: catch-up = rbd bench exited -> the marker readable on the
#       replica (the replay is in journal order: the marker there means the whole load
#       is; the marker's open, lock and write are included); (j3) per burst size in
#       $BENCH_J_BURSTS (8M 64M): random 64 KiB writes, 16 in flight, from one client
#       holding the image open, then a flushed 4 KiB marker as the burst's last write:
#       its ack on the primary -> readable on the replica (and, in brackets, from the
#       burst's end: the last burst write's flush returned); (j4) the primary's write
#       throughput with journaling on while the tool replays: rbd bench of $BENCH_J_TOTAL
#       random 64 KiB writes, 16 threads, on the replicated image and on an image of the
#       same size without journaling, alternated three times, medians.
#       Runnable alone: BENCH_TOOLS="engine rbd-mirror" BENCH_PHASES=j deploy/dev/bench.sh
#   (s) migration switch (issue 17): $BENCH_S_IMAGES (20) images of 32 MiB (8 MiB written)
#       replicated one way site-a -> site-b, then written by one client (256 KiB to each
#       image every 0.5 s) for $BENCH_S_WRITE_SECONDS (5) s up to the switch; downtime = the
#       writes stopped (client closed) -> every image primary on site-b. engine: `migrate
#       start --schedule 10s`, ready in `migrate status`, then `migrate switch --parallel 16`
#       (its own "downtime" figure, and the command's wall time); rbd-mirror: the OpenStack
#       runbook (journal-based pool mirroring: images with journaling, `mirror pool enable
#       POOL pool` on both sites, caught up = every image up+replaying with 0 entries
#       behind), then `rbd mirror pool demote` on site-a and `rbd mirror pool promote` on
#       site-b, repeated until every image is primary there (a promotion is refused until
#       the image has replayed the demotion). export-diff has none.
#       Runnable alone: BENCH_TOOLS="engine rbd-mirror" BENCH_PHASES=s deploy/dev/bench.sh
# Data is written before the tool's daemons start; the timed window holds nothing but the
# trigger and the replication.
#
# What each figure includes (nothing is subtracted):
#   engine       t0 = just before the EnableVolumeReplication RPCs (all at once, over one
#                gRPC channel opened beforehand, as the csi-addons controller keeps one) or,
#                for (b), before creating the next sync snapshot csirr-sync.<seq> on the
#                primary by hand (librbd, in process) and notifying the registry object, as
#                the engine's scheduler does after taking one; end = the replica's site reported that
#                sync point complete in the primary's registry (what GetVolumeReplicationInfo
#                returns as lastSyncTime). The replayer writes that once the delta is
#                flushed on the replica; the replica's snapshot of it follows (a monitor
#                commit, off the critical path; the time it appears is printed too). The
#                replayer is woken by RADOS notifications on the registry object (Enable, a
#                new sync snapshot, role changes) and also polls every --poll-interval
#                ($BENCH_POLL) as a safety net. The engine's own copy time
#                (GetVolumeReplicationInfo lastSyncDuration) and a timeline from the sidecar
#                log are printed beside it.
#   rbd-mirror   t0 = just before `mirror image enable <img> snapshot` (librbd, in process;
#                for (d) 20 threads at once) or, for (b), `mirror image snapshot`; end = the
#                replica's non-primary mirror snapshot that mirrors the primary's newest
#                mirror snapshot (same primary_snap_id) is marked complete: rbd-mirror sets
#                that flag only after all data is copied and the image state is applied.
#                rbd-mirror is started, and has elected its leader, before the tool's
#                scenarios; it is event driven (no poll interval).
#   export-diff  t0 = just before `snap create` of the source snapshot; end = the last
#                `rbd export-diff ... | rbd import-diff ...` pipe exited (process start and
#                connection setup of both rbd processes included; the destination image is
#                created before t0). (d): per image a thread takes the snapshot and starts
#                the pipe, all 20 at once.
# Every tool creates two RBD snapshots per sync (primary, replica); each costs 0.1-1 s on
# this pair, the wait for the monitor's next Paxos proposal (paxos_propose_interval 1 s).
# rbd-mirror creates the replica's before copying and flags it complete after;
# import-diff creates it at the end of the pipe; the engine creates it right after
# reporting the sync point (the replica holds exactly that point until then, and
# nothing writes it or promotes it before the snapshot exists).
# Completion is polled every 50 ms through librbd (python3-rbd) holding a connection.
# Peak RSS: VmHWM of the replaying sidecar (site-b) and of rbd-mirror at the end of each
# phase (max over the phases).
#
# Environment:
#   BENCH_TOOLS        tools to run (default "engine rbd-mirror export-diff")
#   BENCH_POOL         pool created (and deleted) on both sites (default csirr-bench-<pid>)
#   BENCH_POLL         the replayer's --poll-interval (default 5s, as `serve`)
#   BENCH_ENGINE_ARGS  extra `serve` flags of the replaying sidecar (e.g.
#                      "--max-concurrent-syncs 20")
#   BENCH_ENGINE_ENV   environment of the sidecars, e.g. "MALLOC_ARENA_MAX=2"
#   BENCH_PHASES       phases to run (default "ab c d ds g m1 mt n s j")
#   BENCH_J_WRITES, BENCH_J_TOTAL, BENCH_J_IDLE, BENCH_J_IDLE_SECONDS, BENCH_J_BURSTS
#                      phase (j): single writes timed (20), rbd bench total (64M), idle
#                      journal images (10), idle CPU window (20), burst sizes ("8M 64M")
#   BENCH_J_PORT       metrics port of the replaying sidecar in (j) (default 9473)
#   BENCH_S_IMAGES, BENCH_S_WRITE_SECONDS
#                      phase (s): images switched (20), seconds of writes before it (5)
#   BENCH_MAX_BUSY     before each timed scenario, wait (up to BENCH_QUIET_WAIT s, default
#                      90) until the cores are at most this % busy (default 30)
#   BENCH_TIMEOUT      seconds to wait for one scenario (default 120)
#   BENCH_KEEP=1       keep the pool, logs and work dir (default: delete the pool)
#   BENCH_BIN          the binary to measure instead of a release build (CI's bounded
#                      run measures its own build: the dev profile is optimized too)
#   BENCH_SKIP_BUILD=1 use the existing target/release binary ($CARGO_TARGET_DIR/release
#                      when CARGO_TARGET_DIR is set)
#   BENCH_PERF=1       record both sidecars with `perf record -g` in each phase
#                      ($WORK/perf-{a,b}-PHASE.data; with BENCH_KEEP=1 to keep them)
#   BENCH_MIN_FREE_GIB refuse to start with less free disk next to the pair (default 16)
#   BENCH_RUNS         run the whole benchmark this many times (default 1) and print, per
#                      tool and scenario, the median and the range over the runs beside the
#                      targets (issue 19: three runs, medians); each run's own report too
#   BENCH_RESULTS_JSON write this run's figures to that file as JSON (BENCH_RUNS uses it)
#
# The Python helpers are in deploy/dev/bench/: timing.py (triggers a scenario and times
# it), journal.py (phase (j)'s measurements), report.py (the report, from the figures
# this script collects in $WORK/figures.json) and medians.py (BENCH_RUNS).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
cd "$REPO_ROOT"
PAIR="$SCRIPT_DIR/ceph-pair.sh"
LOG_TAG=bench.sh
if [[ -f $SCRIPT_DIR/lib.sh ]]; then
    # shellcheck source=deploy/dev/lib.sh
    source "$SCRIPT_DIR/lib.sh"
else
    log() { printf '[%s %s] %s\n' "$LOG_TAG" "$(date +%T)" "$*" >&2; }
    die() {
        log "ERROR: $*"
        exit 1
    }
fi

BENCH_TOOLS=${BENCH_TOOLS:-engine rbd-mirror export-diff}
BENCH_POOL=${BENCH_POOL:-csirr-bench-$$}
BENCH_POLL=${BENCH_POLL:-5s}
BENCH_ENGINE_ARGS=${BENCH_ENGINE_ARGS:-}
BENCH_ENGINE_ENV=${BENCH_ENGINE_ENV:-}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
BENCH_KEEP=${BENCH_KEEP:-0}
POOL=$BENCH_POOL
BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/csi-rbd-replicator}
if [[ -n ${BENCH_BIN:-} ]]; then BENCH_SKIP_BUILD=1; fi
# BENCH_RUNS > 1: this script once per run, then the medians over the runs.
if [[ ${BENCH_RUNS:-1} -gt 1 ]]; then
    runs_dir=$(mktemp -d /tmp/csirr-bench-runs.XXXXXX)
    for ((run = 1; run <= BENCH_RUNS; run++)); do
        log "run $run of $BENCH_RUNS"
        skip=${BENCH_SKIP_BUILD:-0}
        ((run > 1)) && skip=1
        BENCH_RUNS=1 BENCH_SKIP_BUILD=$skip BENCH_RESULTS_JSON="$runs_dir/run$run.json" \
            bash "${BASH_SOURCE[0]}" || die "run $run failed (its results: $runs_dir)"
    done
    exec python3 "$SCRIPT_DIR/bench/medians.py" "$runs_dir"/run*.json
fi
N_MULTI=20
N_SWITCH=${BENCH_S_IMAGES:-20}
S_WRITE_SECONDS=${BENCH_S_WRITE_SECONDS:-5}
N_GROUP=10
N_MANY=${BENCH_MANY:-200}
SCENARIOS=(a b b0 c d ds g m1 mt n s)
declare -A TITLE=(
    [a]="(a) 1 GiB seq, first sync"
    [b]="(b) 64 MiB rand 64K delta"
    [b0]="(b) same, from snap existing"
    [c]="(c) 4 GiB/256 MiB rand 64K, first"
    [d]="(d) 20 x 64 MiB, first sync"
    [ds]="(d) same, serial Enable+Promote"
    [g]="(g) group 10 x 64 MiB, 1st cut"
    [m1]="(e) 1 GiB, 64 MiB in 256 spread writes"
    [mt]="(e) 1 TiB sparse, the same writes"
    [n]="(f) $N_MANY x 4 MiB enabled at once"
    [s]="(s) migration switch, $N_SWITCH images"
)
# (b)'s target counts from the snapshot existing (b0); from taking it (b) includes the
# monitor's wait for the snapshot, in every tool, and is there to compare.
# Targets: issue 19's where it set them ((a), (b) from the snapshot existing, (d) both
# ways), issue 3's for (c).
declare -A TARGET=([a]=2.5 [b0]=0.5 [c]=2.5 [d]=3.5 [ds]=3.5)
RSS_TARGET=100
declare -A RES=()    # RES[tool.scenario] = seconds
declare -A COPY=()   # COPY[scenario] = engine copy seconds (lastSyncDuration; max for d)
declare -A RSS=()    # RSS[tool] = MiB
declare -A NOTES=()  # NOTES[scenario] = engine timeline summary
declare -A ALLOC=()  # ALLOC[c] = MiB the engine's replica of (c) allocates
declare -A CALLS=()  # CALLS[tool] = {"enable": "p50/p99/max" ms, ...} of the serial run
declare -A JRES=()   # JRES[tool.key] = figures of phase (j)
J_WRITES=${BENCH_J_WRITES:-20}
J_TOTAL=${BENCH_J_TOTAL:-64M}
J_BURSTS=${BENCH_J_BURSTS:-8M 64M}
J_IDLE=${BENCH_J_IDLE:-10}
J_IDLE_SECONDS=${BENCH_J_IDLE_SECONDS:-20}
J_PORT=${BENCH_J_PORT:-9473}
declare -A PRSS=()   # PRSS[tool.phase] = peak RSS (MiB) of the replaying process in a phase
declare -A PCPU=()   # PCPU[tool.phase] = CPU seconds of the tool's processes in a phase
ALLOC_MIRROR="" ALLOC_EXPORT=""

for t in $BENCH_TOOLS; do
    case $t in engine | rbd-mirror | export-diff) ;; *) die "unknown tool $t" ;; esac
done
for c in rbd ceph rados jq grpcurl python3 rbd-mirror; do
    command -v "$c" >/dev/null || die "$c not found (deploy/dev/test.sh installs what the pair needs)"
done
/usr/bin/python3 -c 'import rados, rbd' 2>/dev/null || die "python3-rbd/python3-rados missing"
# The engine's RPCs go through one gRPC channel, as the csi-addons controller's do (20
# grpcurl processes starting at once would time process start-up on 2 cores).
if ! /usr/bin/python3 -c 'import grpc' 2>/dev/null; then
    ((EUID == 0)) || die "python3-grpcio missing (apt-get install python3-grpcio)"
    log "installing python3-grpcio"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-grpcio; } >&2 ||
        die "cannot install python3-grpcio"
fi

WORK=$(mktemp -d /tmp/csirr-bench.XXXXXX)
PIDS=()
POOL_MADE=0
cleanup() {
    local rc=$? p
    set +e
    for p in "${PIDS[@]}"; do
        stop_pid "$p"
    done
    if ((POOL_MADE)) && [[ $BENCH_KEEP != 1 ]]; then
        pool_delete
    fi
    if [[ $BENCH_KEEP == 1 || $rc != 0 ]]; then
        log "logs and helper kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the pair -----------------------------------------------------------------------
# Never take over a pair that another checkout (e.g. a CI clone) is running on the ports.
CSIRR_PAIR_TAKEOVER=${CSIRR_PAIR_TAKEOVER:-0} "$PAIR" up >&2
eval "$("$PAIR" env)"
# One benchmark at a time on the pair: two would share the 2 cores and be worthless.
exec 9>"$CSIRR_PAIR_DIR/bench.lock"
if ! flock -n 9; then
    log "another bench.sh runs on this pair; waiting for it (up to 30 min)"
    flock -w 1800 9 || die "another bench.sh still holds $CSIRR_PAIR_DIR/bench.lock"
fi
# The OSDs are sparse files that bluestore never shrinks: every run leaves them larger
# (about 25 full runs filled a 68 GiB disk). Refuse to start without room for a run.
avail_gib=$(df -P -BG "$CSIRR_PAIR_DIR" | awk 'NR == 2 { sub("G", "", $4); print $4 }')
pair_gib=$(du -s -BG "$CSIRR_PAIR_DIR" 2>/dev/null | awk '{ sub("G", "", $1); print $1 }')
log "pair files: ${pair_gib:-?} GiB; free: ${avail_gib:-?} GiB"
if [[ ${avail_gib:-0} =~ ^[0-9]+$ ]] && ((avail_gib < ${BENCH_MIN_FREE_GIB:-16})); then
    die "only ${avail_gib} GiB free next to the pair (a run writes about 12 GiB into its OSD files," \
        "which never shrink): reset the pair with '$PAIR down && $PAIR up'"
fi
c_rbd() { # SITE ARGS...
    local s=$1
    shift
    if [[ $s == site-a ]]; then
        rbd -c "$CSIRR_SITE_A_CONF" --keyring "$CSIRR_SITE_A_KEYRING" "$@"
    else
        rbd -c "$CSIRR_SITE_B_CONF" --keyring "$CSIRR_SITE_B_KEYRING" "$@"
    fi
}
c_ceph() { # SITE ARGS...
    local s=$1
    shift
    if [[ $s == site-a ]]; then
        ceph -c "$CSIRR_SITE_A_CONF" --keyring "$CSIRR_SITE_A_KEYRING" "$@"
    else
        ceph -c "$CSIRR_SITE_B_CONF" --keyring "$CSIRR_SITE_B_KEYRING" "$@"
    fi
}

# --- the binary ---------------------------------------------------------------------
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "cargo build --release"
    cargo build --release --bin csi-rbd-replicator >&2
fi
[[ -x $BIN ]] || die "$BIN missing"

# --- the helpers (librbd through python3-rbd): deploy/dev/bench/ -------------------------
# timing.py triggers one scenario and times it to the replica complete; journal.py runs
# phase (j)'s measurements; common.py is what they share.
BENCH_PY=$SCRIPT_DIR/bench
helper() {
    [[ $1 == timeline ]] || wait_quiet
    /usr/bin/python3 "$BENCH_PY/timing.py" "$1" "$POOL" "$BENCH_TIMEOUT" "${@:2}"
}

# CPU busy share (percent of all cores) over one second, from /proc/stat.
cpu_busy() {
    local a b
    a=$(awk '/^cpu / { print $2+$3+$4+$7+$8, $5+$6 }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2+$3+$4+$7+$8, $5+$6 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        busy = y[1] - x[1]; idle = y[2] - x[2];
        printf "%d", (busy + idle > 0) ? 100 * busy / (busy + idle) : 0 }'
}

# The machine is shared (2 cores): before each timed scenario wait, up to
# $BENCH_QUIET_WAIT s, until the cores are at most $BENCH_MAX_BUSY % busy, so that
# builds or tests of others do not end up in the figures; say so when they might have.
BUSY_NOTE=()
wait_quiet() {
    local b n
    for ((n = 0; n < ${BENCH_QUIET_WAIT:-90}; n++)); do
        b=$(cpu_busy)
        ((b <= ${BENCH_MAX_BUSY:-30})) && return 0
    done
    log "warning: the cores are still ${b}% busy with other work; measuring anyway"
    BUSY_NOTE+=("a scenario started with the cores ${b}% busy with other work")
}

# --- pool lifecycle -----------------------------------------------------------------
avail_gib() { c_ceph "$1" df -f json | jq '.stats.total_avail_bytes / 1073741824 | floor'; }
used_bytes() { c_ceph "$1" df -f json | jq '.stats.total_used_raw_bytes'; }

declare -A USED_BEFORE=()
pool_create() { # PEERS(0|1)
    local site tok
    pool_delete quiet
    for site in site-a site-b; do USED_BEFORE[$site]=$(used_bytes "$site"); done
    POOL_MADE=1
    for site in site-a site-b; do
        c_ceph "$site" osd pool create "$POOL" 16 16 replicated >/dev/null 2>&1
        c_ceph "$site" osd pool set "$POOL" min_size 1 >/dev/null 2>&1 || true
        c_rbd "$site" pool init "$POOL"
        c_rbd "$site" mirror pool enable "$POOL" image --site-name "$site"
    done
    if (($1)); then
        tok="$WORK/token"
        (
            umask 077
            c_rbd site-a mirror pool peer bootstrap create --site-name site-a "$POOL" >"$tok"
        )
        c_rbd site-b mirror pool peer bootstrap import --site-name site-b --direction rx-tx \
            "$POOL" "$tok" 2>/dev/null
        rm -f "$tok"
        for site in site-a site-b; do
            c_rbd "$site" mirror pool info "$POOL" --all --format json |
                jq -e '[.peers[] | select((.mon_host // "") != "")] | length == 1' >/dev/null ||
                die "$site: pool $POOL has no peer with mon_host after bootstrap"
        done
    fi
}

# Deletes the pool on both sites (its mirror peers first, so that their config-keys go
# too) and waits until the OSDs have freed the space, so the next tool does not compete
# with the deletion.
pool_delete() {
    local site u n cur
    for site in site-a site-b; do
        c_ceph "$site" osd pool ls | grep -x "$POOL" >/dev/null || continue
        for u in $(c_rbd "$site" mirror pool info "$POOL" --format json 2>/dev/null |
            jq -r '.peers[]?.uuid'); do
            c_rbd "$site" mirror pool peer remove "$POOL" "$u" 2>/dev/null || true
        done
        c_ceph "$site" osd pool rm "$POOL" "$POOL" --yes-i-really-really-mean-it >/dev/null 2>&1 ||
            log "warning: cannot delete pool $POOL on $site"
    done
    POOL_MADE=0
    [[ ${1:-} == quiet ]] && return 0
    # The OSD removes the pool's PGs in the background: wait until each site is back to
    # (about) where it was before the phase, so the next phase does not compete with it.
    # Others' tests may write meanwhile: stop waiting also once usage stops falling.
    local before low stalled
    for site in site-a site-b; do
        before=${USED_BEFORE[$site]:-0}
        low=$(used_bytes "$site")
        stalled=0
        for ((n = 0; n < 60 && stalled < 5; n++)); do
            sleep 1
            cur=$(used_bytes "$site")
            ((cur <= before + 268435456)) && break
            if ((cur < low)); then
                low=$cur
                stalled=0
            else
                stalled=$((stalled + 1))
            fi
        done
    done
}

# The primaries of one phase on site-a: "ab" = the 1 GiB image of (a) and (b); "c" = the
# 4 GiB image of (c); "d" = the 20 images of (d).
write_images() { # PREFIX PHASE
    local p=$1 i pid batch=()
    log "$p: writing the primaries of ($2) on site-a"
    case $2 in
    ab)
        c_rbd site-a create --size 1G "$POOL/${p}a"
        c_rbd site-a bench --io-type write --io-pattern seq --io-size 4M --io-total 1G \
            "$POOL/${p}a" >/dev/null
        ;;
    c)
        c_rbd site-a create --size 4G "$POOL/${p}c"
        c_rbd site-a bench --io-type write --io-pattern rand --io-size 64K --io-total 256M \
            "$POOL/${p}c" >/dev/null
        ;;
    m1) helper write-spread "${p}m1" $((1 << 30)) >/dev/null ;;
    mt) helper write-spread "${p}mt" $((1 << 40)) >/dev/null ;;
    n) helper create-many "${p}n" "$N_MANY" $((4 << 20)) >/dev/null ;;
    j)
        c_rbd site-a create --size 256M --image-feature layering,exclusive-lock,journaling \
            "$POOL/${p}j"
        c_rbd site-a bench --io-type write --io-pattern seq --io-size 4M --io-total 32M \
            "$POOL/${p}j" >/dev/null
        for i in $(j_names "$p"); do
            c_rbd site-a create --size 16M --image-feature layering,exclusive-lock,journaling \
                "$POOL/$i"
        done
        # (j4)'s baseline: the same size and layout without journaling, never replicated.
        c_rbd site-a create --size 256M --image-feature layering,exclusive-lock "$POOL/${p}jplain"
        c_rbd site-a bench --io-type write --io-pattern seq --io-size 4M --io-total 256M \
            "$POOL/${p}jplain" >/dev/null
        ;;
    s)
        # rbd-mirror's runbook mirrors journals: its images get journaling.
        local feat=layering,exclusive-lock,object-map,fast-diff
        [[ $p == mir- ]] && feat+=,journaling
        for i in $(switch_names "$p"); do
            c_rbd site-a create --size 32M --image-feature "$feat" "$POOL/$i"
            c_rbd site-a bench --io-type write --io-pattern seq --io-size 4M --io-total 8M \
                "$POOL/$i" >/dev/null
        done
        ;;
    d | ds | g)
        local names
        if [[ $2 == g ]]; then names=$(group_names "$p"); else names=$(multi_names "$p"); fi
        for i in $names; do
            c_rbd site-a create --size 64M "$POOL/$i"
        done
        # Four at a time: these writes only prepare the scenario.
        for i in $names; do
            c_rbd site-a bench --io-type write --io-pattern seq --io-size 4M --io-total 64M \
                "$POOL/$i" >/dev/null &
            batch+=($!)
            if ((${#batch[@]} == 4)); then
                for pid in "${batch[@]}"; do wait "$pid" || die "rbd bench failed"; done
                batch=()
            fi
        done
        for pid in "${batch[@]}"; do wait "$pid" || die "rbd bench failed"; done
        ;;
    esac
    settle
}

# Whether both sites can take a phase without passing the nearfull ratio (0.85): an OSD
# of this pair that runs out of space crashes (bluestore ENOSPC) and takes the pair
# down for everyone. Worst cases per site in GiB (site-b, engine (c): a replica that
# allocates whole objects, 4 GiB).
declare -A NEED_A=([ab]=1.2 [c]=0.4 [d]=1.4 [ds]=1.4 [m1]=0.2 [mt]=0.2 [n]=1.0 [j]=0.8 [g]=0.7 [s]=0.8)
declare -A NEED_B=([ab]=1.2 [c]=4.3 [d]=1.4 [ds]=1.4 [m1]=0.3 [mt]=0.3 [n]=1.0 [j]=0.8 [g]=0.7 [s]=0.8)
room_for() { # PHASE
    local site need
    for site in site-a site-b; do
        need=${NEED_A[$1]}
        [[ $site == site-b ]] && need=${NEED_B[$1]}
        if ! c_ceph "$site" df -f json | jq -e --argjson need "$need" \
            '.stats.total_used_raw_bytes + $need * 1073741824 <= 0.85 * .stats.total_bytes' \
            >/dev/null; then
            log "warning: $site has no room for phase ($1) (needs $need GiB below 85% full): skipped"
            return 1
        fi
    done
}

# Data written through librbd may still be flushed by the OSD: give it a moment.
settle() { sleep "${BENCH_SETTLE:-3}"; }

delta_writes() { # IMAGE
    c_rbd site-a bench --io-type write --io-pattern rand --io-size 64K --io-total 64M \
        "$POOL/$1" >/dev/null
    settle
}

multi_names() { # PREFIX
    local i
    for ((i = 1; i <= N_MULTI; i++)); do printf '%sd%02d\n' "$1" "$i"; done
}

switch_names() { # PREFIX: the images of (s)
    local i
    for ((i = 1; i <= N_SWITCH; i++)); do printf '%ss%02d\n' "$1" "$i"; done
}

group_names() { # PREFIX: the members of (g)
    local i
    for ((i = 1; i <= N_GROUP; i++)); do printf '%sg%02d\n' "$1" "$i"; done
}

j_names() { # PREFIX: the idle images of (j)
    local i
    for ((i = 1; i <= J_IDLE; i++)); do printf '%sji%02d\n' "$1" "$i"; done
}

many_names() { # PREFIX: the images of (f), as create-many names them
    local i
    for ((i = 1; i <= N_MANY; i++)); do printf '%sn%03d\n' "$1" "$i"; done
}

json_field() { jq -r ".$2" <<<"$1"; }

cpu_seconds() { # PID: user + system CPU time the process used so far
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' \
        "/proc/$1/stat" 2>/dev/null || true
}

vmhwm_mib() { # PID
    local v
    v=$(awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null) || true
    [[ $v =~ ^[0-9]+$ ]] && echo "$v" || echo ""
}

# (b) runs BENCH_B_ROUNDS times (default 3): snapshot timing on the monitor and the
# replayer's poll phase make single deltas vary by up to a second. The table shows the
# median, and the range beside it.
B_ROUNDS=${BENCH_B_ROUNDS:-3}
declare -A BVALS=() B0VALS=()
record_b() { # TOOL JSON
    local s t
    s=$(json_field "$2" seconds)
    t=$(jq -r '.trigger_seconds // 0' <<<"$2")
    BVALS[$1]+="$s "
    B0VALS[$1]+="$(awk -v s="$s" -v t="$t" 'BEGIN { printf "%.3f", s - t }') "
    log "$1 ${TITLE[b]}: ${s}s (of which ${t}s creating the primary snapshot)"
}
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
range_of() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR > 1) printf "%.2f-%.2f", lo, hi }'; }
finish_b() { # TOOL
    [[ -n ${BVALS[$1]:-} ]] || return 0
    RES[$1.b]=$(median "${BVALS[$1]}")
    RES[$1.b0]=$(median "${B0VALS[$1]}")
    RANGE[$1.b]=$(range_of "${BVALS[$1]}")
    RANGE[$1.b0]=$(range_of "${B0VALS[$1]}")
}
declare -A RANGE=()

record() { # TOOL SCENARIO JSON
    local s t
    s=$(json_field "$3" seconds)
    t=$(jq -r '.trigger_seconds // empty' <<<"$3")
    RES[$1.$2]=$s
    log "$1 ${TITLE[$2]}: ${s}s${t:+ (of which ${t}s creating the primary snapshot)}"
}

# --- tool: this engine --------------------------------------------------------------
start_sidecar() { # SITE SOCKET LOG ARGS...
    local site=$1 sock=$2 out=$3 s
    shift 3
    s=$([[ $site == site-a ]] && echo A || echo B)
    local secret_var=CSIRR_SITE_${s}_SECRET_DIR
    # shellcheck disable=SC2086 # BENCH_ENGINE_ENV is a list of VAR=value
    env NO_COLOR=1 RUST_LOG=info $BENCH_ENGINE_ENV "$BIN" serve --endpoint "unix://$sock" \
        --drivername bench.rbd.csi.ceph.com \
        --csi-config "$CSIRR_CSI_CONFIG" --cluster-mapping "$CSIRR_CLUSTER_MAPPING" \
        --cluster-id "$site" --secret-dir "${!secret_var}" --pools "$POOL" "$@" \
        >"$out" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
    for ((i = 0; i < 300; i++)); do
        if grpcurl -plaintext -unix -authority localhost "$sock" identity.Identity/Probe 2>/dev/null |
            grep '"ready": true' >/dev/null; then
            return 0
        fi
        kill -0 "$LAST_PID" 2>/dev/null || die "sidecar for $site exited; log: $out"
        sleep 0.2
    done
    die "sidecar for $site not ready in 60s; log: $out"
}

stop_pid() { # PID: SIGTERM, then SIGKILL after 20 s
    local n
    kill "$1" 2>/dev/null || true
    for ((n = 0; n < 100; n++)); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$1" 2>/dev/null; then
        log "warning: pid $1 ignored SIGTERM for 20 s; killing it"
        kill -9 "$1" 2>/dev/null || true
    fi
    wait "$1" 2>/dev/null || true
    local p keep=()
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# Max lastSyncDuration (seconds) over IMAGES, as GetVolumeReplicationInfo reports it.
engine_copy_seconds() { # SOCK IMAGE...
    local sock=$1 n d max=0
    shift
    for n in "$@"; do
        d=$(grpcurl -plaintext -unix -authority localhost \
            -d "{\"replication_source\": {\"volume\": {\"volume_id\": \"$POOL/$n\"}}}" \
            "$sock" replication.Controller/GetVolumeReplicationInfo 2>/dev/null |
            jq -r '.lastSyncDuration // "0s"' | tr -d s)
        max=$(awk -v a="$max" -v b="${d:-0}" 'BEGIN { print (b > a) ? b : a }')
    done
    echo "$max"
}

engine_note() { # SCENARIO T0 JSON_OF_RUN IMAGE...
    local sc=$1 t0=$2 run=$3 tl
    shift 3
    tl=$(helper timeline "$WORK/sidecar-b.log" "$t0" "$@")
    NOTES[$sc]=$(jq -r --argjson run "$run" '"pickup (first log line of the image) +\(.pickup)s" +
        (if .pickup_last != .pickup then ", last image +\(.pickup_last)s" else "" end) +
        ", copy (engine, max) \(.copy_seconds_max)s, complete in log +\(.complete_logged)s, " +
        "reported complete +\($run.seconds)s, replica snapshot seen +\($run.snapshot_seconds)s"' <<<"$tl")
    jq -r '.lines[]' <<<"$tl" >"$WORK/timeline-$sc.txt"
}

max_rss() { # TOOL MIB: keeps the larger
    [[ -n $2 ]] || return 0
    if [[ -z ${RSS[$1]:-} ]] || (($2 > RSS[$1])); then RSS[$1]=$2; fi
}

# Each tool runs in three phases, (a)+(b), (c) and (d), each in a fresh pool that is
# deleted afterwards, with its daemons started for the phase only: one phase at a time
# keeps the space the benchmark needs on the pair's small OSDs bounded.
read -r -a PHASES <<<"${BENCH_PHASES:-ab c d ds g m1 mt n s j}"

# Phase (j), journal mode, for TOOL (engine: the site-b sidecar's metrics on $J_PORT;
# rbd-mirror) whose replaying process is PID: the images enabled by the caller, waits
# until every replica replays, then (j0) idle CPU, (j1) single-write lag, (j2) load.
journal_phase() { # TOOL PREFIX PID
    local tool=$1 p=$2 pid=$3 n ready c0 c1 out img
    local names=("${p}j")
    mapfile -t -O 1 names < <(j_names "$p")
    for ((n = 0; n < BENCH_TIMEOUT * 5; n++)); do
        ready=0
        for img in "${names[@]}"; do
            if [[ $tool == engine ]]; then
                curl -sf "http://127.0.0.1:$J_PORT/metrics" 2>/dev/null |
                    grep -F "csi_rbd_replicator_journal_caught_up_timestamp_seconds{" |
                    grep -F "image=\"$img\"" >/dev/null && ready=$((ready + 1))
            else
                c_rbd site-b mirror image status "$POOL/$img" --format json 2>/dev/null |
                    jq -e '.state == "up+replaying"' >/dev/null && ready=$((ready + 1))
            fi
        done
        ((ready == ${#names[@]})) && break
        sleep 0.2
    done
    ((ready == ${#names[@]})) || die "$tool: only $ready of ${#names[@]} journal replicas replay after ${BENCH_TIMEOUT}s"
    log "$tool: ${#names[@]} journal-mode replicas replaying after $((n / 5)) s"
    sleep 5
    wait_quiet
    c0=$(cpu_seconds "$pid")
    sleep "$J_IDLE_SECONDS"
    c1=$(cpu_seconds "$pid")
    JRES[$tool.j0]=$(awk -v a="$c0" -v b="$c1" -v s="$J_IDLE_SECONDS" 'BEGIN { printf "%.1f", 100 * (b - a) / s }')
    log "$tool (j0): CPU of the idle replaying process with ${#names[@]} journal images: ${JRES[$tool.j0]}% of a core"
    wait_quiet
    out=$(BENCH_TIMEOUT=$BENCH_TIMEOUT /usr/bin/python3 "$BENCH_PY/journal.py" lag "$tool" "$POOL" "${p}j" "$J_WRITES" "$J_PORT")
    JRES[$tool.j1]=$(jq -r '"\(.median) / \(.p99) / \(.max)"' <<<"$out")
    log "$tool (j1): lag of $J_WRITES single 4 KiB writes, median / p99 / max s: ${JRES[$tool.j1]}"
    # The same after quiet spells (the engine probes less often once it found
    # nothing for 2 s: --journal-idle-probe-interval).
    wait_quiet
    out=$(JBENCH_GAP=2.5-3.5 BENCH_TIMEOUT=$BENCH_TIMEOUT /usr/bin/python3 "$BENCH_PY/journal.py" lag "$tool" "$POOL" "${p}j" 6 "$J_PORT")
    JRES[$tool.j1q]=$(jq -r '"\(.median) / \(.p99) / \(.max)"' <<<"$out")
    log "$tool (j1): lag of 6 single 4 KiB writes 2.5-3.5 s apart, median / p99 / max s: ${JRES[$tool.j1q]}"
    wait_quiet
    out=$(BENCH_TIMEOUT=$BENCH_TIMEOUT /usr/bin/python3 "$BENCH_PY/journal.py" load "$tool" "$POOL" "${p}j" "$J_TOTAL" "$J_PORT")
    JRES[$tool.j2]=$(jq -r '"rbd bench \(.bench_ops) writes in \(.bench_seconds) s (\(.bench_iops | floor) IOPS); catch-up \(.catch_up) s after it exited; max behind during the load: \(.max_entries_behind // "-") entries, \(.max_bytes_behind // "-") bytes"' <<<"$out")
    JRES[$tool.j2c]=$(jq -r .catch_up <<<"$out")
    JRES[$tool.j2s]=$(jq -c '[.samples[] | "\(.[0])s:\(.[1] // "-")"] | join(" ")' <<<"$out")
    log "$tool (j2): ${JRES[$tool.j2]}"
    log "$tool (j2): entries behind over time: ${JRES[$tool.j2s]}"
    local burst
    for burst in $J_BURSTS; do
        wait_quiet
        out=$(BENCH_TIMEOUT=$BENCH_TIMEOUT /usr/bin/python3 "$BENCH_PY/journal.py" burst "$tool" "$POOL" "${p}j" "$burst" "$J_PORT")
        JRES[$tool.j3.$burst]=$(jq -r '"\(.lag) (\(.after_burst))"' <<<"$out")
        log "$tool (j3): $burst burst of random 64 KiB writes in $(jq -r .burst_seconds <<<"$out") s; its last write on the replica after ${JRES[$tool.j3.$burst]} s (from the burst's end)"
    done
    journal_overhead "$tool" "$p"
}

# (j4) What journaling costs the primary while TOOL replays: rbd bench of $J_TOTAL
# random 64 KiB writes (16 in flight) on the replicated journaled image and on an
# image of the same size and layout without journaling, alternated three times;
# medians of the write throughput, and the throughput lost.
journal_overhead() { # TOOL PREFIX
    local tool=$1 p=$2 r img bps
    local -a plain=() journaled=()
    for ((r = 0; r < 3; r++)); do
        for img in "${p}jplain" "${p}j"; do
            wait_quiet
            bps=$(c_rbd site-a bench --io-type write --io-pattern rand --io-size 64K \
                --io-threads 16 --io-total "$J_TOTAL" "$POOL/$img" |
                awk '/elapsed:/ { for (i = 1; i < NF; i++) if ($i == "ops/sec:") print int($(i + 1) * 65536) }')
            [[ -n $bps ]] || die "$tool: rbd bench on $img printed no throughput"
            if [[ $img == "${p}j" ]]; then journaled+=("$bps"); else plain+=("$bps"); fi
        done
    done
    JRES[$tool.j4]=$(printf '%s\n' "${plain[@]}" | sort -n | sed -n 2p)
    JRES[$tool.j4j]=$(printf '%s\n' "${journaled[@]}" | sort -n | sed -n 2p)
    JRES[$tool.j4]=$(awk -v a="${JRES[$tool.j4]}" -v b="${JRES[$tool.j4j]}" \
        'BEGIN { printf "%.1f -> %.1f MiB/s (-%.0f%%)", a / 1048576, b / 1048576, 100 * (1 - b / a) }')
    log "$tool (j4): primary write throughput, rbd bench $J_TOTAL rand 64K, without -> with journaling: ${JRES[$tool.j4]}"
}

# (s) with the engine: migrate start, ready, writes up to the switch, migrate switch.
engine_switch() { # PREFIX SOCK_A SOCK_B
    local p=$1 names out t0 t1 i mig
    mapfile -t names < <(switch_names "$p")
    mig=(--from site-a --from-endpoint "unix://$2" --to-endpoint "unix://$3" --pool "$POOL")
    "$BIN" migrate start "${mig[@]}" --schedule 10s >"$WORK/migrate-start.txt" 2>&1 ||
        die "migrate start failed: $(cat "$WORK/migrate-start.txt")"
    for ((i = 0; i < BENCH_TIMEOUT * 2; i++)); do
        "$BIN" migrate status "${mig[@]}" >"$WORK/migrate-status.txt" 2>&1 && break
        sleep 0.5
    done
    ((i < BENCH_TIMEOUT * 2)) || die "migration not ready in ${BENCH_TIMEOUT}s: $(tail -5 "$WORK/migrate-status.txt")"
    out=$(helper write-for "$S_WRITE_SECONDS" "${names[@]}")
    t0=$(json_field "$out" t_closed)
    "$BIN" migrate switch "${mig[@]}" --parallel 16 >"$WORK/migrate-switch.txt" 2>&1 ||
        die "migrate switch failed: $(cat "$WORK/migrate-switch.txt")"
    t1=$(date +%s.%N)
    RES[engine.s]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    NOTES[s]="$(tail -1 "$WORK/migrate-switch.txt"); $(json_field "$out" written) bytes written in ${S_WRITE_SECONDS}s before it"
    log "engine ${TITLE[s]}: ${RES[engine.s]}s from the writes stopped; ${NOTES[s]}"
}

# (s) with rbd-mirror, the runbook's way: journal-based pool mirroring, pool demote and
# pool promote.
mirror_switch() { # PREFIX
    local p=$1 names out t0 t1 i n site
    mapfile -t names < <(switch_names "$p")
    for site in site-a site-b; do
        c_rbd "$site" mirror pool enable "$POOL" pool --site-name "$site" >/dev/null
    done
    for ((i = 0; i < BENCH_TIMEOUT * 2; i++)); do
        n=$(c_rbd site-b mirror pool status "$POOL" --verbose --format json 2>/dev/null |
            jq '[.images[]? | select(.state == "up+replaying" and
                 ((.description // "") | test("\"entries_behind_primary\":0")))] | length')
        ((${n:-0} == N_SWITCH)) && break
        sleep 0.5
    done
    ((i < BENCH_TIMEOUT * 2)) || die "rbd-mirror: $N_SWITCH images not caught up in ${BENCH_TIMEOUT}s (got ${n:-0})"
    out=$(helper write-for "$S_WRITE_SECONDS" "${names[@]}")
    t0=$(json_field "$out" t_closed)
    c_rbd site-a mirror pool demote "$POOL" >"$WORK/mirror-demote.txt" 2>&1 ||
        die "mirror pool demote failed: $(cat "$WORK/mirror-demote.txt")"
    for ((i = 0; i < BENCH_TIMEOUT * 10; i++)); do
        c_rbd site-b mirror pool promote "$POOL" >>"$WORK/mirror-promote.txt" 2>&1 || true
        n=$(helper primary-count site-b "${names[@]}")
        ((n == N_SWITCH)) && break
    done
    t1=$(date +%s.%N)
    ((n == N_SWITCH)) || die "rbd-mirror: only $n of $N_SWITCH images primary on site-b"
    RES[rbd-mirror.s]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    log "rbd-mirror ${TITLE[s]}: ${RES[rbd-mirror.s]}s from the writes stopped ($((i + 1)) pool promote rounds; $(head -1 "$WORK/mirror-demote.txt"))"
}

run_engine() {
    local p=eng- sa="$WORK/a.sock" sb="$WORK/b.sock" phase pid_a pid_b out multi many rss r img jargs
    log "=== engine ==="
    mapfile -t multi < <(multi_names "$p")
    for phase in "${PHASES[@]}"; do
        room_for "$phase" || continue
        pool_create 1
        write_images "$p" "$phase"
        # Site-a replays nothing; in (s) its scheduler takes the migration's sync points.
        if [[ $phase == s ]]; then
            start_sidecar site-a "$sa" "$WORK/sidecar-a.log" --poll-interval "$BENCH_POLL"
        else
            start_sidecar site-a "$sa" "$WORK/sidecar-a.log" --no-replayer
        fi
        pid_a=$LAST_PID
        # shellcheck disable=SC2086 # BENCH_ENGINE_ARGS is a list of flags
        jargs=()
        [[ $phase != j ]] || jargs=(--metrics-address "127.0.0.1:$J_PORT")
        start_sidecar site-b "$sb" "$WORK/sidecar-b.log" --poll-interval "$BENCH_POLL" \
            $BENCH_ENGINE_ARGS "${jargs[@]}"
        pid_b=$LAST_PID
        perf_pid=""
        if [[ -n ${BENCH_PERF:-} ]]; then
            perf record -F 499 -g -p "$pid_b" -o "$WORK/perf-b-$phase.data" >/dev/null 2>&1 &
            perf_pid=$!
            perf record -F 499 -g -p "$pid_a" -o "$WORK/perf-a-$phase.data" >/dev/null 2>&1 &
            perf_pid+=" $!"
        fi
        cpu_a0=$(cpu_seconds "$pid_a") cpu_b0=$(cpu_seconds "$pid_b")
        case $phase in
        ab)
            out=$(helper engine-enable "$sa" "${p}a")
            record engine a "$out"
            COPY[a]=$(engine_copy_seconds "$sa" "${p}a")
            engine_note a "$(json_field "$out" t0)" "$out" "${p}a"

            for ((r = 1; r <= B_ROUNDS; r++)); do
                delta_writes "${p}a"
                out=$(helper engine-snap "${p}a")
                record_b engine "$out"
                ((r > 1)) || {
                    COPY[b]=$(engine_copy_seconds "$sa" "${p}a")
                    engine_note b "$(json_field "$out" t0)" "$out" "${p}a"
                }
            done
            finish_b engine
            ;;
        c)
            out=$(helper engine-enable "$sa" "${p}c")
            record engine c "$out"
            COPY[c]=$(engine_copy_seconds "$sa" "${p}c")
            engine_note c "$(json_field "$out" t0)" "$out" "${p}c"
            ALLOC[c]=$(allocated_mib site-b "${p}c")
            ;;
        g)
            out=$(helper engine-group "$sa" $(group_names "$p"))
            record engine g "$out"
            ;;
        d)
            out=$(helper engine-enable "$sa" "${multi[@]}")
            record engine d "$out"
            COPY[d]=$(engine_copy_seconds "$sa" "${multi[@]}")
            engine_note d "$(json_field "$out" t0)" "$out" "${multi[@]}"
            ;;
        ds)
            out=$(helper engine-serial "$sa" "${multi[@]}")
            record engine ds "$out"
            CALLS[engine]=$(jq -c .calls <<<"$out")
            ;;
        m1 | mt)
            out=$(helper engine-enable "$sa" "${p}$phase")
            record engine "$phase" "$out"
            ;;
        n)
            mapfile -t many < <(many_names "$p")
            out=$(helper engine-enable "$sa" "${many[@]}")
            record engine n "$out"
            ;;
        s) engine_switch "$p" "$sa" "$sb" ;;
        j)
            for img in "${p}j" $(j_names "$p"); do
                grpcurl -plaintext -unix -authority localhost -d "{\"replication_source\": \
                    {\"volume\": {\"volume_id\": \"$POOL/$img\"}}, \"parameters\": \
                    {\"mirroringMode\": \"journal\"}}" "$sa" \
                    replication.Controller/EnableVolumeReplication >/dev/null ||
                    die "EnableVolumeReplication $img (journal) failed"
            done
            journal_phase engine "$p" "$pid_b"
            ;;
        esac
        rss=$(vmhwm_mib "$pid_b")
        PRSS[engine.$phase]=$rss
        PCPU[engine.$phase]=$(awk -v a0="$cpu_a0" -v b0="$cpu_b0" -v a="$(cpu_seconds "$pid_a")" \
            -v b="$(cpu_seconds "$pid_b")" 'BEGIN { printf "%.1f+%.1f", a - a0, b - b0 }')
        log "engine: CPU seconds of the sidecars in phase ($phase) after the images were written: site-a+site-b ${PCPU[engine.$phase]}"
        for p_ in $perf_pid; do
            kill -INT "$p_" 2>/dev/null || true
            wait "$p_" 2>/dev/null || true
        done
        log "engine: peak RSS of the replaying sidecar in phase ($phase): ${rss:-?} MiB"
        max_rss engine "$rss"
        stop_pid "$pid_b"
        stop_pid "$pid_a"
        cat "$WORK/sidecar-b.log" >>"$WORK/sidecar-b.all.log"
        pool_delete
    done
    log "engine: peak RSS of the replaying sidecar ${RSS[engine]:-?} MiB"
}

# MiB the pool holds on SITE, as the OSD accounts it (`rbd du` and `rbd diff` count whole
# objects on fast-diff images and cannot show sparseness inside objects). The phase of
# (c) holds only that image. PG stats reach the mgr every few seconds: wait for them.
allocated_mib() { # SITE IMAGE
    sleep 8
    c_ceph "$1" df -f json | jq --arg p "$POOL" \
        '[.pools[] | select(.name == $p) | .stats.stored] | add / 1048576 | floor' || echo "?"
}

# --- tool: native rbd-mirror (snapshot mode) -----------------------------------------
start_rbd_mirror() {
    local i
    (cd "$WORK" && exec rbd-mirror --cluster site-b --id admin -f \
        --log-file "$WORK/rbd-mirror.log" >>"$WORK/rbd-mirror.out" 2>&1) &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    for ((i = 0; i < 120; i++)); do
        c_rbd site-b mirror pool status "$POOL" --verbose --format json 2>/dev/null |
            jq -e '[.daemons[]? | select(.leader == true)] | length > 0' >/dev/null && return 0
        kill -0 "$LAST_PID" 2>/dev/null || die "rbd-mirror exited; see $WORK/rbd-mirror.out"
        sleep 0.5
    done
    log "warning: rbd-mirror reported no leader in 60s; measuring anyway"
}

run_mirror() {
    local p=mir- phase pid out multi many rss r img
    log "=== rbd-mirror ==="
    mapfile -t multi < <(multi_names "$p")
    for phase in "${PHASES[@]}"; do
        if [[ $phase == g ]]; then
            log "rbd-mirror: (g) skipped: Ceph 16 has no group mirroring"
            continue
        fi
        room_for "$phase" || continue
        pool_create 1
        write_images "$p" "$phase"
        start_rbd_mirror
        pid=$LAST_PID
        cpu0=$(cpu_seconds "$pid")
        case $phase in
        ab)
            out=$(helper mirror-enable "${p}a")
            record rbd-mirror a "$out"
            for ((r = 1; r <= B_ROUNDS; r++)); do
                delta_writes "${p}a"
                out=$(helper mirror-snap "${p}a")
                record_b rbd-mirror "$out"
            done
            finish_b rbd-mirror
            ;;
        c)
            out=$(helper mirror-enable "${p}c")
            record rbd-mirror c "$out"
            ALLOC_MIRROR=$(allocated_mib site-b "${p}c")
            ;;
        d)
            out=$(helper mirror-enable "${multi[@]}")
            record rbd-mirror d "$out"
            ;;
        ds)
            out=$(helper mirror-serial "${multi[@]}")
            record rbd-mirror ds "$out"
            CALLS[rbd-mirror]=$(jq -c .calls <<<"$out")
            ;;
        m1 | mt)
            out=$(helper mirror-enable "${p}$phase")
            record rbd-mirror "$phase" "$out"
            ;;
        n)
            mapfile -t many < <(many_names "$p")
            out=$(helper mirror-enable "${many[@]}")
            record rbd-mirror n "$out"
            ;;
        s) mirror_switch "$p" ;;
        j)
            for img in "${p}j" $(j_names "$p"); do
                c_rbd site-a mirror image enable "$POOL/$img" journal >/dev/null
            done
            journal_phase rbd-mirror "$p" "$pid"
            ;;
        esac
        rss=$(vmhwm_mib "$pid")
        PRSS[rbd-mirror.$phase]=$rss
        PCPU[rbd-mirror.$phase]=$(awk -v c0="$cpu0" -v c="$(cpu_seconds "$pid")" 'BEGIN { printf "%.1f", c - c0 }')
        log "rbd-mirror: CPU seconds in phase ($phase): ${PCPU[rbd-mirror.$phase]}"
        log "rbd-mirror: peak RSS in phase ($phase): ${rss:-?} MiB"
        max_rss rbd-mirror "$rss"
        stop_pid "$pid"
        pool_delete
    done
    log "rbd-mirror: peak RSS ${RSS[rbd-mirror]:-?} MiB"
}

# --- tool: rbd export-diff | rbd import-diff -------------------------------------------
run_export() {
    local p=exp- phase out multi n r
    log "=== export-diff | import-diff ==="
    mapfile -t multi < <(multi_names "$p")
    for phase in "${PHASES[@]}"; do
        # (d) serial times Enable/Promote calls; (e) and (f) are about the replaying
        # process (memory, many images), which export-diff does not have; nor has it
        # roles to switch (s).
        case $phase in ds | g | m1 | mt | n | j | s) continue ;; esac
        room_for "$phase" || continue
        pool_create 0
        write_images "$p" "$phase"
        case $phase in
        ab)
            c_rbd site-b create --size 1G "$POOL/${p}a"
            out=$(helper export - s1 "${p}a")
            record export-diff a "$out"
            for ((r = 1; r <= B_ROUNDS; r++)); do
                delta_writes "${p}a"
                out=$(helper export "s$r" "s$((r + 1))" "${p}a")
                record_b export-diff "$out"
            done
            finish_b export-diff
            ;;
        c)
            c_rbd site-b create --size 4G "$POOL/${p}c"
            out=$(helper export - s1 "${p}c")
            record export-diff c "$out"
            ALLOC_EXPORT=$(allocated_mib site-b "${p}c")
            ;;
        d)
            for n in "${multi[@]}"; do c_rbd site-b create --size 64M "$POOL/$n"; done
            out=$(helper export - s1 "${multi[@]}")
            record export-diff d "$out"
            ;;
        esac
        pool_delete
    done
}

# --- main -----------------------------------------------------------------------------
# Pools of earlier runs that died (we hold the lock: no other run is using them).
for site in site-a site-b; do
    for old in $(c_ceph "$site" osd pool ls | grep -E '^csirr-bench(-[0-9]+)?$' || true); do
        log "removing pool $old left by an earlier run on $site"
        c_ceph "$site" osd pool rm "$old" "$old" --yes-i-really-really-mean-it >/dev/null 2>&1 || true
    done
done
for site in site-a site-b; do
    a=$(avail_gib "$site")
    ((a >= 2)) || die "$site has only ${a} GiB free; the benchmark needs 2 (remove old test images)"
done
log "tools: $BENCH_TOOLS; pool $POOL; replayer poll interval $BENCH_POLL; work dir $WORK"
log "load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
T_START=$SECONDS
for t in $BENCH_TOOLS; do
    case $t in
    engine) run_engine ;;
    rbd-mirror) run_mirror ;;
    export-diff) run_export ;;
    esac
done

# --- report ---------------------------------------------------------------------------
# Every figure of the run goes to $WORK/figures.json; bench/report.py prints the report
# from it (and writes BENCH_RESULTS_JSON for BENCH_RUNS' medians).
assoc_json() { # NAME of an associative array -> a JSON object of its non-empty strings
    local -n arr=$1
    local k
    for k in "${!arr[@]}"; do printf '%s\t%s\n' "$k" "${arr[$k]}"; done |
        jq -R -s 'split("\n") | map(select(length > 0) | split("\t") | select((.[1] // "") != "")
            | {(.[0]): .[1]}) | add // {}'
}
list_json() { jq -n '$ARGS.positional' --args "$@"; }
jq -n --arg date "$(date -u +%FT%TZ)" --arg cores "$(nproc)" --arg poll "$BENCH_POLL" \
    --arg engine_args "$BENCH_ENGINE_ARGS" --arg engine_env "$BENCH_ENGINE_ENV" \
    --arg b_rounds "$B_ROUNDS" --arg j_idle "$J_IDLE" --arg j_total "$J_TOTAL" \
    --arg work "$WORK" --arg seconds "$((SECONDS - T_START))" --arg rss_target "$RSS_TARGET" \
    --arg alloc_mirror "$ALLOC_MIRROR" --arg alloc_export "$ALLOC_EXPORT" \
    --argjson j_bursts "$(list_json $J_BURSTS)" --argjson phases "$(list_json "${PHASES[@]}")" \
    --argjson scenarios "$(list_json "${SCENARIOS[@]}")" \
    --argjson busy_notes "$(list_json ${BUSY_NOTE[@]+"${BUSY_NOTE[@]}"})" \
    --argjson titles "$(assoc_json TITLE)" --argjson targets "$(assoc_json TARGET)" \
    --argjson res "$(assoc_json RES)" --argjson range "$(assoc_json RANGE)" \
    --argjson rss "$(assoc_json RSS)" --argjson prss "$(assoc_json PRSS)" \
    --argjson pcpu "$(assoc_json PCPU)" --argjson calls "$(assoc_json CALLS)" \
    --argjson alloc "$(assoc_json ALLOC)" --argjson copy "$(assoc_json COPY)" \
    --argjson notes "$(assoc_json NOTES)" --argjson jres "$(assoc_json JRES)" \
    '$ARGS.named' >"$WORK/figures.json"
# shellcheck disable=SC2046 # no RESULTS argument without BENCH_RESULTS_JSON
/usr/bin/python3 "$BENCH_PY/report.py" "$WORK/figures.json" ${BENCH_RESULTS_JSON:+"$BENCH_RESULTS_JSON"} |
    tee "$WORK/report.txt"
