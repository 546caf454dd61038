#!/usr/bin/env bash
# Profiles cache-api's hit paths once, on a small local system this script
# starts and tears down (its own testbed in target/bench-profile-testbed).
#
#   bench/profile.sh [--name NAME] [--skip-build] [--skip-callgrind]
#
# 1. callgrind (instructions, exact call graph): a near-cache-on cache-api under
#    valgrind, wrk -t1 -c16 for 20 s of Zipf GETs (all near hits after warming);
#    then the reference server the same way, for instructions and mallocs per request;
#    then Redis hits the same way: cache-api with the near cache off, and the reference
#    server doing one Redis GET per request.
#    `perf stat -e instructions` does not work in this VM (no hardware counters),
#    so instruction counts come from callgrind.
# 2. perf record -e cpu-clock (time samples, kernel included) of the same
#    binary, not under valgrind, for the near-hit path (A) and the Redis-hit
#    path (B, LOCAL_CACHE_ENABLED=false), 10 s each at 64 connections.
# Output: bench/results/profile-NAME-{callgrind,perf-near,perf-redis}.txt
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NAME="$(date +%Y%m%d-%H%M)"
BUILD=1
CALLGRIND=1
while [ $# -gt 0 ]; do
    case "$1" in
        --name) NAME="$2"; shift ;;
        --skip-build) BUILD=0 ;;
        --skip-callgrind) CALLGRIND=0 ;;
        -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
RUN="$ROOT/target/bench-profile/$NAME"
TB="$ROOT/target/bench-profile-testbed"
OUT="$ROOT/bench/results"
PY="$ROOT/bench/.venv/bin/python"
BENCH="$ROOT/bench/bench.py"
KEYS=2000
rm -rf "$RUN"
mkdir -p "$RUN/bin" "$RUN/logs" "$OUT"
# The process supervisor (cargo xtask): a private copy, like the services'.
XT="$RUN/bin/xtask"
log() { echo "[profile $(date +%T)] $*"; }
die() { echo "[profile $(date +%T)] ERROR: $*" >&2; exit 1; }
# proc CMD ARGS...: `xtask proc CMD --dir $RUN ARGS...`; stops wait 30 s before
# KILL (valgrind writes its profile on exit).
proc() {
    case "$1" in
        stop | down) "$XT" proc "$1" --dir "$RUN" --timeout 30 "${@:2}" ;;
        *) "$XT" proc "$1" --dir "$RUN" "${@:2}" ;;
    esac
}
command -v valgrind >/dev/null || die "valgrind missing (apt-get install valgrind)"
command -v perf >/dev/null || die "perf missing (apt-get install linux-perf)"
[ -x "$PY" ] || die "run bench/run.sh once first (it creates bench/.venv)"

cleanup() {
    local rc=$?
    trap - EXIT
    if [ -x "$XT" ]; then
        proc down >/dev/null || true
        "$XT" testbed down "$TB" >/dev/null 2>&1 || true
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$BUILD" = 1 ] && cargo build --release --bins 2>&1 | tail -n 2
for b in cache-api cache-invalidator cachectl xtask; do
    cp "target/release/$b" "$RUN/bin/" || die "target/release/$b missing: run without --skip-build"
done
"$XT" testbed down "$TB" >/dev/null 2>&1 || true
"$XT" testbed up "$TB" >"$RUN/logs/testbed.log" 2>&1 || die "testbed up failed"
set -a; . "$TB/env"; set +a
read -r PA PB PI <<<"$("$XT" proc ports 3)"
COMMON=(--env "REDIS_URL=$REDIS_URL" --env "MONGO_URI=$MONGO_URI" --env LOG_FORMAT=json --env RUST_LOG=warn)
proc start --name invalidator --port "$PI" --ready /health --timeout 60 "${COMMON[@]}" \
    --env "HTTP_ADDR=127.0.0.1:$PI" -- "$RUN/bin/cache-invalidator"
sleep 2
"$RUN/bin/cachectl" populate --count "$KEYS" --batch 1000 | tail -n 1
"$PY" "$BENCH" zipf --keys "$KEYS" --out "$RUN/ids.txt" --part "$RUN/zipf.json" >/dev/null

# ---- callgrind, near hits
if [ "$CALLGRIND" = 1 ]; then
log "callgrind: cache-api (near cache on) under valgrind, wrk -t1 -c16 -d20s"
proc start --name api-vg --port "$PA" --ready /api/health/ --timeout 120 "${COMMON[@]}" \
    --env "HTTP_ADDR=127.0.0.1:$PA" --env LOCAL_CACHE_TTL_MS=3600000 -- \
    valgrind --tool=callgrind --callgrind-out-file="$RUN/callgrind.out" "$RUN/bin/cache-api"
"$PY" "$BENCH" warm --api "http://127.0.0.1:$PA" --count "$KEYS"
wrk -t1 -c16 -d20s --latency -s bench/wrk/zipf_get.lua "http://127.0.0.1:$PA" -- "$RUN/ids.txt" >"$RUN/logs/wrk-vg.txt"
grep -E 'Requests/sec|requests in' "$RUN/logs/wrk-vg.txt" || true
proc stop --name api-vg
{
    echo "# callgrind of cache-api, near-cache hits (wrk -t1 -c16 -d20s, Zipf over $KEYS keys), $(date -Is)"
    grep -E 'requests in' "$RUN/logs/wrk-vg.txt" || true
    echo "## exclusive (self), top entries"
    callgrind_annotate "$RUN/callgrind.out" 2>/dev/null | sed -n '/file:function/,$p' | head -n 60 || true
    echo "## inclusive, selected entries"
    callgrind_annotate --inclusive=yes "$RUN/callgrind.out" 2>/dev/null \
        | grep -E 'get_features|middleware|propagation|metrics::key|PrometheusRecorder|Http1Transaction>::(parse|encode)|TieredStore::get|body_with_source|Utc::now|moka' \
        | head -n 60 || true
} >"$OUT/profile-$NAME-callgrind.txt"

log "callgrind: the reference server (same body size), wrk -t1 -c16 -d20s"
proc start --name ref-vg -- valgrind --tool=callgrind --callgrind-out-file="$RUN/callgrind-ref.out" \
    "$RUN/bin/cachectl" reference-server --addr "127.0.0.1:$PB" --body-bytes 417
sleep 5
wrk -t1 -c16 -d20s -s bench/wrk/zipf_get.lua "http://127.0.0.1:$PB" -- "$RUN/ids.txt" >"$RUN/logs/wrk-ref-vg.txt"
proc stop --name ref-vg
{
    echo
    echo "## per request: cache-api (near hit) vs the reference server, both under callgrind"
    "$PY" "$BENCH" callgrind-summary "cache-api near hit=$RUN/callgrind.out=$RUN/logs/wrk-vg.txt" \
        "reference server=$RUN/callgrind-ref.out=$RUN/logs/wrk-ref-vg.txt"
} >>"$OUT/profile-$NAME-callgrind.txt"

log "callgrind: Redis hits, cache-api (near cache off) and the one-GET reference, wrk -t1 -c16 -d20s each"
proc start --name api-redis-vg --port "$PA" --ready /api/health/ --timeout 120 "${COMMON[@]}" \
    --env "HTTP_ADDR=127.0.0.1:$PA" --env LOCAL_CACHE_ENABLED=false -- \
    valgrind --tool=callgrind --callgrind-out-file="$RUN/callgrind-redis.out" "$RUN/bin/cache-api"
"$PY" "$BENCH" warm --api "http://127.0.0.1:$PA" --count "$KEYS"
wrk -t1 -c16 -d20s -s bench/wrk/zipf_get.lua "http://127.0.0.1:$PA" -- "$RUN/ids.txt" >"$RUN/logs/wrk-redis-vg.txt"
proc stop --name api-redis-vg
proc start --name ref-redis-vg -- valgrind --tool=callgrind --callgrind-out-file="$RUN/callgrind-ref-redis.out" \
    "$RUN/bin/cachectl" reference-server --addr "127.0.0.1:$PB" --redis-url "$REDIS_URL"
sleep 5
wrk -t1 -c16 -d20s -s bench/wrk/zipf_get.lua "http://127.0.0.1:$PB" -- "$RUN/ids.txt" >"$RUN/logs/wrk-ref-redis-vg.txt"
proc stop --name ref-redis-vg
{
    echo
    echo "## per request: cache-api (Redis hit, near cache off) vs the one-GET reference, both under callgrind"
    "$PY" "$BENCH" callgrind-summary "cache-api Redis hit=$RUN/callgrind-redis.out=$RUN/logs/wrk-redis-vg.txt" \
        "one-GET reference=$RUN/callgrind-ref-redis.out=$RUN/logs/wrk-ref-redis-vg.txt"
} >>"$OUT/profile-$NAME-callgrind.txt"
log "wrote $OUT/profile-$NAME-callgrind.txt"
fi

# ---- perf, near hits and Redis hits
for mode in near redis; do
    if [ "$mode" = near ]; then
        extra=(LOCAL_CACHE_TTL_MS=3600000)
    else
        extra=(LOCAL_CACHE_ENABLED=false)
    fi
    proc start --name "api-$mode" --port "$PB" --ready /api/health/ --timeout 60 "${COMMON[@]}" \
        --env "HTTP_ADDR=127.0.0.1:$PB" --env "${extra[0]}" -- "$RUN/bin/cache-api"
    "$PY" "$BENCH" warm --api "http://127.0.0.1:$PB" --count "$KEYS"
    log "perf record -e cpu-clock: $mode hits, wrk -t2 -c64 -d10s"
    wrk -t2 -c64 -d12s -s bench/wrk/zipf_get.lua "http://127.0.0.1:$PB" -- "$RUN/ids.txt" >"$RUN/logs/wrk-$mode.txt" &
    wpid=$!
    sleep 1
    perf record -e cpu-clock -F 1999 -g -p "$(proc pid --name "api-$mode")" -o "$RUN/perf-$mode.data" -- sleep 10 \
        >"$RUN/logs/perf-$mode.log" 2>&1
    wait "$wpid"
    grep -E 'Requests/sec' "$RUN/logs/wrk-$mode.txt" || true
    {
        echo "# perf record -e cpu-clock -F 1999 -g of cache-api, $mode hits (wrk -t2 -c64), $(date -Is)"
        grep -E 'Requests/sec|Latency' "$RUN/logs/wrk-$mode.txt" || true
        echo "## self time by symbol"
        perf report -i "$RUN/perf-$mode.data" --stdio --no-children --sort symbol -g none --percent-limit 0.7 2>/dev/null \
            | grep -v '^$' | head -n 70 || true
        echo "## self time by shared object"
        perf report -i "$RUN/perf-$mode.data" --stdio --no-children --sort dso -g none 2>/dev/null \
            | grep -v '^$' | head -n 20 || true
        echo "## inclusive (children) by symbol"
        perf report -i "$RUN/perf-$mode.data" --stdio --children --sort symbol -g none --percent-limit 3 2>/dev/null \
            | grep -v '^$' | head -n 90 || true
    } >"$OUT/profile-$NAME-perf-$mode.txt"
    proc stop --name "api-$mode"
    log "wrote $OUT/profile-$NAME-perf-$mode.txt"
done
