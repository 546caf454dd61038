"""Invalidation: the lag from an acknowledged write (through the API, or
straight into MongoDB) until Redis and two near-cache replicas serve the new
content, beside the lag per stage the services record; and the invalidator's
throughput under versioned writes from several threads straight into MongoDB."""

from __future__ import annotations

import random
import threading
import time

from ..http import Http, histogram_delta, msum, msum_delta, scrape
from ..output import log, write_json
from ..stats import Window, histogram_quantile, proc_cpu_seconds, summary_ms
from ..system import customer_id, feature_path, features_collection, mongo_client, redis_client, redis_key

# The version a write sets, as the services compute it
# (libs/feature-store/src/version.rs): max(stored + 1, server ms x 1000).
VERSION_EXPR = {
    "$max": [
        {"$add": [{"$ifNull": ["$version", 0]}, 1]},
        {"$multiply": [{"$toLong": "$$NOW"}, 1000]},
    ]
}


def _wait_for_api_writes(api: Http) -> float:
    """Seconds until two writes in a row succeed within 1 s each. The API's
    writes only work again once the database has finished the writes of the
    previous phase that timed out at the API (see settle)."""
    t_wait = time.perf_counter()
    ok_in_row = 0
    while ok_in_row < 2:
        if time.perf_counter() - t_wait > 300:
            raise SystemExit("lag: API writes still fail after 300 s")
        t0 = time.perf_counter()
        status, _, _ = api.post_json("/api/features/", {"customer_id": customer_id(1), "features": {"credit_score": 700}})
        ok_in_row = ok_in_row + 1 if status in (200, 201) and time.perf_counter() - t0 < 1.0 else 0
    return time.perf_counter() - t_wait


# The stages of a change's way as the services record them in the histogram
# invalidation_lag_seconds{stage}: (label, who, stage, what it spans).
STAGES = (
    ("feed", "invalidator", "feed", "change's wall time in MongoDB -> read from the change feed"),
    ("redis", "invalidator", "redis", "change's wall time in MongoDB -> guarded write in Redis done"),
    ("published", "invalidator", "published", "change's wall time in MongoDB -> announced (stream and channel)"),
    ("replica A", "A", "replica", "stream entry's time -> applied in replica A's near cache"),
    ("replica D", "D", "replica", "stream entry's time -> applied in replica D's near cache"),
)


def stage_lags(before: dict, after: dict) -> dict:
    """Per stage (STAGES), from the histograms' growth over the phase: count,
    mean, and p50/p99 interpolated within the buckets with the bucket's bound
    (the services record whole milliseconds: a sub-millisecond lag counts 0)."""
    out = {}
    for label, who, stage, what in STAGES:
        buckets = histogram_delta(before[who], after[who], "invalidation_lag_seconds", stage=stage)
        count = msum_delta(before[who], after[who], "invalidation_lag_seconds_count", stage=stage)
        total = msum_delta(before[who], after[who], "invalidation_lag_seconds_sum", stage=stage)
        row = {"what": what, "source": f"{who} /metrics invalidation_lag_seconds{{stage=\"{stage}\"}}",
               "count": count, "mean_ms": round(1000 * total / count, 3) if count else None}
        for q in (0.5, 0.99):
            value, bound = histogram_quantile(buckets, q)
            row[f"p{q * 100:g}_ms"] = None if value is None else round(1000 * value, 3)
            row[f"p{q * 100:g}_bucket_le_ms"] = None if bound is None else round(1000 * bound, 3)
        row["buckets"] = [("+Inf" if le == float("inf") else round(1000 * le, 3), c) for le, c in buckets]
        out[label] = row
    return out


def cmd_lag(a):
    r = redis_client(a.redis_port)
    coll = features_collection(mongo_client(a), a)
    api_a, api_d = Http(a.api_a), Http(a.api_d)
    replicas = {"A": api_a, "D": api_d}
    rng = random.Random(a.seed)
    keys = [customer_id(n) for n in rng.sample(range(1, a.keys + 1), a.writes)]
    api_write_recovery_s = _wait_for_api_writes(api_a)
    log(f"lag: API writes answer again after {api_write_recovery_s:.1f}s")
    inv_before = scrape(a.invalidator)
    before = {"invalidator": inv_before, "A": scrape(a.api_a), "D": scrape(a.api_d)}
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
            client.get(feature_path(key))
            status, resp, _ = client.get(feature_path(key))
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
                v = r.get(redis_key(key))
                if v is not None and needle in v:
                    seen["redis"] = time.perf_counter() - t_ack
                    first_poll["redis"] = polls == 1
            for name, client in replicas.items():
                if seen[name] is None:
                    _, _, body = client.get(feature_path(key))
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
    stages = stage_lags(before, {"invalidator": inv_after, "A": scrape(a.api_a), "D": scrape(a.api_d)})

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

    def invalidator_lag(stat: str) -> dict:
        return {
            stage: msum_delta(inv_before, inv_after, f"invalidation_lag_seconds_{stat}", stage=stage)
            for stage in ("feed", "redis", "published")
        }

    lag_sum, lag_cnt = invalidator_lag("sum"), invalidator_lag("count")
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
        "stages": stages,
        "stage_note": "Lag per stage from the services' histograms over this phase. The invalidator's "
        "stages count from the change's wall time in MongoDB, the replicas' from the stream entry's id; both "
        "are whole milliseconds, so a sample of 0 is any lag under 1 ms and a p50/p99 under 1 ms only says "
        "'under 1 ms'. p50/p99 are interpolated within the buckets (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25 ms...), "
        "the bucket's upper bound beside them.",
        "invalidator_events": msum_delta(inv_before, inv_after, "invalidator_events_total"),
        "machine": machine,
        "samples": results,
    }
    write_json(a.part, out)
    log("lag per stage: " + "; ".join(
        f"{k} p50 {v['p50_ms']} p99 {v['p99_ms']} mean {v['mean_ms']} ms (n {v['count']:.0f})" for k, v in stages.items()))
    for label, row in table.items():
        log("lag[" + label + "]: " + "; ".join(
            f"{t} p50 {v.get('p50')} p99 {v.get('p99')} max {v.get('max')} ms (missed {v['not_seen_within_timeout']})"
            for t, v in row.items()))


def cmd_throughput(a):
    """Versioned writes straight into MongoDB from several threads, as fast as
    the database takes them; the invalidator's events/s over the same window."""
    coll = features_collection(mongo_client(a, maxPoolSize=a.threads + 2), a)
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
            key = customer_id(rng.randint(1, a.keys))
            t0 = time.perf_counter()
            coll.update_one(
                {"_id": key},
                [{"$set": {"features.bench_throughput": {"$literal": f"{n}-{i}"}, "version": VERSION_EXPR}}],
            )
            dt = time.perf_counter() - t0
            acked[n] += 1
            i += 1
            if i % 4 == 0:  # a sample of the latencies keeps the lock out of most writes
                with lock:
                    write_lat.append(dt)

    sampler_thread = threading.Thread(target=sampler, daemon=True)
    sampler_thread.start()
    time.sleep(1.1)  # a sample or two before the first write
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
