#!/usr/bin/env bash
# The project's single test command.
#
#   scripts/test.sh [extra args for the test runner]
#
# Installs the test services if needed (scripts/testbed.sh install), starts a
# private Redis + SecantusDB in a fresh state dir under target/, exports their
# environment (REDIS_URL, MONGO_URI, TESTBED_*, SECANTUSD, REDIS_SERVER), runs
#   cargo nextest run --workspace --all-targets   (if cargo-nextest is installed)
#   cargo test --workspace --all-targets          (otherwise)
# and always tears the services down again. Exits with the test runner's status.
# TEST_RUNNER=cargo forces `cargo test` even where nextest is installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TESTBED="$ROOT/scripts/testbed.sh"

"$TESTBED" install

mkdir -p "$ROOT/target"
TB_DIR="$(mktemp -d "$ROOT/target/testbed-run.XXXXXX")"
rc=1
child=""

# shellcheck disable=SC2317  # trap handlers are invoked indirectly
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    "$TESTBED" down "$TB_DIR" || echo "test.sh: WARNING: testbed teardown failed ($TB_DIR)" >&2
    if [ "$rc" = 0 ]; then
        rm -rf "$TB_DIR"
    else
        echo "test.sh: service logs kept in $TB_DIR" >&2
    fi
    exit "$status"
}
# On INT/TERM: stop the test runner (if running), then the EXIT trap tears down.
# shellcheck disable=SC2317
on_signal() {
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        kill -"$1" "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    exit "$2"
}
trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

"$TESTBED" up "$TB_DIR"
set -a
# shellcheck disable=SC1091
. "$TB_DIR/env"
set +a

if [ "${TEST_RUNNER:-}" != cargo ] && cargo nextest --version >/dev/null 2>&1; then
    runner=(cargo nextest run --workspace --all-targets)
else
    runner=(cargo test --workspace --all-targets)
fi

echo "test.sh: running: ${runner[*]} $*"
start=$SECONDS
# Run in the background and `wait`, so a signal to this script is handled at
# once (bash defers traps until a foreground child exits).
set +e
"${runner[@]}" "$@" &
child=$!
wait "$child"
rc=$?
child=""
set -e

if [ "$rc" = 0 ]; then
    echo "test.sh: PASSED (${runner[*]}) in $((SECONDS - start))s"
else
    echo "test.sh: FAILED with exit status $rc (${runner[*]}) after $((SECONDS - start))s"
fi
exit "$rc"
