#!/usr/bin/env bash
# Benchmarks of redis-mongo-cache, side by side in one run, against a system
# this script starts on loopback and tears down again.
#
#   bench/run.sh [--quick] [--name NAME] [--skip-build | --bin-dir DIR] [--no-memory-1m]
#                [--auth-cost | --warm | --hit-path [--rounds N] | --lag
#                 | --memory [--baseline-bin-dir DIR]]
#
#   --quick          3 s per load cell (10 s otherwise), fewer writes and entries
#   --name NAME      results go to bench/results/NAME.json, NAME-*.png, NAME.md
#                    (default: quick-YYYYmmdd-HHMM or full-YYYYmmdd-HHMM)
#   --skip-build     use the release binaries already in target/release
#   --bin-dir DIR    use the release binaries in DIR (cache-api, cache-invalidator, cachectl);
#                    no build but xtask's when target/ has none (a debug build: it only supervises)
#   --no-memory-1m   measure the near cache at 10k/100k entries only
#   --auth-cost      only the near-cache hit path of A and F side by side (the cost of
#                    authentication, rate limiting and load shedding):
#                    bench/results/NAME-auth.{json,md}, ~3 min after the build
#   --warm           only the first 10 s after a full flush, with warm start off (WARM_KEYS=0)
#                    and on (defaults), and the 404 storm with NEGATIVE_TTL_MS=0 and the
#                    default: bench/results/NAME-warm.{json,md}, ~4 min after the build;
#                    needs no wrk, oha or redis-benchmark
#   --hit-path       only the hit-path comparison, side by side: A, B, C, F, G, H at 16, 64 and
#                    256 connections (wrk, Zipf GETs, 10 s a cell, 3 s with --quick),
#                    --rounds N interleaved rounds (default 2), with the ratios A/C, B/G, F/A,
#                    H/B: bench/results/NAME-hitpath.{json,md}, ~5-8 min after the build
#   --lag            only the invalidation lag: 200 writes (half through A, half straight into
#                    MongoDB), each timed to Redis and replicas A and D, with the lag per stage
#                    from the services' histograms: bench/results/NAME-lag.{json,md},
#                    NAME-lag.png, NAME-lag-stages.png, ~2-3 min after the build
#   --memory         only the near cache's memory: a fresh cache-api (E) filled to 100k and 1M
#                    entries (10k, 50k, 100k with --quick); with --baseline-bin-dir DIR the
#                    cache-api in DIR is measured the same way right after, in the same run:
#                    bench/results/NAME-memory.{json,md}, ~4 min after the build (~8 with a baseline)
#
# What it starts (all on 127.0.0.1, free ports, LOG_FORMAT=json RUST_LOG=warn):
#   testbed     cargo xtask testbed up target/bench-testbed (private Redis + SecantusDB)
#   invalidator one cache-invalidator
#   A           cache-api, near cache on  (LOCAL_CACHE_TTL_MS=3600000: hits stay near hits)
#   B           cache-api, LOCAL_CACHE_ENABLED=false (every hit is a Redis hit)
#   C           cachectl reference-server: a constant body of the API's body size
#   G           cachectl reference-server --redis-url: one Redis GET of the key per request
#               (the reference of B; --hit-path only)
#   D           cache-api, near cache on (second replica, for the invalidation lag)
#   E           cache-api for the memory measurement (started last, alone)
#   F           cache-api as A, plus an API key (API_KEYS), RATE_LIMIT_PER_SECOND and
#               MAX_CONCURRENT_REQUESTS set too high to refuse anything: what admission costs
#   H           cache-api as B plus F's admission settings (--hit-path only)
# Every client request carries `Authorization: Bearer $CACHE_API_KEY` (a random key per
# run); A, B, D, E have no credentials configured and ignore it, C and G any header.
# Phases, in order: machine, Zipf table, populate + warm, hit path (wrk + redis-benchmark),
# fixed-rate latency (oha), offload on a warm system, miss path + stampede, offload from
# cold, invalidation lag, invalidator throughput, memory, report (JSON, PNG, Markdown).
# Work files, logs and process records (`xtask proc`): target/bench-run/NAME/. See BENCHMARKS.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

QUICK=0
NAME=""
BUILD=1
MEM_1M=1
AUTH_COST=0
WARM=0
HIT_PATH=0
ROUNDS=2
LAG=0
MEMORY=0
BASELINE_DIR=""
BIN_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --name) NAME="$2"; shift ;;
        --name=*) NAME="${1#--name=}" ;;
        --skip-build) BUILD=0 ;;
        --bin-dir) BIN_DIR="$2"; BUILD=0; shift ;;
        --bin-dir=*) BIN_DIR="${1#--bin-dir=}"; BUILD=0 ;;
        --no-memory-1m) MEM_1M=0 ;;
        --auth-cost) AUTH_COST=1 ;;
        --warm) WARM=1 ;;
        --hit-path) HIT_PATH=1 ;;
        --rounds) ROUNDS="$2"; shift ;;
        --rounds=*) ROUNDS="${1#--rounds=}" ;;
        --lag) LAG=1 ;;
        --memory) MEMORY=1 ;;
        --baseline-bin-dir) BASELINE_DIR="$2"; shift ;;
        --baseline-bin-dir=*) BASELINE_DIR="${1#--baseline-bin-dir=}" ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ $((AUTH_COST + WARM + HIT_PATH + LAG + MEMORY)) -le 1 ] || { echo "--auth-cost, --warm, --hit-path, --lag, --memory: one at most" >&2; exit 2; }
[ -z "$BASELINE_DIR" ] || [ "$MEMORY" = 1 ] || { echo "--baseline-bin-dir: only with --memory" >&2; exit 2; }
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds: a positive number" >&2; exit 2; }
# The run's kind: what its results are named after and which phases it runs.
MODE="$([ "$QUICK" = 1 ] && echo quick || echo full)"
[ "$AUTH_COST" = 1 ] && MODE=auth
[ "$WARM" = 1 ] && MODE=warm
[ "$HIT_PATH" = 1 ] && MODE=hitpath
[ "$LAG" = 1 ] && MODE=lag
[ "$MEMORY" = 1 ] && MODE=memory
if [ -z "$NAME" ]; then
    NAME="$MODE-$(date +%Y%m%d-%H%M)"
fi
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "--name: letters, digits, . _ - only" >&2; exit 2; }

if [ "$QUICK" = 1 ]; then
    SECS=3; OHA_SECS=3; MIX_SECS=5; LAG_WRITES=200; TP_SECS=5; REDIS_N=50000
    MEM_COUNTS="10000 50000 100000"
else
    SECS=10; OHA_SECS=10; MIX_SECS=15; LAG_WRITES=1000; TP_SECS=10; REDIS_N=200000
    MEM_COUNTS="10000 100000"
    [ "$MEM_1M" = 1 ] && MEM_COUNTS="10000 100000 1000000"
fi
# --memory: the issue's two sizes.
[ "$MODE" = memory ] && [ "$QUICK" = 0 ] && MEM_COUNTS="100000 1000000"

CONC="1 16 64 256"
RATES="2000 5000 10000 20000 30000"
CUSTOMERS=10000
# --lag: 200 writes, on fewer customers (they are only written and read back).
if [ "$MODE" = lag ]; then LAG_WRITES=200; CUSTOMERS=2000; fi
# --hit-path: the connection counts of the targets (issue: 16, 64 and 256).
[ "$MODE" = hitpath ] && CONC="16 64 256"

RUN="$ROOT/target/bench-run/$NAME"
TB="$ROOT/target/bench-testbed"
RESULTS="$ROOT/bench/results"
VENV="$ROOT/bench/.venv"
PY="$VENV/bin/python"
BENCH="$ROOT/bench/bench.py"
rm -rf "$RUN"
mkdir -p "$RUN/bin" "$RUN/logs" "$RUN/pids" "$RUN/parts" "$RESULTS"
RAW="$RUN/logs/loadgen.log"
# The process supervisor (cargo xtask): a private copy, like the services'.
XT="$RUN/bin/xtask"

log() { echo "[bench $(date +%T)] $*"; }
die() { echo "[bench $(date +%T)] ERROR: $*" >&2; exit 1; }
# proc CMD ARGS...: `xtask proc CMD --dir $RUN ARGS...` (start, stop, pid, down).
proc() { "$XT" proc "$1" --dir "$RUN" "${@:2}"; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    log "tearing down"
    if [ -x "$XT" ]; then
        proc down >/dev/null || true
        "$XT" testbed down "$TB" >/dev/null 2>&1 || true
    fi
    log "done (exit $rc); logs in $RUN/logs"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# finish_meta: the run's end time in meta.json.
finish_meta() {
    python3 - "$RUN/meta.json" <<'EOF'
import json, sys, datetime
p = sys.argv[1]; m = json.load(open(p))
m["finished_at"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
json.dump(m, open(p, "w"), indent=2)
EOF
}

flush_features() {
    # Every cached document, tombstone and fence; not the invalidator's own keys.
    redis-cli -p "$TESTBED_REDIS_PORT" --scan --pattern 'features:*' \
        | xargs -r -n 1000 redis-cli -p "$TESTBED_REDIS_PORT" UNLINK >/dev/null
}

# settle: until the invalidator has applied the previous phase's writes.
settle() { "$PY" "$BENCH" settle --invalidator "$I" --mongo-uri "$MONGO_URI" --quiet 3 --max 180; }

# ---------------------------------------------------------------- tools
ulimit -n 65536 2>/dev/null || ulimit -n 4096 || true
case "$MODE" in
    warm | lag | memory) TOOLS="redis-cli curl python3" ;;
    hitpath) TOOLS="wrk redis-cli curl python3" ;;
    *) TOOLS="wrk redis-benchmark redis-cli curl python3" ;;
esac
if [[ " $TOOLS " == *" wrk "* ]] && ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "wrk missing; apt-get install wrk"
        DEBIAN_FRONTEND=noninteractive apt-get install -y wrk >"$RUN/logs/wrk-install.log" 2>&1 \
            || { apt-get update >>"$RUN/logs/wrk-install.log" 2>&1 \
                && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk >>"$RUN/logs/wrk-install.log" 2>&1; } \
            || die "could not install wrk (see $RUN/logs/wrk-install.log)"
    fi
fi
for tool in $TOOLS; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done

log "run $NAME ($MODE); work dir $RUN"
if ! "$PY" -c 'import matplotlib, redis, pymongo' 2>/dev/null; then
    log "creating $VENV (matplotlib, redis, pymongo)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --disable-pip-version-check -q -r "$ROOT/bench/requirements.txt"
fi
OHA="$ROOT/bench/.cargo-bin/bin/oha"
# Only the full and quick runs have the fixed-rate phase.
if { [ "$MODE" = full ] || [ "$MODE" = quick ]; } && [ ! -x "$OHA" ] && ! command -v oha >/dev/null; then
    log "installing oha into bench/.cargo-bin (cargo install oha --locked; a few minutes)"
    cargo install oha --locked --root "$ROOT/bench/.cargo-bin" >"$RUN/logs/oha-install.log" 2>&1 \
        || log "oha could not be installed (see $RUN/logs/oha-install.log): the fixed-rate phase is skipped"
fi

if [ "$BUILD" = 1 ]; then
    log "cargo build --release --bins"
    cargo build --release --bins 2>&1 | tail -n 3
fi
# Private copies: others may rebuild target/release (or DIR) while this runs.
SRC="${BIN_DIR:-target/release}"
for b in cache-api cache-invalidator cachectl; do
    cp "$SRC/$b" "$RUN/bin/$b" || die "$SRC/$b missing: run without --skip-build / --bin-dir"
done
if [ -n "$BASELINE_DIR" ]; then
    cp "$BASELINE_DIR/cache-api" "$RUN/bin/cache-api-baseline" || die "$BASELINE_DIR/cache-api missing"
fi
# The supervisor and test bed: this checkout's own build (xtask finds .venv-secantus/ in
# the checkout it was built from), release or debug; built (debug) when there is none.
XT_SRC=""
for cand in target/release/xtask target/debug/xtask; do
    [ -x "$cand" ] && { XT_SRC="$cand"; break; }
done
if [ -z "$XT_SRC" ]; then
    log "no xtask binary in target/: cargo build -p xtask"
    cargo build -q -p xtask || die "cannot build xtask"
    XT_SRC=target/debug/xtask
fi
cp "$XT_SRC" "$XT"
BIN="$RUN/bin"

"$XT" testbed install >"$RUN/logs/testbed-install.log" 2>&1 || die "testbed install failed (see $RUN/logs/testbed-install.log)"
"$XT" testbed down "$TB" >/dev/null 2>&1 || true
"$XT" testbed up "$TB" >"$RUN/logs/testbed.log" 2>&1 || { cat "$RUN/logs/testbed.log"; die "testbed up failed"; }
set -a
# shellcheck disable=SC1091
. "$TB/env"
set +a
[ "$TESTBED_REDIS_PORT" != 6379 ] || die "refusing to use the system Redis"
log "testbed: Redis 127.0.0.1:$TESTBED_REDIS_PORT, SecantusDB 127.0.0.1:$TESTBED_MONGO_PORT"

read -r PORT_A PORT_B PORT_C PORT_D PORT_E PORT_I PORT_F PORT_G PORT_H <<<"$("$XT" proc ports 9)"
A="http://127.0.0.1:$PORT_A"; B="http://127.0.0.1:$PORT_B"; C="http://127.0.0.1:$PORT_C"
D="http://127.0.0.1:$PORT_D"; E="http://127.0.0.1:$PORT_E"; I="http://127.0.0.1:$PORT_I"
F="http://127.0.0.1:$PORT_F"; G="http://127.0.0.1:$PORT_G"; H="http://127.0.0.1:$PORT_H"
# The harness, wrk and oha send it on every request (never logged).
CACHE_API_KEY="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export CACHE_API_KEY
COMMON=(--env "REDIS_URL=$REDIS_URL" --env "MONGO_URI=$MONGO_URI" --env LOG_FORMAT=json --env RUST_LOG=warn)
# `proc start` arguments of the API replicas (started and restarted by name).
api() { # api NAME PORT INSTANCE [KEY=VALUE...]
    local name="$1" port="$2" instance="$3" extra=() kv
    shift 3
    for kv in "$@"; do extra+=(--env "$kv"); done
    proc start --name "$name" --port "$port" --ready /api/health/ --timeout 60 "${COMMON[@]}" \
        --env "HTTP_ADDR=127.0.0.1:$port" --env "INSTANCE_ID=$instance" ${extra[@]+"${extra[@]}"} -- "$BIN/cache-api"
}
api_a() { api api-a "$PORT_A" bench-a LOCAL_CACHE_TTL_MS=3600000; }
api_b() { api api-b "$PORT_B" bench-b LOCAL_CACHE_ENABLED=false; }
# Admission with limits far above what the machine serves: every check runs, none refuses.
ADMISSION=("API_KEYS=bench:features:read+features:write+admin:$CACHE_API_KEY"
    RATE_LIMIT_PER_SECOND=100000000 RATE_LIMIT_BURST=100000000 MAX_CONCURRENT_REQUESTS=100000)
api_f() { api api-f "$PORT_F" bench-f LOCAL_CACHE_TTL_MS=3600000 "${ADMISSION[@]}"; }
api_h() { api api-h "$PORT_H" bench-h LOCAL_CACHE_ENABLED=false "${ADMISSION[@]}"; }
# The reference servers: C a constant body of the API's size, G one Redis GET per request
# (ready once a warmed key answers).
reference_c() {
    proc start --name reference --port "$PORT_C" --ready /api/features/X/ --timeout 30 "${COMMON[@]}" -- \
        "$BIN/cachectl" reference-server --addr "127.0.0.1:$PORT_C" --body-bytes "$BODY_BYTES"
}
reference_g() {
    proc start --name reference-redis --port "$PORT_G" --ready /api/features/CUST00001/ --timeout 30 \
        "${COMMON[@]}" -- "$BIN/cachectl" reference-server --addr "127.0.0.1:$PORT_G" --redis-url "$REDIS_URL"
}

cat >"$RUN/meta.json" <<EOF
{
  "quick": $([ "$QUICK" = 1 ] && echo true || echo false),
  "mode": "$MODE",
  "binaries": "$SRC",
  "started_at": "$(date -Is)",
  "git_head": "$(git rev-parse HEAD 2>/dev/null || echo unknown)",
  "git_dirty_files": $(git status --porcelain 2>/dev/null | wc -l),
  "customers": $CUSTOMERS,
  "concurrency": [${CONC// /, }],
  "offered_rates": [${RATES// /, }],
  "seconds_per_cell": $SECS,
  "processes": {
    "A": "cache-api, near cache on, LOCAL_CACHE_TTL_MS=3600000",
    "B": "cache-api, LOCAL_CACHE_ENABLED=false",
    "C": "cachectl reference-server (constant body)",
    "D": "cache-api, near cache on, defaults (second replica for the lag phase)",
    "E": "cache-api for the memory phase, LOCAL_CACHE_TTL_MS=3600000",
    "F": "cache-api as A plus API_KEYS, RATE_LIMIT_PER_SECOND, MAX_CONCURRENT_REQUESTS (never refusing)",
    "G": "cachectl reference-server --redis-url (one Redis GET per request; --hit-path)",
    "H": "cache-api as B plus F's admission settings (--hit-path)",
    "invalidator": "cache-invalidator, defaults (INVALIDATION_MODE=refresh)",
    "common_env": "LOG_FORMAT=json RUST_LOG=warn, testbed Redis + SecantusDB 0.7.0b3 (--sync-on-commit)"
  }
}
EOF

"$PY" "$BENCH" machine --part "$RUN/parts/machine.json"

IDS="$RUN/zipf-ids.txt"
# memory_phase PART [BINARY]: a fresh cache-api (E), alone, filled to $MEM_COUNTS entries
# (its bounds well above: neither entries nor bytes may evict).
memory_phase() {
    local part="$1" binary="${2:-$BIN/cache-api}" max
    max=$(($(echo "$MEM_COUNTS" | tr ' ' '\n' | sort -n | tail -n 1) + 10000))
    log "memory: near cache of a fresh cache-api (E, $(basename "$binary")) at $MEM_COUNTS entries"
    proc start --name api-e --port "$PORT_E" --ready /api/health/ --timeout 60 "${COMMON[@]}" \
        --env "HTTP_ADDR=127.0.0.1:$PORT_E" --env INSTANCE_ID=bench-e --env "LOCAL_CACHE_MAX_ENTRIES=$max" \
        --env "LOCAL_CACHE_MAX_BYTES=$((max * 4096))" \
        --env LOCAL_CACHE_TTL_MS=3600000 -- "$binary"
    # shellcheck disable=SC2086
    "$PY" "$BENCH" memory --api "$E" --pid "$(proc pid --name api-e)" --redis-port "$TESTBED_REDIS_PORT" \
        --counts $MEM_COUNTS --part "$RUN/parts/$part.json"
    proc stop --name api-e
}
if [ "$MODE" = memory ]; then
    memory_phase memory
    [ -z "$BASELINE_DIR" ] || memory_phase memory_baseline "$BIN/cache-api-baseline"
    finish_meta
    "$PY" "$BENCH" report --run-dir "$RUN" --name "$NAME-memory" --out "$RESULTS/$NAME-memory.json"
    log "results: $RESULTS/$NAME-memory.json, $RESULTS/$NAME-memory.md"
    exit 0
fi
if [ "$WARM" = 1 ]; then
    # ------------------------------------------------------------ warm start, 404 storm
    # inv [KEY=VALUE...]: starts the invalidator with these settings.
    inv() {
        local extra=() kv
        for kv in "$@"; do extra+=(--env "$kv"); done
        proc start --name invalidator --port "$PORT_I" --ready /health --ready-contains '"leader"' --timeout 60 \
            "${COMMON[@]}" --env "HTTP_ADDR=127.0.0.1:$PORT_I" --env INSTANCE_ID=bench-invalidator \
            ${extra[@]+"${extra[@]}"} -- "$BIN/cache-invalidator"
    }
    CONTROL="cache-invalidator:cache_demo.customer_features"
    log "starting the invalidator; populating $CUSTOMERS customers"
    inv
    MONGO_TIMEOUT_MS=50000 "$BIN/cachectl" populate --count "$CUSTOMERS" --batch 1000 >"$RUN/logs/populate.log" 2>&1 \
        || { tail -n 30 "$RUN/logs/populate.log"; die "populate failed"; }
    "$PY" "$BENCH" zipf --keys "$CUSTOMERS" --s 1.0 --out "$IDS" --part "$RUN/parts/zipf.json"
    proc stop --name invalidator
    for mode in off on; do
        settings=()
        [ "$mode" = off ] && settings=(WARM_KEYS=0)
        log "flush recovery, warm start $mode: invalidator, replicas A and D ${settings[*]:-(defaults)}"
        # Both runs start from the same state: nothing cached, no record.
        flush_features
        redis-cli -p "$TESTBED_REDIS_PORT" DEL "$CONTROL:hot" >/dev/null
        inv ${settings[@]+"${settings[@]}"}
        api api-a "$PORT_A" bench-a ${settings[@]+"${settings[@]}"}
        api api-d "$PORT_D" bench-d ${settings[@]+"${settings[@]}"}
        "$XT" proc wait "$A/api/info/" --contains '"subscribed":true' --timeout 30
        "$XT" proc wait "$D/api/info/" --contains '"subscribed":true' --timeout 30
        # The full flush: the invalidator restarts without its saved position.
        {
            echo "set -euo pipefail"
            declare -p XT RUN COMMON PORT_I BIN settings
            declare -f proc inv
            echo 'proc stop --name invalidator'
            echo "redis-cli -p $TESTBED_REDIS_PORT DEL $CONTROL:resume-token >/dev/null"
            echo 'inv ${settings[@]+"${settings[@]}"}'
        } >"$RUN/flush-$mode.sh"
        "$PY" "$BENCH" recovery10 --apis "$A" "$D" --invalidator "$I" --label "warm start $mode" \
            --ids "$IDS" --flush-script "$RUN/flush-$mode.sh" --rate 200 --threads 32 --before 20 --after 10 \
            --part "$RUN/parts/recovery10_$mode.json"
        proc stop --name api-a; proc stop --name api-d; proc stop --name invalidator
    done
    inv
    for ttl in 0 default; do
        settings=()
        [ "$ttl" = 0 ] && settings=(NEGATIVE_TTL_MS=0)
        log "404 storm on a fresh replica, NEGATIVE_TTL_MS=$ttl"
        api api-e "$PORT_E" bench-e ${settings[@]+"${settings[@]}"}
        "$PY" "$BENCH" storm --api "$E" --label "NEGATIVE_TTL_MS=$ttl" --ids 100 --per-id 50 --threads 8 \
            --part "$RUN/parts/storm_$ttl.json"
        proc stop --name api-e
    done
    python3 - "$RUN/meta.json" <<'EOF'
import json, sys, datetime
p = sys.argv[1]; m = json.load(open(p))
m["finished_at"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
m["processes"] = {"A, D": "cache-api, near cache on, defaults (plus WARM_KEYS=0 in the 'off' run)",
                  "E": "cache-api for the 404 storm (NEGATIVE_TTL_MS=0, then the default)",
                  "invalidator": "cache-invalidator (plus WARM_KEYS=0 in the 'off' run)"}
json.dump(m, open(p, "w"), indent=2)
EOF
    "$PY" "$BENCH" report --run-dir "$RUN" --name "$NAME-warm" --out "$RESULTS/$NAME-warm.json"
    log "results: $RESULTS/$NAME-warm.json, $RESULTS/$NAME-warm.md"
    exit 0
fi

# lag_phase: the invalidation lag, with a second near-cache replica D beside A.
lag_phase() {
    log "invalidation lag: second near-cache replica D; $LAG_WRITES writes (half API, half direct)"
    api api-d "$PORT_D" bench-d
    "$XT" proc wait "$D/api/info/" --contains '"subscribed":true' --timeout 30
    "$XT" proc wait "$A/api/info/" --contains '"subscribed":true' --timeout 30
    settle
    "$PY" "$BENCH" lag --api-a "$A" --api-d "$D" --invalidator "$I" --redis-port "$TESTBED_REDIS_PORT" \
        --mongo-uri "$MONGO_URI" --keys "$CUSTOMERS" --writes "$LAG_WRITES" --part "$RUN/parts/lag.json"
}

# ---------------------------------------------------------------- system
log "starting the invalidator and API A (near on)$([ "$MODE" = lag ] || echo ", API B (near off) and API F (A with auth and limits)")"
proc start --name invalidator --port "$PORT_I" --ready /health --ready-contains '"leader"' --timeout 60 \
    "${COMMON[@]}" --env "HTTP_ADDR=127.0.0.1:$PORT_I" --env INSTANCE_ID=bench-invalidator -- "$BIN/cache-invalidator"
api_a
if [ "$MODE" != lag ]; then
    api_b
    api_f
fi

log "populating $CUSTOMERS customers"
# Bulk writes of 1000 on a loaded 2-core machine can exceed the default bound
# (below TOMBSTONE_TTL_MS, which must outlast the longest read).
MONGO_TIMEOUT_MS=50000 "$BIN/cachectl" populate --count "$CUSTOMERS" --batch 1000 >"$RUN/logs/populate.log" 2>&1 \
    || { tail -n 30 "$RUN/logs/populate.log"; die "populate failed"; }
tail -n 1 "$RUN/logs/populate.log"

if [ "$MODE" = lag ]; then
    lag_phase
    finish_meta
    "$PY" "$BENCH" report --run-dir "$RUN" --name "$NAME" --out "$RESULTS/$NAME-lag.json"
    log "results: $RESULTS/$NAME-lag.json, $RESULTS/$NAME-lag.md, $RESULTS/$NAME-lag.png, $RESULTS/$NAME-lag-stages.png"
    exit 0
fi
log "warming every key through A and B"
"$PY" "$BENCH" warm --api "$A" --count "$CUSTOMERS"
"$PY" "$BENCH" warm --api "$B" --count "$CUSTOMERS"
"$PY" "$BENCH" warm --api "$F" --count "$CUSTOMERS"
read -r DOC_BYTES BODY_BYTES <<<"$("$PY" "$BENCH" sizes --api "$A" --redis-port "$TESTBED_REDIS_PORT" \
    --count "$CUSTOMERS" --part "$RUN/parts/sizes.json" | tail -n 1)"
log "documents: $DOC_BYTES bytes in Redis, $BODY_BYTES-byte response bodies"

if [ "$AUTH_COST" = 1 ]; then
    "$PY" "$BENCH" zipf --keys "$CUSTOMERS" --s 1.0 --out "$IDS" --urls "near=$A" --part "$RUN/parts/zipf.json"
    log "auth cost: wrk at $CONC connections, ${SECS}s each, on A (open) and F (key, rate limit, shedding)"
    # shellcheck disable=SC2086
    "$PY" "$BENCH" hitpath --targets "near=$A" "near-auth=$F" --metrics near near-auth \
        --conc $CONC --seconds "$SECS" --ids "$IDS" --redis-port "$TESTBED_REDIS_PORT" \
        --redis-n "$REDIS_N" --doc-bytes "$DOC_BYTES" --raw-log "$RAW" --part "$RUN/parts/hitpath.json"
    "$PY" "$BENCH" auth-cost --part "$RUN/parts/hitpath.json" --meta "$RUN/meta.json" \
        --machine "$RUN/parts/machine.json" --out "$RESULTS/$NAME-auth.json"
    log "results: $RESULTS/$NAME-auth.json, $RESULTS/$NAME-auth.md"
    exit 0
fi

if [ "$MODE" = hitpath ]; then
    log "API H (B with auth and limits), reference servers C (constant body) and G (one Redis GET)"
    api_h
    reference_c
    reference_g
    "$PY" "$BENCH" zipf --keys "$CUSTOMERS" --s 1.0 --out "$IDS" --part "$RUN/parts/zipf.json"
    log "hit path: wrk at $CONC connections, ${SECS}s each, on A, B, C, G, F, H; $ROUNDS interleaved rounds"
    # shellcheck disable=SC2086
    "$PY" "$BENCH" hitpath-rounds \
        --targets "near=$A" "redis=$B" "reference=$C" "redis-reference=$G" "near-auth=$F" "redis-auth=$H" \
        --metrics near redis near-auth redis-auth --expect near=local near-auth=local redis=redis redis-auth=redis \
        --conc $CONC --seconds "$SECS" --rounds "$ROUNDS" --ids "$IDS" --raw-log "$RAW" \
        --run-dir "$RUN" --out "$RESULTS/$NAME-hitpath.json"
    log "results: $RESULTS/$NAME-hitpath.json, $RESULTS/$NAME-hitpath.md"
    exit 0
fi

reference_c

"$PY" "$BENCH" zipf --keys "$CUSTOMERS" --s 1.0 --out "$IDS" --urls "near=$A" "redis=$B" "reference=$C" --part "$RUN/parts/zipf.json"

# ---------------------------------------------------------------- hit path
log "hit path: wrk at $CONC connections, ${SECS}s each, on A, F, B, C; redis-benchmark at the same concurrency"
# shellcheck disable=SC2086
"$PY" "$BENCH" hitpath --targets "near=$A" "near-auth=$F" "redis=$B" "reference=$C" --metrics near near-auth redis \
    --conc $CONC --seconds "$SECS" --ids "$IDS" --redis-port "$TESTBED_REDIS_PORT" \
    --redis-n "$REDIS_N" --doc-bytes "$DOC_BYTES" --raw-log "$RAW" --part "$RUN/parts/hitpath.json"

# ---------------------------------------------------------------- fixed-rate latency
log "latency under fixed offered load: oha at $RATES req/s, ${OHA_SECS}s each, on A, B and the reference C"
# shellcheck disable=SC2086
"$PY" "$BENCH" latency --targets "near=$IDS.near.urls" "redis=$IDS.redis.urls" "reference=$IDS.reference.urls" --rates $RATES \
    --seconds "$OHA_SECS" --conc 64 --raw-log "$RAW" --part "$RUN/parts/latency.json"

# ---------------------------------------------------------------- offload (warm)
log "database offload on a warm system: 95/5 reads/writes on A for ${MIX_SECS}s"
"$PY" "$BENCH" offload --api "$A" --label warm --ids "$IDS" --seconds "$MIX_SECS" --conc 64 \
    --raw-log "$RAW" --part "$RUN/parts/offload_warm.json"
settle
"$PY" "$BENCH" probe --api "$A" --label "offload, warm" \
    --part "$RUN/parts/probe_after_offload_warm.json"

# ---------------------------------------------------------------- miss path
log "miss path: flushing features:* from Redis, restarting B (empty, no near cache)"
settle
flush_features
proc stop --name api-b
api_b
"$PY" "$BENCH" miss --api "$B" --near-api "$A" --keys "$CUSTOMERS" --count 1000 --part "$RUN/parts/miss.json"
log "stampede: 1000 concurrent GETs of one cold key on B"
"$PY" "$BENCH" stampede --api "$B" --redis-port "$TESTBED_REDIS_PORT" --keys-range "$CUSTOMERS" \
    --n 1000 --repeat 3 --part "$RUN/parts/stampede.json"

# ---------------------------------------------------------------- offload (cold)
log "database offload from cold: flushing features:*, restarting A, 95/5 on A for ${MIX_SECS}s"
settle
flush_features
proc stop --name api-a
api_a
"$PY" "$BENCH" offload --api "$A" --label cold --ids "$IDS" --seconds "$MIX_SECS" --conc 64 \
    --raw-log "$RAW" --part "$RUN/parts/offload_cold.json"
settle
"$PY" "$BENCH" probe --api "$A" --label "offload, cold" \
    --part "$RUN/parts/probe_after_offload_cold.json"
# The lag phase starts from a fresh A (the probe above says whether the old one still reached MongoDB).
proc stop --name api-a
api_a

# ---------------------------------------------------------------- invalidation
lag_phase
log "invalidator throughput: versioned writes straight into MongoDB from 4 threads, ${TP_SECS}s"
settle
"$PY" "$BENCH" throughput --invalidator "$I" --invalidator-pid "$(proc pid --name invalidator)" \
    --mongo-pid "$("$XT" proc pid --dir "$TB" --name mongo)" --mongo-uri "$MONGO_URI" --keys "$CUSTOMERS" --threads 4 \
    --seconds "$TP_SECS" --part "$RUN/parts/throughput.json"

# ---------------------------------------------------------------- memory
settle
proc stop --name reference; proc stop --name api-b; proc stop --name api-d; proc stop --name api-f
memory_phase memory

# ---------------------------------------------------------------- report
finish_meta
"$PY" "$BENCH" report --run-dir "$RUN" --name "$NAME" --out "$RESULTS/$NAME.json"
log "results: $RESULTS/$NAME.json, $RESULTS/$NAME.md, $RESULTS/$NAME-*.png"
