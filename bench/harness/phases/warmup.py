"""After a flush, and when clients ask for what does not exist.

``recovery10`` measures the first seconds after a full flush (the
invalidator flushes Redis and announces a flush to every replica): a fixed
rate of Zipf-distributed GETs runs across the replicas before and after the
flush, and per second after it the phase records the share of responses a
cache served (from the responses' x-cache-source) and the MongoDB find
commands every process sent (their /metrics). Run once per configuration
(e.g. ``WARM_KEYS=0`` and the default) and put side by side in the report.

``storm`` measures a 404 storm: many GETs for a set of ids that exist
nowhere, counting the MongoDB finds the API sent (negative caching should
make it one per id per ``NEGATIVE_TTL_MS``, not one per request).
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from ..http import Http, msum, scrape
from ..output import log, write_json
from ..system import feature_path


def _finds(urls: list[str]) -> float:
    """MongoDB find commands the processes sent so far, together."""
    return sum(msum(scrape(u), "mongodb_commands_total", command="find") for u in urls)


def _flushes_applied(url: str) -> float:
    return msum(scrape(url), "invalidation_messages_applied_total", op="flush")


def _warm_loaded(urls: list[str]) -> float:
    return sum(msum(scrape(u), "cache_warm_keys_loaded_total") for u in urls)


class Load:
    """Fixed-rate GETs of Zipf-drawn ids over the replicas, from `threads`
    threads each on its own keep-alive connection; every response is
    counted by the second it completed in and the tier that served it."""

    def __init__(self, apis: list[str], ids: list[str], rate: float, threads: int):
        self.apis, self.ids, self.rate, self.threads = apis, ids, rate, threads
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, int]] = []  # (completed at, source, status)
        self.workers = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def _run(self, n: int) -> None:
        client = Http(self.apis[n % len(self.apis)])
        interval = self.threads / self.rate
        due = time.perf_counter()
        i = n
        while not self.stop.is_set():
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            due += interval
            try:
                status, resp, _ = client.get(feature_path(self.ids[i % len(self.ids)]))
                source = resp.getheader("x-cache-source") or "none"
            except OSError:
                status, source = 0, "error"
            i += self.threads
            with self.lock:
                self.events.append((time.perf_counter(), source, status))
        client.close()

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def finish(self) -> None:
        self.stop.set()
        for w in self.workers:
            w.join()

    def per_second(self, t0: float, seconds: int) -> list[dict]:
        rows = [{"second": s, "responses": 0, "sources": {}} for s in range(seconds)]
        with self.lock:
            events = list(self.events)
        for at, source, _ in events:
            s = int(at - t0)
            if 0 <= s < seconds:
                row = rows[s]
                row["responses"] += 1
                row["sources"][source] = row["sources"].get(source, 0) + 1
        for row in rows:
            n = row["responses"]
            cached = row["sources"].get("local", 0) + row["sources"].get("redis", 0)
            row["hit_ratio"] = round(cached / n, 4) if n else None
            row["near_hit_ratio"] = round(row["sources"].get("local", 0) / n, 4) if n else None
        return rows


def cmd_recovery10(a):
    """Load before and after a full flush; the first --after seconds after it, per second."""
    ids = [l for l in Path(a.ids).read_text().split() if l]
    load = Load(a.apis, ids, a.rate, a.threads)
    load.start()
    log(f"recovery10[{a.label}]: {a.rate:g} GET/s over {len(a.apis)} replicas; {a.before:g} s before the flush")
    time.sleep(a.before)
    flushes = _flushes_applied(a.apis[0])
    warm_before = _warm_loaded(a.apis)
    started = time.perf_counter()
    flush = subprocess.Popen(["bash", a.flush_script], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    # The flush's moment: when the first replica applied the announcement.
    t0 = None
    while time.perf_counter() - started < 60:
        if _flushes_applied(a.apis[0]) > flushes:
            t0 = time.perf_counter()
            break
        time.sleep(0.05)
    if t0 is None:
        load.finish()
        raise SystemExit(f"recovery10[{a.label}]: no flush within 60 s of {a.flush_script}")
    # The replicas' finds from t0 on; the restarted invalidator's since it
    # started (it reads nothing with `find` before its flush's refill).
    finds_t0 = _finds(a.apis)
    finds = []
    for s in range(1, int(a.after) + 1):
        time.sleep(max(0.0, t0 + s - time.perf_counter()))
        finds.append(_finds(a.apis) + _finds([a.invalidator]))
    load.finish()
    flush.wait(timeout=60)
    rows = load.per_second(t0, int(a.after))
    prev = finds_t0
    for row, total in zip(rows, finds):
        row["mongodb_finds"] = total - prev
        prev = total
    responses = sum(r["responses"] for r in rows)
    cached = sum(r["sources"].get("local", 0) + r["sources"].get("redis", 0) for r in rows)
    local = sum(r["sources"].get("local", 0) for r in rows)
    before = load.per_second(t0 - a.before + 2, int(a.before) - 3)
    out = {
        "label": a.label,
        "replicas": a.apis,
        "offered_rps": a.rate,
        "threads": a.threads,
        "seconds_after_flush": int(a.after),
        "flush": "The invalidator restarted without its saved change-feed position: it flushes Redis and "
                 "announces a flush (t = 0 when the first replica applied it)",
        "mongodb_finds_after_flush": finds[-1] - finds_t0 if finds else None,
        "warm_keys_loaded": _warm_loaded(a.apis) - warm_before,
        "responses_after_flush": responses,
        "hit_ratio_after_flush": round(cached / responses, 4) if responses else None,
        "near_hit_ratio_after_flush": round(local / responses, 4) if responses else None,
        "hit_ratio_before_flush": _ratio(before),
        "per_second": rows,
    }
    write_json(a.part, out)
    log(f"recovery10[{a.label}]: first {int(a.after)} s after the flush: MongoDB finds "
        f"{out['mongodb_finds_after_flush']:.0f}, hit ratio {out['hit_ratio_after_flush']} "
        f"(near {out['near_hit_ratio_after_flush']}); before the flush {out['hit_ratio_before_flush']}")


def _ratio(rows: list[dict]) -> float | None:
    n = sum(r["responses"] for r in rows)
    cached = sum(r["sources"].get("local", 0) + r["sources"].get("redis", 0) for r in rows)
    return round(cached / n, 4) if n else None


def cmd_storm(a):
    """GETs for ids that exist nowhere: --ids ids x --per-id requests each, from --threads threads."""
    missing = [f"NOSUCH{a.seed}{n:05d}" for n in range(a.ids)]
    order = [missing[i % a.ids] for i in range(a.ids * a.per_id)]
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def worker(n: int) -> None:
        client = Http(a.api)
        for id_ in order[n::a.threads]:
            status, _, _ = client.get(feature_path(id_))
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
        client.close()

    before = msum(scrape(a.api), "mongodb_commands_total", command="find")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    time.sleep(0.3)  # the last responses' counters
    samples = scrape(a.api)
    finds = msum(samples, "mongodb_commands_total", command="find") - before
    out = {
        "label": a.label,
        "api": a.api,
        "missing_ids": a.ids,
        "requests_per_id": a.per_id,
        "requests": a.ids * a.per_id,
        "threads": a.threads,
        "seconds": round(took, 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "mongodb_finds": finds,
        "mongodb_finds_per_id": round(finds / a.ids, 2),
        "negative_hits": msum(samples, "cache_requests_total", result="negative_hit"),
    }
    write_json(a.part, out)
    log(f"storm[{a.label}]: {out['requests']} GETs of {a.ids} missing ids in {took:.1f} s -> "
        f"MongoDB finds {finds:.0f} ({out['mongodb_finds_per_id']} per id); statuses {out['statuses']}")

