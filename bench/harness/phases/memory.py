"""Memory: the resident size of a fresh cache-api as its near cache fills to
the given entry counts, and Redis's memory per stored document."""

from __future__ import annotations

import json
import random
import time
from datetime import datetime, timedelta, timezone

from ..http import Http
from ..output import log, write_json
from ..stats import proc_status
from ..system import batch_read, customer_id, feature_path, near_cache_entries, redis_client, redis_key


def _mem_id(n: int) -> str:
    return f"MEM{n:07d}"


def _mem_docs(start: int, count: int):
    """Documents shaped like cachectl populate's, under ids of their own
    (MEM0000001...): (id, the JSON the services store in Redis)."""
    rng = random.Random(start)
    now = datetime.now(timezone.utc)
    calc = now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    exp = (now + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    segs = ["premium", "standard", "basic", "new"]
    version = int(time.time() * 1000) * 1000
    for n in range(start, start + count):
        cid = _mem_id(n)
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


def cmd_memory(a):
    """RSS of a cache-api as its near cache fills from Redis (batch reads)."""
    r = redis_client(a.redis_port)
    top = max(a.counts)
    used0 = int(r.info("memory")["used_memory"])
    t0 = time.perf_counter()
    doc_bytes = 0
    pipe = r.pipeline(transaction=False)
    for i, (cid, raw) in enumerate(_mem_docs(1, top), 1):
        pipe.set(redis_key(cid), raw, ex=3600)
        doc_bytes += len(raw)
        if i % 5000 == 0:
            pipe.execute()
    pipe.execute()
    redis_fill_s = time.perf_counter() - t0
    used1 = int(r.info("memory")["used_memory"])
    log(f"memory: wrote {top} documents into Redis in {redis_fill_s:.1f}s (avg {doc_bytes / top:.0f} bytes)")

    client = Http(a.api, timeout=120)
    # The baseline is a process that has served requests, not one that never has.
    for _ in range(3):
        client.get(feature_path(customer_id(1)))
    time.sleep(1)
    rows = [{"entries": near_cache_entries(client), **proc_status(a.pid)}]
    log(f"memory: baseline RSS {rows[0]['VmRSS'] / 2**20:.1f} MiB")
    filled = 0
    for target in sorted(a.counts):
        t0 = time.perf_counter()
        while filled < target:
            n = min(1000, target - filled)
            ids = [_mem_id(k) for k in range(filled + 1, filled + n + 1)]
            got = len(batch_read(client, ids)["found"])
            if got != n:
                raise RuntimeError(f"batch found {got} of {n}")
            filled += n
        fill_s = time.perf_counter() - t0
        time.sleep(1)
        row = {"entries": near_cache_entries(client), "target": target, "fill_seconds": round(fill_s, 1),
               **proc_status(a.pid)}
        if row["entries"] < target:
            raise RuntimeError(f"the near cache holds {row['entries']} of {target} entries: its bounds "
                               "(LOCAL_CACHE_MAX_ENTRIES, LOCAL_CACHE_MAX_BYTES) evicted")
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
        r.unlink(*[redis_key(_mem_id(k)) for k in range(i, min(top, i + 9999) + 1)])
