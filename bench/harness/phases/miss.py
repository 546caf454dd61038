"""The miss path: cold keys read one after another from an API whose tiers are
empty (MongoDB answers), the same keys again (Redis answers) and, for
comparison, from a near-cache API with the same client; and the stampede:
many concurrent GETs of one cold key, which should cost one MongoDB find."""

from __future__ import annotations

import asyncio
import random
import time
from urllib.parse import urlparse

from ..http import Http, auth_header_line, delta, scrape, tier_counts
from ..output import log, write_json
from ..stats import Window, summary_ms
from ..system import customer_id, feature_path, redis_client, redis_key


def serial_gets(client: Http, keys: list[str], check_as: str | None = None) -> dict:
    """GETs the keys one after another: latency summary and x-cache-source
    counts. With check_as, a GET that does not answer 200 fails the phase
    (the message names check_as)."""
    lat, sources = [], {}
    for k in keys:
        t0 = time.perf_counter()
        status, resp, _ = client.get(feature_path(k))
        lat.append(time.perf_counter() - t0)
        if check_as is not None and status != 200:
            raise RuntimeError(f"{check_as}: GET {k} answered {status}")
        src = resp.getheader("x-cache-source")
        sources[src] = sources.get(src, 0) + 1
    return {"latency_ms": summary_ms(lat), "sources": sources}


def cmd_miss(a):
    """Cold keys, serially, on an API whose tiers are empty; then the same keys warm."""
    client = Http(a.api)
    rng = random.Random(a.seed)
    keys = [customer_id(n) for n in rng.sample(range(1, a.keys + 1), a.count)]
    before = tier_counts(scrape(a.api))
    win = Window()
    cold = serial_gets(client, keys, "cold")
    mid = tier_counts(scrape(a.api))
    warm = serial_gets(client, keys, "warm")
    after = tier_counts(scrape(a.api))
    cold["metrics_delta"] = delta(mid, before)
    warm["metrics_delta"] = delta(after, mid)
    out = {"api": a.api, "keys": a.count, "client": "python http.client, one keep-alive connection",
           "cold": cold, "warm": warm}
    if a.near_api:
        near = Http(a.near_api)
        out["near_hit_same_client"] = {"api": a.near_api, **serial_gets(near, keys)}
        near.close()
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
    req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth_header_line()}\r\n".encode()

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
    r = redis_client(a.redis_port)
    u = urlparse(a.api)
    rng = random.Random(a.seed)
    candidates = [customer_id(n) for n in rng.sample(range(1, a.keys_range + 1), a.keys_range)]
    cold = [k for k in candidates if not r.exists(redis_key(k))][: a.repeat]
    if len(cold) < a.repeat:
        raise SystemExit("stampede: not enough cold keys (is Redis flushed?)")
    runs = []
    for key in cold:
        before = tier_counts(scrape(a.api))
        res = asyncio.run(_stampede_once(u.hostname, u.port, feature_path(key), a.n))
        time.sleep(0.3)  # let the counters of the last responses land before the scrape
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
