"""The hit path: closed-loop throughput and latency of warm GETs (wrk) on each
target at each concurrency, next to redis-benchmark's GET at the same
concurrency; and latency at fixed offered rates (oha), where a closed loop
would hide queueing."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..http import delta, scrape, tier_counts
from ..loadgen import WRK_SCRIPTS, oha_bin, run_oha, run_redis_benchmark, run_wrk
from ..output import log, write_json
from ..stats import Window


def cmd_hitpath(a):
    targets = [t.split("=", 1) for t in a.targets]
    script = WRK_SCRIPTS / "zipf_get.lua"
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
        # One connection is slow: a quarter of the requests (at least 10,000) keeps the cell short.
        requests = a.redis_n if conc > 1 else max(a.redis_n // 4, 10000)
        rb = run_redis_benchmark(a.redis_port, conc, requests, a.doc_bytes, a.raw_log)
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


def cmd_auth_cost(a):
    """The hit path of A (open) and F (API key, rate limit, load shedding)
    side by side: bench/results/NAME-auth.json and a Markdown table next to it."""
    hp = json.loads(Path(a.part).read_text())
    rows = []
    for level in hp["levels"]:
        t = level["targets"]
        near, auth = t.get("near"), t.get("near-auth")
        if not (near and auth):
            continue
        rows.append({
            "connections": level["connections"],
            "near_rps": near["rps"],
            "near_auth_rps": auth["rps"],
            "ratio": round(auth["rps"] / near["rps"], 3),
            "near_p50_ms": near["latency_ms"]["p50"],
            "near_auth_p50_ms": auth["latency_ms"]["p50"],
            "near_p99_ms": near["latency_ms"]["p99"],
            "near_auth_p99_ms": auth["latency_ms"]["p99"],
            "errors": near["error_total"] + auth["error_total"],
            "machine_busy_pct": [near["machine"].get("busy_pct"), auth["machine"].get("busy_pct")],
        })
    out = {
        "meta": json.loads(Path(a.meta).read_text()),
        "machine": json.loads(Path(a.machine).read_text()),
        "seconds_per_cell": hp["seconds"],
        "rows": rows,
        "hitpath": hp,
    }
    write_json(a.out, out)
    lines = [
        "| conns | A req/s (open) | F req/s (key + rate limit + shedding) | F/A | p50 A / F ms | p99 A / F ms | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ] + [
        f"| {r['connections']} | {r['near_rps']:,.0f} | {r['near_auth_rps']:,.0f} | {r['ratio']} | "
        f"{r['near_p50_ms']} / {r['near_auth_p50_ms']} | {r['near_p99_ms']} / {r['near_auth_p99_ms']} | {r['errors']} |"
        for r in rows
    ]
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    for line in lines:
        log(line)
