# Process handling shared by bench/run.sh and bench/profile.sh; sourced after
# RUN (work dir with pids/ and logs/), TB (test bed dir) and LOG_TAG are set.
# STOP_SECONDS (default 10) is how long stop() waits before KILL.

log() { echo "[$LOG_TAG $(date +%T)] $*"; }
die() { echo "[$LOG_TAG $(date +%T)] ERROR: $*" >&2; exit 1; }

# start NAME ENV=VALUE... -- CMD ARGS...: runs in the background, PID in $RUN/pids/NAME.
start() {
    local name="$1"; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    env "${envs[@]}" "$@" </dev/null >>"$RUN/logs/$name.log" 2>&1 &
    echo $! >"$RUN/pids/$name"
}

pid_of() { cat "$RUN/pids/$1" 2>/dev/null || true; }

# stop NAME: TERM, up to STOP_SECONDS, then KILL; only that PID.
stop() {
    local name="$1" pid i
    pid="$(pid_of "$name")"
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 $((${STOP_SECONDS:-10} * 5))); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -f "$RUN/pids/$name"
}

# stop_all: every process started here, then the test bed.
stop_all() {
    local f
    for f in "$RUN"/pids/*; do
        [ -e "$f" ] && stop "$(basename "$f")"
    done
    scripts/testbed.sh down "$TB" >/dev/null 2>&1 || true
}

# wait_http URL [SECONDS] [PATTERN]: until the URL answers 200 (and contains PATTERN).
wait_http() {
    local url="$1" timeout="${2:-30}" pattern="${3:-}" t0=$SECONDS body
    while true; do
        if body="$(curl -fsS --max-time 2 "$url" 2>/dev/null)"; then
            if [ -z "$pattern" ] || [[ "$body" == *"$pattern"* ]]; then
                return 0
            fi
        fi
        ((SECONDS - t0 < timeout)) || die "$url did not answer${pattern:+ with $pattern} within ${timeout}s"
        sleep 0.2
    done
}

# free_ports N: N free TCP ports of 127.0.0.1, space-separated.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
