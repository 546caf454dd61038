#!/usr/bin/env bash
# Local test services for redis-mongo-cache: a private redis-server and a
# SecantusDB (MongoDB-compatible, one-node replica set "secantus") on free ports.
#
#   scripts/testbed.sh install        venv .venv-secantus/ with SecantusDB; check redis-server,
#                                     chromium and chromedriver (apt-get installs them as root)
#   scripts/testbed.sh up     [DIR]   start both (state dir, default target/testbed), write DIR/env
#   scripts/testbed.sh status [DIR]   show what runs in DIR
#   scripts/testbed.sh down   [DIR]   stop both (by PID only) and remove their data
#
# The system Redis on 127.0.0.1:6379 is never used or touched.
# Optional environment:
#   TESTBED_START_TIMEOUT    seconds to wait for each service (default 30)
#   TESTBED_SECANTUS_ARGS    extra secantusd-py flags (word-split), e.g. "--log-level DEBUG"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECANTUS_VERSION="0.7.0b3"
VENV="$ROOT/.venv-secantus"
VENV_PY="$VENV/bin/python"
SECANTUSD_BIN="$VENV/bin/secantusd-py"
START_TIMEOUT="${TESTBED_START_TIMEOUT:-30}"

log() { echo "testbed: $*"; }
die() { echo "testbed: ERROR: $*" >&2; exit 1; }

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- helpers
abs_dir() {
    # absolute path of the state dir (created if needed)
    local d="${1:-$ROOT/target/testbed}"
    [ -n "$d" ] || die "empty state dir"
    mkdir -p "$d"
    (cd "$d" && pwd)
}

# single-quote a value for the env file
shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# pid_alive PID NAME: the process exists, is not a zombie and its command line
# mentions NAME (guards against a recycled PID).
pid_alive() {
    local pid="$1" name="$2" stat cmdline
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [ -r "/proc/$pid/stat" ]; then
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
        stat="${stat##*) }"
        [ "${stat%% *}" != "Z" ] || return 1
        cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
        [[ "$cmdline" == *"$name"* ]] || return 1
    fi
    return 0
}

read_pid() {
    if [ -f "$1" ]; then tr -dc '0-9' <"$1"; fi
}

# stop_pidfile FILE NAME: TERM, wait up to 10 s, then KILL. Only that PID.
stop_pidfile() {
    local file="$1" name="$2" pid i
    pid="$(read_pid "$file")"
    if [ -n "$pid" ] && pid_alive "$pid" "$name"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            pid_alive "$pid" "$name" || break
            sleep 0.2
        done
        if pid_alive "$pid" "$name"; then
            log "$name (pid $pid) still alive after 10 s, sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            for i in $(seq 1 25); do
                pid_alive "$pid" "$name" || break
                sleep 0.2
            done
        fi
        pid_alive "$pid" "$name" && echo "testbed: WARNING: $name (pid $pid) did not exit" >&2
    elif [ -n "$pid" ]; then
        log "$name (pid $pid) is not running"
    fi
    rm -f "$file"
}

redis_cli_bin() { command -v redis-cli 2>/dev/null || true; }

redis_ping() {
    local port="$1" cli
    cli="$(redis_cli_bin)"
    if [ -n "$cli" ]; then
        [ "$("$cli" -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = "PONG" ]
    else
        python3 - "$port" <<'EOF'
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
        s.sendall(b"PING\r\n")
        sys.exit(0 if s.recv(64).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
EOF
    fi
}

mongo_ping() {
    # mongo_ping PORT [PID TIMEOUT]: TCP connect + pymongo ping, retried until TIMEOUT.
    "$VENV_PY" - "$@" <<'EOF'
import os, socket, sys, time
port = int(sys.argv[1])
pid = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] else None
deadline = time.monotonic() + (float(sys.argv[3]) if len(sys.argv) > 3 else 2.0)
import pymongo
uri = f"mongodb://127.0.0.1:{port}/?replicaSet=secantus&retryWrites=false"
last = "no attempt"
while True:
    if pid is not None:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                dead = f.read().rsplit(") ", 1)[1].startswith("Z")
        except OSError:
            dead = True
        if dead:
            print(f"secantusd (pid {pid}) exited", file=sys.stderr)
            sys.exit(2)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
        c = pymongo.MongoClient(uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=1000)
        try:
            c.admin.command("ping")
            sys.exit(0)
        finally:
            c.close()
    except Exception as e:  # noqa: BLE001 - report the last failure
        last = f"{type(e).__name__}: {e}"
    if time.monotonic() >= deadline:
        print(f"no ping answer from 127.0.0.1:{port}: {last}", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.2)
EOF
}

free_ports() {
    # two distinct free TCP ports on 127.0.0.1 (both bound at once, then released)
    python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

installed_secantus_version() {
    [ -x "$SECANTUSD_BIN" ] && [ -x "$VENV_PY" ] || return 1
    "$VENV_PY" -c 'import importlib.metadata as m; print(m.version("SecantusDB"))' 2>/dev/null
}

show_log_tail() {
    local f="$1"
    echo "----- last 40 lines of $f -----" >&2
    tail -n 40 "$f" >&2 2>/dev/null || echo "(no log)" >&2
    echo "-----" >&2
}

# ---------------------------------------------------------------- install
cmd_install() {
    log "install: checking SecantusDB $SECANTUS_VERSION in $VENV"
    local have
    have="$(installed_secantus_version || true)"
    if [ "$have" = "$SECANTUS_VERSION" ]; then
        log "SecantusDB $have already installed ($SECANTUSD_BIN)"
    else
        [ -n "$have" ] && log "found SecantusDB '$have', want $SECANTUS_VERSION: reinstalling"
        command -v python3 >/dev/null || die "python3 not found (needed for the SecantusDB virtualenv)"
        if [ ! -x "$VENV_PY" ]; then
            log "creating virtualenv $VENV"
            if ! python3 -m venv "$VENV"; then
                rm -rf "$VENV"
                if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                    log "python3 -m venv failed; installing Debian's python3-venv"
                    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
                    python3 -m venv "$VENV" || die "could not create $VENV"
                else
                    die "python3 -m venv failed; install python3-venv"
                fi
            fi
        fi
        log "pip install SecantusDB==$SECANTUS_VERSION (this takes a minute the first time)"
        "$VENV_PY" -m pip install --disable-pip-version-check --no-input --progress-bar off \
            "SecantusDB==$SECANTUS_VERSION"
        # keep the venv out of git without touching the project's .gitignore
        [ -f "$VENV/.gitignore" ] || echo '*' >"$VENV/.gitignore"
        have="$(installed_secantus_version || true)"
        [ "$have" = "$SECANTUS_VERSION" ] || die "SecantusDB install did not produce $SECANTUSD_BIN ($have)"
        log "SecantusDB $have installed"
    fi

    log "install: checking redis-server"
    if ! command -v redis-server >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            log "redis-server missing; apt-get install redis-server"
            apt-get update
            DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
        else
            die "redis-server is not installed and we are not root: install Debian's redis-server package"
        fi
    fi
    log "redis-server: $(command -v redis-server) ($(redis-server --version | awk '{print $3}'))"
    [ -n "$(redis_cli_bin)" ] || log "note: redis-cli not found; pings use a python fallback"

    # The API's documentation pages are tested in a real headless browser
    # (services/api/tests/it/docs.rs), driven through chromedriver.
    log "install: checking chromium and chromedriver"
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            log "chromium or chromedriver missing; apt-get install chromium chromium-driver"
            apt-get update
            DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver
        else
            log "WARNING: chromium/chromedriver missing and we are not root: the browser test will fail;" \
                "install Debian's chromium and chromium-driver packages"
        fi
    fi
    if command -v chromedriver >/dev/null; then
        log "chromedriver: $(command -v chromedriver) ($(chromedriver --version 2>/dev/null | awk '{print $2}'))"
    fi
    log "install: done"
}

# ---------------------------------------------------------------- up
cmd_up() {
    local dir; dir="$(abs_dir "${1:-}")"
    [ -x "$SECANTUSD_BIN" ] || die "$SECANTUSD_BIN missing: run 'scripts/testbed.sh install' first"
    command -v redis-server >/dev/null || die "redis-server missing: run 'scripts/testbed.sh install' first"
    local redis_server; redis_server="$(command -v redis-server)"

    local rpid mpid
    rpid="$(read_pid "$dir/redis.pid")"
    mpid="$(read_pid "$dir/mongo.pid")"
    if [ -n "$rpid" ] && [ -n "$mpid" ] && [ -f "$dir/env" ] \
        && pid_alive "$rpid" redis-server && pid_alive "$mpid" secantusd; then
        log "testbed already up in $dir (redis pid $rpid, secantusd pid $mpid): reusing it"
        cat "$dir/env"
        return 0
    fi
    if [ -n "$rpid$mpid" ]; then
        log "stale or partial testbed in $dir: cleaning it up first"
        cmd_down "$dir"
    fi

    local ports redis_port mongo_port
    ports="$(free_ports)"
    redis_port="${ports% *}"
    mongo_port="${ports#* }"
    log "state dir $dir; redis port $redis_port; SecantusDB port $mongo_port"

    # Start both first, then wait: SecantusDB's start-up overlaps with Redis'.
    mkdir -p "$dir/redis-data" "$dir/mongo-data"
    rm -f "$dir/env"
    log "starting redis-server"
    "$redis_server" --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
        --daemonize no --dir "$dir/redis-data" \
        </dev/null >"$dir/redis.log" 2>&1 &
    echo $! >"$dir/redis.pid"

    # An explicit --config file stops secantusd-py from auto-discovering
    # ./secantusd.toml or ~/.secantus/secantusd.toml.
    # (Its TTL sweeper runs every 60 s; [storage] ttl_sweep_seconds is accepted
    # there but not applied by secantusd-py 0.7.0b3, so tests that need expiry now
    # run the admin command {"secantusAdmin.pruneTtl": 1}; see TESTING.md.)
    cat >"$dir/secantusd.toml" <<EOF
# written by scripts/testbed.sh; settings come from command-line flags
EOF
    log "starting SecantusDB ($SECANTUSD_BIN)"
    local extra=()
    if [ -n "${TESTBED_SECANTUS_ARGS:-}" ]; then
        read -r -a extra <<<"$TESTBED_SECANTUS_ARGS"
    fi
    "$SECANTUSD_BIN" --config "$dir/secantusd.toml" --host 127.0.0.1 --port "$mongo_port" \
        --storage-path "$dir/mongo-data" --sync-on-commit ${extra[@]+"${extra[@]}"} \
        </dev/null >"$dir/mongo.log" 2>&1 &
    echo $! >"$dir/mongo.pid"

    local t0 i
    t0=$SECONDS
    log "waiting for redis-server (up to ${START_TIMEOUT}s)"
    rpid="$(read_pid "$dir/redis.pid")"
    for ((i = 0; ; i++)); do
        if ! pid_alive "$rpid" redis-server; then
            show_log_tail "$dir/redis.log"
            cmd_down "$dir" >/dev/null 2>&1 || true
            die "redis-server exited during start-up (log above: $dir/redis.log)"
        fi
        redis_ping "$redis_port" && break
        if ((SECONDS - t0 >= START_TIMEOUT)); then
            show_log_tail "$dir/redis.log"
            cmd_down "$dir" >/dev/null 2>&1 || true
            die "redis-server did not answer PING on 127.0.0.1:$redis_port within ${START_TIMEOUT}s"
        fi
        sleep 0.1
    done
    log "redis-server ready"

    log "waiting for SecantusDB (up to ${START_TIMEOUT}s)"
    mpid="$(read_pid "$dir/mongo.pid")"
    local left=$((START_TIMEOUT - (SECONDS - t0)))
    ((left >= 5)) || left=5
    local prc=0
    mongo_ping "$mongo_port" "$mpid" "$left" || prc=$?
    if ((prc != 0)); then
        show_log_tail "$dir/mongo.log"
        cmd_down "$dir" >/dev/null 2>&1 || true
        if ((prc == 2)); then
            die "SecantusDB exited during start-up (log above: $dir/mongo.log)"
        fi
        die "SecantusDB did not answer ping on 127.0.0.1:$mongo_port within ${START_TIMEOUT}s (log above: $dir/mongo.log)"
    fi
    log "SecantusDB ready after $((SECONDS - t0))s"

    {
        echo "# written by scripts/testbed.sh up; source it (set -a) to use the testbed"
        echo "export REDIS_URL=$(shq "redis://127.0.0.1:$redis_port/0")"
        echo "export MONGO_URI=$(shq "mongodb://127.0.0.1:$mongo_port/?replicaSet=secantus&retryWrites=false")"
        echo "export TESTBED_REDIS_PORT=$redis_port"
        echo "export TESTBED_MONGO_PORT=$mongo_port"
        echo "export TESTBED_DIR=$(shq "$dir")"
        echo "export SECANTUSD=$(shq "$SECANTUSD_BIN")"
        echo "export REDIS_SERVER=$(shq "$redis_server")"
        echo "export TESTBED_PYTHON=$(shq "$VENV_PY")"
    } >"$dir/env.tmp"
    mv "$dir/env.tmp" "$dir/env"
    log "testbed up; environment in $dir/env:"
    cat "$dir/env"
}

# ---------------------------------------------------------------- down
cmd_down() {
    local dir="${1:-$ROOT/target/testbed}"
    if [ ! -d "$dir" ]; then
        log "no state dir $dir: nothing to stop"
        return 0
    fi
    dir="$(cd "$dir" && pwd)"
    stop_pidfile "$dir/mongo.pid" secantusd
    stop_pidfile "$dir/redis.pid" redis-server
    rm -rf "$dir/mongo-data" "$dir/redis-data"
    rm -f "$dir/env" "$dir/env.tmp" "$dir/secantusd.toml"
    log "testbed in $dir is down (logs kept: $dir/*.log)"
}

# ---------------------------------------------------------------- status
cmd_status() {
    local dir="${1:-$ROOT/target/testbed}"
    if [ ! -d "$dir" ]; then
        log "no testbed in $dir"
        return 1
    fi
    dir="$(cd "$dir" && pwd)"
    local ok=0 rpid mpid rport="" mport=""
    if [ -f "$dir/env" ]; then
        rport="$(sed -n 's/^export TESTBED_REDIS_PORT=//p' "$dir/env")"
        mport="$(sed -n 's/^export TESTBED_MONGO_PORT=//p' "$dir/env")"
    fi
    rpid="$(read_pid "$dir/redis.pid")"
    mpid="$(read_pid "$dir/mongo.pid")"
    if [ -n "$rpid" ] && pid_alive "$rpid" redis-server; then
        if [ -n "$rport" ] && redis_ping "$rport"; then
            echo "redis-server: running, pid $rpid, 127.0.0.1:$rport, PING ok"
        else
            echo "redis-server: pid $rpid alive but no PING answer (port ${rport:-unknown})"
            ok=1
        fi
    else
        echo "redis-server: not running${rpid:+ (stale pid $rpid)}"
        ok=1
    fi
    if [ -n "$mpid" ] && pid_alive "$mpid" secantusd; then
        if [ -n "$mport" ] && [ -x "$VENV_PY" ] && mongo_ping "$mport" "" 3 2>/dev/null; then
            echo "SecantusDB:   running, pid $mpid, 127.0.0.1:$mport, ping ok"
        else
            echo "SecantusDB:   pid $mpid alive but no ping answer (port ${mport:-unknown})"
            ok=1
        fi
    else
        echo "SecantusDB:   not running${mpid:+ (stale pid $mpid)}"
        ok=1
    fi
    if [ -f "$dir/env" ]; then
        echo "env file: $dir/env"
        cat "$dir/env"
    fi
    return $ok
}

main() {
    local cmd="${1:-}"
    shift || true
    case "$cmd" in
        install) cmd_install "$@" ;;
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        status) cmd_status "$@" ;;
        -h | --help | help) usage ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
