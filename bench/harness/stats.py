"""Numbers from samples and from the machine: percentiles and latency
summaries, quantiles of Prometheus histograms, machine-wide CPU use
(/proc/stat), load average, and one process's CPU time and memory (/proc/PID)."""

from __future__ import annotations

import os
import time


def pct(values, p: float):
    """Nearest-rank percentile (p in 0-100) of a list; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100.0 * len(s) + 0.5) - 1))
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


def histogram_quantile(buckets: list[tuple[float, float]], q: float):
    """The q-quantile (0-1) of cumulative histogram buckets (upper bound,
    count), interpolated linearly within its bucket as Prometheus'
    histogram_quantile does, and that bucket's upper bound: (value, bound).
    (None, None) without observations; in the +Inf bucket, the last finite
    bound for both."""
    if not buckets or buckets[-1][1] <= 0:
        return None, None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower, lower
            inside = count - below
            value = le if inside <= 0 else lower + (le - lower) * (rank - below) / inside
            return value, le
        lower, below = le, count
    return lower, lower


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
