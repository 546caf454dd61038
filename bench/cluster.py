#!/usr/bin/env python3
"""Redis Cluster beside a single Redis, in one run (BENCHMARKS.md, "Redis Cluster").

    bench/cluster.py [--seconds 8] [--rounds 2] [--partitions 3] [--name NAME] [--bin-dir DIR]

Needs release binaries (target/release/cache-api, cache-invalidator,
invalidator-feedbench: `cargo build --release -p cache-api -p cache-invalidator`),
redis-server, redis-cli, wrk, and the test bed's SecantusDB
(`cargo xtask testbed install`). Starts on loopback, free ports:
  - a single redis-server, and a 3-master + 3-replica cluster (redis-cli --cluster create);
  - SecantusDB;
  - per topology: one cache-invalidator and two cache-api replicas (A near cache on,
    B near cache off), then the other topology, interleaved `--rounds` times.
Measures per topology: near-cache hit and Redis hit req/s (wrk -t2 -c64, one hot set
of 1,000 keys), MongoDB write through A -> visible through the other replica B's
Redis read (the invalidation lag, 200 writes), and invalidator throughput with
invalidator-feedbench (batch 1 and 64; 1 and --partitions partitions).
Writes bench/results/NAME-cluster.{json,md}.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from harness.http import Http  # noqa: E402
from harness.loadgen import run_feedbench, run_wrk  # noqa: E402
from harness.servers import Procs, free_port, start_cluster, start_redis  # noqa: E402

RELEASE = ROOT / "target" / "release"
SECANTUS = ROOT / ".venv-secantus" / "bin" / "secantusd-py"
KEYS = 1000


def wait_http(url: str, timeout: float = 30.0):
    deadline = time.time() + timeout
    client = Http(url, timeout=2)
    while time.time() < deadline:
        try:
            status, _, _ = client.get("/readyz")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def start_stack(procs, mongo_uri, db, redis_env):
    env = {"MONGO_URI": mongo_uri, "MONGO_DB": db, "LOG_FORMAT": "json", "RUST_LOG": "warn",
           **redis_env}
    inv_port, a_port, b_port = free_port(), free_port(), free_port()
    inv = procs.start(f"inv-{db}", [str(RELEASE / "cache-invalidator")],
                      {**env, "HTTP_ADDR": f"127.0.0.1:{inv_port}", "INSTANCE_ID": f"inv-{db}"})
    a = procs.start(f"a-{db}", [str(RELEASE / "cache-api")],
                    {**env, "HTTP_ADDR": f"127.0.0.1:{a_port}", "INSTANCE_ID": f"a-{db}",
                     "LOCAL_CACHE_TTL_MS": "3600000"})
    b = procs.start(f"b-{db}", [str(RELEASE / "cache-api")],
                    {**env, "HTTP_ADDR": f"127.0.0.1:{b_port}", "INSTANCE_ID": f"b-{db}",
                     "LOCAL_CACHE_ENABLED": "false"})
    for port in (a_port, b_port):
        wait_http(f"http://127.0.0.1:{port}")
    wait_http(f"http://127.0.0.1:{inv_port}")
    return [inv, a, b], f"http://127.0.0.1:{a_port}", f"http://127.0.0.1:{b_port}"


def populate(a_url):
    client = Http(a_url)
    for n in range(KEYS):
        status, _, _ = client.post_json("/api/features/", {
            "customer_id": f"CL{n:05d}", "features": {"score": n / KEYS, "segment": "a"},
            "model_version": "v1"})
        assert status in (200, 201), status


def hit_path(a_url, b_url, ids_file, seconds):
    script = ROOT / "bench" / "wrk" / "zipf_get.lua"
    # Warm both tiers for every key first.
    for url in (a_url, b_url):
        client = Http(url)
        for n in range(KEYS):
            client.get(f"/api/features/CL{n:05d}/")
    near = run_wrk(a_url, 64, seconds, script, [str(ids_file)])
    redis_hit = run_wrk(b_url, 64, seconds, script, [str(ids_file)])
    return {"near_rps": near["rps"], "near_p99_ms": near["latency_ms"].get("p99"),
            "redis_rps": redis_hit["rps"], "redis_p99_ms": redis_hit["latency_ms"].get("p99")}


def invalidation_lag(a_url, b_url, writes=200):
    """Write through A; poll B (near cache off: it reads Redis) until it
    serves the new version. B reads Redis, so this is write -> Redis."""
    a, b = Http(a_url), Http(b_url)
    lags = []
    for n in range(writes):
        key = f"CL{n % KEYS:05d}"
        status, _, body = a.post_json("/api/features/", {
            "customer_id": key, "features": {"score": n}, "model_version": "v2"})
        version = json.loads(body)["version"]
        started = time.perf_counter()
        while True:
            _, _, got = b.get(f"/api/features/{key}/")
            if json.loads(got).get("version") == version:
                lags.append((time.perf_counter() - started) * 1000)
                break
            if time.perf_counter() - started > 5:
                lags.append(5000.0)
                break
    lags.sort()
    return {"p50_ms": round(statistics.median(lags), 2),
            "p99_ms": round(lags[int(len(lags) * 0.99) - 1], 2)}


def feedbench(env, batch, partitions, seconds):
    return run_feedbench(RELEASE / "invalidator-feedbench", env, batch, partitions, seconds)


def main():
    global RELEASE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--name", default=time.strftime("cluster-%Y%m%d-%H%M"))
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "release"),
                        help="where the release binaries are (default target/release)")
    args = parser.parse_args()
    RELEASE = Path(args.bin_dir)
    for tool in ("redis-server", "redis-cli", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing")
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    procs = Procs(workdir)
    results = {"single": [], "cluster": []}
    try:
        single = free_port()
        start_redis(procs, single)
        cluster = start_cluster(procs)
        mongo_port = free_port()
        (workdir / "mongo").mkdir()
        procs.start("secantus", [str(SECANTUS), "--host", "127.0.0.1", "--port", str(mongo_port),
                                 "--storage-path", str(workdir / "mongo"), "--sync-on-commit"])
        time.sleep(3)
        mongo_uri = f"mongodb://127.0.0.1:{mongo_port}/?replicaSet=secantus&retryWrites=false"
        ids_file = workdir / "ids.txt"
        ids_file.write_text("".join(f"CL{n % KEYS:05d}\n" for n in range(KEYS)))
        topologies = {
            "single": {"REDIS_URL": f"redis://127.0.0.1:{single}/0"},
            "cluster": {"REDIS_CLUSTER_NODES": ",".join(f"127.0.0.1:{p}" for p in cluster[:3]),
                        "REDIS_URL": f"redis://127.0.0.1:{cluster[0]}/0",
                        "INVALIDATION_PARTITIONS": str(args.partitions)},
        }
        for round_no in range(args.rounds):
            for name, redis_env in topologies.items():
                print(f"round {round_no + 1}: {name}", flush=True)
                db = f"bench_{name}_{round_no}"
                stack, a_url, b_url = start_stack(procs, mongo_uri, db, redis_env)
                populate(a_url)
                row = {"round": round_no + 1, **hit_path(a_url, b_url, ids_file, args.seconds),
                       "lag": invalidation_lag(a_url, b_url)}
                for proc in stack:
                    procs.stop(proc)
                env = {"MONGO_URI": mongo_uri, "MONGO_DB": f"feed_{name}_{round_no}", **redis_env}
                row["feed"] = [feedbench(env, batch, partitions, 4)
                               for partitions in sorted({1, args.partitions})
                               for batch in (1, 64)]
                results[name].append(row)
                print(json.dumps(row), flush=True)
    finally:
        procs.stop_all()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    lines = ["| topology | round | near hit req/s | Redis hit req/s | write → Redis p50 / p99 ms | "
             "feed changes/s (P=1 b=1, P=1 b=64, P=n b=1, P=n b=64) |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for row in rows:
            feed = ", ".join(f"{f['changes_per_s']:,.0f}" for f in row["feed"])
            lines.append(f"| {name} | {row['round']} | {row['near_rps']:,.0f} | "
                         f"{row['redis_rps']:,.0f} | {row['lag']['p50_ms']} / {row['lag']['p99_ms']} | "
                         f"{feed} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
