"""Between phases: ``settle`` waits until the database and the invalidator
have finished the previous phase's writes; ``probe`` checks whether an API can
still reach MongoDB after an overloading phase, and how soon."""

from __future__ import annotations

import json
import time

from ..http import Http, msum, msum_delta, scrape
from ..output import log, write_json
from ..system import customer_id, feature_path, features_collection, mongo_client


def cmd_settle(a):
    """Waits until the previous phase's writes are done: the database answers
    a read, a small write and a no-op findAndModify within 1 s together, and
    the invalidator's event counter has stood still for --quiet seconds. (The
    stand-in goes on executing findAndModify writes whose API requests timed
    out long ago, and further findAndModify calls queue behind them.)"""
    client = mongo_client(a, serverSelectionTimeoutMS=5000)
    coll = features_collection(client, a)
    probe_coll = client["bench_probe"]["probe"]  # not watched by the invalidator
    first = customer_id(1)
    t0 = time.perf_counter()
    last, since = None, time.perf_counter()
    while time.perf_counter() - t0 < a.max:
        p0 = time.perf_counter()
        coll.find_one({"_id": first})
        probe_coll.update_one({"_id": "settle"}, {"$inc": {"n": 1}}, upsert=True)
        # A findAndModify that changes nothing (no change event) queues behind
        # the API's writes still executing in the database.
        client[a.mongo_db].command({
            "findAndModify": a.mongo_collection,
            "query": {"_id": first},
            "update": {"$set": {"customer_id": first}},
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
    before = scrape(a.api)
    attempts = []
    for _ in range(a.tries):
        t0 = time.perf_counter()
        status, _, _ = client.post_json("/api/features/", {"customer_id": customer_id(1), "features": {"credit_score": 700}})
        t1 = time.perf_counter()
        # An id that exists nowhere: near cache and Redis miss, MongoDB answers 404.
        rstatus, resp, _ = client.get(feature_path(f"BENCHPROBE{int(time.time() * 1000)}"))
        attempts.append({
            "write_status": status, "write_ms": round((t1 - t0) * 1000, 1),
            "cold_read_status": rstatus, "cold_read_ms": round((time.perf_counter() - t1) * 1000, 1),
            "cold_read_source": resp.getheader("x-cache-source"),
        })
        if status in (200, 201) and rstatus == 404:
            break
        time.sleep(a.pause)
    commands_sent = msum_delta(before, scrape(a.api), "mongodb_commands_total")
    hstatus, _, hbody = client.get("/api/health/")
    client.close()
    ok = any(x["write_status"] in (200, 201) and x["cold_read_status"] == 404 for x in attempts)
    out = {"api": a.api, "label": a.label, "mongodb_reachable": ok, "attempts": attempts,
           "mongodb_commands_sent_meanwhile": commands_sent, "health_status": hstatus,
           "health": json.loads(hbody) if hstatus in (200, 503) else None}
    write_json(a.part, out)
    log(f"probe[{a.label}]: MongoDB reachable through the API: {ok}; commands sent {commands_sent:.0f}; "
        f"health {hstatus}; attempts {attempts}")
