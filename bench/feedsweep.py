#!/usr/bin/env python3
"""Invalidator throughput against batch size and partitions (BENCHMARKS.md,
"Invalidation lag and invalidator throughput").

    bench/feedsweep.py [--seconds 5] [--rounds 2] [--batches 1 4 16 64 256] [--partitions 1 3]
                       [--rate 0] [--cluster] [--name NAME] [--bin-dir DIR]

Runs invalidator-feedbench (services/invalidator/src/bin/feedbench.rs: a
synthetic change feed through the apply pipeline, decoded change -> guarded
Redis write, announcement on the partition's stream and channel, position
save; MongoDB is never contacted) on a private redis-server on a free port,
for every batch size and partition count (INVALIDATION_PARTITIONS), `--rounds`
interleaved rounds, Redis flushed before each run. With --cluster also on a
3-master + 3-replica Redis Cluster, interleaved with the single Redis.
Needs the release binary invalidator-feedbench (`cargo build --release -p
cache-invalidator`, or --bin-dir), redis-server and redis-cli; the plots need
matplotlib (bench/.venv, made by bench/run.sh: run this with bench/.venv/bin/python).
Writes bench/results/NAME-feed.{json,md}, NAME-feed-throughput.png (changes/s
against batch size, the 50,000/s target dashed) and NAME-feed-lag.png (p50/p99
lag of a change, from when it was due to its batch's announcement).
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from harness.loadgen import run_feedbench  # noqa: E402
from harness.output import log, write_json  # noqa: E402
from harness.plots import make_plots  # noqa: E402
from harness.servers import Procs, free_port, redis_cli, start_cluster, start_redis  # noqa: E402

# The target through the Redis side with a single leader.
TARGET_CHANGES_PER_S = 50_000


def topologies(procs: Procs, cluster: bool) -> dict:
    """Per topology: the settings that point the feedbench at it, and the
    ports of the masters to flush between runs."""
    single = free_port()
    start_redis(procs, single)
    out = {"single": ({"REDIS_URL": f"redis://127.0.0.1:{single}/0"}, [single])}
    if cluster:
        ports = start_cluster(procs)
        out["cluster"] = ({"REDIS_CLUSTER_NODES": ",".join(f"127.0.0.1:{p}" for p in ports[:3]),
                           "REDIS_URL": f"redis://127.0.0.1:{ports[0]}/0"}, ports[:3])
    return out


def summarize(runs: list[dict], batches: list[int]) -> dict:
    """Per series (topology and partitions), per batch size: the median over
    rounds of changes/s and of the lag percentiles, with each round's figure."""
    series: dict[str, list[dict]] = {}
    for key in dict.fromkeys((r["topology"], r["partitions"]) for r in runs):
        topology, partitions = key
        rows = []
        for batch in batches:
            cell = [r for r in runs if (r["topology"], r["partitions"], r["batch"]) == (topology, partitions, batch)]
            if not cell:
                continue
            rows.append({
                "batch": batch,
                "changes_per_s_median": round(statistics.median(r["changes_per_s"] for r in cell), 1),
                "changes_per_s_rounds": [round(r["changes_per_s"], 1) for r in cell],
                "lag_p50_ms_median": round(statistics.median(r["lag_ms"]["p50"] for r in cell), 3),
                "lag_p99_ms_median": round(statistics.median(r["lag_ms"]["p99"] for r in cell), 3),
                "lag_p99_ms_rounds": [r["lag_ms"]["p99"] for r in cell],
            })
        series[f"{topology}, {partitions} partition{'s' if partitions > 1 else ''}"] = rows
    return series


def markdown(res: dict) -> str:
    feed = res["feed"]
    rate = f"{feed['rate']}/s" if feed["rate"] else "as fast as it goes"
    lines = [
        f"# Invalidator throughput by batch size `{res['name']}`", "",
        f"invalidator-feedbench, {feed['seconds']} s a run, offered rate {rate}, {feed['rounds']} interleaved "
        f"rounds (median; each round in brackets); Redis flushed before each run. Target: "
        f"{TARGET_CHANGES_PER_S:,} changes/s.", "",
        "| series | batch | changes/s | rounds | lag p50 ms | lag p99 ms | p99 rounds | target met |",
        "|---|---:|---:|---|---:|---:|---|---|",
    ]
    for series, rows in feed["series"].items():
        for r in rows:
            lines.append(
                f"| {series} | {r['batch']} | {r['changes_per_s_median']:,.0f} | "
                f"{', '.join(f'{x:,.0f}' for x in r['changes_per_s_rounds'])} | {r['lag_p50_ms_median']} | "
                f"{r['lag_p99_ms_median']} | {', '.join(str(x) for x in r['lag_p99_ms_rounds'])} | "
                f"{'yes' if r['changes_per_s_median'] >= TARGET_CHANGES_PER_S else 'no'} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rate", type=int, default=0, help="changes/s offered (0: as fast as it goes)")
    parser.add_argument("--cluster", action="store_true", help="also on a 3+3 Redis Cluster")
    parser.add_argument("--name", default=time.strftime("feed-%Y%m%d-%H%M"))
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "release"),
                        help="where invalidator-feedbench is (default target/release)")
    args = parser.parse_args()
    binary = Path(args.bin_dir) / "invalidator-feedbench"
    if not binary.exists():
        sys.exit(f"{binary} is missing (cargo build --release -p cache-invalidator, or --bin-dir)")
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing")
    workdir = Path(tempfile.mkdtemp(prefix="bench-feed-"))
    procs = Procs(workdir)
    raw_log = workdir / "feedbench.log"
    runs = []
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        redis = topologies(procs, args.cluster)
        # MongoDB is never contacted; the settings still want a URI (a port nothing listens on).
        mongo = {"MONGO_URI": f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=1000"}
        for round_no in range(1, args.rounds + 1):
            for topology, (env, masters) in redis.items():
                for partitions in args.partitions:
                    for batch in args.batches:
                        for port in masters:
                            redis_cli(port, "FLUSHALL")
                        res = run_feedbench(binary, {**env, **mongo, "MONGO_DB": f"feed_{round_no}"}, batch,
                                            partitions, args.seconds, args.rate, raw_log)
                        runs.append({"round": round_no, "topology": topology, **res})
                        log(f"round {round_no} {topology} P={partitions} batch {batch:>3}: "
                            f"{res['changes_per_s']:>9,.0f} changes/s, lag p50 {res['lag_ms']['p50']} "
                            f"p99 {res['lag_ms']['p99']} ms")
    finally:
        procs.stop_all()
    result = {
        "name": f"{args.name}-feed",
        "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "binary": str(binary),
        "feed": {
            "seconds": args.seconds,
            "rate": args.rate,
            "rounds": args.rounds,
            "target_changes_per_s": TARGET_CHANGES_PER_S,
            "series": summarize(runs, args.batches),
            "runs": runs,
        },
    }
    out = ROOT / "bench" / "results" / f"{args.name}-feed.json"
    write_json(out, result)
    result["plots"] = make_plots(result, out.parent, args.name)
    write_json(out, result)
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    log(f"results: {out}, {out.with_suffix('.md')}, plots {result['plots']}; raw output {raw_log}")


if __name__ == "__main__":
    main()
