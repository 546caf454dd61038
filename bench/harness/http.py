"""HTTP to the services: a keep-alive client, a Prometheus /metrics scrape, and
the sums of the samples the phases compare before and after a measurement."""

from __future__ import annotations

import http.client
import json
import os
import re
from urllib.parse import urlparse


def auth_headers() -> dict:
    """`Authorization: Bearer $CACHE_API_KEY` when the variable is set (a
    service without credentials configured ignores it), else nothing."""
    key = os.environ.get("CACHE_API_KEY", "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def auth_header_line() -> str:
    """The same header as raw request text ("" without a key)."""
    return "".join(f"{k}: {v}\r\n" for k, v in auth_headers().items())


class Http:
    """A keep-alive HTTP/1.1 client on one connection (reconnects on error);
    every request carries `CACHE_API_KEY` when it is set."""

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
                self.conn.request(method, path, body=body, headers={**auth_headers(), **(headers or {})})
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


def msum_delta(before, after, name: str, **labels) -> float:
    """How much the samples named so grew from one scrape to the next."""
    return msum(after, name, **labels) - msum(before, name, **labels)


def histogram_delta(before, after, name: str, **labels) -> list[tuple[float, float]]:
    """The cumulative buckets (upper bound, count) of a Prometheus histogram
    `name` over a measurement: after minus before, summed over the samples
    that carry `labels`, by `le` (+Inf last)."""
    def buckets(samples) -> dict[float, float]:
        out: dict[float, float] = {}
        for n, l, v in samples:
            if n == f"{name}_bucket" and all(l.get(k) == want for k, want in labels.items()):
                le = float(l["le"])
                out[le] = out.get(le, 0.0) + v
        return out

    b, a = buckets(before), buckets(after)
    return [(le, a[le] - b.get(le, 0.0)) for le in sorted(a)]


def is_feature_get(name: str, labels: dict) -> bool:
    """A request counter of GET on the single-document route (both path spellings)."""
    return (
        name == "http_requests_total"
        and labels.get("method") == "GET"
        and labels.get("route", "").startswith("/api/features/{")
    )


def is_feature_post(name: str, labels: dict) -> bool:
    """A request counter of POST on the write route (with or without the slash)."""
    return (
        name == "http_requests_total"
        and labels.get("method") == "POST"
        and labels.get("route", "").rstrip("/") == "/api/features"
    )


def feature_gets(samples) -> float:
    return sum(v for n, l, v in samples if is_feature_get(n, l))


def feature_posts(samples) -> float:
    return sum(v for n, l, v in samples if is_feature_post(n, l))


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
