#!/usr/bin/env bash
# The project's single test command.
#
#   scripts/test.sh [extra args for the test runner]
#
# Runs `cargo xtask test` (xtask/src/test_run.rs): installs the test services
# if needed, builds the workspace's binaries, starts a private Redis +
# SecantusDB in a fresh state dir under target/, exports their environment
# (REDIS_URL, MONGO_URI, TESTBED_*, SECANTUSD, REDIS_SERVER), runs
#   cargo nextest run --workspace --all-targets   (if cargo-nextest is installed)
#   cargo test --workspace --all-targets          (otherwise)
# and always tears the services down again (logs stay when the run failed).
# Exits with the test runner's status. TEST_RUNNER=cargo forces `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo xtask test "$@"
