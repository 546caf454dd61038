#!/usr/bin/env bash
# quickstart.sh: the whole redis-mongo-cache system on this machine, no Docker.
#
#   ./quickstart.sh [start] [--populate N] [--no-build]   install what is missing, build, start in the background
#   ./quickstart.sh run     [--populate N] [--no-build]   the same in the foreground (Ctrl-C stops it)
#   ./quickstart.sh stop    [--purge]                      stop all it started (--purge: also delete its data)
#   ./quickstart.sh status                                 what runs, with health checks
#
# It runs `cargo xtask quickstart` (xtask/src/quickstart/; knobs: --help),
# built in the profile the services use (the running system's, else
# QUICKSTART_PROFILE, default release) so their dependencies compile once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v cargo >/dev/null \
    || { echo "==> ERROR: cargo not found: install Rust (https://rustup.rs), open a new shell, run again" >&2; exit 1; }
profile="$(sed -n 's/^QUICKSTART_PROFILE=//p' "${QS_STATE_DIR:-$ROOT/.quickstart}/env" 2>/dev/null || true)"
profile="${profile:-${QUICKSTART_PROFILE:-release}}"
release=()
[ "$profile" = debug ] || release=(--release)
exec cargo run ${release[@]+"${release[@]}"} --manifest-path "$ROOT/Cargo.toml" --bin xtask -- quickstart "$@"
