#!/usr/bin/env python3
"""Measurement driver for bench/run.sh: one subcommand per phase.

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

from __future__ import annotations

import argparse
import asyncio
import http.client
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[bench.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: str | Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def pct(values, p: float):
    """Nearest-rank percentile (p in 0-100) of a list; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def summary_ms(seconds: list[float]) -> dict:
    """p50/p90/p99/p99.9/max/mean in milliseconds of a list of seconds."""
    ms = [x * 1000.0 for x in seconds]
    if not ms:
        return {"n": 0}
    out = {"n": len(ms), "mean": sum(ms) / len(ms), "min": min(ms)}
    for p in (50, 90, 99, 99.9):
        out[f"p{p:g}"] = pct(ms, p)
    out["max"] = max(ms)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


# ---------------------------------------------------------------- machine load


def cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return [int(x) for x in parts[1:]]


def cpu_delta(a: list[int], b: list[int]) -> dict:
    """Machine-wide CPU use between two /proc/stat samples, in % of all cores."""
    d = [y - x for x, y in zip(a, b)]
    total = sum(d[:8]) or 1
    idle = d[3] + d[4]
    steal = d[7] if len(d) > 7 else 0
    return {
        "busy_pct": round(100.0 * (total - idle - steal) / total, 1),
        "steal_pct": round(100.0 * steal / total, 1),
        "idle_pct": round(100.0 * idle / total, 1),
    }


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Window:
    """CPU and load of the machine over one measurement, for noise notes."""

    def __init__(self):
        self.t0 = time.time()
        self.cpu0 = cpu_times()
        self.load0 = loadavg()

    def close(self) -> dict:
        out = cpu_delta(self.cpu0, cpu_times())
        out["loadavg_1m_before"] = self.load0
        out["loadavg_1m_after"] = loadavg()
        out["seconds"] = round(time.time() - self.t0, 2)
        return out


# ---------------------------------------------------------------- HTTP, metrics


class Http:
    """A keep-alive HTTP/1.1 client on one connection (reconnects on error)."""

    def __init__(self, base: str, timeout: float = 10.0):
        u = urlparse(base)
        self.host, self.port = u.hostname, u.port
        self.timeout = timeout
        self.conn = None

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                return resp.status, resp, data
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise RuntimeError("unreachable")

    def get(self, path: str):
        return self.request("GET", path)

    def post_json(self, path: str, obj):
        return self.request(
            "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"}
        )

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(base: str) -> list[tuple[str, dict, float]]:
    client = Http(base)
    try:
        status, _, body = client.get("/metrics")
    finally:
        client.close()
    if status != 200:
        raise RuntimeError(f"{base}/metrics answered {status}")
    out = []
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(3))))
        except ValueError:
            pass
    return out


def msum(samples, name: str, **labels) -> float:
    total = 0.0
    for n, l, v in samples:
        if n == name and all(l.get(k) == want for k, want in labels.items()):
            total += v
    return total


def feature_gets(samples) -> float:
    """GET requests on the single-document route (both path spellings)."""
    return sum(
        v
        for n, l, v in samples
        if n == "http_requests_total"
        and l.get("method") == "GET"
        and l.get("route", "").startswith("/api/features/{")
    )


def feature_posts(samples) -> float:
    return sum(
        v
        for n, l, v in samples
        if n == "http_requests_total"
        and l.get("method") == "POST"
        and l.get("route", "").rstrip("/") == "/api/features"
    )


def tier_counts(samples) -> dict:
    return {
        "local_hit": msum(samples, "cache_requests_total", tier="local", result="hit"),
        "local_miss": msum(samples, "cache_requests_total", tier="local", result="miss"),
        "redis_hit": msum(samples, "cache_requests_total", tier="redis", result="hit"),
        "redis_miss": msum(samples, "cache_requests_total", tier="redis", result="miss"),
        "mongodb_find": msum(samples, "mongodb_commands_total", command="find"),
        "coalesced_waits": msum(samples, "cache_coalesced_waits_total"),
    }


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


# ---------------------------------------------------------------- load generators


def run_wrk(url: str, conc: int, seconds: float, script: Path, args: list[str], raw_log=None) -> dict:
    threads = min(2, conc)  # wrk needs at least one connection per thread
    cmd = [
        "wrk", f"-t{threads}", f"-c{conc}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
        "-s", str(script), url, "--", *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if raw_log:
        with open(raw_log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr + "\n")
    line = next((l for l in proc.stdout.splitlines() if l.startswith("WRKJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()} {proc.stdout[-500:]}")
    data = json.loads(line[len("WRKJSON "):])
    secs = data["duration_us"] / 1e6
    lat = {k: v / 1000.0 for k, v in data["latency_us"].items()}
    errors = sum(data["errors"].values())
    return {
        "tool": "wrk",
        "command": " ".join(cmd),
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
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = proc.stdout.replace("\r", "\n")
    if raw_log:
        with open(raw_log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n" + out + proc.stderr + "\n")
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
        "command": " ".join(cmd),
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
    local = HERE / ".cargo-bin" / "bin" / "oha"
    if local.exists():
        return str(local)
    return shutil.which("oha")


def run_oha(url_file: Path, rate: int, seconds: float, conc: int, raw_log=None) -> dict:
    cmd = [
        oha_bin(), "-z", f"{seconds:g}s", "-q", str(rate), "--latency-correction",
        "-c", str(conc), "--no-tui", "--output-format", "json",
        "--urls-from-file", str(url_file),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if raw_log:
        with open(raw_log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n" + proc.stdout[:4000] + proc.stderr + "\n")
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
        "command": " ".join(cmd),
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


# ---------------------------------------------------------------- phases


def cmd_zipf(a):
    """Precomputed Zipf draws over CUST00001..CUST{keys}: one id per line."""
    rng = random.Random(a.seed)
    ids = [f"CUST{n:05d}" for n in range(1, a.keys + 1)]
    rng.shuffle(ids)  # rank -> id: the hottest keys are spread over the id space
    weights = [1.0 / (k ** a.s) for k in range(1, a.keys + 1)]
    cum = list(itertools.accumulate(weights))
    draws = rng.choices(ids, cum_weights=cum, k=a.samples)
    Path(a.out).write_text("\n".join(draws) + "\n")
    for spec in a.urls or []:
        name, _, base = spec.partition("=")
        Path(f"{a.out}.{name}.urls").write_text(
            "".join(f"{base}/api/features/{i}/\n" for i in draws)
        )
    total = cum[-1]
    part = {
        "keys": a.keys,
        "s": a.s,
        "samples": a.samples,
        "seed": a.seed,
        "distinct_in_sample": len(set(draws)),
        "share_of_top_1": round(weights[0] / total, 4),
        "share_of_top_10": round(cum[9] / total, 4),
        "share_of_top_100": round(cum[99] / total, 4),
        "share_of_top_1000": round(cum[999] / total, 4),
    }
    write_json(a.part, part)
    log(f"zipf: {a.samples} draws over {a.keys} keys, s={a.s}; top-100 keys get {part['share_of_top_100']:.0%}")


def cmd_warm(a):
    """Reads every key once through an API with batch requests of 1000."""
    client = Http(a.api, timeout=60)
    ids = [f"CUST{n:05d}" for n in range(1, a.count + 1)]
    found = missing = 0
    t0 = time.perf_counter()
    for i in range(0, len(ids), 1000):
        status, _, body = client.post_json("/api/features/batch/", {"customer_ids": ids[i : i + 1000]})
        if status != 200:
            raise RuntimeError(f"batch read answered {status}: {body[:200]!r}")
        data = json.loads(body)
        found += len(data["found"])
        missing += len(data["missing"])
    elapsed = time.perf_counter() - t0
    status, _, body = client.get("/api/info/")
    entries = json.loads(body)["tiers"][0].get("entries") if status == 200 else None
    client.close()
    log(f"warm {a.api}: {found} found, {missing} missing in {elapsed:.1f}s; near-cache entries: {entries}")
    if missing:
        raise SystemExit(f"warm: {missing} ids missing")


def cmd_sizes(a):
    """Average stored document size (Redis) and response body size (API)."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=a.redis_port)
    rng = random.Random(1)
    sample = [f"CUST{rng.randint(1, a.count):05d}" for _ in range(300)]
    lens = [r.strlen(f"features:{i}") for i in sample]
    lens = [x for x in lens if x]
    client = Http(a.api)
    bodies = [len(client.get(f"/api/features/{i}/")[2]) for i in sample[:100]]
    client.close()
    doc = round(sum(lens) / len(lens))
    body = round(sum(bodies) / len(bodies))
    write_json(a.part, {"doc_bytes_in_redis": doc, "response_body_bytes": body, "sampled": len(lens)})
    print(f"{doc} {body}")


def cmd_hitpath(a):
    targets = [t.split("=", 1) for t in a.targets]
    script = HERE / "wrk" / "zipf_get.lua"
    levels = []
    for conc in a.conc:
        level = {"connections": conc, "targets": {}}
        for name, url in targets:
            metrics_before = tier_counts(scrape(url)) if name in a.metrics else None
            win = Window()
            res = run_wrk(url, conc, a.seconds, script, [a.ids], a.raw_log)
            res["machine"] = win.close()
            if metrics_before is not None:
                res["tiers"] = delta(tier_counts(scrape(url)), metrics_before)
            level["targets"][name] = res
            lat = res["latency_ms"]
            log(
                f"hit c={conc:<3} {name:<10} {res['rps']:>9.0f} req/s  p50 {lat['p50']:.3f} "
                f"p99 {lat['p99']:.3f} p99.9 {lat['p99.9']:.3f} ms  errors {res['error_total']}"
            )
        win = Window()
        rb = run_redis_benchmark(a.redis_port, conc, a.redis_n if conc > 1 else max(a.redis_n // 4, 10000), a.doc_bytes, a.raw_log)
        rb["machine"] = win.close()
        level["targets"]["redis-benchmark"] = rb
        log(
            f"hit c={conc:<3} redis-bench {rb['rps']:>9.0f} req/s  p50 {rb['latency_ms']['p50']:.3f} "
            f"p99 {rb['latency_ms']['p99']:.3f} ms"
        )
        levels.append(level)
    write_json(a.part, {"seconds": a.seconds, "levels": levels})


def cmd_latency(a):
    if oha_bin() is None:
        write_json(a.part, {"skipped": "oha is not installed"})
        log("latency: oha missing; skipped")
        return
    out = {"seconds": a.seconds, "connections": a.conc, "targets": {}}
    for spec in a.targets:
        name, url_file = spec.split("=", 1)
        rows = []
        for rate in a.rates:
            win = Window()
            res = run_oha(Path(url_file), rate, a.seconds, a.conc, a.raw_log)
            res["machine"] = win.close()
            res["saturated"] = res["achieved_rps"] < 0.95 * rate
            rows.append(res)
            lat = res["latency_ms"]
            log(
                f"oha {name:<8} offered {rate:>6} achieved {res['achieved_rps']:>8.0f}  p50 {lat['p50']} "
                f"p99 {lat['p99']} p99.9 {lat['p99.9']} ms{'  SATURATED' if res['saturated'] else ''}"
            )
            time.sleep(1)
        sat = next((r["offered_rps"] for r in rows if r["saturated"]), None)
        out["targets"][name] = {"runs": rows, "first_saturated_offered_rps": sat}
    write_json(a.part, out)


def cmd_miss(a):
    """Cold keys, serially, on an API whose tiers are empty; then the same keys warm."""
    client = Http(a.api)
    rng = random.Random(a.seed)
    keys = [f"CUST{n:05d}" for n in rng.sample(range(1, a.keys + 1), a.count)]
    before = tier_counts(scrape(a.api))

    def serial(label):
        lat, sources = [], {}
        for k in keys:
            t0 = time.perf_counter()
            status, resp, _ = client.get(f"/api/features/{k}/")
            lat.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"{label}: GET {k} answered {status}")
            src = resp.getheader("x-cache-source")
            sources[src] = sources.get(src, 0) + 1
        return {"latency_ms": summary_ms(lat), "sources": sources}

    win = Window()
    cold = serial("cold")
    mid = tier_counts(scrape(a.api))
    warm = serial("warm")
    after = tier_counts(scrape(a.api))
    cold["metrics_delta"] = delta(mid, before)
    warm["metrics_delta"] = delta(after, mid)
    out = {"api": a.api, "keys": a.count, "client": "python http.client, one keep-alive connection",
           "cold": cold, "warm": warm}
    if a.near_api:
        near = Http(a.near_api)
        lat, sources = [], {}
        for k in keys:
            t0 = time.perf_counter()
            status, resp, _ = near.get(f"/api/features/{k}/")
            lat.append(time.perf_counter() - t0)
            src = resp.getheader("x-cache-source")
            sources[src] = sources.get(src, 0) + 1
        near.close()
        out["near_hit_same_client"] = {"api": a.near_api, "latency_ms": summary_ms(lat), "sources": sources}
    out["machine"] = win.close()
    client.close()
    write_json(a.part, out)
    log(
        f"miss: cold p50 {cold['latency_ms']['p50']} p99 {cold['latency_ms']['p99']} ms {cold['sources']}; "
        f"warm p50 {warm['latency_ms']['p50']} p99 {warm['latency_ms']['p99']} ms {warm['sources']}"
    )


async def _stampede_once(host: str, port: int, path: str, n: int) -> dict:
    conns = []
    for i in range(0, n, 100):  # connect in groups: the listen backlog is finite
        conns += await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(min(100, n - i))))
    await asyncio.sleep(0.2)  # every connection accepted before the burst
    req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

    async def one(reader, writer, t0):
        head = await reader.readuntil(b"\r\n\r\n")
        t1 = time.perf_counter()
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
        await reader.readexactly(int(headers.get("content-length", "0")))
        writer.close()
        return status, headers.get("x-cache-source"), t1 - t0

    t0 = time.perf_counter()
    for _, writer in conns:  # all requests leave in one event-loop turn
        writer.write(req)
    sent = time.perf_counter() - t0
    results = await asyncio.gather(*(one(r, w, t0) for r, w in conns))
    statuses, sources = {}, {}
    for status, src, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
        sources[src] = sources.get(src, 0) + 1
    return {
        "requests": n,
        "send_spread_ms": round(sent * 1000, 3),
        "statuses": statuses,
        "sources": sources,
        "latency_ms": summary_ms([r[2] for r in results]),
    }


def cmd_stampede(a):
    import redis

    r = redis.Redis(host="127.0.0.1", port=a.redis_port)
    u = urlparse(a.api)
    rng = random.Random(a.seed)
    candidates = [f"CUST{n:05d}" for n in rng.sample(range(1, a.keys_range + 1), a.keys_range)]
    cold = [k for k in candidates if not r.exists(f"features:{k}")][: a.repeat]
    if len(cold) < a.repeat:
        raise SystemExit("stampede: not enough cold keys (is Redis flushed?)")
    runs = []
    for key in cold:
        before = tier_counts(scrape(a.api))
        res = asyncio.run(_stampede_once(u.hostname, u.port, f"/api/features/{key}/", a.n))
        time.sleep(0.3)
        res["key"] = key
        res["metrics_delta"] = delta(tier_counts(scrape(a.api)), before)
        runs.append(res)
        log(
            f"stampede {key}: {a.n} concurrent GETs -> MongoDB finds {res['metrics_delta']['mongodb_find']:.0f}, "
            f"coalesced waits {res['metrics_delta']['coalesced_waits']:.0f}, sources {res['sources']}, "
            f"p50 {res['latency_ms']['p50']} max {res['latency_ms']['max']} ms"
        )
    write_json(a.part, {"api": a.api, "concurrent_requests": a.n, "runs": runs,
                        "mongodb_finds_per_stampede": [r["metrics_delta"]["mongodb_find"] for r in runs]})


def cmd_offload(a):
    before_s = scrape(a.api)
    win = Window()
    res = run_wrk(a.api, a.conc, a.seconds, HERE / "wrk" / "mixed.lua", [a.ids, str(a.write_fraction)], a.raw_log)
    res["machine"] = win.close()
    after_s = scrape(a.api)
    reads = feature_gets(after_s) - feature_gets(before_s)
    writes = feature_posts(after_s) - feature_posts(before_s)
    writes_by_status = {}
    for n, l, v in after_s:
        if n == "http_requests_total" and l.get("method") == "POST" and l.get("route", "").rstrip("/") == "/api/features":
            prev = sum(v2 for n2, l2, v2 in before_s if n2 == n and l2 == l)
            if v - prev:
                writes_by_status[l.get("status")] = v - prev
    tiers = delta(tier_counts(after_s), tier_counts(before_s))
    out = {
        "label": a.label,
        "api": a.api,
        "wrk": res,
        "reads": reads,
        "writes": writes,
        "writes_by_status": writes_by_status,
        "tiers": tiers,
        "reads_reaching_mongodb": tiers["redis_miss"],
        "fraction_of_reads_reaching_mongodb": (tiers["redis_miss"] / reads) if reads else None,
        "mongodb_find_commands": tiers["mongodb_find"],
        "database_read_offload_pct": round(100.0 * (1 - tiers["redis_miss"] / reads), 3) if reads else None,
    }
    write_json(a.part, out)
    log(
        f"offload[{a.label}]: {reads:.0f} reads, {writes:.0f} writes in {res['seconds']}s; reads reaching MongoDB "
        f"{tiers['redis_miss']:.0f} ({out['fraction_of_reads_reaching_mongodb']:.4%}); tiers {tiers}"
    )


def cmd_lag(a):
    import pymongo
    import redis

    r = redis.Redis(host="127.0.0.1", port=a.redis_port)
    coll = pymongo.MongoClient(a.mongo_uri)[a.mongo_db][a.mongo_collection]
    api_a, api_d = Http(a.api_a), Http(a.api_d)
    replicas = {"A": api_a, "D": api_d}
    rng = random.Random(a.seed)
    keys = [f"CUST{n:05d}" for n in rng.sample(range(1, a.keys + 1), a.writes)]
    # The API's writes only work again once the database has finished the
    # writes of the previous phase that timed out at the API (see settle).
    t_wait = time.perf_counter()
    ok_in_row = 0
    while ok_in_row < 2:
        if time.perf_counter() - t_wait > 300:
            raise SystemExit("lag: API writes still fail after 300 s")
        t0 = time.perf_counter()
        status, _, _ = api_a.post_json("/api/features/", {"customer_id": "CUST00001", "features": {"credit_score": 700}})
        ok_in_row = ok_in_row + 1 if status in (200, 201) and time.perf_counter() - t0 < 1.0 else 0
    api_write_recovery_s = time.perf_counter() - t_wait
    log(f"lag: API writes answer again after {api_write_recovery_s:.1f}s")
    inv_before = scrape(a.invalidator)
    results = []
    cycles = []
    write_times = []
    retried_writes = 0
    run_tag = f"{int(time.time())}"
    win = Window()
    for i, key in enumerate(keys):
        path = "api" if i % 2 == 0 else "direct"
        # Both replicas hold the current version in their near cache before the write.
        pre_sources = {}
        for name, client in replicas.items():
            client.get(f"/api/features/{key}/")
            status, resp, _ = client.get(f"/api/features/{key}/")
            pre_sources[name] = resp.getheader("x-cache-source")
        marker = f"lag-{run_tag}-{i}"
        needle = marker.encode()
        t_write = time.perf_counter()
        for attempt in range(1, 7):
            if path == "api":
                status, _, body = api_a.post_json(
                    "/api/features/",
                    {"customer_id": key, "features": {"credit_score": 700, "bench_marker": marker}},
                )
                if status in (200, 201):
                    break
                if status != 503 or attempt == 6:
                    raise RuntimeError(f"POST {key} answered {status}: {body[:200]!r}")
            else:
                res = coll.update_one({"_id": key}, {"$set": {"features.bench_marker": marker}})
                if res.matched_count != 1:
                    raise RuntimeError(f"direct update of {key} matched {res.matched_count}")
                break
            retried_writes += 1
            time.sleep(0.2 * attempt)
        t_ack = time.perf_counter()
        write_times.append(t_ack - t_write)
        seen = {"redis": None, "A": None, "D": None}
        first_poll = {}
        polls = 0
        while time.perf_counter() - t_ack < a.timeout and None in seen.values():
            polls += 1
            c0 = time.perf_counter()
            if seen["redis"] is None:
                v = r.get(f"features:{key}")
                if v is not None and needle in v:
                    seen["redis"] = time.perf_counter() - t_ack
                    first_poll["redis"] = polls == 1
            for name, client in replicas.items():
                if seen[name] is None:
                    _, _, body = client.get(f"/api/features/{key}/")
                    if needle in body:
                        seen[name] = time.perf_counter() - t_ack
                        first_poll[name] = polls == 1
            cycles.append(time.perf_counter() - c0)
            time.sleep(0.0002)
        results.append({"key": key, "path": path, "pre_sources": pre_sources, "polls": polls,
                        "seen_at_first_poll": first_poll, **seen})
        if (i + 1) % 200 == 0:
            log(f"lag: {i + 1}/{a.writes} writes")
    machine = win.close()
    inv_after = scrape(a.invalidator)

    def stats(path, target):
        vals = [x[target] for x in results if (path is None or x["path"] == path)]
        missing = sum(1 for v in vals if v is None)
        s = summary_ms([v for v in vals if v is not None])
        s["not_seen_within_timeout"] = missing
        s["seen_at_first_poll"] = sum(
            1 for x in results if (path is None or x["path"] == path) and x["seen_at_first_poll"].get(target)
        )
        return s

    table = {}
    for path in ("api", "direct", None):
        label = path or "all"
        table[label] = {t: stats(path, t) for t in ("redis", "A", "D")}
    lag_sum = {
        stage: msum(inv_after, "invalidation_lag_seconds_sum", stage=stage)
        - msum(inv_before, "invalidation_lag_seconds_sum", stage=stage)
        for stage in ("redis", "published")
    }
    lag_cnt = {
        stage: msum(inv_after, "invalidation_lag_seconds_count", stage=stage)
        - msum(inv_before, "invalidation_lag_seconds_count", stage=stage)
        for stage in ("redis", "published")
    }
    out = {
        "writes": a.writes,
        "api_writes": sum(1 for x in results if x["path"] == "api"),
        "direct_writes": sum(1 for x in results if x["path"] == "direct"),
        "timeout_s": a.timeout,
        "poll_cycle_ms": summary_ms(cycles),
        "write_ack_ms": summary_ms(write_times),
        "api_write_ack_ms": summary_ms([w for w, x in zip(write_times, results) if x["path"] == "api"]),
        "direct_write_ack_ms": summary_ms([w for w, x in zip(write_times, results) if x["path"] == "direct"]),
        "waited_for_api_writes_s": round(api_write_recovery_s, 1),
        "writes_retried_after_503": retried_writes,
        "lag_ms": table,
        "invalidator_reported_mean_lag_ms": {
            s: round(1000 * lag_sum[s] / lag_cnt[s], 3) if lag_cnt[s] else None for s in lag_sum
        },
        "invalidator_events": msum(inv_after, "invalidator_events_total") - msum(inv_before, "invalidator_events_total"),
        "machine": machine,
        "samples": results,
    }
    write_json(a.part, out)
    for label, row in table.items():
        log("lag[" + label + "]: " + "; ".join(
            f"{t} p50 {v.get('p50')} p99 {v.get('p99')} max {v.get('max')} ms (missed {v['not_seen_within_timeout']})"
            for t, v in row.items()))


VERSION_EXPR = {
    "$max": [
        {"$add": [{"$ifNull": ["$version", 0]}, 1]},
        {"$multiply": [{"$toLong": "$$NOW"}, 1000]},
    ]
}


def cmd_throughput(a):
    """Versioned writes straight into MongoDB from several threads, as fast as
    the database takes them; the invalidator's events/s over the same window."""
    import pymongo

    coll = pymongo.MongoClient(a.mongo_uri, maxPoolSize=a.threads + 2)[a.mongo_db][a.mongo_collection]
    samples = []
    stop_sampling = threading.Event()
    stop_writing = threading.Event()
    pids = {"invalidator": a.invalidator_pid, "mongodb": a.mongo_pid}
    acked = [0] * a.threads
    write_lat: list[float] = []
    lock = threading.Lock()

    def sampler():
        while not stop_sampling.is_set():
            try:
                m = scrape(a.invalidator)
                samples.append({
                    "t": time.perf_counter(),
                    "events": msum(m, "invalidator_events_total"),
                    "cpu": {k: proc_cpu_seconds(p) for k, p in pids.items() if p},
                })
            except Exception as e:  # noqa: BLE001 - a missed sample is not fatal
                log(f"throughput: sample failed: {e}")
            stop_sampling.wait(0.5)

    def writer(n):
        rng = random.Random(1000 + n)
        i = 0
        while not stop_writing.is_set():
            key = f"CUST{rng.randint(1, a.keys):05d}"
            t0 = time.perf_counter()
            coll.update_one(
                {"_id": key},
                [{"$set": {"features.bench_throughput": {"$literal": f"{n}-{i}"}, "version": VERSION_EXPR}}],
            )
            dt = time.perf_counter() - t0
            acked[n] += 1
            i += 1
            if i % 4 == 0:
                with lock:
                    write_lat.append(dt)

    sampler_thread = threading.Thread(target=sampler, daemon=True)
    sampler_thread.start()
    time.sleep(1.1)
    win = Window()
    t_start = time.perf_counter()
    writers = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(a.threads)]
    for w in writers:
        w.start()
    time.sleep(a.seconds)
    stop_writing.set()
    for w in writers:
        w.join()
    t_end = time.perf_counter()
    machine = win.close()
    writes = sum(acked)
    # Drain: until the event counter has stood still for 2 s (at most 120 s).
    last, still_since = None, time.perf_counter()
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        time.sleep(0.5)
        if samples and samples[-1]["events"] != last:
            last, still_since = samples[-1]["events"], time.perf_counter()
        elif time.perf_counter() - still_since > 2.0:
            break
    stop_sampling.set()
    sampler_thread.join()
    first = max((x for x in samples if x["t"] <= t_start), key=lambda x: x["t"], default=samples[0])
    in_window = [x for x in samples if t_start <= x["t"] <= t_end]
    last_in = in_window[-1] if in_window else samples[-1]
    win_secs = last_in["t"] - first["t"]
    ev_window = last_in["events"] - first["events"]
    total_events = samples[-1]["events"] - first["events"]
    final_t = next(x["t"] for x in samples if x["events"] == samples[-1]["events"])
    cpu_use = {
        k: round(100.0 * (last_in["cpu"][k] - first["cpu"][k]) / win_secs, 1)
        for k in pids
        if pids[k] and k in first["cpu"] and k in last_in["cpu"] and win_secs > 0
    }
    out = {
        "writer": f"{a.threads} Python threads, pymongo update_one with a version-advancing pipeline "
        "(what the API's write does, as an update instead of findAndModify)",
        "seconds": round(t_end - t_start, 2),
        "writes_acknowledged": writes,
        "write_rps": round(writes / (t_end - t_start), 1),
        "write_latency_ms": summary_ms(write_lat),
        "invalidator_events_in_window": ev_window,
        "invalidator_events_per_s": round(ev_window / win_secs, 1) if win_secs else None,
        "invalidator_events_total": total_events,
        "events_minus_writes": total_events - writes,
        "drain_after_last_write_s": round(max(0.0, final_t - t_end), 2),
        "cpu_pct_of_one_core_during_writes": cpu_use,
        "machine": machine,
        "timeline": [{"t": round(x["t"] - t_start, 2), "events": x["events"] - first["events"]} for x in samples],
    }
    write_json(a.part, out)
    log(
        f"throughput: {writes} writes acked ({out['write_rps']}/s), invalidator {out['invalidator_events_per_s']} "
        f"events/s, {total_events:.0f} events in all, drained {out['drain_after_last_write_s']}s after the "
        f"last write; CPU % of a core {cpu_use}"
    )


def _mem_docs(start: int, count: int):
    rng = random.Random(start)
    now = datetime.now(timezone.utc)
    calc = now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    exp = (now + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    segs = ["premium", "standard", "basic", "new"]
    version = int(time.time() * 1000) * 1000
    for n in range(start, start + count):
        cid = f"MEM{n:07d}"
        features = {
            "credit_score": rng.randint(300, 850),
            "annual_income": rng.randint(20000, 250000),
            "debt_to_income": round(rng.random() * 0.8, 3),
            "account_age_months": rng.randint(1, 240),
            "num_credit_cards": rng.randint(0, 10),
            "late_payments_12m": rng.randint(0, 6),
            "utilization_rate": round(rng.random(), 3),
            "has_mortgage": rng.random() < 0.4,
            "customer_segment": rng.choice(segs),
            "risk_score": round(rng.random(), 4),
        }
        doc = {"version": version, "customer_id": cid, "features": features,
               "calculated_at": calc, "model_version": "v1.0.0", "expires_at": exp}
        yield cid, json.dumps(doc, separators=(",", ":"))


def cmd_settle(a):
    """Waits until the previous phase's writes are done: the database answers
    a read, a small write and a no-op findAndModify within 1 s together, and
    the invalidator's event counter has stood still for --quiet seconds. (The
    stand-in goes on executing findAndModify writes whose API requests timed
    out long ago, and further findAndModify calls queue behind them.)"""
    import pymongo

    client = pymongo.MongoClient(a.mongo_uri, serverSelectionTimeoutMS=5000)
    coll = client[a.mongo_db][a.mongo_collection]
    probe_coll = client["bench_probe"]["probe"]  # not watched by the invalidator
    t0 = time.perf_counter()
    last, since = None, time.perf_counter()
    while time.perf_counter() - t0 < a.max:
        p0 = time.perf_counter()
        coll.find_one({"_id": "CUST00001"})
        probe_coll.update_one({"_id": "settle"}, {"$inc": {"n": 1}}, upsert=True)
        # A findAndModify that changes nothing (no change event) queues behind
        # the API's writes still executing in the database.
        client[a.mongo_db].command({
            "findAndModify": a.mongo_collection,
            "query": {"_id": "CUST00001"},
            "update": {"$set": {"customer_id": "CUST00001"}},
        })
        probe = time.perf_counter() - p0
        events = msum(scrape(a.invalidator), "invalidator_events_total")
        if events != last or probe > 1.0:
            last, since = events, time.perf_counter()
        elif time.perf_counter() - since >= a.quiet:
            log(f"settle: database and invalidator quiet ({events:.0f} events) after {time.perf_counter() - t0:.1f}s")
            return
        time.sleep(0.25)
    log(f"settle: still busy after {a.max}s; going on")


def cmd_probe(a):
    """Can the API still reach MongoDB? A write and a read of an id that exists
    nowhere (404 from MongoDB, 503 when unreachable); and whether the API's
    MongoDB command counter moves at all."""
    client = Http(a.api, timeout=10)
    before = msum(scrape(a.api), "mongodb_commands_total")
    attempts = []
    for i in range(a.tries):
        t0 = time.perf_counter()
        status, _, _ = client.post_json("/api/features/", {"customer_id": "CUST00001", "features": {"credit_score": 700}})
        t1 = time.perf_counter()
        # An id that exists nowhere: near cache and Redis miss, MongoDB answers 404.
        rstatus, resp, _ = client.get(f"/api/features/BENCHPROBE{int(time.time() * 1000)}/")
        attempts.append({
            "write_status": status, "write_ms": round((t1 - t0) * 1000, 1),
            "cold_read_status": rstatus, "cold_read_ms": round((time.perf_counter() - t1) * 1000, 1),
            "cold_read_source": resp.getheader("x-cache-source"),
        })
        if status in (200, 201) and rstatus == 404:
            break
        time.sleep(a.pause)
    after = msum(scrape(a.api), "mongodb_commands_total")
    hstatus, _, hbody = client.get("/api/health/")
    client.close()
    ok = any(x["write_status"] in (200, 201) and x["cold_read_status"] == 404 for x in attempts)
    out = {"api": a.api, "label": a.label, "mongodb_reachable": ok, "attempts": attempts,
           "mongodb_commands_sent_meanwhile": after - before, "health_status": hstatus,
           "health": json.loads(hbody) if hstatus in (200, 503) else None}
    write_json(a.part, out)
    log(f"probe[{a.label}]: MongoDB reachable through the API: {ok}; commands sent {after - before:.0f}; "
        f"health {hstatus}; attempts {attempts}")


def _callgrind_calls(path: str):
    """Instruction total and, per callee, calls by caller from a callgrind file."""
    names, total = {}, 0
    calls: dict[str, dict[str, int]] = {}
    fn = cfn = None
    for line in open(path, errors="replace"):
        m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?", line)
        if m:
            kind, id_, name = m.groups()
            if name:
                names[id_] = name
            if kind == "fn":
                fn, cfn = names.get(id_, id_), None
            else:
                cfn = names.get(id_, id_)
            continue
        m = re.match(r"^calls=(\d+)", line)
        if m and cfn:
            callee = cfn.split("'")[0]
            calls.setdefault(callee, {})
            calls[callee][fn] = calls[callee].get(fn, 0) + int(m.group(1))
            continue
        m = re.match(r"^(?:summary|totals): (\d+)", line)
        if m:
            total = int(m.group(1))
    return total, calls


def cmd_callgrind_summary(a):
    """Instructions and malloc calls per request, and the callers of malloc,
    for runs given as LABEL=CALLGRIND_FILE=WRK_OUTPUT."""
    rows = []
    for spec in a.runs:
        label, cg, wrk = spec.split("=", 2)
        requests = int(re.search(r"(\d+) requests in", Path(wrk).read_text()).group(1))
        total, calls = _callgrind_calls(cg)
        # glibc's entry point, or mimalloc's (the services' global allocator)
        mallocs = {}
        for entry in ("malloc", "mi_malloc_aligned", "mi_zalloc_aligned", "mi_malloc", "mi_zalloc"):
            for caller, n in calls.get(entry, {}).items():
                mallocs[caller] = mallocs.get(caller, 0) + n
        rows.append((label, requests, total, mallocs))
        print(f"{label}: {requests} requests, {total:,} instructions in all = {total / requests:,.0f} per request "
              f"(start-up and warm-up included); malloc calls {sum(mallocs.values()) / requests:.1f} per request")
    print()
    print("callers of malloc, calls per request:")
    for label, requests, _, mallocs in rows:
        print(f"  {label}:")
        for caller, n in sorted(mallocs.items(), key=lambda kv: -kv[1])[: a.top]:
            if n / requests >= 0.05:
                print(f"    {n / requests:6.2f}  {caller[:160]}")


def cmd_memory(a):
    """RSS of a cache-api as its near cache fills from Redis (batch reads)."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=a.redis_port)
    top = max(a.counts)
    used0 = int(r.info("memory")["used_memory"])
    t0 = time.perf_counter()
    doc_bytes = 0
    pipe = r.pipeline(transaction=False)
    for i, (cid, raw) in enumerate(_mem_docs(1, top), 1):
        pipe.set(f"features:{cid}", raw, ex=3600)
        doc_bytes += len(raw)
        if i % 5000 == 0:
            pipe.execute()
    pipe.execute()
    redis_fill_s = time.perf_counter() - t0
    used1 = int(r.info("memory")["used_memory"])
    log(f"memory: wrote {top} documents into Redis in {redis_fill_s:.1f}s (avg {doc_bytes / top:.0f} bytes)")

    client = Http(a.api, timeout=120)

    def entries():
        status, _, body = client.get("/api/info/")
        return json.loads(body)["tiers"][0].get("entries")

    for _ in range(3):
        client.get("/api/features/CUST00001/")
    time.sleep(1)
    rows = [{"entries": entries(), **proc_status(a.pid)}]
    log(f"memory: baseline RSS {rows[0]['VmRSS'] / 2**20:.1f} MiB")
    filled = 0
    for target in sorted(a.counts):
        t0 = time.perf_counter()
        while filled < target:
            n = min(1000, target - filled)
            ids = [f"MEM{k:07d}" for k in range(filled + 1, filled + n + 1)]
            status, _, body = client.post_json("/api/features/batch/", {"customer_ids": ids})
            if status != 200:
                raise RuntimeError(f"batch answered {status}")
            got = len(json.loads(body)["found"])
            if got != n:
                raise RuntimeError(f"batch found {got} of {n}")
            filled += n
        fill_s = time.perf_counter() - t0
        time.sleep(1)
        row = {"entries": entries(), "target": target, "fill_seconds": round(fill_s, 1), **proc_status(a.pid)}
        rows.append(row)
        log(f"memory: {row['entries']} near-cache entries -> RSS {row['VmRSS'] / 2**20:.1f} MiB (fill {fill_s:.1f}s)")
    client.close()
    base = rows[0]["VmRSS"]
    for row in rows[1:]:
        row["rss_bytes_per_entry"] = round((row["VmRSS"] - base) / row["entries"], 1) if row["entries"] else None
    out = {
        "api": a.api,
        "avg_document_json_bytes": round(doc_bytes / top, 1),
        "redis_used_memory_bytes_per_key": round((used1 - used0) / top, 1),
        "redis_fill_seconds": round(redis_fill_s, 1),
        "rows": rows,
        "method": "documents written straight into Redis (keys features:MEM0000001...), then read through "
        "POST /api/features/batch/ (1000 ids each), which fills the near cache from Redis; RSS from "
        "/proc/PID/status after each step",
    }
    write_json(a.part, out)
    # The documents only exist for this measurement.
    for i in range(1, top + 1, 10000):
        r.unlink(*[f"features:MEM{k:07d}" for k in range(i, min(top, i + 9999) + 1)])


def cmd_machine(a):
    info = {"nproc": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Hypervisor vendor", "CPU MHz", "L2 cache", "L3 cache"):
                info[k.strip()] = v.strip()
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                info["mem_total_mib"] = int(line.split()[1]) // 1024
    info["kernel"] = os.uname().release
    info["loadavg"] = open("/proc/loadavg").read().split()[:3]
    for tool, args in (("wrk", ["--version"]), ("redis-benchmark", ["--version"]), ("redis-server", ["--version"]),
                       ("rustc", ["--version"])):
        try:
            p = subprocess.run([tool, *args], capture_output=True, text=True)
            info[tool] = (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            info[tool] = None
    if oha_bin():
        p = subprocess.run([oha_bin(), "--version"], capture_output=True, text=True)
        info["oha"] = p.stdout.strip()
    win = Window()
    time.sleep(a.sample_seconds)
    info["idle_machine_before_run"] = win.close()
    write_json(a.part, info)
    log(f"machine: {info.get('nproc')} CPUs {info.get('Model name')}, {info.get('mem_total_mib')} MiB; "
        f"before the run: {info['idle_machine_before_run']}")


# ---------------------------------------------------------------- report


def cmd_report(a):
    run_dir = Path(a.run_dir)
    parts = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "parts").glob("*.json"))}
    meta = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").exists() else {}
    result = {"name": a.name, **meta, **parts}
    result["summary"] = summarize(result)
    out = Path(a.out)
    write_json(out, result)
    plots = make_plots(result, out.parent, a.name)
    result["plots"] = plots
    write_json(out, result)
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    log(f"report: {out} and {len(plots)} plots")


def summarize(res: dict) -> dict:
    s = {}
    hp = res.get("hitpath")
    if hp:
        for level in hp["levels"]:
            c = level["connections"]
            t = level["targets"]
            row = {name: {"rps": v["rps"], "p50_ms": v["latency_ms"]["p50"], "p99_ms": v["latency_ms"]["p99"]}
                   for name, v in t.items()}
            ref, rb = t.get("reference"), t.get("redis-benchmark")
            for name in ("near", "redis"):
                if name in t and ref:
                    row[name]["rps_vs_reference"] = round(t[name]["rps"] / ref["rps"], 3)
                if name in t and rb:
                    row[name]["rps_vs_redis_benchmark"] = round(t[name]["rps"] / rb["rps"], 3)
            s[f"hit_c{c}"] = row
    lag = res.get("lag")
    if lag:
        s["lag_ms_all"] = {t: {k: v.get(k) for k in ("p50", "p99", "max")} for t, v in lag["lag_ms"]["all"].items()}
    st = res.get("stampede")
    if st:
        s["stampede_mongodb_finds"] = st["mongodb_finds_per_stampede"]
    for key in ("offload_warm", "offload_cold"):
        if key in res:
            s[key + "_fraction_reaching_mongodb"] = res[key]["fraction_of_reads_reaching_mongodb"]
    mem = res.get("memory")
    if mem:
        s["memory"] = [{"entries": r["entries"], "rss_mib": round(r["VmRSS"] / 2**20, 1),
                        "bytes_per_entry": r.get("rss_bytes_per_entry")} for r in mem["rows"]]
    return s


def make_plots(res: dict, out_dir: Path, name: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("report: matplotlib missing; no plots")
        return []
    made = []
    colors = {"near": "tab:green", "redis": "tab:blue", "reference": "tab:gray", "redis-benchmark": "tab:red"}
    labels = {"near": "cache-api, near-cache hit (A)", "redis": "cache-api, Redis hit (B)",
              "reference": "reference axum server (C)", "redis-benchmark": "redis-benchmark GET"}

    def save(fig, stem):
        path = out_dir / f"{name}-{stem}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)

    hp = res.get("hitpath")
    if hp:
        conc = [l["connections"] for l in hp["levels"]]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for tname in ("near", "redis", "reference", "redis-benchmark"):
            if tname not in hp["levels"][0]["targets"]:
                continue
            rps = [l["targets"][tname]["rps"] for l in hp["levels"]]
            p50 = [l["targets"][tname]["latency_ms"]["p50"] for l in hp["levels"]]
            p99 = [l["targets"][tname]["latency_ms"]["p99"] for l in hp["levels"]]
            axes[0].plot(conc, rps, "o-", color=colors[tname], label=labels[tname])
            axes[1].plot(conc, p50, "o-", color=colors[tname], label=labels[tname] + " p50")
            axes[1].plot(conc, p99, "s--", color=colors[tname], alpha=0.7, label=labels[tname] + " p99")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(conc, [str(c) for c in conc])
            ax.set_xlabel("concurrent connections")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("requests/s")
        axes[0].set_title("Hit path throughput (Zipf s=1.0 over 10,000 keys)")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("latency (ms, log)")
        axes[1].set_title("Hit path latency")
        axes[0].legend(fontsize=8)
        axes[1].legend(fontsize=6, ncol=2)
        save(fig, "hitpath")

    lat = res.get("latency")
    if lat and "targets" in lat:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for tname, t in lat["targets"].items():
            rates = [r["offered_rps"] for r in t["runs"]]
            c = colors.get(tname, None)
            axes[0].plot(rates, [r["achieved_rps"] for r in t["runs"]], "o-", color=c, label=labels.get(tname, tname))
            for p, style in (("p50", "o-"), ("p99", "s--"), ("p99.9", "^:")):
                axes[1].plot(rates, [r["latency_ms"][p] for r in t["runs"]], style, color=c,
                             label=f"{labels.get(tname, tname)} {p}")
        rmax = max(r["offered_rps"] for t in lat["targets"].values() for r in t["runs"])
        axes[0].plot([0, rmax], [0, rmax], color="black", lw=0.8, ls=":", label="achieved = offered")
        axes[0].set_xlabel("offered req/s")
        axes[0].set_ylabel("achieved req/s")
        axes[0].set_title("Open-loop load (oha, latency-corrected)")
        axes[1].set_xlabel("offered req/s")
        axes[1].set_ylabel("latency (ms, log)")
        axes[1].set_yscale("log")
        axes[1].set_title("Latency at a fixed offered rate")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        axes[1].legend(fontsize=6, ncol=2)
        save(fig, "latency-vs-load")

    lag = res.get("lag")
    if lag and lag.get("samples"):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        styles = {"redis": "-", "A": "--", "D": ":"}
        pcolors = {"api": "tab:blue", "direct": "tab:orange"}
        for path in ("api", "direct"):
            for target in ("redis", "A", "D"):
                vals = sorted(x[target] * 1000 for x in lag["samples"] if x["path"] == path and x[target] is not None)
                if not vals:
                    continue
                ys = [(i + 1) / len(vals) for i in range(len(vals))]
                ax.step(vals, ys, where="post", ls=styles[target], color=pcolors[path],
                        label=f"{path} write -> {'Redis' if target == 'redis' else 'replica ' + target}")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("time from write acknowledgement to new content visible (ms)")
        ax.set_ylabel("fraction of writes")
        ax.set_title("Invalidation lag (CDF)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "lag")

    mem = res.get("memory")
    if mem:
        rows = mem["rows"]
        filled = [r for r in rows[1:] if r["entries"]]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ax.plot([r["entries"] for r in filled], [r["VmRSS"] / 2**20 for r in filled], "o-", label="RSS")
        ax.axhline(rows[0]["VmRSS"] / 2**20, color="gray", ls="--", lw=0.8,
                   label=f"empty process ({rows[0]['VmRSS'] / 2**20:.1f} MiB)")
        for r in filled:
            ax.annotate(f"{r['VmRSS'] / 2**20:.0f} MiB, {r.get('rss_bytes_per_entry', 0):.0f} B/entry",
                        (r["entries"], r["VmRSS"] / 2**20), textcoords="offset points", xytext=(-40, 8), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8, loc="upper left")
        ax.set_xlabel("near-cache entries")
        ax.set_ylabel("RSS (MiB, log)")
        ax.set_title("cache-api resident memory")
        ax.grid(alpha=0.3)
        save(fig, "memory")

    miss = res.get("miss")
    if miss:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        rows = []
        if "near_hit_same_client" in miss:
            rows.append(("near-cache hit (A)", miss["near_hit_same_client"]["latency_ms"]))
        rows.append(("Redis hit (B, warm)", miss["warm"]["latency_ms"]))
        rows.append(("MongoDB, cold key (B)", miss["cold"]["latency_ms"]))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r[1]["p50"] for r in rows], width=0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [r[1]["p99"] for r in rows], width=0.4, label="p99")
        ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
        ax.set_ylabel("ms (serial requests, one client)")
        ax.set_yscale("log")
        ax.set_title("Latency by the tier that answers")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        save(fig, "tiers")
    return made


def markdown(res: dict) -> str:
    lines = [f"# Benchmark run `{res['name']}`", ""]
    m = res.get("machine", {})
    lines.append(f"Machine: {m.get('nproc')} CPUs ({m.get('Model name')}, {m.get('Hypervisor vendor', 'bare')}), "
                 f"{m.get('mem_total_mib')} MiB RAM, kernel {m.get('kernel')}; load average at start "
                 f"{m.get('loadavg')}; idle sample before the run: {m.get('idle_machine_before_run')}.")
    lines.append("")
    hp = res.get("hitpath")
    if hp:
        lines += ["## Hit path (wrk, Zipf s=1.0 over 10,000 keys, "
                  f"{hp['seconds']} s per cell)", "",
                  "| conns | target | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | machine busy/steal % | tiers (delta) |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for level in hp["levels"]:
            for name, v in level["targets"].items():
                l = v["latency_ms"]
                tiers = v.get("tiers")
                tiers_s = ", ".join(f"{k} {int(x)}" for k, x in tiers.items() if x) if tiers else ""
                mach = v.get("machine", {})
                lines.append(
                    f"| {level['connections']} | {name} | {v['rps']:,.0f} | {l['p50']} | {l.get('p90')} | {l['p99']} | "
                    f"{l.get('p99.9')} | {v.get('error_total', 0)} | {mach.get('busy_pct')}/{mach.get('steal_pct')} | {tiers_s} |")
        lines.append("")
        lines += ["Ratios (req/s of the cache-api over the reference server and over redis-benchmark GET):", "",
                  "| conns | near/ref | redis/ref | near/redis-benchmark | redis/redis-benchmark |", "|---:|---:|---:|---:|---:|"]
        for k, row in res["summary"].items():
            if not k.startswith("hit_c"):
                continue
            n, r = row.get("near", {}), row.get("redis", {})
            lines.append(f"| {k[5:]} | {n.get('rps_vs_reference')} | {r.get('rps_vs_reference')} | "
                         f"{n.get('rps_vs_redis_benchmark')} | {r.get('rps_vs_redis_benchmark')} |")
        lines.append("")
    lat = res.get("latency")
    if lat:
        if "skipped" in lat:
            lines += [f"## Latency under fixed offered load: skipped ({lat['skipped']})", ""]
        else:
            lines += [f"## Latency under fixed offered load (oha, {lat['seconds']} s, {lat['connections']} connections, "
                      "latency correction on)", "",
                      "| target | offered/s | achieved/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | saturated |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            for name, t in lat["targets"].items():
                for r in t["runs"]:
                    l = r["latency_ms"]
                    lines.append(f"| {name} | {r['offered_rps']:,} | {r['achieved_rps']:,.0f} | {l['p50']} | {l['p90']} | "
                                 f"{l['p99']} | {l['p99.9']} | {l['max']} | {'yes' if r['saturated'] else 'no'} |")
            lines.append("")
    miss = res.get("miss")
    if miss:
        lines += ["## Miss path (serial, one keep-alive connection, Python client)", "",
                  "| what | n | p50 ms | p90 ms | p99 ms | max ms | sources |", "|---|---:|---:|---:|---:|---:|---|"]
        rows = [("cold key (Redis flushed, B restarted)", miss["cold"]),
                ("same keys again (warm)", miss["warm"])]
        if "near_hit_same_client" in miss:
            rows.append(("near-cache hit on A, same client", miss["near_hit_same_client"]))
        for label, v in rows:
            l = v["latency_ms"]
            lines.append(f"| {label} | {l['n']} | {l['p50']} | {l['p90']} | {l['p99']} | {l['max']} | {v['sources']} |")
        lines.append("")
    st = res.get("stampede")
    if st:
        lines += [f"## Stampede ({st['concurrent_requests']} concurrent GETs of one cold key)", "",
                  "| key | MongoDB finds | coalesced waits | statuses | sources | p50 ms | max ms |",
                  "|---|---:|---:|---|---|---:|---:|"]
        for r in st["runs"]:
            d = r["metrics_delta"]
            lines.append(f"| {r['key']} | {d['mongodb_find']:.0f} | {d['coalesced_waits']:.0f} | {r['statuses']} | "
                         f"{r['sources']} | {r['latency_ms']['p50']} | {r['latency_ms']['max']} |")
        lines.append("")
    for key in ("offload_warm", "offload_cold"):
        o = res.get(key)
        if o:
            lines += [f"## Database offload, {o['label']} (wrk mixed 95/5, {o['wrk']['connections']} connections, "
                      f"{o['wrk']['seconds']} s)", "",
                      f"- requests/s {o['wrk']['rps']:,.0f}; reads {o['reads']:.0f}, writes {o['writes']:.0f} "
                      f"(by status: {o.get('writes_by_status')})",
                      f"- reads that reached MongoDB (Redis misses): {o['reads_reaching_mongodb']:.0f} = "
                      f"{100 * (o['fraction_of_reads_reaching_mongodb'] or 0):.3f} % of reads "
                      f"(offload {o['database_read_offload_pct']} %)",
                      f"- tier counters: {o['tiers']}", ""]
    probes = [res[k] for k in ("probe_after_offload_warm", "probe_after_offload_cold") if k in res]
    if probes:
        lines += ["## Can the API still reach MongoDB after the mixed phase?", "",
                  "| after | reachable | MongoDB commands sent during the probe | /api/health/ | attempts (write status/ms, read of an absent id status/ms) |",
                  "|---|---|---:|---:|---|"]
        for p in probes:
            tries = "; ".join(f"{x['write_status']}/{x['write_ms']:.0f}, {x['cold_read_status']}/{x['cold_read_ms']:.0f}"
                              for x in p["attempts"])
            lines.append(f"| {p['label']} | {p['mongodb_reachable']} | {p['mongodb_commands_sent_meanwhile']:.0f} | "
                         f"{p['health_status']} | {tries} |")
        lines.append("")
    lag = res.get("lag")
    if lag:
        lines += [f"## Invalidation lag ({lag['writes']} writes: {lag['api_writes']} through API A, "
                  f"{lag['direct_writes']} directly in MongoDB)", "",
                  "| writes | seen in | p50 ms | p90 ms | p99 ms | max ms | seen at the first poll | not seen in time |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for path, row in lag["lag_ms"].items():
            for target, v in row.items():
                lines.append(f"| {path} | {target} | {v.get('p50')} | {v.get('p90')} | {v.get('p99')} | {v.get('max')} | "
                             f"{v.get('seen_at_first_poll')} | {v['not_seen_within_timeout']} |")
        lines += ["", f"Write acknowledgement: API {lag.get('api_write_ack_ms')}, direct {lag.get('direct_write_ack_ms')}; "
                  f"retried after 503: {lag.get('writes_retried_after_503')}.",
                  "", f"Poll cycle: {lag['poll_cycle_ms']}; invalidator's own mean lag (event wall time to Redis / "
                  f"published): {lag['invalidator_reported_mean_lag_ms']}", ""]
    tp = res.get("throughput")
    if tp:
        lines += ["## Invalidator throughput", "",
                  f"- writer: {tp['writer']}",
                  f"- writes acknowledged: {tp['writes_acknowledged']} in {tp['seconds']} s = {tp['write_rps']}/s; "
                  f"write latency {tp['write_latency_ms']}",
                  f"- invalidator events/s over the same window: {tp['invalidator_events_per_s']}; events in all "
                  f"{tp['invalidator_events_total']:.0f}; drained {tp['drain_after_last_write_s']} s after the last write",
                  f"- CPU (% of one core) during the writes: {tp['cpu_pct_of_one_core_during_writes']}", ""]
    mem = res.get("memory")
    if mem:
        lines += ["## Memory", "", f"Average document: {mem['avg_document_json_bytes']} bytes of JSON; Redis: "
                  f"{mem['redis_used_memory_bytes_per_key']} bytes per key.", "",
                  "| near-cache entries | RSS MiB | RssAnon MiB | bytes/entry over baseline | fill s |", "|---:|---:|---:|---:|---:|"]
        for r in mem["rows"]:
            lines.append(f"| {r['entries']} | {r['VmRSS'] / 2**20:.1f} | {r.get('RssAnon', 0) / 2**20:.1f} | "
                         f"{r.get('rss_bytes_per_entry', '')} | {r.get('fill_seconds', '')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def add_mongo_args(sp):
        """Where the benchmark's documents live (the services' defaults)."""
        sp.add_argument("--mongo-uri", required=True)
        sp.add_argument("--mongo-db", default="cache_demo")
        sp.add_argument("--mongo-collection", default="customer_features")

    def add(name, fn, **kw):
        sp = sub.add_parser(name, **kw)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("machine", cmd_machine)
    sp.add_argument("--part", required=True)
    sp.add_argument("--sample-seconds", type=float, default=3)

    sp = add("zipf", cmd_zipf)
    sp.add_argument("--keys", type=int, default=10000)
    sp.add_argument("--s", type=float, default=1.0)
    sp.add_argument("--samples", type=int, default=200000)
    sp.add_argument("--seed", type=int, default=42)
    sp.add_argument("--out", required=True)
    sp.add_argument("--urls", nargs="*", help="NAME=BASE_URL: also write OUT.NAME.urls for oha")
    sp.add_argument("--part", required=True)

    sp = add("warm", cmd_warm)
    sp.add_argument("--api", required=True)
    sp.add_argument("--count", type=int, default=10000)

    sp = add("sizes", cmd_sizes)
    sp.add_argument("--api", required=True)
    sp.add_argument("--redis-port", type=int, required=True)
    sp.add_argument("--count", type=int, default=10000)
    sp.add_argument("--part", required=True)

    sp = add("hitpath", cmd_hitpath)
    sp.add_argument("--targets", nargs="+", required=True, help="NAME=URL")
    sp.add_argument("--metrics", nargs="*", default=[], help="targets whose /metrics to diff")
    sp.add_argument("--conc", type=int, nargs="+", default=[1, 16, 64, 256])
    sp.add_argument("--seconds", type=float, default=10)
    sp.add_argument("--ids", required=True)
    sp.add_argument("--redis-port", type=int, required=True)
    sp.add_argument("--redis-n", type=int, default=200000)
    sp.add_argument("--doc-bytes", type=int, required=True)
    sp.add_argument("--raw-log")
    sp.add_argument("--part", required=True)

    sp = add("latency", cmd_latency)
    sp.add_argument("--targets", nargs="+", required=True, help="NAME=URL_FILE")
    sp.add_argument("--rates", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    sp.add_argument("--seconds", type=float, default=10)
    sp.add_argument("--conc", type=int, default=64)
    sp.add_argument("--raw-log")
    sp.add_argument("--part", required=True)

    sp = add("miss", cmd_miss)
    sp.add_argument("--api", required=True)
    sp.add_argument("--near-api")
    sp.add_argument("--keys", type=int, default=10000)
    sp.add_argument("--count", type=int, default=1000)
    sp.add_argument("--seed", type=int, default=7)
    sp.add_argument("--part", required=True)

    sp = add("stampede", cmd_stampede)
    sp.add_argument("--api", required=True)
    sp.add_argument("--redis-port", type=int, required=True)
    sp.add_argument("--keys-range", type=int, default=10000, help="pick cold keys among CUST00001..N")
    sp.add_argument("--n", type=int, default=1000)
    sp.add_argument("--repeat", type=int, default=3)
    sp.add_argument("--seed", type=int, default=11)
    sp.add_argument("--part", required=True)

    sp = add("offload", cmd_offload)
    sp.add_argument("--api", required=True)
    sp.add_argument("--label", required=True)
    sp.add_argument("--ids", required=True)
    sp.add_argument("--seconds", type=float, default=15)
    sp.add_argument("--conc", type=int, default=64)
    sp.add_argument("--write-fraction", type=float, default=0.05)
    sp.add_argument("--raw-log")
    sp.add_argument("--part", required=True)

    sp = add("lag", cmd_lag)
    sp.add_argument("--api-a", required=True)
    sp.add_argument("--api-d", required=True)
    sp.add_argument("--invalidator", required=True)
    sp.add_argument("--redis-port", type=int, required=True)
    add_mongo_args(sp)
    sp.add_argument("--keys", type=int, default=10000)
    sp.add_argument("--writes", type=int, default=1000)
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.add_argument("--seed", type=int, default=13)
    sp.add_argument("--part", required=True)

    sp = add("throughput", cmd_throughput)
    sp.add_argument("--invalidator", required=True)
    sp.add_argument("--invalidator-pid", type=int)
    sp.add_argument("--mongo-pid", type=int)
    add_mongo_args(sp)
    sp.add_argument("--keys", type=int, default=10000)
    sp.add_argument("--threads", type=int, default=4)
    sp.add_argument("--seconds", type=float, default=10)
    sp.add_argument("--part", required=True)

    sp = add("settle", cmd_settle)
    sp.add_argument("--invalidator", required=True)
    add_mongo_args(sp)
    sp.add_argument("--quiet", type=float, default=2.0)
    sp.add_argument("--max", type=float, default=120.0)

    sp = add("probe", cmd_probe)
    sp.add_argument("--api", required=True)
    sp.add_argument("--label", required=True)
    sp.add_argument("--tries", type=int, default=5)
    sp.add_argument("--pause", type=float, default=2.0)
    sp.add_argument("--part", required=True)

    sp = add("callgrind-summary", cmd_callgrind_summary)
    sp.add_argument("runs", nargs="+", help="LABEL=CALLGRIND_OUT=WRK_OUTPUT")
    sp.add_argument("--top", type=int, default=25)

    sp = add("memory", cmd_memory)
    sp.add_argument("--api", required=True)
    sp.add_argument("--pid", type=int, required=True)
    sp.add_argument("--redis-port", type=int, required=True)
    sp.add_argument("--counts", type=int, nargs="+", default=[10000, 100000])
    sp.add_argument("--part", required=True)

    sp = add("report", cmd_report)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--name", required=True)
    sp.add_argument("--out", required=True)

    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
