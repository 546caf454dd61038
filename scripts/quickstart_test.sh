#!/usr/bin/env bash
# End-to-end test of ./quickstart.sh (run by CI, also by hand):
#
#   scripts/quickstart_test.sh
#
# start (build included) -> both replicas healthy -> POST on replica 1 -> GET on
# both -> direct MongoDB writes (with and without a new version) reach both
# replicas -> a second start starts nothing -> stop leaves nothing running ->
# a start with a busy port fails cleanly. Prints "N passed, M failed"; exits
# non-zero on any failure. Always stops what it started.
#
# It never uses the default ports: it picks free ones (override with QS_REDIS_PORT,
# QS_MONGO_PORT, QS_INVALIDATOR_PORT, QS_API1_PORT, QS_API2_PORT) and its own state
# dir (QS_STATE_DIR, default target/quickstart-test). QUICKSTART_PROFILE=debug
# uses a debug build (what CI does: scripts/test.sh has built most of it already).
# Ignores .env and the caller's REDIS_URL/MONGO_URI: it always runs its own servers.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QS="$ROOT/quickstart.sh"
export QS_STATE_DIR="${QS_STATE_DIR:-$ROOT/target/quickstart-test}"
export QUICKSTART_PROFILE="${QUICKSTART_PROFILE:-release}"
export QS_DOTENV=0
export QS_START_TIMEOUT="${QS_START_TIMEOUT:-90}"
# Hermetic: none of the caller's service settings leak in.
unset REDIS_URL REDIS_HOST REDIS_PORT REDIS_DB REDIS_PASSWORD MONGO_URI MONGO_DB \
    MONGO_COLLECTION CONFIG_FILE HTTP_ADDR INSTANCE_ID LOCAL_CACHE_ENABLED \
    LOCAL_CACHE_TTL_MS INVALIDATION_MODE OTEL_EXPORTER_OTLP_ENDPOINT
POLL_SECONDS=10

PASSED=0
FAILED=0
STARTED=0
HOLDER_PID=""
t_begin=$SECONDS

say() { echo "quickstart_test: $*"; }
pass() {
    PASSED=$((PASSED + 1))
    echo "ok   - $*"
}
fail() {
    FAILED=$((FAILED + 1))
    echo "FAIL - $*"
}
# check DESCRIPTION CMD...: one assertion.
check() {
    local what="$1"
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}

# shellcheck disable=SC2317  # invoked by the trap
finish() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$HOLDER_PID" ]; then
        kill "$HOLDER_PID" 2>/dev/null || true
        wait "$HOLDER_PID" 2>/dev/null || true
    fi
    if [ "$STARTED" = 1 ]; then
        if ((FAILED > 0 || status != 0)); then
            say "logs of the failed run (last lines):"
            local f
            for f in "$QS_STATE_DIR"/logs/*.log; do
                [ -f "$f" ] || continue
                echo "----- $f"
                tail -n 15 "$f"
            done
        fi
        "$QS" stop >/dev/null 2>&1 || echo "quickstart_test: WARNING: ./quickstart.sh stop failed" >&2
    fi
    if ((status != 0 && FAILED == 0)); then FAILED=1; fi
    echo
    echo "quickstart_test: $PASSED passed, $FAILED failed ($((SECONDS - t_begin))s)"
    ((FAILED == 0)) || exit 1
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ helpers

# Five distinct free ports, bound at the same time so they differ.
free_ports() {
    python3 - <<'EOF'
import socket
socks = []
for _ in range(5):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# alive PID: exists and is not a zombie (an exited child waits for init to reap it).
alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != Z ]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Processes of this state dir: the services carry QUICKSTART_STATE_DIR in their
# environment; redis-server rewrites that memory, so it is found by its port.
our_pids() {
    python3 - "$QS_STATE_DIR" "${QS_REDIS_PORT:-}" <<'EOF'
import os, re, sys
marker = f"QUICKSTART_STATE_DIR={sys.argv[1]}".encode()
redis = re.compile(rb"(^|/)redis-server 127\.0\.0\.1:%s(?![0-9])" % sys.argv[2].encode()) if sys.argv[2] else None
found = []
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
        continue
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b") ", 1)[1].startswith(b"Z"):
                continue
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        continue
    if marker in env or (redis and redis.search(cmd.split(b"\0")[0])):
        found.append(pid)
print(" ".join(sorted(found, key=int)))
EOF
}

pid_files() {
    local f
    for f in "$QS_STATE_DIR"/pids/*.pid; do
        [ -f "$f" ] && printf '%s=%s ' "$(basename "$f" .pid)" "$(cat "$f")"
    done
    echo
}

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" || true; }

# doc PORT: "version credit_score segment source" of the test document (or "").
doc() {
    curl -fsS --max-time 5 "http://127.0.0.1:$1/api/features/$CUSTOMER/" 2>/dev/null | python3 -c '
import json, sys
try:
    d = json.load(sys.stdin)
except ValueError:
    sys.exit(0)
f = d.get("features", {})
print(d.get("version"), f.get("credit_score"), f.get("segment"), d.get("source"))
' || true
}

# poll_both DESCRIPTION PYTHON-CONDITION: until both replicas serve a document
# for which the condition (over v, score, segment) holds; at most POLL_SECONDS.
poll_both() {
    local what="$1" cond="$2" t0=$SECONDS port d ok
    while true; do
        ok=1
        for port in "$QS_API1_PORT" "$QS_API2_PORT"; do
            d="$(doc "$port")"
            # shellcheck disable=SC2086  # $d: four words, on purpose
            if [ -z "$d" ] || ! python3 -c "
import sys
v, score, segment, source = sys.argv[1:5]
v = int(v)
sys.exit(0 if ($cond) else 1)" $d 2>/dev/null; then
                ok=0
                LAST="$port: ${d:-no document}"
                break
            fi
        done
        if [ "$ok" = 1 ]; then
            pass "$what (both replicas after $((SECONDS - t0))s)"
            return 0
        fi
        if ((SECONDS - t0 >= POLL_SECONDS)); then
            fail "$what: not served by both replicas within ${POLL_SECONDS}s (last: $LAST)"
            return 1
        fi
        sleep 0.2
    done
}

# mongo_update UPDATE-JSON: update_one on the test document, straight in MongoDB.
mongo_update() {
    "$ROOT/.venv-secantus/bin/python" - "$MONGO_URI" "$MONGO_DB" "$CUSTOMER" "$1" <<'EOF'
import json, sys
import pymongo
uri, db, customer, update = sys.argv[1:5]
c = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
r = c[db]["customer_features"].update_one({"_id": customer}, json.loads(update))
print(f"matched={r.matched_count} modified={r.modified_count}")
sys.exit(0 if r.matched_count == 1 and r.modified_count == 1 else 1)
EOF
}

# ------------------------------------------------------------------ setup

read -r p1 p2 p3 p4 p5 <<<"$(free_ports)"
export QS_REDIS_PORT="${QS_REDIS_PORT:-$p1}" QS_MONGO_PORT="${QS_MONGO_PORT:-$p2}"
export QS_INVALIDATOR_PORT="${QS_INVALIDATOR_PORT:-$p3}"
export QS_API1_PORT="${QS_API1_PORT:-$p4}" QS_API2_PORT="${QS_API2_PORT:-$p5}"
say "state dir $QS_STATE_DIR, profile $QUICKSTART_PROFILE; ports redis $QS_REDIS_PORT," \
    "mongo $QS_MONGO_PORT, invalidator $QS_INVALIDATOR_PORT, api $QS_API1_PORT/$QS_API2_PORT"

# A clean slate: anything left by an earlier run of this test is stopped, its data removed.
"$QS" stop --purge >/dev/null 2>&1 || true

# ------------------------------------------------------------------ 1. start

say "running ./quickstart.sh start"
STARTED=1
t0=$SECONDS
mkdir -p "$QS_STATE_DIR"
START_LOG="$QS_STATE_DIR/test-start.out"
if "$QS" start 2>&1 | tee "$START_LOG" | sed 's/^/    | /'; then
    build="$(sed -n 's/^==> build done in \(.*\)$/, of which build \1/p' "$START_LOG")"
    pass "./quickstart.sh start ($((SECONDS - t0))s$build)"
else
    fail "./quickstart.sh start"
    exit 1
fi
set -a
# shellcheck disable=SC1091
. "$QS_STATE_DIR/env"
set +a
check "state file names the requested ports" \
    test "$QS_API1_PORT:$QS_API2_PORT:$QS_REDIS_PORT:$QS_MONGO_PORT" = "$p4:$p5:$p1:$p2"

# ------------------------------------------------------------------ 2. health, write, read

for port in "$QS_API1_PORT" "$QS_API2_PORT"; do
    check "GET :$port/api/health/ is 200" test "$(http_code "http://127.0.0.1:$port/api/health/")" = 200
done
check "invalidator /health is 200" test "$(http_code "http://127.0.0.1:$QS_INVALIDATOR_PORT/health")" = 200
check "Swagger UI /swagger/ is 200" test "$(http_code "http://127.0.0.1:$QS_API1_PORT/swagger/")" = 200
check "/metrics is 200" test "$(http_code "http://127.0.0.1:$QS_API2_PORT/metrics")" = 200

CUSTOMER="QSTEST-$$-$RANDOM"
code="$(http_code -X POST "http://127.0.0.1:$QS_API1_PORT/api/features/" -H 'content-type: application/json' \
    -d "{\"customer_id\": \"$CUSTOMER\", \"features\": {\"credit_score\": 700, \"segment\": \"gold\"}}")"
check "POST $CUSTOMER on replica 1 is 201 (got $code)" test "$code" = 201

d1="$(doc "$QS_API1_PORT")"
d2="$(doc "$QS_API2_PORT")"
v0="${d1%% *}"
check "GET on replica 1 serves it ($d1)" test -n "$d1"
check "GET on replica 2 serves it ($d2)" test -n "$d2"
check "both replicas serve the same version ($v0)" \
    test -n "$v0" -a "${d1%% *}" = "${d2%% *}"
check "replica 1 GET is 200" test "$(http_code "http://127.0.0.1:$QS_API1_PORT/api/features/$CUSTOMER/")" = 200
check "replica 2 GET is 200" test "$(http_code "http://127.0.0.1:$QS_API2_PORT/api/features/$CUSTOMER/")" = 200

# ------------------------------------------------------------------ 3. direct MongoDB writes

# shellcheck disable=SC2016  # MongoDB operators, not shell expansions
if [[ "$v0" =~ ^[0-9]+$ ]]; then
    if out="$(mongo_update '{"$set": {"features.credit_score": 801}, "$inc": {"version": 1}}' 2>&1)"; then
        pass "direct MongoDB update_one with a new version ($out)"
        poll_both "new credit_score 801 at version $((v0 + 1))" "score == '801' and v == $((v0 + 1))" || true
    else
        fail "direct MongoDB update_one with a new version: $out"
    fi
    if out="$(mongo_update '{"$set": {"features.segment": "platinum"}}' 2>&1)"; then
        pass "direct MongoDB update_one without touching the version ($out)"
        poll_both "new segment 'platinum' (unversioned write)" "segment == 'platinum' and score == '801'" || true
        poll_both "the unversioned write got a version of its own (> $((v0 + 1)))" \
            "segment == 'platinum' and v > $((v0 + 1))" || true
    else
        fail "direct MongoDB update_one without touching the version: $out"
    fi
else
    fail "no version from the API: skipping the MongoDB write checks"
fi

# ------------------------------------------------------------------ 4. second start

pids_before="$(our_pids)"
files_before="$(pid_files)"
n_before="$(wc -w <<<"$pids_before")"
check "5 processes run ($n_before: $pids_before)" test "$n_before" = 5
out="$("$QS" start 2>&1)" || true
if grep -q "everything is already running: nothing started" <<<"$out" \
    && [ "$(grep -c 'is already running' <<<"$out")" = 6 ]; then
    pass "second start reports 'already running' for all 5"
else
    fail "second start output: $out"
fi
sleep 1
check "second start started no process (before: $pids_before)" test "$(our_pids)" = "$pids_before"
check "second start left the PID files alone" test "$(pid_files)" = "$files_before"
check "status is 0 while all run" "$QS" status

# ------------------------------------------------------------------ 5. stop

out="$("$QS" stop 2>&1)" || true
STARTED=0
printf '    | %s\n' "${out//$'\n'/$'\n'    | }"
check "stop stopped 5 components" test "$(grep -c '^==> stopping ' <<<"$out")" = 5
gone=1
for pid in $pids_before; do
    if alive "$pid"; then
        gone=0
        echo "    still running: $pid $(tr '\0' ' ' </proc/"$pid"/cmdline 2>/dev/null)"
    fi
done
check "every started PID is gone" test "$gone" = 1
check "no process of this state dir is left" test -z "$(our_pids)"
closed=1
for port in "$QS_REDIS_PORT" "$QS_MONGO_PORT" "$QS_INVALIDATOR_PORT" "$QS_API1_PORT" "$QS_API2_PORT"; do
    if port_open "$port"; then
        closed=0
        echo "    port $port still open"
    fi
done
check "all 5 ports are closed" test "$closed" = 1
check "no PID files are left" test -z "$(pid_files | tr -d ' ')"
rc=0
"$QS" status >/dev/null 2>&1 || rc=$?
check "status says 'not running' (exit 3, got $rc)" test "$rc" = 3

# ------------------------------------------------------------------ 6. a busy port

# Something else on the API port: start must refuse before starting anything.
python3 -c 'import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1); time.sleep(120)' \
    "$QS_API2_PORT" &
HOLDER_PID=$!
for _ in $(seq 1 50); do port_open "$QS_API2_PORT" && break; sleep 0.1; done
STARTED=1
rc=0
out="$("$QS" start --no-build 2>&1)" || rc=$?
check "start with a busy QS_API2_PORT fails (exit $rc)" test "$rc" != 0
check "  ... naming the busy port" grep -q "port $QS_API2_PORT (QS_API2_PORT.*) is busy" <<<"$out"
check "  ... and leaves nothing running" test -z "$(our_pids)"
kill "$HOLDER_PID" 2>/dev/null || true
wait "$HOLDER_PID" 2>/dev/null || true
HOLDER_PID=""
"$QS" stop --purge >/dev/null 2>&1 || true
STARTED=0
