#!/usr/bin/env python3
"""Probe how the MongoDB stand-in (SecantusDB) behaves where the project cares.

Usage:
    python scripts/probe_secantus.py --port P [--secantusd PATH] [--only 1,3,4]

Runs with any Python that has pymongo (e.g. the testbed's .venv-secantus/bin/python,
which gets pymongo as a dependency of SecantusDB).

* Probes 1, 2, 3, 5, 6, 7 and part of 8 run against the already running server on
  127.0.0.1:P (they create and drop databases named ``probe_*``).
* Probes 4, 8 (start-up time) and 9 start their own short-lived SecantusDB
  instances (free ports, storage under a temp dir) with ``--secantusd`` (default:
  ``secantusd-py`` next to this Python, else on PATH) and kill them by PID.
  Pass ``--no-spawn`` to skip those.

Every finding is printed as ``[n] ...`` lines; the findings are summarised in
TESTING.md ("Differences between the MongoDB stand-in and MongoDB").
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import pymongo
from pymongo import ReturnDocument, UpdateOne, monitoring
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

UTC = dt.timezone.utc


def say(n, *parts):
    print(f"[{n}]", *parts, flush=True)


def uri(port):
    return f"mongodb://127.0.0.1:{port}/?replicaSet=secantus&retryWrites=false"


def client(port, **kw):
    kw.setdefault("serverSelectionTimeoutMS", 5000)
    return pymongo.MongoClient(uri(port), **kw)


def run_together(target, n):
    """Runs `target` in `n` threads at once and waits for all of them."""
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def err_str(e):
    code = getattr(e, "code", None)
    details = getattr(e, "details", None) or {}
    return (
        f"{type(e).__name__} code={code} codeName={details.get('codeName')!r} "
        f"labels={details.get('errorLabels')} msg={str(e).split(', full error')[0]!r}"
    )


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Instance:
    """A short-lived SecantusDB started by this script; always killed by PID."""

    def __init__(self, exe, storage, extra=(), port=None):
        self.exe, self.storage, self.extra = exe, storage, list(extra)
        self.port = port or free_port()
        self.proc = None
        os.makedirs(os.path.dirname(storage), exist_ok=True)
        self.log = open(os.path.join(os.path.dirname(storage), f"secantusd-{self.port}.log"), "ab")

    def start(self, timeout=60):
        t0 = time.monotonic()
        cmd = [self.exe, "--host", "127.0.0.1", "--port", str(self.port),
               "--storage-path", self.storage, "--sync-on-commit", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"secantusd exited early with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                c = client(self.port, serverSelectionTimeoutMS=1000)
                c.admin.command("ping")
                c.close()
                return time.monotonic() - t0
            except (OSError, PyMongoError):
                time.sleep(0.05)
        raise RuntimeError("secantusd did not answer ping in time")

    def kill(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- 1
def probe1(port, **_):
    c = client(port)
    col = c.probe_1.items
    col.drop()
    say(1, "server version reported:", c.server_info().get("version"))
    pipe = [{"$set": {
        "version": {"$add": [{"$ifNull": ["$version", 0]}, 1]},
        "hits": {"$toLong": {"$add": [{"$ifNull": ["$hits", {"$literal": 0}]}, 1]}},
        "last_seen": {"$max": ["$last_seen", "$$NOW"]},
        "exp_dateAdd": {"$dateAdd": {"startDate": "$$NOW", "unit": "millisecond", "amount": 30000}},
        "exp_add": {"$add": ["$$NOW", 30000]},
        "lit": {"$literal": "$notAFieldPath"},
        # workaround form for a monotonic timestamp: compare as epoch millis
        "last_seen_ms": {"$toDate": {"$max": [{"$toLong": "$last_seen_ms"}, {"$toLong": "$$NOW"}]}},
    }}]
    docs = []
    for i in range(3):
        d = col.find_one_and_update({"_id": "k1"}, pipe, upsert=True,
                                    return_document=ReturnDocument.AFTER)
        docs.append(d)
        say(1, f"call {i + 1}: {d}")
        say(1, "  types:", {k: type(v).__name__ for k, v in d.items()})
        time.sleep(0.05)
    ok_inc = [d["version"] for d in docs] == [1, 2, 3]
    say(1, "upsert+AFTER returns the new doc, $ifNull/$add counter works:", ok_inc)
    say(1, "$dateAdd supported and equal to $add(date, ms):",
        docs[-1]["exp_dateAdd"] == docs[-1]["exp_add"])
    say(1, "$literal keeps '$...' string:", docs[-1]["lit"] == "$notAFieldPath")
    say(1, "$max(['$last_seen', '$$NOW']) advances on later calls:",
        docs[2]["last_seen"] > docs[0]["last_seen"],
        f"(call1={docs[0]['last_seen']}, call3={docs[2]['last_seen']})")
    say(1, "$toLong-based max advances:", docs[2]["last_seen_ms"] > docs[0]["last_seen_ms"])

    # The project's version expression (libs/feature-store/src/version.rs):
    # numeric $max of (version + 1) and epoch-ms(NOW) * 1000.
    from bson.int64 import Int64
    vexpr = {"$max": [{"$add": [{"$ifNull": ["$version", Int64(0)]}, Int64(1)]},
                      {"$multiply": [{"$toLong": "$$NOW"}, 1000]}]}
    col.delete_many({})
    vs = [col.find_one_and_update({"_id": "v"}, [{"$set": {"version": vexpr}}], upsert=True,
                                  return_document=ReturnDocument.AFTER)["version"] for _ in range(3)]
    col.update_one({"_id": "v"}, {"$set": {"version": Int64(9_000_000_000_000_000)}})
    ahead = col.find_one_and_update({"_id": "v"}, [{"$set": {"version": vexpr}}],
                                    return_document=ReturnDocument.AFTER)["version"]
    say(1, f"numeric version expr max(version+1, toLong(NOW)*1000): {vs} "
           f"({type(vs[0]).__name__}, strictly increasing: {vs[0] < vs[1] < vs[2]}); "
           f"when ahead of the clock 9e15 -> {ahead}")

    # Pin down the comparison problem between stored dates and $$NOW-derived dates.
    col2 = c.probe_1.cmp
    col2.drop()
    d1 = dt.datetime(2020, 1, 1)
    col2.insert_one({"_id": 1, "a": d1, "later": dt.datetime(2030, 1, 1), "n": 5})
    exprs = {
        "cmp[$a(2020), $$NOW]": {"$cmp": ["$a", "$$NOW"]},
        "gt[$$NOW, $a(2020)]": {"$gt": ["$$NOW", "$a"]},
        "max[$a(2020), $$NOW]": {"$max": ["$a", "$$NOW"]},
        "max[$$NOW, $later(2030)]": {"$max": ["$$NOW", "$later"]},
        "max[$a, $dateAdd(NOW,0)]": {"$max": ["$a", {"$dateAdd": {"startDate": "$$NOW", "unit": "millisecond", "amount": 0}}]},
        "max[$a, $a+1ms]": {"$max": ["$a", {"$add": ["$a", 1]}]},
        "max[$n(5), 7]": {"$max": ["$n", 7]},
        "toDate(max[toLong $a, toLong NOW])": {"$toDate": {"$max": [{"$toLong": "$a"}, {"$toLong": "$$NOW"}]}},
        "type($$NOW)": {"$type": "$$NOW"},
    }
    r = list(col2.aggregate([{"$project": exprs}]))[0]
    for k in exprs:
        say(1, f"  {k} => {r.get(k)!r}")
    n = col2.count_documents({"$expr": {"$lt": ["$a", "$$NOW"]}})
    say(1, "  find {$expr: {$lt: ['$a'(2020), '$$NOW']}} matches (MongoDB: 1):", n)
    n = col2.count_documents({"a": {"$lt": dt.datetime.now(UTC)}})
    say(1, "  find {a: {$lt: <client datetime now>}} matches (MongoDB: 1):", n)
    try:
        col2.aggregate([{"$project": {"x": "$$CLUSTER_TIME"}}]).to_list()
        say(1, "  $$CLUSTER_TIME: supported")
    except PyMongoError as e:
        say(1, "  $$CLUSTER_TIME:", err_str(e))
    c.drop_database("probe_1")


# --------------------------------------------------------------------------- 2
def probe2(port, tries=2000, **_):
    c = client(port, maxPoolSize=20)
    col = c.probe_2.items
    col.drop()
    pipe = [{"$set": {"v": {"$add": [{"$ifNull": ["$v", 0]}, 1]}, "at": "$$NOW"}}]

    # A: one thread keeps deleting the _id, two threads upsert it.
    stats = {"ok": 0, "none": 0, "dup": 0, "other": 0}
    codes = {}
    lock = threading.Lock()
    stop = threading.Event()
    deletes = [0]

    def deleter():
        while not stop.is_set():
            col.delete_one({"_id": "race"})
            deletes[0] += 1

    def say_codes():
        for k, v in codes.items():
            say(2, f"  {v}x {k}")

    def counted(call):
        """Runs `call` (which names its outcome); the outcome is counted in
        `stats`, errors also by message in `codes`."""
        try:
            key = call()
        except PyMongoError as e:
            key = "dup" if isinstance(e, DuplicateKeyError) else "other"
            with lock:
                codes[err_str(e)] = codes.get(err_str(e), 0) + 1
        with lock:
            stats[key] += 1

    def upsert_once(_id):
        d = col.find_one_and_update({"_id": _id}, pipe, upsert=True,
                                    return_document=ReturnDocument.AFTER)
        return "none" if d is None else "ok"

    def upserter(n):
        for _ in range(n):
            counted(lambda: upsert_once("race"))

    t0 = time.monotonic()
    dt_ = threading.Thread(target=deleter)
    dt_.start()
    ups = [threading.Thread(target=upserter, args=(tries // 2,)) for _ in range(2)]
    for t in ups:
        t.start()
    for t in ups:
        t.join()
    stop.set()
    dt_.join()
    say(2, f"A delete-vs-upsert on one _id: {tries} find_one_and_update(upsert, AFTER) "
           f"with {deletes[0]} concurrent delete_one in {time.monotonic() - t0:.1f}s -> {stats}")
    say_codes()

    # B: four threads upsert the same fresh _id at the same moment (barrier).
    stats = {"ok": 0, "none": 0, "dup": 0, "other": 0}
    codes.clear()
    rounds = tries // 4
    barrier = threading.Barrier(4)

    def racer():
        for i in range(rounds):
            barrier.wait()
            counted(lambda: upsert_once(f"b{i}"))

    t0 = time.monotonic()
    run_together(racer, 4)
    vs = sorted({d["v"] for d in col.find({"_id": {"$regex": "^b"}})})
    say(2, f"B 4 threads upserting the same new _id at once, {rounds} rounds "
           f"({rounds * 4} calls) in {time.monotonic() - t0:.1f}s -> {stats}; final v values: {vs}")
    say_codes()

    # C: the same with update_one(upsert) instead of find_one_and_update.
    col.delete_many({})
    stats = {"ok": 0, "none": 0, "dup": 0, "other": 0}
    codes.clear()

    def racer_c():
        for i in range(rounds):
            barrier.wait()
            counted(lambda: col.update_one({"_id": f"c{i}"}, pipe, upsert=True) and "ok")

    run_together(racer_c, 4)
    say(2, f"C 4 threads update_one(upsert) on the same new _id, {rounds} rounds -> {stats}")
    say_codes()

    # E: the raw findAndModify reply of a call that returned None.
    col.delete_many({})
    samples = []

    def racer_e():
        for i in range(50):
            barrier.wait()
            r = c.probe_2.command({"findAndModify": "items", "query": {"_id": f"e{i}"},
                                   "update": pipe, "upsert": True, "new": True})
            if r.get("value") is None:
                with lock:
                    samples.append({k: v for k, v in r.items() if not k.startswith("$")
                                    and k != "operationTime"})

    run_together(racer_e, 4)
    vs = sorted({d["v"] for d in col.find({"_id": {"$regex": "^e"}})})
    say(2, f"E raw findAndModify(upsert, new) replies with value null: {len(samples)}/200, "
           f"e.g. {samples[0] if samples else None}; final v values {vs} (4 = every call applied)")

    # D: what a duplicate key error looks like (insert of an existing _id).
    try:
        col.insert_one({"_id": "dup"})
        col.insert_one({"_id": "dup"})
    except DuplicateKeyError as e:
        say(2, "D duplicate insert error:", err_str(e))
    c.drop_database("probe_2")


# --------------------------------------------------------------------------- 3
def next_event(stream, timeout=5.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        ev = stream.try_next()
        if ev is not None:
            return ev
        if not stream.alive:
            return None
    return None


def drain(stream, timeout=1.5):
    out = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and stream.alive:
        ev = stream.try_next()
        if ev is not None:
            out.append(ev)
            t0 = time.monotonic()
    return out


def brief(ev):
    keep = {k: ev[k] for k in ("operationType", "documentKey", "updateDescription",
                               "fullDocument", "to") if k in ev}
    return keep


def probe3(port, **_):
    c = client(port)
    db = c.probe_3
    c.drop_database("probe_3")
    col = db.items
    col.insert_one({"_id": "seed"})  # make sure the collection exists

    for fd in ("default", "updateLookup", "whenAvailable", "required"):
        try:
            with col.watch(full_document=fd, max_await_time_ms=200) as s:
                col.update_one({"_id": "seed"}, {"$inc": {"n": 1}}, upsert=True)
                ev = next_event(s)
                say(3, f"full_document={fd!r}: accepted; update event fullDocument="
                       f"{ev.get('fullDocument') if ev else 'NO EVENT'}")
        except PyMongoError as e:
            say(3, f"full_document={fd!r}:", err_str(e))
    try:
        with col.watch(full_document_before_change="whenAvailable", max_await_time_ms=200) as s:
            col.update_one({"_id": "seed"}, {"$inc": {"n": 1}})
            ev = next_event(s)
            say(3, "full_document_before_change='whenAvailable': accepted; "
                   f"fullDocumentBeforeChange={ev.get('fullDocumentBeforeChange', 'ABSENT') if ev else 'NO EVENT'}")
    except PyMongoError as e:
        say(3, "full_document_before_change='whenAvailable':", err_str(e))

    with col.watch(max_await_time_ms=1000) as s:
        t0 = time.monotonic()
        s.try_next()
        idle = time.monotonic() - t0
        threading.Timer(0.3, lambda: col.insert_one({"wake": 1})).start()
        t0 = time.monotonic()
        ev = next_event(s)
        say(3, f"getMore with maxAwaitTimeMS=1000: idle returns after {idle:.2f}s; "
               f"an insert 0.3s in wakes it after {time.monotonic() - t0:.2f}s ({ev and ev['operationType']})")

    col.delete_many({})
    with col.watch(full_document="updateLookup", max_await_time_ms=200) as s:
        idle = s.try_next()
        say(3, "idle try_next() ->", idle, "; stream.resume_token while idle:", s.resume_token)
        col.insert_one({"_id": "d1", "a": 1, "b": 2, "c": 3, "arr": [1, 2, 3]})
        ev = next_event(s)
        say(3, "insert event keys:", sorted(ev.keys()))
        say(3, "  _id (resume token):", ev["_id"], "clusterTime:", ev.get("clusterTime"),
            "wallTime:", ev.get("wallTime"), "ns:", ev.get("ns"), "documentKey:", ev.get("documentKey"))
        first_token = ev["_id"]

        col.find_one_and_update({"_id": "d1"}, [{"$set": {"a": 1, "b": 20, "d": "$$NOW"}}])
        ev = next_event(s)
        say(3, "pipeline update {$set: {a: 1 (same), b: 20 (changed), d: $$NOW (new)}} -> "
               f"{ev['operationType']} updateDescription={ev.get('updateDescription')}")

        for label, upd in (("pipeline [$unset: ['c']]", [{"$unset": ["c"]}]),
                           ("pipeline [$set: {arr: [1, 2]}] (was [1, 2, 3])", [{"$set": {"arr": [1, 2]}}]),
                           ("pipeline [$set: {arr: [1, 2, 3]}] (append)", [{"$set": {"arr": [1, 2, 3]}}]),
                           ("operator {$unset: {b: ''}}", {"$unset": {"b": ""}}),
                           ("operator {$pop: {arr: 1}}", {"$pop": {"arr": 1}}),
                           ("operator {$set: {b: 1}}", {"$set": {"b": 1}})):
            col.update_one({"_id": "d1"}, upd)
            ev = next_event(s)
            say(3, f"{label} -> {ev['operationType']} "
                   f"updateDescription={ev.get('updateDescription')}")

        col.update_one({"_id": "d1"}, {"$set": {"a": 1, "b": 21}})
        ev = next_event(s)
        say(3, "operator update {$set: {a: 1 (same), b: 21}} -> updateDescription=",
            ev.get("updateDescription"))

        r = col.update_one({"_id": "d1"}, {"$set": {"a": 1}})
        ev = next_event(s, timeout=1.5)
        say(3, f"no-op update (matched={r.matched_count}, modified={r.modified_count}) -> event:",
            brief(ev) if ev else None)

        r = col.update_one({"_id": "d1"}, [{"$set": {"a": 1}}])
        ev = next_event(s, timeout=1.5)
        say(3, f"no-op pipeline update (matched={r.matched_count}, modified={r.modified_count}) -> event:",
            brief(ev) if ev else None)

        col.find_one_and_update({"_id": "u1"}, [{"$set": {"v": 1}}], upsert=True)
        ev = next_event(s)
        say(3, "upsert that inserts ->", brief(ev))

        col.replace_one({"_id": "u1"}, {"v": 2})
        ev = next_event(s)
        say(3, "replace_one ->", brief(ev))

        col.delete_one({"_id": "u1"})
        ev = next_event(s)
        say(3, "delete_one ->", brief(ev), "| keys:", sorted(ev.keys()))
        last_token = ev["_id"]
        say(3, "stream.resume_token after last event equals its _id:", s.resume_token == last_token)

    # Resume with saved tokens.
    col.insert_one({"_id": "after1"})
    col.insert_one({"_id": "after2"})
    def watched(label, **options):
        """Opens a stream with `options`, reports what it delivers (or the error)."""
        try:
            with col.watch(max_await_time_ms=200, **options) as s:
                evs = drain(s)
                say(3, f"watch({label}) -> {len(evs)} events: "
                       f"{[(e['operationType'], e['documentKey']) for e in evs]}")
        except PyMongoError as e:
            say(3, f"watch({label}):", err_str(e))

    for kw in ("resume_after", "start_after"):
        watched(f"{kw}=<token of delete>", **{kw: last_token})
    watched("resume_after=<token of first insert>", resume_after=first_token)
    ot = c.admin.command("ping").get("operationTime")
    col.insert_one({"_id": "after3"})
    watched("start_at_operation_time=<ping operationTime>", start_at_operation_time=ot)

    # Database- and cluster-level streams.
    for name, target in (("db.watch()", db), ("client.watch()", c)):
        try:
            with target.watch(max_await_time_ms=200) as s:
                db.other.insert_one({"x": 1})
                ev = next_event(s)
                say(3, f"{name}: accepted; sees insert into probe_3.other: ns={ev and ev.get('ns')}")
        except PyMongoError as e:
            say(3, f"{name}:", err_str(e))

    # drop
    dbs = db.watch(max_await_time_ms=200)
    s = col.watch(max_await_time_ms=200)
    col.insert_one({"_id": "before-drop"})
    next_event(s)
    col.drop()
    evs = drain(s, 3)
    say(3, "collection stream on drop() ->", [e["operationType"] for e in evs], "; stream.alive =", s.alive)
    inval = [e for e in evs if e["operationType"] == "invalidate"]
    if inval:
        say(3, "  invalidate event:", inval[0])
        col.insert_one({"_id": "recreated"})
        for kw in ("resume_after", "start_after"):
            try:
                with col.watch(max_await_time_ms=200, **{kw: inval[0]["_id"]}) as s2:
                    evs2 = drain(s2)
                    say(3, f"  watch({kw}=<invalidate token>) -> "
                           f"{[(e['operationType'], e.get('documentKey')) for e in evs2]}")
            except PyMongoError as e:
                say(3, f"  watch({kw}=<invalidate token>):", err_str(e))
    s.close()
    say(3, "db-level stream on drop() ->", [e["operationType"] for e in drain(dbs, 2)])

    # rename
    c.drop_database("probe_3")
    col = db.src
    col.insert_one({"_id": 1})
    dbs = db.watch(max_await_time_ms=200)
    s = col.watch(max_await_time_ms=200)
    col.rename("dst")
    evs = drain(s, 3)
    say(3, "collection stream on rename() ->", [brief(e) for e in evs], "; stream.alive =", s.alive)
    s.close()
    say(3, "db-level stream on rename() ->", [brief(e) for e in drain(dbs, 2)])
    dbs.close()
    c.drop_database("probe_3")


# --------------------------------------------------------------------------- 4
def try_resume(label, col, token):
    """Resume from ``token`` both ways; report whether it fails at watch() or at the
    first getMore, and what the first event is."""
    for kw in ("resume_after", "start_after"):
        try:
            s = col.watch(max_await_time_ms=200, **{kw: token})
        except PyMongoError as e:
            say(4, f"{label}: watch({kw}=old token) fails AT watch() ->", err_str(e))
            continue
        try:
            ev = s.try_next()
            say(4, f"{label}: watch({kw}=old token) ok; first try_next -> {brief(ev) if ev else ev}")
        except PyMongoError as e:
            say(4, f"{label}: watch({kw}=old token) ok, fails at FIRST try_next ->", err_str(e))
        finally:
            s.close()


def read_live(label, live):
    n = 0
    try:
        while True:
            ev = live.try_next()
            if ev is None:
                break
            n += 1
        say(4, f"{label}: stream opened before the writes, read afterwards -> {n} events, no error")
    except PyMongoError as e:
        say(4, f"{label}: stream opened before the writes, read afterwards -> {n} events, then",
            err_str(e))
    live.close()


def probe4(port, exe=None, tmp=None, **_):
    for label, extra in (("--oplog-max-entries 50", ["--oplog-max-entries", "50"]),
                         ("--oplog-retention-seconds 2", ["--oplog-retention-seconds", "2"])):
        inst = Instance(exe, os.path.join(tmp, f"p4-{extra[0][2:]}", "data"), extra)
        try:
            inst.start()
            c = client(inst.port)
            col = c.probe_4.items
            col.insert_one({"_id": "seed"})

            def fresh_token():
                with col.watch(max_await_time_ms=200) as s:
                    col.insert_one({})
                    return next_event(s)["_id"]

            def token_then_writes(n):
                """A fresh token and a live stream (opened, not read yet), then
                `n` writes; the token is tried again after them."""
                token = fresh_token()
                live = col.watch(max_await_time_ms=200)
                live.try_next()
                if "retention" in label:
                    time.sleep(3)
                for i in range(n):
                    col.update_one({"_id": "seed"}, {"$set": {"i": i}})
                try_resume(f"{label}, after {n} writes", col, token)
                return token, live

            # (a) 200 writes, nothing else
            token, live = token_then_writes(200)
            # (b) the same token after forcing a prune with SecantusDB's admin command
            try:
                r = c.admin.command("secantusAdmin.pruneOplog")
                say(4, f"{label}: admin command secantusAdmin.pruneOplog -> pruned={r.get('pruned')}")
            except PyMongoError as e:
                say(4, f"{label}: secantusAdmin.pruneOplog ->", err_str(e))
            try_resume(f"{label}, after pruneOplog", col, token)
            read_live(f"{label}, after pruneOplog", live)
            # (c) a new token, then > 1000 writes (no admin command)
            token, live = token_then_writes(1100)
            read_live(f"{label}, after 1100 writes", live)
            c.close()
        finally:
            inst.kill()


# --------------------------------------------------------------------------- 5
def probe5(port, ttl_wait=90, **_):
    c = client(port)
    col = c.probe_5.items
    col.drop()
    try:
        name = col.create_index("expires_at", expireAfterSeconds=0)
        say(5, "create_index(expires_at, expireAfterSeconds=0) accepted:", name,
            [ix for ix in col.list_indexes() if ix["name"] == name])
    except PyMongoError as e:
        say(5, "create_index TTL:", err_str(e))
        return
    now = dt.datetime.now(UTC)
    col.insert_many([{"_id": f"past{i}", "expires_at": now - dt.timedelta(seconds=60)} for i in range(5)]
                    + [{"_id": "soon", "expires_at": now + dt.timedelta(seconds=5)},
                       {"_id": "future", "expires_at": now + dt.timedelta(hours=1)},
                       {"_id": "nodate", "expires_at": "not a date"}])
    s = col.watch(max_await_time_ms=200)
    t0 = time.monotonic()
    gone_at = {}
    while time.monotonic() - t0 < ttl_wait:
        present = {d["_id"] for d in col.find({}, {"_id": 1})}
        for k in ("past0", "soon"):
            if k not in present and k not in gone_at:
                gone_at[k] = time.monotonic() - t0
        if len(gone_at) == 2:
            break
        time.sleep(1)
    present = sorted(d["_id"] for d in col.find({}, {"_id": 1}))
    say(5, f"after {time.monotonic() - t0:.0f}s: removed at (s after insert) {gone_at}; remaining {present}")
    evs = drain(s, 1)
    say(5, "change-stream events for TTL deletions:", [(e["operationType"], e["documentKey"]) for e in evs])
    s.close()
    col.insert_one({"_id": "expired-again", "expires_at": dt.datetime.now(UTC) - dt.timedelta(seconds=1)})
    try:
        r = c.admin.command("secantusAdmin.pruneTtl")
        say(5, "admin command secantusAdmin.pruneTtl ->", {k: v for k, v in r.items() if not k.startswith("$")},
            "; expired doc still there:", col.find_one({"_id": "expired-again"}) is not None)
    except PyMongoError as e:
        say(5, "secantusAdmin.pruneTtl ->", err_str(e))
    c.drop_database("probe_5")


# --------------------------------------------------------------------------- 6
def probe6(port, **_):
    c = client(port)
    col = c.probe_6.items
    col.drop()
    col.insert_one({"_id": "exists", "v": 5})
    pipe = [{"$set": {"v": {"$add": [{"$ifNull": ["$v", 0]}, 1]}, "at": "$$NOW"}}]
    ops = [UpdateOne({"_id": k}, pipe, upsert=True) for k in ("exists", "new1", "new2", "new1")]
    try:
        r = col.bulk_write(ops, ordered=False)
        say(6, "bulk_write(ordered=False) of 4 pipeline UpdateOne upserts "
               "(existing, new1, new2, new1 again):",
            f"matched={r.matched_count} modified={r.modified_count} upserted={r.upserted_count} "
            f"upserted_ids={r.upserted_ids}")
        say(6, "  docs:", list(col.find({}, {"at": 0}).sort("_id")))
    except PyMongoError as e:
        say(6, "bulk_write:", err_str(e), getattr(e, "details", None))
    # A failing op in the middle of an unordered batch.
    col = c.probe_6.uniq
    col.create_index("u", unique=True)
    ops = [UpdateOne({"_id": "x1"}, [{"$set": {"u": 1}}], upsert=True),
           UpdateOne({"_id": "x2"}, [{"$set": {"u": 1}}], upsert=True),
           UpdateOne({"_id": "x3"}, [{"$set": {"u": 3}}], upsert=True)]
    try:
        r = col.bulk_write(ops, ordered=False)
        say(6, "unordered batch with a unique-index violation: no error?!", r.bulk_api_result)
    except PyMongoError as e:
        det = getattr(e, "details", {}) or {}
        say(6, "unordered batch with a unique-index violation ->", type(e).__name__,
            "writeErrors:", [(w.get("index"), w.get("code")) for w in det.get("writeErrors", [])],
            "nUpserted:", det.get("nUpserted"), "upserted:", det.get("upserted"))
    c.drop_database("probe_6")


# --------------------------------------------------------------------------- 7
def probe7(port, **_):
    names, fails = [], []

    class L(monitoring.CommandListener):
        def started(self, e):
            names.append(e.command_name)

        def succeeded(self, e):
            pass

        def failed(self, e):
            fails.append((e.command_name, e.failure))

    c = client(port, event_listeners=[L()])
    col = c.probe_7.items
    col.drop()
    col.insert_many([{"_id": f"k{i}", "n": i} for i in range(1000)])
    ids = [f"k{i}" for i in range(0, 1000, 3)] + ["missing1", "missing2"]
    got = list(col.find({"_id": {"$in": ids}}))
    say(7, f"find({{_id: {{$in: {len(ids)} ids}}}}) -> {len(got)} docs (expect 334)")
    got = list(col.find({"_id": {"$in": []}}))
    say(7, "find $in [] ->", len(got))
    say(7, "count_documents({n: {$gte: 500}}) ->", col.count_documents({"n": {"$gte": 500}}),
        "; count_documents({}) ->", col.count_documents({}),
        "; estimated_document_count() ->", col.estimated_document_count())
    col.delete_many({"n": {"$lt": 100}})
    say(7, "after delete_many 100: count_documents ->", col.count_documents({}),
        "; estimated_document_count ->", col.estimated_document_count())
    got = list(col.find({"n": {"$gte": 990}}, {"n": 1}).sort("n", -1).limit(3))
    say(7, "find+projection+sort+limit ->", got)
    say(7, "distinct commands seen by command monitoring:", sorted(set(names)))
    say(7, "failed commands:", fails)
    c.drop_database("probe_7")


# --------------------------------------------------------------------------- 8
def probe8(port, exe=None, tmp=None, spawn=True, **_):
    c = client(port)
    for cmd in ("ping", "hello"):
        lat = []
        for _ in range(200):
            t0 = time.perf_counter()
            c.admin.command(cmd)
            lat.append((time.perf_counter() - t0) * 1000)
        lat.sort()
        say(8, f"{cmd}: median {statistics.median(lat):.2f} ms, p99 {lat[197]:.2f} ms, max {lat[-1]:.2f} ms")
    t0 = time.perf_counter()
    c2 = client(port)
    c2.admin.command("ping")
    say(8, f"new client + first ping: {(time.perf_counter() - t0) * 1000:.0f} ms")
    c2.close()
    if spawn:
        inst = Instance(exe, os.path.join(tmp, "p8", "data"))
        os.makedirs(os.path.dirname(inst.storage), exist_ok=True)
        try:
            t = inst.start()
            say(8, f"start-up on empty storage until ping answers: {t:.2f} s")
            client(inst.port).p.c.insert_many([{"i": i} for i in range(1000)])
            inst.kill()
            t = inst.start()
            say(8, f"restart (SIGTERM, same storage) until ping answers: {t:.2f} s")
        finally:
            inst.kill()


# --------------------------------------------------------------------------- 9
def probe9(port, exe=None, tmp=None, **_):
    inst = Instance(exe, os.path.join(tmp, "p9", "data"))
    os.makedirs(os.path.dirname(inst.storage), exist_ok=True)
    try:
        inst.start()
        c = client(inst.port)
        col = c.probe_9.items
        col.insert_one({"_id": "seed"})
        with col.watch(max_await_time_ms=200) as s:
            col.insert_one({"_id": "a"})
            token = next_event(s)["_id"]
            col.insert_one({"_id": "b"})
            next_event(s)
        for i in range(100):
            col.update_one({"_id": "seed"}, {"$set": {"i": i}})
        c.close()
        inst.kill(signal.SIGKILL)
        t = inst.start()
        c = client(inst.port)
        col = c.probe_9.items
        say(9, f"after kill -9 + restart on same storage ({t:.1f}s): docs={col.count_documents({})} "
               f"(expect 3), seed.i={col.find_one({'_id': 'seed'}).get('i')} (expect 99)")
        try:
            with col.watch(max_await_time_ms=200, resume_after=token) as s:
                evs = drain(s)
                say(9, f"resume_after(token saved before kill) -> {len(evs)} events, first: "
                       f"{brief(evs[0]) if evs else None}")
        except PyMongoError as e:
            say(9, "resume_after(old token) after restart ->", err_str(e))
        c.close()
    finally:
        inst.kill()


PROBES = {1: probe1, 2: probe2, 3: probe3, 4: probe4, 5: probe5, 6: probe6,
          7: probe7, 8: probe8, 9: probe9}
SPAWNING = {4, 9}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="port of a running SecantusDB")
    ap.add_argument("--secantusd", help="secantusd-py used for the probes that start their own server")
    ap.add_argument("--no-spawn", action="store_true", help="skip probes 4 and 9 and the start-up timing")
    ap.add_argument("--only", help="comma-separated probe numbers, e.g. 2,3")
    ap.add_argument("--tries", type=int, default=2000, help="calls for the race probe (2)")
    ap.add_argument("--ttl-wait", type=int, default=90, help="seconds to wait for TTL deletion (5)")
    a = ap.parse_args()

    exe = a.secantusd
    if not exe:
        cand = os.path.join(os.path.dirname(sys.executable), "secantusd-py")
        exe = cand if os.path.exists(cand) else shutil.which("secantusd-py")
    wanted = [int(x) for x in a.only.split(",")] if a.only else sorted(PROBES)
    if a.no_spawn or not exe:
        wanted = [n for n in wanted if n not in SPAWNING]
    print(f"pymongo {pymongo.version}; server 127.0.0.1:{a.port}; secantusd for spawned instances: {exe}")
    tmp = tempfile.mkdtemp(prefix="probe-secantus-")
    failed = 0
    try:
        for n in wanted:
            print(f"===== probe {n} =====", flush=True)
            try:
                PROBES[n](a.port, exe=exe, tmp=tmp, spawn=not a.no_spawn and bool(exe),
                          tries=a.tries, ttl_wait=a.ttl_wait)
            except Exception:  # keep going: a crashing probe is itself a finding
                failed += 1
                say(n, "PROBE CRASHED:")
                traceback.print_exc(file=sys.stdout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
