#!/usr/bin/env bash
# deploy/dev/bench.sh: replication benchmark on the local two-cluster pair, side by side:
# this engine (csi-rbd-replicator), native rbd-mirror in snapshot mode, and
# `rbd export-diff | rbd import-diff` (issue 3, item 9).
#
#   deploy/dev/bench.sh                      all three tools, all phases, ~20 min on the 2-core VM
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
#       the image has replayed the demotion; after each round the driver counts the
#       primaries through librbd over a connection it opened beforehand). export-diff has
#       none.
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
# The run itself is deploy/dev/bench/driver.py (the phases, the tools' daemons, the
# figures); its helpers: timing.py (triggers a scenario and times it), journal.py (phase
# (j)'s measurements), report.py (the report, from the figures the driver collects in
# $WORK/figures.json) and medians.py (BENCH_RUNS). This wrapper brings the pair up,
# takes the bench lock, builds the binary and hands over to the driver.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
cd "$REPO_ROOT"
PAIR="$SCRIPT_DIR/ceph-pair.sh"
LOG_TAG=bench.sh
# shellcheck source=deploy/dev/lib.sh
source "$SCRIPT_DIR/lib.sh"

for c in rbd ceph rados grpcurl python3 rbd-mirror; do
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

# Never take over a pair that another checkout (e.g. a CI clone) is running on the ports.
CSIRR_PAIR_TAKEOVER=${CSIRR_PAIR_TAKEOVER:-0} "$PAIR" up >&2
eval "$("$PAIR" env)"
# One benchmark at a time on the pair: two would share the 2 cores and be worthless. The
# lock's descriptor stays open across the exec below: the driver holds it to the end.
exec 9>"$CSIRR_PAIR_DIR/bench.lock"
if ! flock -n 9; then
    log "another bench.sh runs on this pair; waiting for it (up to 30 min)"
    flock -w 1800 9 || die "another bench.sh still holds $CSIRR_PAIR_DIR/bench.lock"
fi

if [[ -z ${BENCH_BIN:-} ]]; then
    BENCH_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/csi-rbd-replicator
    if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
        log "cargo build --release"
        cargo build --release --bin csi-rbd-replicator >&2
    fi
fi
[[ -x $BENCH_BIN ]] || die "$BENCH_BIN missing"
export BENCH_BIN
exec /usr/bin/python3 "$SCRIPT_DIR/bench/driver.py"
