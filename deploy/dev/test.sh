#!/usr/bin/env bash
# deploy/dev/test.sh: the project's one test command (CI runs it through .ci/run).
#
#   deploy/dev/test.sh [NEXTEST ARGS...]     e.g. deploy/dev/test.sh -E 'test(omap)'
#
# Without arguments: every test, in two passes: all but `exclusive_*` in parallel,
# then the `exclusive_*` tests (which stop and start Ceph daemons) one at a time; the
# fault-suite classes (the kill loop, OSD hang, mon hang/kill, local-cluster hang,
# partition) run after them in deploy/dev/faults.sh --short, which prints
# `N passed, N failed` per class.
#
# Phases: install (Debian packages, grpcurl) -> toolchain check -> cargo fmt --check ->
# cargo clippy -D warnings -> cargo build --all-targets -> two-cluster Ceph pair up
# (deploy/dev/ceph-pair.sh) -> cargo nextest run (unit and integration tests, with the
# CSIRR_* variables of `ceph-pair.sh env`) -> fault suite, bounded (deploy/dev/faults.sh
# --short; the partition class on a second pair in network namespaces) -> the benchmark
# driver, bounded (deploy/dev/bench.sh: phase (a)+(b) with the three tools, a short (j))
# -> every fuzz target for a bounded time (deploy/dev/fuzz.sh) -> pair down. Exit code =
# first failure.
#
# Environment:
#   CSIRR_KEEP_PAIR=1    leave the Ceph pair running afterwards (default: tear it down;
#                        note that this also tears down a pair that was already running)
#   CSIRR_SKIP_CARGO=1   only install and bring the pair up (for working on this script)
#   CSIRR_PAIR_DIR       where the pair keeps its state (default <repo>/.pair)
#   CSIRR_FUZZ_SECONDS   seconds per fuzz target (default 10)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
cd "$REPO_ROOT"
PAIR="$SCRIPT_DIR/ceph-pair.sh"

LOG_TAG=test.sh
# shellcheck source=deploy/dev/lib.sh
source "$SCRIPT_DIR/lib.sh"
# The bounded benchmark's client (python3-grpcio) and its helpers' lint (pyflakes3).
APT_PACKAGES+=(python3-grpcio pyflakes3)

# --- phase bookkeeping --------------------------------------------------------------
PHASE_NAMES=()
PHASE_SECS=()
PHASE_RESULTS=()
CURRENT_PHASE=
PHASE_T0=0
phase_begin() {
    CURRENT_PHASE=$1
    PHASE_T0=$SECONDS
    printf '\n==> %s\n' "$1" >&2
}
phase_end() { # RESULT
    PHASE_NAMES+=("$CURRENT_PHASE")
    PHASE_SECS+=($((SECONDS - PHASE_T0)))
    PHASE_RESULTS+=("$1")
    printf '<== %s: %s (%ss)\n' "$CURRENT_PHASE" "$1" "$((SECONDS - PHASE_T0))" >&2
    CURRENT_PHASE=
}
# Run one phase: phase NAME CMD... ; a failing phase ends the run (after the summary).
phase() {
    local name=$1 rc=0
    shift
    phase_begin "$name"
    "$@" || rc=$?
    if ((rc != 0)); then
        phase_end "FAILED (exit $rc)"
        exit "$rc"
    fi
    phase_end ok
}

PAIR_TOUCHED=0
T_START=$SECONDS
on_exit() {
    local rc=$?
    set +e
    if [[ -n $CURRENT_PHASE ]]; then phase_end "FAILED (exit $rc)"; fi
    if ((PAIR_TOUCHED)); then
        if [[ ${CSIRR_KEEP_PAIR:-0} == 1 ]]; then
            log "CSIRR_KEEP_PAIR=1: leaving the Ceph pair running ($PAIR down to stop it)"
        else
            local t0=$SECONDS
            "$PAIR" down || log "warning: '$PAIR down' failed"
            PHASE_NAMES+=("pair down")
            PHASE_SECS+=($((SECONDS - t0)))
            PHASE_RESULTS+=("done")
        fi
    fi
    printf '\n%-28s %8s  %s\n' "phase" "seconds" "result" >&2
    local i
    for i in "${!PHASE_NAMES[@]}"; do
        printf '%-28s %8s  %s\n' "${PHASE_NAMES[$i]}" "${PHASE_SECS[$i]}" "${PHASE_RESULTS[$i]}" >&2
    done
    printf '%-28s %8s  exit %s\n' "total" "$((SECONDS - T_START))" "$rc" >&2
    exit "$rc"
}
trap on_exit EXIT

# --- phases -------------------------------------------------------------------------

check_toolchain() {
    command -v cargo >/dev/null ||
        die "cargo not found: install Rust with rustup (rust-toolchain.toml pins the version)"
    cargo --version >&2
    cargo fmt --version >&2 || die "rustfmt missing: rustup component add rustfmt"
    cargo clippy --version >&2 || die "clippy missing: rustup component add clippy"
    cargo nextest --version >&2 ||
        die "cargo-nextest not found: install it (e.g. cargo install --locked cargo-nextest)"
}

pair_up() {
    PAIR_TOUCHED=1
    "$PAIR" up
    eval "$("$PAIR" env)"
    "$PAIR" status | grep -E '^===|health:' >&2
}

# A process of the tests that dies of a signal (a sidecar aborted inside
# librados, say) leaves a core in the package directory (kernel.core_pattern
# "core"): its crashing thread's backtrace is printed, and the core removed.
report_cores() {
    local c exe
    while IFS= read -r c; do
        exe=$(file -b "$c" 2>/dev/null | sed -n "s/.*execfn: '\([^']*\)'.*/\1/p")
        log "core dump $c of ${exe:-an unknown program}"
        if command -v gdb >/dev/null && [[ -n $exe && -x $exe ]]; then
            gdb -q -batch -ex 'info threads' -ex bt "$exe" "$c" 2>&1 | tail -n 80 >&2 || true
        fi
        rm -f "$c"
    done < <(find "$REPO_ROOT" -maxdepth 3 -type f \( -name core -o -name 'core.[0-9]*' \) \
        -newer "$REPO_ROOT/Cargo.toml" 2>/dev/null)
}

run_tests() {
    env | grep '^CSIRR_' | sort | sed 's/^/  /' >&2
    ulimit -c unlimited 2>/dev/null || log "cannot raise the core size limit"
    if (($#)); then
        local rc=0
        cargo nextest run --features failpoints --no-fail-fast "$@" || rc=$?
        report_cores
        return "$rc"
    fi
    # Tests named exclusive_* stop and start Ceph daemons (disaster drills):
    # they run after the others, one at a time.
    # The fault-suite classes run in their own phase (faults.sh --short).
    local rc=0 faults='test(fault_kill_loop) | binary(osd_hang) | binary(mon_faults) | binary(partition)'
    cargo nextest run --features failpoints --no-fail-fast \
        -E "not test(/^exclusive_/) & not ($faults)" || rc=$?
    cargo nextest run --features failpoints --no-fail-fast --test-threads 1 \
        -E "test(/^exclusive_/) & not ($faults)" || rc=$?
    report_cores
    return "$rc"
}

# --- main ---------------------------------------------------------------------------

# A from-scratch build gains nothing from incremental state, and it costs gigabytes.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# Say how much room the build has: a full disk otherwise shows up as an odd compiler error.
free_gib=$(df -P --block-size=1G "$REPO_ROOT" | awk 'NR==2 {print $4}')
log "free disk for the build: ${free_gib} GiB (a clean build with tests and fuzz takes about 5 GiB, the Ceph pair some more)"
if ((free_gib < 15)); then
    log "warning: less than 15 GiB free; the build may fail with 'No space left on device'"
fi

phase "install" install_packages
if [[ ${CSIRR_SKIP_CARGO:-0} == 1 ]]; then
    phase "ceph pair up" pair_up
    log "CSIRR_SKIP_CARGO=1: skipping fmt, clippy, build and tests"
    exit 0
fi
phase "toolchain" check_toolchain
phase "cargo fmt --check" cargo fmt --all --check
phase "cargo clippy" cargo clippy --all-targets -- -D warnings
# The PV watcher (cargo feature kube, off by default for build time) and the
# tests' fail points (feature failpoints) must not rot.
phase "cargo clippy (kube, failpoints)" cargo clippy --all-targets --features kube,failpoints -- -D warnings
# The tests run with fail points compiled in (FAILPOINTS set by a few tests).
phase "cargo build" cargo build --all-targets --features failpoints
phase "ceph pair up" pair_up
phase "cargo nextest run" run_tests "$@"

# ===================================================================================
# LATER ADDITIONS go here, each as `phase "NAME" function_or_command`, e.g. an
# end-to-end run of the sidecar binary against the pair with grpcurl, or a comparison
# with native rbd-mirror. They run with the pair up and the CSIRR_* variables set; the
# pair is torn down by the EXIT trap after them.
# ===================================================================================

# Skipped when test.sh was given a test filter:
# The fault suite, one run per class (deploy/dev/faults.sh ITERATIONS for the long run).
if (($# == 0)); then
    phase "fault suite (bounded)" bash "$SCRIPT_DIR/faults.sh" --short
fi
# The benchmark driver, bounded: phase (a)+(b) with all three tools side by side and a
# short phase (j), measuring this run's own build (the dev profile is optimized), so
# that the benchmark keeps working; its figures are in the log. The full benchmark is
# deploy/dev/bench.sh (README, Performance).
bench_bounded() {
    local bin=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/csi-rbd-replicator
    bash -n "$SCRIPT_DIR/bench.sh"
    pyflakes3 "$SCRIPT_DIR"/bench/*.py
    BENCH_BIN=$bin BENCH_PHASES=ab BENCH_B_ROUNDS=1 bash "$SCRIPT_DIR/bench.sh"
    BENCH_BIN=$bin BENCH_TOOLS=engine BENCH_PHASES=j BENCH_J_WRITES=5 BENCH_J_IDLE=2 \
        BENCH_J_IDLE_SECONDS=5 BENCH_J_BURSTS=8M BENCH_J_TOTAL=16M bash "$SCRIPT_DIR/bench.sh"
}
if (($# == 0)); then
    phase "bench (bounded)" bench_bounded
fi
# Every cargo-fuzz target for a short, bounded time (deploy/dev/fuzz.sh SECONDS for
# longer runs).
if (($# == 0)); then
    phase "fuzz (bounded)" bash "$SCRIPT_DIR/fuzz.sh" "${CSIRR_FUZZ_SECONDS:-10}"
fi

log "all phases passed"
