#!/usr/bin/env bash
# deploy/dev/fuzz.sh: runs every cargo-fuzz target (fuzz/) for a bounded time.
#
#   deploy/dev/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   default 20 s, every target
#
# Installs cargo-fuzz (crates.io) if it is missing and uses the nightly toolchain the
# machine has. Each target starts from its checked-in seed corpus (fuzz/corpus/TARGET,
# read only) plus a scratch directory for what it finds; a crash stops the run, leaves
# the input in fuzz/artifacts/TARGET and exits non-zero (turn it into a unit test).
# Prints `N passed, N failed` over the targets.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$SCRIPT_DIR/../.."
LOG_TAG=fuzz.sh
# shellcheck source=deploy/dev/lib.sh
source "$SCRIPT_DIR/lib.sh"

secs=${1:-20}
shift || true
rustup toolchain list | grep -q '^nightly' ||
    die "no nightly toolchain (cargo-fuzz needs one): rustup toolchain install nightly"
command -v cargo-fuzz >/dev/null || {
    log "installing cargo-fuzz"
    cargo install --locked cargo-fuzz
}
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(cargo +nightly fuzz list)
log "building ${#targets[@]} fuzz targets"
cargo +nightly fuzz build
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
passed=0 failed=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    if cargo +nightly fuzz run "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
        runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$scratch/$t.log" | grep -oE '[0-9]+$' || echo '?')
        log "$t: ok, $runs inputs in ${secs}s"
        passed=$((passed + 1))
    else
        log "$t: FAILED; last lines:"
        tail -30 "$scratch/$t.log" >&2
        failed=$((failed + 1))
    fi
done
echo "fuzz: $passed passed, $failed failed"
((failed == 0))
