#!/usr/bin/env bash
# quickstart.sh: the whole redis-mongo-cache system on this machine, no Docker.
#
#   ./quickstart.sh [start] [--populate N] [--no-build]   install what is missing, build, start in the background
#   ./quickstart.sh run     [--populate N] [--no-build]   the same in the foreground (shows the logs; Ctrl-C stops it)
#   ./quickstart.sh stop    [--purge]                      stop all it started (--purge: also delete its data)
#   ./quickstart.sh status                                 what runs, with health checks
#
# It starts (logs in .quickstart/logs/, PIDs in .quickstart/pids/):
#   redis-server       127.0.0.1:6380    unless REDIS_URL is set (then that Redis is used)
#   SecantusDB         127.0.0.1:27018   unless MONGO_URI is set (a MongoDB stand-in in .venv-secantus/)
#   cache-invalidator  127.0.0.1:9100
#   cache-api          127.0.0.1:8001 (api-1) and 127.0.0.1:8002 (api-2)
# A .env file at the repo root is read first (set -a). The services get the
# variables of .env.example from the environment (LOG_FORMAT defaults to pretty).
#
# Knobs (environment variables):
#   QS_REDIS_PORT QS_MONGO_PORT QS_API1_PORT QS_API2_PORT QS_INVALIDATOR_PORT
#                        ports; a busy default port is replaced by a free one, a busy port you chose is an error
#   QUICKSTART_PROFILE   release (default) or debug: cargo profile and target/<profile>/ binaries
#                        (a first release build takes 10+ minutes on 2 cores; debug is quicker)
#   QS_START_TIMEOUT     seconds to wait for each service to become healthy (default 60)
#   QS_STOP_TIMEOUT      seconds between TERM and KILL on stop (default 10)
#   QS_STATE_DIR         state dir: pids/, logs/, data (default .quickstart)
#   QS_DOTENV=0          do not read .env
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
QS_DIR="${QS_STATE_DIR:-$ROOT/.quickstart}"
mkdir -p "$QS_DIR"
QS_DIR="$(cd "$QS_DIR" && pwd)"
PID_DIR="$QS_DIR/pids"
LOG_DIR="$QS_DIR/logs"
STATE_FILE="$QS_DIR/env"
VENV_PY="$ROOT/.venv-secantus/bin/python"
SECANTUSD_BIN="$ROOT/.venv-secantus/bin/secantusd-py"
START_TIMEOUT="${QS_START_TIMEOUT:-60}"
STOP_TIMEOUT="${QS_STOP_TIMEOUT:-10}"
# Start order; stop runs it backwards.
COMPONENTS=(redis mongo invalidator api-1 api-2)

log() { echo "==> $*"; }
say() { echo "    $*"; }
warn() { echo "==> WARNING: $*" >&2; }
die() {
    echo "==> ERROR: $*" >&2
    exit 1
}

# the header comment above
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }

# ------------------------------------------------------------------ processes

proc_name() {
    case "$1" in
        redis) echo redis-server ;;
        mongo) echo secantusd ;;
        invalidator) echo cache-invalidator ;;
        api-*) echo cache-api ;;
        *) die "unknown component $1" ;;
    esac
}

read_pid() { if [ -f "$1" ]; then tr -dc '0-9' <"$1"; fi; }

# Start time of PID in clock ticks since boot (field 22 of /proc/PID/stat).
start_time() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    # shellcheck disable=SC2086  # split the fields on purpose
    set -- $stat
    echo "${20}"
}

# proc_alive PID NAME [START]: PID runs (not a zombie), its command line
# mentions NAME and, when given, it started at START (not a recycled PID).
proc_alive() {
    local pid="$1" name="$2" want="${3:-}" stat cmdline
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [ -r "/proc/$pid/stat" ] || return 0
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != Z ] || return 1
    cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" || return 1
    [[ "$cmdline" == *"$name"* ]] || return 1
    [ -z "$want" ] || [ "$(start_time "$pid")" = "$want" ]
}

# running COMPONENT: prints its PID when its PID file names a live process.
running() {
    local pid start
    pid="$(read_pid "$PID_DIR/$1.pid")"
    [ -n "$pid" ] || return 1
    start="$(cat "$PID_DIR/$1.start" 2>/dev/null || true)"
    proc_alive "$pid" "$(proc_name "$1")" "$start" || return 1
    echo "$pid"
}

# spawn COMPONENT CMD...: starts CMD in its own session (so a Ctrl-C in this
# terminal does not reach it), output to logs/COMPONENT.log, PID to pids/.
spawn() {
    local comp="$1" pidfile="$PID_DIR/$1.pid" logfile="$LOG_DIR/$1.log" i pid
    shift
    mkdir -p "$PID_DIR" "$LOG_DIR"
    [ ! -f "$logfile" ] || mv -f "$logfile" "$logfile.1"
    rm -f "$pidfile" "$pidfile.new" "$PID_DIR/$comp.start"
    local setsid=()
    if command -v setsid >/dev/null; then setsid=(setsid); fi
    # Listed before it exists, and Ctrl-C/TERM held back until its PID is
    # written, so an interruption always stops it too (EXIT trap).
    STARTED+=("$comp")
    PENDING_SIGNAL=""
    trap 'PENDING_SIGNAL=130' INT
    trap 'PENDING_SIGNAL=143' TERM
    # The inner shell writes its own PID and execs the service, so the PID is
    # the service's also where setsid has to fork.
    # shellcheck disable=SC2016  # $$ and $@ belong to the inner shell
    ${setsid[@]+"${setsid[@]}"} bash -c 'echo $$ >"$0.new"; exec "$@"' "$pidfile" "$@" \
        </dev/null >"$logfile" 2>&1 8>&- 9>&- &
    echo "$!" >"$pidfile"
    trap 'exit 130' INT
    trap 'exit 143' TERM
    [ -z "$PENDING_SIGNAL" ] || exit "$PENDING_SIGNAL"
    # no "Killed" job notice from bash if it dies while this script runs
    disown $! 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        [ -s "$pidfile.new" ] && break
        sleep 0.1
    done
    pid="$(read_pid "$pidfile.new")"
    if [ -n "$pid" ]; then echo "$pid" >"$pidfile"; fi
    rm -f "$pidfile.new"
    pid="$(read_pid "$pidfile")"
    start_time "$pid" >"$PID_DIR/$comp.start" 2>/dev/null || true
}

# stop_component COMPONENT: TERM, wait STOP_TIMEOUT, then KILL. Only its PID.
stop_component() {
    local comp="$1" name pid i
    name="$(proc_name "$comp")"
    pid="$(read_pid "$PID_DIR/$comp.pid")"
    if pid="$(running "$comp")"; then
        log "stopping $comp (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
            proc_alive "$pid" "$name" || break
            sleep 0.1
        done
        if proc_alive "$pid" "$name"; then
            warn "$comp (pid $pid) still running after ${STOP_TIMEOUT}s: sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                proc_alive "$pid" "$name" || break
                sleep 0.1
            done
            ! proc_alive "$pid" "$name" || warn "$comp (pid $pid) did not exit"
        fi
    elif [ -f "$PID_DIR/$comp.pid" ]; then
        say "$comp: not running (stale PID file removed)"
    fi
    rm -f "$PID_DIR/$comp.pid" "$PID_DIR/$comp.pid.new" "$PID_DIR/$comp.start"
}

# show_log_tail COMPONENT: its last 30 log lines, stack backtraces left out.
show_log_tail() {
    local f="$LOG_DIR/$1.log"
    echo "----- last lines of $f -----" >&2
    if [ -f "$f" ]; then
        awk '/^Stack backtrace:/ { skip = 1; line[n++] = "(stack backtrace left out)"; next }
             skip && /^$/ { skip = 0 }
             !skip { line[n++] = $0 }
             END { for (i = (n > 30 ? n - 30 : 0); i < n; i++) print line[i] }' "$f" >&2
    else
        echo "(no log)" >&2
    fi
    echo "-----" >&2
}

# ------------------------------------------------------------------ ports

# port_busy PORT: something is bound to 127.0.0.1:PORT (or to all addresses).
port_busy() {
    if command -v python3 >/dev/null; then
        python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)  # busy
finally:
    s.close()
sys.exit(1)
EOF
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

CHOSEN_PORTS=" "
# pick_port VAR DEFAULT LABEL: sets VAR to a free port (see the header).
pick_port() {
    local var="$1" default="$2" label="$3" given="${!1:-}" port i
    if [ -n "$given" ]; then
        if ! [[ "$given" =~ ^[0-9]+$ ]] || ((given < 1 || given > 65535)); then
            die "$var=$given is not a port"
        fi
        [[ "$CHOSEN_PORTS" != *" $given "* ]] || die "$var=$given: that port is already used for another service"
        port_busy "$given" && die "port $given ($var, for $label) is busy; choose another one"
        port="$given"
    else
        port="$default"
        if port_busy "$port" || [[ "$CHOSEN_PORTS" == *" $port "* ]]; then
            for ((i = 0; i < 20; i++)); do
                port="$(free_port)"
                [[ "$CHOSEN_PORTS" == *" $port "* ]] || break
            done
            log "port $default ($label) is busy: using $port instead (set $var to choose)"
        fi
    fi
    CHOSEN_PORTS+="$port "
    printf -v "$var" '%s' "$port"
}

# ------------------------------------------------------------------ health

redis_ping_port() {
    if command -v redis-cli >/dev/null; then
        [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]
    else
        local line=""
        {
            exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'PING\r\n' >&3 && read -r -t 2 line <&3
            exec 3>&-
        } 2>/dev/null || return 1
        [[ "$line" == +PONG* ]]
    fi
}

# mongo_ping URI [TIMEOUT [PID]]: pymongo ping, retried until TIMEOUT seconds;
# gives up early when PID exits. Exit 2: no Python with pymongo.
mongo_ping() {
    local py=""
    if [ -x "$VENV_PY" ]; then
        py="$VENV_PY"
    elif command -v python3 >/dev/null && python3 -c 'import pymongo' 2>/dev/null; then
        py="python3"
    else
        return 2
    fi
    "$py" - "$@" <<'EOF'
import os, sys, time
import pymongo
uri = sys.argv[1]
deadline = time.monotonic() + (float(sys.argv[2]) if len(sys.argv) > 2 else 5.0)
pid = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None
last = "no attempt"
while True:
    if pid is not None:
        try:
            os.kill(pid, 0)
        except OSError:
            print(f"process {pid} exited", file=sys.stderr)
            sys.exit(3)
    try:
        c = pymongo.MongoClient(uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=1000)
        try:
            c.admin.command("ping")
            sys.exit(0)
        finally:
            c.close()
    except Exception as e:  # noqa: BLE001 - report the last failure
        last = f"{type(e).__name__}: {e}"
    if time.monotonic() >= deadline:
        print(f"no ping answer: {last}", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.2)
EOF
}

http_ok() { curl -fsS -o /dev/null --max-time 3 "$1" 2>/dev/null; }

# fail_start COMPONENT MESSAGE: log tail, exit 1 (the EXIT trap stops what
# this run started).
fail_start() {
    show_log_tail "$1"
    echo "==> ERROR: $2" >&2
    exit 1
}

# wait_for COMPONENT CHECK...: until CHECK succeeds; fails if the process exits
# or START_TIMEOUT passes.
wait_for() {
    local comp="$1" t0=$SECONDS pid
    shift
    pid="$(read_pid "$PID_DIR/$comp.pid")"
    while true; do
        proc_alive "$pid" "$(proc_name "$comp")" \
            || fail_start "$comp" "$comp exited during start-up (log: $LOG_DIR/$comp.log)"
        "$@" && break
        ((SECONDS - t0 < START_TIMEOUT)) \
            || fail_start "$comp" "$comp not healthy after ${START_TIMEOUT}s (log: $LOG_DIR/$comp.log)"
        sleep 0.2
    done
    say "$comp is up (pid $pid, $((SECONDS - t0))s)"
}

# ------------------------------------------------------------------ state

shq() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

write_state() {
    {
        echo "# written by quickstart.sh; source it (set -a) to talk to the running system"
        echo "REDIS_URL=$(shq "$REDIS_URL")"
        echo "MONGO_URI=$(shq "$MONGO_URI")"
        echo "MONGO_DB=$(shq "$MONGO_DB")"
        echo "QS_OWN_REDIS=$OWN_REDIS"
        echo "QS_OWN_MONGO=$OWN_MONGO"
        echo "QS_REDIS_PORT=$QS_REDIS_PORT"
        echo "QS_MONGO_PORT=$QS_MONGO_PORT"
        echo "QS_INVALIDATOR_PORT=$QS_INVALIDATOR_PORT"
        echo "QS_API1_PORT=$QS_API1_PORT"
        echo "QS_API2_PORT=$QS_API2_PORT"
        echo "QUICKSTART_PROFILE=$PROFILE"
        echo "QS_BIN_DIR=$(shq "$BIN_DIR")"
    } >"$STATE_FILE.tmp"
    mv "$STATE_FILE.tmp" "$STATE_FILE"
}

# Which components this configuration runs.
wanted() {
    case "$1" in
        redis) [ "$OWN_REDIS" = 1 ] ;;
        mongo) [ "$OWN_MONGO" = 1 ] ;;
        *) return 0 ;;
    esac
}

any_running() {
    local c
    for c in "${COMPONENTS[@]}"; do
        running "$c" >/dev/null && return 0
    done
    return 1
}

port_of() {
    case "$1" in
        redis) echo "$QS_REDIS_PORT" ;;
        mongo) echo "$QS_MONGO_PORT" ;;
        invalidator) echo "$QS_INVALIDATOR_PORT" ;;
        api-1) echo "$QS_API1_PORT" ;;
        api-2) echo "$QS_API2_PORT" ;;
    esac
}

# ------------------------------------------------------------------ install / build

# ensure_tools NEED_REDIS NEED_MONGO: installs what the components to start need.
ensure_tools() {
    local need_redis="$1" need_mongo="$2" need=()
    command -v curl >/dev/null || need+=(curl)
    command -v python3 >/dev/null || need+=(python3 python3-venv)
    if [ "$need_redis" = 1 ] && ! command -v redis-server >/dev/null; then need+=(redis-server); fi
    if ((${#need[@]})); then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            log "installing ${need[*]} (apt-get)"
            apt-get update
            DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
        else
            die "missing: ${need[*]}. Install them (Debian/Ubuntu: sudo apt-get install ${need[*]}) and run again"
        fi
    fi
    if [ "$need_mongo" = 1 ]; then
        log "checking the MongoDB stand-in SecantusDB (.venv-secantus/)"
        "$ROOT/scripts/testbed.sh" install 2>&1 | sed -u 's/^/    /' \
            || die "scripts/testbed.sh install failed (output above)"
        [ -x "$SECANTUSD_BIN" ] || die "$SECANTUSD_BIN missing after scripts/testbed.sh install"
    fi
}

build() {
    local bins=(cache-api cache-invalidator cachectl) b missing=0
    for b in "${bins[@]}"; do [ -x "$BIN_DIR/$b" ] || missing=1; done
    if [ "$NO_BUILD" = 1 ]; then
        [ "$missing" = 0 ] || die "--no-build, but $BIN_DIR lacks ${bins[*]}: run without --no-build"
        log "--no-build: using the binaries in $BIN_DIR"
        return 0
    fi
    command -v cargo >/dev/null \
        || die "cargo not found: install Rust (https://rustup.rs), open a new shell, run again"
    local args=(build --bins)
    [ "$PROFILE" = release ] && args+=(--release)
    local note=""
    if [ "$missing" = 1 ]; then
        if [ "$PROFILE" = release ]; then
            note=" (a first release build takes 10+ minutes on 2 cores; QUICKSTART_PROFILE=debug is quicker)"
        else
            note=" (the first build takes a few minutes)"
        fi
    fi
    log "building ($PROFILE): cargo ${args[*]}$note"
    local t0=$SECONDS
    (cd "$ROOT" && cargo "${args[@]}") || die "cargo ${args[*]} failed"
    BUILD_SECONDS=$((SECONDS - t0))
    log "build done in ${BUILD_SECONDS}s"
}

# ------------------------------------------------------------------ start

# Resolves the configuration: the running set's (state file) while anything
# runs, else the environment plus defaults and free ports.
configure() {
    if [ -f "$STATE_FILE" ] && any_running; then
        local user_redis="${REDIS_URL:-}" user_mongo="${MONGO_URI:-}"
        # shellcheck disable=SC1090
        . "$STATE_FILE"
        OWN_REDIS="$QS_OWN_REDIS"
        OWN_MONGO="$QS_OWN_MONGO"
        if { [ -n "$user_redis" ] && [ "$user_redis" != "$REDIS_URL" ]; } \
            || { [ -n "$user_mongo" ] && [ "$user_mongo" != "$MONGO_URI" ]; }; then
            warn "keeping the settings of the running system (REDIS_URL/MONGO_URI differ); './quickstart.sh stop' first to change them"
        fi
        if [ -n "$USER_PROFILE" ] && [ "$USER_PROFILE" != "$QUICKSTART_PROFILE" ]; then
            warn "the running system uses profile $QUICKSTART_PROFILE, not $USER_PROFILE; keeping it"
        fi
        PROFILE="$QUICKSTART_PROFILE"
        BIN_DIR="$QS_BIN_DIR"
        REUSING=1
        return 0
    fi
    # Nothing runs: drop stale PID files and state.
    local c
    for c in "${COMPONENTS[@]}"; do
        if [ -f "$PID_DIR/$c.pid" ]; then
            say "removing stale PID file of $c"
        fi
        rm -f "$PID_DIR/$c.pid" "$PID_DIR/$c.pid.new" "$PID_DIR/$c.start"
    done
    rm -f "$STATE_FILE"
    OWN_REDIS=1
    OWN_MONGO=1
    [ -z "${REDIS_URL:-}" ] || OWN_REDIS=0
    [ -z "${MONGO_URI:-}" ] || OWN_MONGO=0
    REUSING=0
}

choose_ports() {
    if [ "$OWN_REDIS" = 1 ]; then
        pick_port QS_REDIS_PORT 6380 "Redis"
        REDIS_URL="redis://127.0.0.1:$QS_REDIS_PORT/0"
    else
        QS_REDIS_PORT=""
    fi
    if [ "$OWN_MONGO" = 1 ]; then
        pick_port QS_MONGO_PORT 27018 "SecantusDB"
        MONGO_URI="mongodb://127.0.0.1:$QS_MONGO_PORT/?replicaSet=secantus&retryWrites=false"
    else
        QS_MONGO_PORT=""
    fi
    pick_port QS_INVALIDATOR_PORT 9100 "cache-invalidator"
    pick_port QS_API1_PORT 8001 "cache-api api-1"
    pick_port QS_API2_PORT 8002 "cache-api api-2"
}

# Before starting anything against a Redis/MongoDB the user named: are they there?
check_external() {
    if [ "$OWN_REDIS" = 0 ]; then
        log "using your Redis: REDIS_URL=$REDIS_URL (from the $URL_ORIGIN)"
        if command -v redis-cli >/dev/null; then
            [ "$(redis-cli -u "$REDIS_URL" ping 2>/dev/null)" = PONG ] \
                || die "REDIS_URL=$REDIS_URL (from the $URL_ORIGIN) does not answer PING. Start that Redis, or unset REDIS_URL (also in .env) to let quickstart run its own"
            say "REDIS_URL answers PING"
        else
            say "redis-cli not found: not checking REDIS_URL beforehand"
        fi
    fi
    if [ "$OWN_MONGO" = 0 ]; then
        log "using your MongoDB: MONGO_URI=$MONGO_URI (from the $URL_ORIGIN)"
        local rc=0
        mongo_ping "$MONGO_URI" 5 >/dev/null 2>&1 || rc=$?
        case "$rc" in
            0) say "MONGO_URI answers ping" ;;
            2) say "no Python with pymongo: not checking MONGO_URI beforehand" ;;
            *) die "MONGO_URI=$MONGO_URI (from the $URL_ORIGIN) does not answer ping (a replica set is needed for change streams). Start that MongoDB, or unset MONGO_URI (also in .env) to let quickstart run SecantusDB" ;;
        esac
    fi
}

service_env() {
    SVC_ENV=(env "QUICKSTART_STATE_DIR=$QS_DIR" "REDIS_URL=$REDIS_URL" "MONGO_URI=$MONGO_URI"
        "MONGO_DB=$MONGO_DB" "LOG_FORMAT=${LOG_FORMAT:-pretty}")
    # Colours only where a terminal shows the logs (run mode); files stay plain.
    [ "${COLOR_LOGS:-0}" = 1 ] || SVC_ENV+=(NO_COLOR=1)
}

start_redis() {
    mkdir -p "$QS_DIR/redis-data"
    log "starting redis-server on 127.0.0.1:$QS_REDIS_PORT"
    spawn redis env "QUICKSTART_STATE_DIR=$QS_DIR" "$(command -v redis-server)" \
        --port "$QS_REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --daemonize no --dir "$QS_DIR/redis-data"
}

start_mongo() {
    mkdir -p "$QS_DIR/mongo-data"
    # An explicit (empty) --config stops secantusd-py from reading
    # ./secantusd.toml or ~/.secantus/secantusd.toml.
    echo "# written by quickstart.sh; settings come from command-line flags" >"$QS_DIR/secantusd.toml"
    log "starting SecantusDB on 127.0.0.1:$QS_MONGO_PORT (data in $QS_DIR/mongo-data)"
    spawn mongo env "QUICKSTART_STATE_DIR=$QS_DIR" "$SECANTUSD_BIN" --config "$QS_DIR/secantusd.toml" \
        --host 127.0.0.1 --port "$QS_MONGO_PORT" --storage-path "$QS_DIR/mongo-data" --sync-on-commit
}

start_app() {
    local comp="$1"
    service_env
    case "$comp" in
        invalidator)
            log "starting cache-invalidator on 127.0.0.1:$QS_INVALIDATOR_PORT"
            spawn invalidator "${SVC_ENV[@]}" "HTTP_ADDR=127.0.0.1:$QS_INVALIDATOR_PORT" \
                INSTANCE_ID=invalidator-1 "$BIN_DIR/cache-invalidator"
            ;;
        api-1 | api-2)
            local port
            port="$(port_of "$comp")"
            log "starting cache-api $comp on 127.0.0.1:$port"
            spawn "$comp" "${SVC_ENV[@]}" "HTTP_ADDR=127.0.0.1:$port" "INSTANCE_ID=$comp" "$BIN_DIR/cache-api"
            ;;
    esac
}

redis_healthy() { redis_ping_port "$QS_REDIS_PORT"; }
mongo_healthy() { mongo_ping "$MONGO_URI" 1 >/dev/null 2>&1; }
invalidator_healthy() { http_ok "http://127.0.0.1:$QS_INVALIDATOR_PORT/health"; }
api1_healthy() { http_ok "http://127.0.0.1:$QS_API1_PORT/api/health/"; }
api2_healthy() { http_ok "http://127.0.0.1:$QS_API2_PORT/api/health/"; }
health_check_of() {
    case "$1" in
        redis) echo redis_healthy ;;
        mongo) echo mongo_healthy ;;
        invalidator) echo invalidator_healthy ;;
        api-1) echo api1_healthy ;;
        api-2) echo api2_healthy ;;
    esac
}

# Stops, newest first, what this invocation started (after a failure or a signal).
stop_started() {
    local i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        stop_component "${STARTED[i]}"
    done
    STARTED=()
    if ! any_running; then rm -f "$STATE_FILE"; fi
}

# EXIT trap of start/run: unless start finished (START_DONE=1), stop what this
# invocation started, whatever ended it: an error, Ctrl-C, TERM, a dead service.
on_start_exit() {
    local status=$?
    trap '' INT TERM
    set +e
    # back to the real stdout/stderr: the signal may have come while a check
    # ran with its output sent to /dev/null
    exec 1>&8 2>&9
    [ -z "${TAIL_PID:-}" ] || kill "$TAIL_PID" 2>/dev/null
    if [ "${START_DONE:-0}" != 1 ] && ((${#STARTED[@]})); then
        echo >&2
        if ((status >= 128)); then
            warn "interrupted: stopping what this run started"
        else
            warn "stopping what this run started"
        fi
        stop_started
    fi
    exit "$status"
}

populate() {
    local n="$1"
    log "populating $n sample customers: $BIN_DIR/cachectl populate --count $n"
    service_env
    "${SVC_ENV[@]}" "$BIN_DIR/cachectl" populate --count "$n" || die "cachectl populate failed"
}

print_summary() {
    local a1="http://127.0.0.1:$QS_API1_PORT" a2="http://127.0.0.1:$QS_API2_PORT"
    local inv="http://127.0.0.1:$QS_INVALIDATOR_PORT"
    cat <<EOF

==> redis-mongo-cache is running
    API replicas   $a1  (api-1)   $a2  (api-2)
    Swagger UI     $a1/swagger/
    ReDoc          $a1/redoc/
    health         $a1/api/health/
    info           $a1/api/info/
    metrics        $a1/metrics
    invalidator    $inv/health   $inv/metrics
    REDIS_URL      $REDIS_URL$([ "$OWN_REDIS" = 1 ] && echo "  (quickstart's redis-server)" || echo "  (yours)")
    MONGO_URI      $MONGO_URI$([ "$OWN_MONGO" = 1 ] && echo "  (quickstart's SecantusDB)" || echo "  (yours)")
    MONGO_DB       $MONGO_DB
    logs           $LOG_DIR/
    environment    set -a; . $STATE_FILE; set +a    (then e.g. $BIN_DIR/cachectl populate --count 100)

    try:
      curl -s -X POST $a1/api/features/ -H 'content-type: application/json' \\
           -d '{"customer_id": "CUST00001", "features": {"credit_score": 720, "segment": "gold"}}'
      curl -s $a1/api/features/CUST00001/     # "source" names the tier that answered
      curl -s $a2/api/features/CUST00001/     # the other replica
      curl -s $a1/api/health/
      ./quickstart.sh status

    stop:  ./quickstart.sh stop
EOF
}

cmd_start() {
    local mode="$1" n_populate="" arg
    shift
    NO_BUILD=0
    while (($#)); do
        arg="$1"
        case "$arg" in
            --no-build) NO_BUILD=1 ;;
            --populate)
                [ $# -ge 2 ] || die "--populate needs a number"
                n_populate="$2"
                shift
                ;;
            --populate=*) n_populate="${arg#--populate=}" ;;
            -h | --help)
                usage
                exit 0
                ;;
            *) die "unknown option $arg (see ./quickstart.sh --help)" ;;
        esac
        shift
    done
    [ -z "$n_populate" ] || [[ "$n_populate" =~ ^[1-9][0-9]*$ ]] || die "--populate wants a positive number, got '$n_populate'"

    STARTED=()
    START_DONE=0
    COLOR_LOGS=0
    if [ "$mode" = run ] && [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then COLOR_LOGS=1; fi
    exec 8>&1 9>&2 # for on_start_exit
    trap on_start_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local t_all=$SECONDS
    BUILD_SECONDS=""
    configure

    local c pid missing=()
    for c in "${COMPONENTS[@]}"; do
        wanted "$c" || continue
        if pid="$(running "$c")"; then
            log "$c is already running (pid $pid, port $(port_of "$c"))"
        else
            [ ! -f "$PID_DIR/$c.pid" ] || say "removing stale PID file of $c"
            rm -f "$PID_DIR/$c.pid" "$PID_DIR/$c.start"
            missing+=("$c")
        fi
    done
    if ((${#missing[@]} == 0)); then
        log "everything is already running: nothing started"
    else
        if [ "$REUSING" = 1 ]; then
            log "starting the missing part: ${missing[*]}"
            for c in "${missing[@]}"; do
                ! port_busy "$(port_of "$c")" \
                    || die "port $(port_of "$c") of $c is taken by another process; run './quickstart.sh stop' and start again"
            done
        fi
        local need_app=0 need_redis=0 need_mongo=0
        for c in "${missing[@]}"; do
            case "$c" in
                redis) need_redis=1 ;;
                mongo) need_mongo=1 ;;
                *) need_app=1 ;;
            esac
        done
        ensure_tools "$need_redis" "$need_mongo"
        [ "$need_app" = 0 ] || build
        [ "$REUSING" = 1 ] || {
            choose_ports
            check_external
        }
        write_state

        local t_start=$SECONDS
        # Redis and SecantusDB start together; then the apps, then all are awaited.
        for c in redis mongo; do
            [[ " ${missing[*]} " == *" $c "* ]] || continue
            "start_$c"
        done
        for c in redis mongo; do
            [[ " ${missing[*]} " == *" $c "* ]] || continue
            wait_for "$c" "$(health_check_of "$c")"
        done
        for c in invalidator api-1 api-2; do
            [[ " ${missing[*]} " == *" $c "* ]] || continue
            start_app "$c"
        done
        for c in invalidator api-1 api-2; do
            [[ " ${missing[*]} " == *" $c "* ]] || continue
            wait_for "$c" "$(health_check_of "$c")"
        done
        log "started ${STARTED[*]} in $((SECONDS - t_start))s${BUILD_SECONDS:+ (build ${BUILD_SECONDS}s)}; total $((SECONDS - t_all))s"
    fi

    [ -z "$n_populate" ] || populate "$n_populate"
    print_summary

    if [ "$mode" = run ]; then
        follow_logs
    fi
    START_DONE=1
}

# follow COMPONENT...: their new log lines, prefixed with the component, in
# the background (TAIL_PID); tail ends by itself once this script has exited.
follow() {
    local files=() c
    for c in "$@"; do files+=("$LOG_DIR/$c.log"); done
    tail -n 0 -F --pid=$$ "${files[@]}" 2>/dev/null | awk '
        /^==> .* <==$/ { name = $2; sub(/.*\//, "", name); sub(/\.log$/, "", name); next }
        /^$/ { next }
        { printf "%-11s | %s\n", name, $0; fflush() }' &
    TAIL_PID=$!
}

# Foreground mode: show the logs; Ctrl-C or TERM stops what this run started.
follow_logs() {
    local c pid
    if ((${#STARTED[@]} == 0)); then
        log "all was started earlier by './quickstart.sh start': showing the logs; Ctrl-C stops showing, './quickstart.sh stop' stops the services"
        START_DONE=1
        trap 'exit 0' INT TERM
        local all=()
        for c in "${COMPONENTS[@]}"; do [ ! -f "$LOG_DIR/$c.log" ] || all+=("$c"); done
        follow "${all[@]}"
        wait "$TAIL_PID" || true
        exit 0
    fi
    log "running in the foreground; Ctrl-C stops everything started here (${STARTED[*]})"
    follow "${STARTED[@]}"
    while true; do
        for c in "${STARTED[@]}"; do
            if ! pid="$(running "$c")"; then
                sleep 0.5
                kill "$TAIL_PID" 2>/dev/null || true
                TAIL_PID=""
                show_log_tail "$c"
                warn "$c exited"
                exit 1
            fi
        done
        sleep 1 &
        wait $! || true
    done
}

# ------------------------------------------------------------------ stop / status

cmd_stop() {
    local purge=0
    while (($#)); do
        case "$1" in
            --purge) purge=1 ;;
            *) die "unknown option $1 for stop (only --purge)" ;;
        esac
        shift
    done
    local i any=0
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
        [ -f "$PID_DIR/${COMPONENTS[i]}.pid" ] || continue
        any=1
        stop_component "${COMPONENTS[i]}"
    done
    [ "$any" = 1 ] || log "nothing to stop (no PID files in $PID_DIR)"
    rm -f "$STATE_FILE"
    if [ "$purge" = 1 ]; then
        rm -rf "$QS_DIR/mongo-data" "$QS_DIR/redis-data"
        log "deleted $QS_DIR/mongo-data and redis-data"
    fi
    log "stopped (logs kept in $LOG_DIR/)"
}

cmd_status() {
    local c
    if [ ! -f "$STATE_FILE" ] && ! any_running; then
        log "not running (./quickstart.sh start)"
        for c in "${COMPONENTS[@]}"; do
            [ ! -f "$PID_DIR/$c.pid" ] || say "stale PID file: $PID_DIR/$c.pid"
        done
        return 3
    fi
    if [ -f "$STATE_FILE" ]; then
        # shellcheck disable=SC1090
        . "$STATE_FILE"
    fi
    OWN_REDIS="${QS_OWN_REDIS:-1}" OWN_MONGO="${QS_OWN_MONGO:-1}"
    : "${QS_REDIS_PORT:=?}" "${QS_MONGO_PORT:=?}" "${QS_INVALIDATOR_PORT:=?}" "${QS_API1_PORT:=?}" "${QS_API2_PORT:=?}"
    : "${REDIS_URL:=?}" "${MONGO_URI:=?}"
    log "quickstart in $QS_DIR (profile ${QUICKSTART_PROFILE:-?})"
    local c pid ok=0 health url
    for c in "${COMPONENTS[@]}"; do
        if ! wanted "$c"; then
            case "$c" in
                redis) printf '    %-12s %s\n' redis "external: $REDIS_URL" ;;
                mongo) printf '    %-12s %s\n' mongo "external: $MONGO_URI" ;;
            esac
            continue
        fi
        if pid="$(running "$c")"; then
            case "$c" in
                redis) url="127.0.0.1:$QS_REDIS_PORT" ;;
                mongo) url="127.0.0.1:$QS_MONGO_PORT" ;;
                invalidator) url="http://127.0.0.1:$QS_INVALIDATOR_PORT/health" ;;
                *) url="http://127.0.0.1:$(port_of "$c")/api/health/" ;;
            esac
            if "$(health_check_of "$c")"; then health="healthy"; else
                health="NOT healthy"
                ok=1
            fi
            printf '    %-12s running  pid %-7s %-40s %s\n' "$c" "$pid" "$url" "$health"
        else
            printf '    %-12s NOT running%s\n' "$c" "$([ -f "$PID_DIR/$c.pid" ] && echo ' (stale PID file)')"
            ok=1
        fi
    done
    [ "$ok" = 0 ] || say "('./quickstart.sh start' starts what is missing; './quickstart.sh stop' stops the rest)"
    return "$ok"
}

# ------------------------------------------------------------------ main

main() {
    local cmd="${1:-start}"
    case "$cmd" in
        start | run | stop | status) [ $# -eq 0 ] || shift ;;
        -h | --help | help)
            usage
            exit 0
            ;;
        -*) cmd=start ;;
        *)
            usage >&2
            exit 2
            ;;
    esac

    if [ "$cmd" = start ] || [ "$cmd" = run ]; then
        URL_ORIGIN="environment"
        if [ "${QS_DOTENV:-1}" != 0 ] && [ -f "$ROOT/.env" ]; then
            local had="${REDIS_URL:+r}${MONGO_URI:+m}"
            log "reading $ROOT/.env"
            set -a
            # shellcheck disable=SC1091
            . "$ROOT/.env"
            set +a
            [ "${REDIS_URL:+r}${MONGO_URI:+m}" = "$had" ] || URL_ORIGIN="environment or .env"
        fi
        USER_PROFILE="${QUICKSTART_PROFILE:-}"
        PROFILE="${USER_PROFILE:-release}"
        case "$PROFILE" in
            release | debug) ;;
            *) die "QUICKSTART_PROFILE=$PROFILE: want release or debug" ;;
        esac
        BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
        case "$BIN_DIR" in /*) ;; *) BIN_DIR="$ROOT/$BIN_DIR" ;; esac
        MONGO_DB="${MONGO_DB:-cache_demo}"
        mkdir -p "$PID_DIR" "$LOG_DIR"
        # keep the state dir out of git without touching .gitignore
        [ -f "$QS_DIR/.gitignore" ] || echo '*' >"$QS_DIR/.gitignore"
    fi
    case "$cmd" in
        start | run) cmd_start "$cmd" "$@" ;;
        stop) cmd_stop "$@" ;;
        status) cmd_status ;;
    esac
}

main "$@"
