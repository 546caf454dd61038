"""The command line of bench/bench.py: one subcommand per phase, each with its
arguments, dispatched to the phase's ``cmd_*`` function."""

from __future__ import annotations

import argparse

from . import report
from .phases import hitpath, invalidation, memory, miss, offload, profile, recovery, setup, warmup

DESCRIPTION = """Measurement driver for bench/run.sh: one subcommand per phase.

Every phase writes one JSON file (``--out``) into the run directory; ``report``
merges them into ``bench/results/<name>.json``, draws the plots and writes a
Markdown summary. bench/run.sh starts and stops the processes; this file only
measures. Run ``bench.py <phase> --help`` for the arguments of each phase.

Numbers come from three places, named in the JSON next to each figure:
- the load generators (wrk, oha, redis-benchmark), parsed from their output;
- this script's own clients (serial latencies, stampede, lag), timed with
  time.perf_counter() around a keep-alive HTTP/1.1 request or a Redis command;
- the services' Prometheus /metrics, read before and after a phase (deltas).
"""


def arg(*flags, **options):
    """One add_argument call, as data."""
    return flags, options


# Arguments several phases share, spelled once.
PART = arg("--part", required=True)
API = arg("--api", required=True)
REDIS_PORT = arg("--redis-port", type=int, required=True)
RAW_LOG = arg("--raw-log")
KEYS = arg("--keys", type=int, default=10000)
# Where the benchmark's documents live (the services' defaults).
MONGO = (
    arg("--mongo-uri", required=True),
    arg("--mongo-db", default="cache_demo"),
    arg("--mongo-collection", default="customer_features"),
)


def seconds(default: float):
    return arg("--seconds", type=float, default=default)


def seed(default: int):
    return arg("--seed", type=int, default=default)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def phase(name, fn, *arguments):
        sp = sub.add_parser(name)
        sp.set_defaults(fn=fn)
        for flags, options in arguments:
            sp.add_argument(*flags, **options)

    phase("machine", setup.cmd_machine, PART, arg("--sample-seconds", type=float, default=3))
    phase("zipf", setup.cmd_zipf,
          KEYS, arg("--s", type=float, default=1.0), arg("--samples", type=int, default=200000), seed(42),
          arg("--out", required=True),
          arg("--urls", nargs="*", help="NAME=BASE_URL: also write OUT.NAME.urls for oha"), PART)
    phase("warm", setup.cmd_warm, API, arg("--count", type=int, default=10000))
    phase("sizes", setup.cmd_sizes, API, REDIS_PORT, arg("--count", type=int, default=10000), PART)
    phase("hitpath", hitpath.cmd_hitpath,
          arg("--targets", nargs="+", required=True, help="NAME=URL"),
          arg("--metrics", nargs="*", default=[], help="targets whose /metrics to diff"),
          arg("--conc", type=int, nargs="+", default=[1, 16, 64, 256]), seconds(10),
          arg("--ids", required=True), REDIS_PORT, arg("--redis-n", type=int, default=200000),
          arg("--doc-bytes", type=int, required=True), RAW_LOG, PART)
    phase("hitpath-rounds", hitpath.cmd_hitpath_rounds,
          arg("--targets", nargs="+", required=True, help="NAME=URL"),
          arg("--metrics", nargs="*", default=[], help="targets whose /metrics to diff"),
          arg("--expect", nargs="*", default=[], help="NAME=SOURCE: the x-cache-source its hits must have"),
          arg("--conc", type=int, nargs="+", default=[16, 64, 256]), seconds(10),
          arg("--rounds", type=int, default=2), arg("--ids", required=True), RAW_LOG,
          arg("--run-dir", required=True, help="meta.json and parts/{machine,sizes,zipf}.json"),
          arg("--out", required=True))
    phase("auth-cost", hitpath.cmd_auth_cost,
          arg("--part", required=True, help="the hitpath phase's JSON"),
          arg("--meta", required=True), arg("--machine", required=True), arg("--out", required=True))
    phase("latency", hitpath.cmd_latency,
          arg("--targets", nargs="+", required=True, help="NAME=URL_FILE"),
          arg("--rates", type=int, nargs="+", default=[2000, 5000, 10000, 20000]), seconds(10),
          arg("--conc", type=int, default=64), RAW_LOG, PART)
    phase("miss", miss.cmd_miss,
          API, arg("--near-api"), KEYS, arg("--count", type=int, default=1000), seed(7), PART)
    phase("stampede", miss.cmd_stampede,
          API, REDIS_PORT,
          arg("--keys-range", type=int, default=10000, help="pick cold keys among CUST00001..N"),
          arg("--n", type=int, default=1000), arg("--repeat", type=int, default=3), seed(11), PART)
    phase("offload", offload.cmd_offload,
          API, arg("--label", required=True), arg("--ids", required=True), seconds(15),
          arg("--conc", type=int, default=64), arg("--write-fraction", type=float, default=0.05), RAW_LOG, PART)
    phase("lag", invalidation.cmd_lag,
          arg("--api-a", required=True), arg("--api-d", required=True), arg("--invalidator", required=True),
          REDIS_PORT, *MONGO, KEYS, arg("--writes", type=int, default=1000),
          arg("--timeout", type=float, default=5.0), seed(13), PART)
    phase("throughput", invalidation.cmd_throughput,
          arg("--invalidator", required=True), arg("--invalidator-pid", type=int), arg("--mongo-pid", type=int),
          *MONGO, KEYS, arg("--threads", type=int, default=4), seconds(10), PART)
    phase("settle", recovery.cmd_settle,
          arg("--invalidator", required=True), *MONGO,
          arg("--quiet", type=float, default=2.0), arg("--max", type=float, default=120.0))
    phase("probe", recovery.cmd_probe,
          API, arg("--label", required=True), arg("--tries", type=int, default=5),
          arg("--pause", type=float, default=2.0), PART)
    phase("callgrind-summary", profile.cmd_callgrind_summary,
          arg("runs", nargs="+", help="LABEL=CALLGRIND_OUT=WRK_OUTPUT"), arg("--top", type=int, default=25))
    phase("memory", memory.cmd_memory,
          API, arg("--pid", type=int, required=True), REDIS_PORT,
          arg("--counts", type=int, nargs="+", default=[10000, 100000]), PART)
    phase("recovery10", warmup.cmd_recovery10,
          arg("--apis", nargs="+", required=True), arg("--invalidator", required=True),
          arg("--label", required=True), arg("--ids", required=True),
          arg("--flush-script", required=True, help="a bash script that makes the invalidator flush"),
          arg("--rate", type=float, default=1000), arg("--threads", type=int, default=8),
          arg("--before", type=float, default=20), arg("--after", type=float, default=10), PART)
    phase("storm", warmup.cmd_storm,
          API, arg("--label", required=True), arg("--ids", type=int, default=100),
          arg("--per-id", type=int, default=50), arg("--threads", type=int, default=8), seed(5), PART)
    phase("report", report.cmd_report,
          arg("--run-dir", required=True), arg("--name", required=True), arg("--out", required=True))
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    a.fn(a)
