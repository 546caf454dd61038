#!/usr/bin/env bash
# A replica's near-cache hit path while invalidations arrive at a fixed rate
# (BENCHMARKS.md, "A replica under 10,000 invalidations/s").
#
#   bench/replica-under-invalidations.sh [--bin-dir DIR] [--rate N] [--rounds N]
#
# Starts on loopback (free ports) a private redis-server and one cache-api
# (near cache on, MongoDB never reached: every document comes from Redis),
# fills Redis with invalidator-feedbench's documents bench-0..9999, warms
# bench-0..1999 into the near cache, then per round: wrk -t1 -c64 for 10 s
# of uniform GETs over those 2,000 keys with no invalidations, and again while
# invalidator-feedbench announces --rate changes/s (batches of 64) over all
# 10,000 keys on the replica's channel. Prints req/s and p50/p99 of each, the
# feed's report, and the replica's applied messages and mean replica-stage lag.
# Needs release binaries (cache-api, invalidator-feedbench), redis-server, wrk.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"
RATE=10000
ROUNDS=2
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) BIN="$2"; shift ;;
        --rate) RATE="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for tool in redis-server redis-cli wrk curl python3; do
    command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 1; }
done
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REDIS_PORT="$(free_port)"
API_PORT="$(free_port)"
WORK="$(mktemp -d)"
API_PID=""
cleanup() {
    [ -n "$API_PID" ] && kill "$API_PID" 2>/dev/null || true
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --logfile "$WORK/redis.log"
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done
COMMON=(REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
    "MONGO_URI=mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300"
    MONGO_DB=replica_load RUST_LOG=warn LOG_FORMAT=json)
env "${COMMON[@]}" "$BIN/invalidator-feedbench" --batch 64 --seconds 1 --keys 10000 --rate 20000 >/dev/null
env "${COMMON[@]}" HTTP_ADDR="127.0.0.1:$API_PORT" LOCAL_CACHE_TTL_MS=3600000 \
    "$BIN/cache-api" >"$WORK/api.log" 2>&1 &
API_PID=$!
until curl -sf "http://127.0.0.1:$API_PORT/readyz" >/dev/null; do sleep 0.2; done
for i in $(seq 0 1999); do
    curl -sf -o /dev/null "http://127.0.0.1:$API_PORT/api/features/bench-$i/"
done
cat >"$WORK/get.lua" <<'LUA'
math.randomseed(7)
request = function()
  return wrk.format("GET", "/api/features/bench-" .. math.random(0, 1999) .. "/")
end
LUA
measure() {
    wrk -t1 -c64 -d10s --latency -s "$WORK/get.lua" "http://127.0.0.1:$API_PORT" \
        | awk '/Requests\/sec/ {rps=$2} / 50%/ {p50=$2} / 99%/ {p99=$2} /Non-2xx/ {bad=$NF}
               END {printf "%s req/s, p50 %s, p99 %s%s\n", rps, p50, p99, bad ? ", non-2xx " bad : ""}'
}
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round, no invalidations:     $(measure)"
    env "${COMMON[@]}" "$BIN/invalidator-feedbench" --batch 64 --seconds 12 --keys 10000 \
        --rate "$RATE" >"$WORK/feed.json" &
    feed=$!
    sleep 1
    echo "round $round, $RATE invalidations/s: $(measure)"
    wait "$feed"
    echo "  feed: $(tail -n 1 "$WORK/feed.json")"
done
curl -s "http://127.0.0.1:$API_PORT/metrics" | awk '
    /^invalidation_messages_applied_total/ {applied += $NF}
    /^invalidation_lag_seconds_sum\{stage="replica"\}/ {sum = $NF}
    /^invalidation_lag_seconds_count\{stage="replica"\}/ {count = $NF}
    END {printf "replica: %d messages applied, replica-stage lag mean %.2f ms\n", applied, count ? 1000 * sum / count : 0}'
