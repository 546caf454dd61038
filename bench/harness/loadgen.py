"""The load generators: wrk (closed loop, with bench/wrk/*.lua), oha (fixed
offered rate, latency-corrected), redis-benchmark (Redis GET, the floor of
a Redis hit) and invalidator-feedbench (a synthetic change feed through the
invalidator's apply pipeline). Each runner starts the tool, appends its
command and output to the raw log where it has one, and returns its figures
as a dict for the JSON part."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from .http import auth_headers

BENCH_DIR = Path(__file__).resolve().parent.parent
WRK_SCRIPTS = BENCH_DIR / "wrk"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _shown(cmd: list[str]) -> str:
    """The command as logged and recorded: the API key never appears."""
    return " ".join("Authorization: Bearer ***" if c.startswith("Authorization:") else c for c in cmd)


def _append_raw_log(raw_log, cmd: list[str], output: str) -> None:
    if raw_log:
        with open(raw_log, "a") as f:
            f.write("$ " + _shown(cmd) + "\n" + output + "\n")


def run_wrk(url: str, conc: int, seconds: float, script: Path, args: list[str], raw_log=None) -> dict:
    threads = min(2, conc)  # wrk needs at least one connection per thread
    cmd = [
        "wrk", f"-t{threads}", f"-c{conc}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
        "-s", str(script), url, "--", *args,
    ]
    proc = _run(cmd)
    _append_raw_log(raw_log, cmd, proc.stdout + proc.stderr)
    # The scripts print their summary as one JSON line (bench/wrk/common.lua).
    line = next((l for l in proc.stdout.splitlines() if l.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()} {proc.stdout[-500:]}")
    data = json.loads(line[len("WRKJSON "):])
    secs = data["duration_us"] / 1e6
    lat = {k: v / 1000.0 for k, v in data["latency_us"].items()}
    errors = sum(data["errors"].values())
    return {
        "tool": "wrk",
        "command": _shown(cmd),
        "threads": threads,
        "connections": conc,
        "seconds": round(secs, 3),
        "requests": data["requests"],
        "rps": round(data["requests"] / secs, 1),
        "errors": data["errors"],
        "error_total": errors,
        "latency_ms": {k: round(v, 3) for k, v in lat.items()},
    }


def run_redis_benchmark(port: int, conc: int, n: int, size: int, raw_log=None) -> dict:
    cmd = [
        "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
        "-c", str(conc), "-n", str(n), "-d", str(size), "--precision", "3",
    ]
    proc = _run(cmd)
    out = proc.stdout.replace("\r", "\n")  # its progress lines end in a bare CR
    _append_raw_log(raw_log, cmd, out + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {proc.stderr.strip()}")
    section = out.split("====== GET ======", 1)
    if len(section) != 2:
        raise RuntimeError("redis-benchmark printed no GET section")
    text = section[1]
    rps = float(re.search(r"throughput summary:\s*([\d.]+) requests per second", text).group(1))
    m = re.search(
        r"latency summary \(msec\):\s*\n\s*avg\s+min\s+p50\s+p95\s+p99\s+max\s*\n\s*"
        r"([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
        text,
    )
    avg, mn, p50, p95, p99, mx = (float(x) for x in m.groups())
    # The percentile table ("99.900% <= 0.807 milliseconds") gives upper
    # bounds for the percentiles the summary omits.
    table = [(float(a), float(b)) for a, b in re.findall(r"([\d.]+)% <= ([\d.]+) milliseconds", text)]

    def upper(p):
        ok = [ms for q, ms in table if q >= p]
        return min(ok) if ok else None

    return {
        "tool": "redis-benchmark",
        "command": _shown(cmd),
        "connections": conc,
        "requests": n,
        "value_bytes": size,
        "rps": rps,
        "latency_ms": {
            "mean": avg, "min": mn, "p50": p50, "p90": upper(90.0), "p95": p95,
            "p99": p99, "p99.9": upper(99.9), "max": mx,
        },
        "note": "p90 and p99.9 are upper bounds read from redis-benchmark's percentile table",
    }


def oha_bin() -> str | None:
    """bench/run.sh installs oha into bench/.cargo-bin; else one on PATH."""
    local = BENCH_DIR / ".cargo-bin" / "bin" / "oha"
    if local.exists():
        return str(local)
    return shutil.which("oha")


def run_oha(url_file: Path, rate: int, seconds: float, conc: int, raw_log=None) -> dict:
    cmd = [
        oha_bin(), "-z", f"{seconds:g}s", "-q", str(rate), "--latency-correction",
        "-c", str(conc), "--no-tui", "--output-format", "json",
        "--urls-from-file", str(url_file),
    ]
    for name, value in auth_headers().items():
        cmd[1:1] = ["-H", f"{name}: {value}"]
    proc = _run(cmd)
    _append_raw_log(raw_log, cmd, proc.stdout[:4000] + proc.stderr)  # the JSON is long; its head will do
    if proc.returncode != 0:
        raise RuntimeError(f"oha failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout)
    summary = data["summary"]
    lp = data.get("latencyPercentiles", {})
    codes = data.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if str(k).startswith("2"))
    # -z aborts the requests still in flight at the deadline: not errors.
    errors = sum(v for k, v in data.get("errorDistribution", {}).items() if "deadline" not in k)
    aborted = sum(v for k, v in data.get("errorDistribution", {}).items() if "deadline" in k)
    total = sum(codes.values())
    achieved = summary.get("requestsPerSec") or 0.0

    def ms(key):
        v = lp.get(key)
        return None if v is None else round(v * 1000.0, 3)

    return {
        "tool": "oha",
        "command": _shown(cmd),
        "offered_rps": rate,
        "achieved_rps": round(achieved, 1),
        "responses": total,
        "ok": ok,
        "errors": errors,
        "aborted_at_deadline": aborted,
        "error_kinds": data.get("errorDistribution", {}),
        "success_rate": summary.get("successRate"),
        "latency_ms": {
            "mean": round((summary.get("average") or 0) * 1000.0, 3),
            "p50": ms("p50"), "p90": ms("p90"), "p99": ms("p99"), "p99.9": ms("p99.9"),
            "max": round((summary.get("slowest") or 0) * 1000.0, 3),
        },
    }


def run_feedbench(binary: Path, env: dict, batch: int, partitions: int, seconds: float, rate: int = 0,
                  raw_log=None) -> dict:
    """One run of invalidator-feedbench (services/invalidator/src/bin/feedbench.rs)
    with `env` (REDIS_URL or REDIS_CLUSTER_NODES, MONGO_URI, MONGO_DB...) and
    INVALIDATION_PARTITIONS=`partitions`: its JSON line."""
    cmd = [str(binary), "--batch", str(batch), "--seconds", f"{seconds:g}", "--rate", str(rate)]
    proc = subprocess.run(cmd, env={**os.environ, **env, "INVALIDATION_PARTITIONS": str(partitions),
                                    "RUST_LOG": "error", "LOG_FORMAT": "json"},
                          capture_output=True, text=True, timeout=seconds + 120, check=False)
    _append_raw_log(raw_log, cmd, f"INVALIDATION_PARTITIONS={partitions}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"invalidator-feedbench failed ({proc.returncode}): {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
