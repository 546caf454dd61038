"""The hit path: closed-loop throughput and latency of warm GETs (wrk) on each
target at each concurrency, next to redis-benchmark's GET at the same
concurrency; the same side by side in interleaved rounds with the ratios of
each cache-api to its reference (hitpath-rounds); and latency at fixed
offered rates (oha), where a closed loop would hide queueing."""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from pathlib import Path

from ..http import Http, delta, scrape, tier_counts
from ..loadgen import WRK_SCRIPTS, oha_bin, run_oha, run_redis_benchmark, run_wrk
from ..output import log, write_json
from ..stats import Window
from ..system import feature_path


def wrk_cell(name: str, url: str, conc: int, seconds: float, ids: str, metrics: bool, raw_log=None) -> dict:
    """One wrk run of Zipf GETs on a target, with the machine's CPU over it and,
    for a cache-api (`metrics`), the tier counters' deltas."""
    metrics_before = tier_counts(scrape(url)) if metrics else None
    win = Window()
    res = run_wrk(url, conc, seconds, WRK_SCRIPTS / "zipf_get.lua", [ids], raw_log)
    res["machine"] = win.close()
    if metrics_before is not None:
        res["tiers"] = delta(tier_counts(scrape(url)), metrics_before)
    lat = res["latency_ms"]
    log(
        f"hit c={conc:<3} {name:<15} {res['rps']:>9.0f} req/s  p50 {lat['p50']:.3f} "
        f"p99 {lat['p99']:.3f} p99.9 {lat['p99.9']:.3f} ms  errors {res['error_total']}"
    )
    return res


def cmd_hitpath(a):
    targets = [t.split("=", 1) for t in a.targets]
    levels = []
    for conc in a.conc:
        level = {"connections": conc, "targets": {}}
        for name, url in targets:
            level["targets"][name] = wrk_cell(name, url, conc, a.seconds, a.ids, name in a.metrics, a.raw_log)
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


# The hit-path ratios: (label, numerator, denominator, target). A
# ratio is computed where both targets ran.
RATIOS = (
    ("A/C", "near", "reference", 0.9),
    ("B/G", "redis", "redis-reference", 0.9),
    ("F/A", "near-auth", "near", 0.95),
    ("H/B", "redis-auth", "redis", 0.95),
)


def _source_check(name: str, url: str, want: str, ids: list[str]) -> dict:
    """GETs each id once and counts `x-cache-source`: are the hits of `name`
    really served by the tier `want`?"""
    client = Http(url)
    sources: dict[str, int] = {}
    try:
        for customer in ids:
            status, resp, _ = client.get(feature_path(customer))
            source = resp.getheader("x-cache-source") if status == 200 else f"status {status}"
            sources[source or "none"] = sources.get(source or "none", 0) + 1
    finally:
        client.close()
    share = round(sources.get(want, 0) / len(ids), 4) if ids else None
    log(f"source check {name}: {sources} (want {want}: {share:.1%})")
    return {"expected": want, "requests": len(ids), "sources": sources, "share_expected": share}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _ratios(cells: list[dict], rounds: int, conc: list[int]) -> list[dict]:
    rps = {(c["round"], c["connections"], c["target"]): c["rps"] for c in cells}
    rows = []
    for label, num, den, target in RATIOS:
        for c in conc:
            per_round = [
                round(rps[(r, c, num)] / rps[(r, c, den)], 3)
                for r in range(1, rounds + 1)
                if (r, c, num) in rps and rps.get((r, c, den))
            ]
            if not per_round:
                continue
            median = _median(per_round)
            rows.append({"ratio": label, "numerator": num, "denominator": den, "connections": c,
                         "rounds": per_round, "median": median, "target": target, "met": median >= target})
    return rows


def _rounds_markdown(out: dict) -> str:
    m = out.get("machine", {})
    sizes = out.get("sizes", {})
    lines = [
        f"# Hit path side by side `{out['name']}`", "",
        f"wrk -t2, Zipf s=1.0 over {out.get('zipf', {}).get('keys', '?')} keys, {out['seconds_per_cell']} s a cell, "
        f"{out['rounds']} interleaved rounds (the target order reversed in even rounds). Machine: {m.get('nproc')} "
        f"CPUs ({m.get('Model name')}); documents {sizes.get('doc_bytes_in_redis')} bytes in Redis, "
        f"{sizes.get('response_body_bytes')}-byte API bodies.", "",
        "| target | what |", "|---|---|",
        *[f"| {name} | {what} |" for name, what in out["targets"].items()], "",
        "Tier of the answers before the measurement (`x-cache-source`): " + "; ".join(
            f"{name} {c['share_expected']:.1%} {c['expected']}" for name, c in out["source_check"].items()) + ".", "",
        "## Ratios of req/s (median over rounds; each round)", "",
        "| ratio | conns | median | rounds | target | met |", "|---|---:|---:|---|---:|---|",
        *[f"| {r['ratio']} ({r['numerator']} / {r['denominator']}) | {r['connections']} | {r['median']} | "
          f"{', '.join(str(x) for x in r['rounds'])} | {r['target']} | {'yes' if r['met'] else 'no'} |"
          for r in out["ratios"]], "",
        "## Cells", "",
        "| round | conns | target | req/s | p50 ms | p99 ms | errors | machine busy/steal % | tiers (delta) |",
        "|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for c in out["cells"]:
        tiers = ", ".join(f"{k} {int(v)}" for k, v in (c.get("tiers") or {}).items() if v)
        mach = c.get("machine", {})
        lines.append(f"| {c['round']} | {c['connections']} | {c['target']} | {c['rps']:,.0f} | "
                     f"{c['latency_ms']['p50']} | {c['latency_ms']['p99']} | {c['error_total']} | "
                     f"{mach.get('busy_pct')}/{mach.get('steal_pct')} | {tiers} |")
    return "\n".join(lines) + "\n"


def cmd_hitpath_rounds(a):
    """Every target at every connection count, round after round (interleaved,
    so drift of the machine hits every target alike): req/s and latency per
    cell and the issue's ratios (RATIOS), per round and as the median over
    rounds. Writes --out (JSON) and the Markdown beside it."""
    targets = [t.split("=", 1) for t in a.targets]
    expect = dict(e.split("=", 1) for e in a.expect)
    run_dir = Path(a.run_dir)
    parts = {name: json.loads((run_dir / "parts" / f"{name}.json").read_text())
             for name in ("machine", "sizes", "zipf") if (run_dir / "parts" / f"{name}.json").exists()}
    meta = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").exists() else {}
    # The 200 hottest ids of the Zipf sample: most of the requests.
    draws = Path(a.ids).read_text().split()
    hottest = [i for i, _ in Counter(draws).most_common(200)]
    checks = {name: _source_check(name, url, expect[name], hottest) for name, url in targets if name in expect}
    cells = []
    for r in range(1, a.rounds + 1):
        order = targets if r % 2 else targets[::-1]
        log(f"hit path round {r}/{a.rounds}: {', '.join(n for n, _ in order)}")
        for conc in a.conc:
            for name, url in order:
                res = wrk_cell(name, url, conc, a.seconds, a.ids, name in a.metrics, a.raw_log)
                cells.append({"round": r, "target": name, **res})
    processes = meta.get("processes", {})
    letters = {"near": "A", "redis": "B", "reference": "C", "redis-reference": "G", "near-auth": "F",
               "redis-auth": "H"}
    out = {
        "name": Path(a.out).stem,
        "meta": meta,
        **parts,
        "seconds_per_cell": a.seconds,
        "rounds": a.rounds,
        "connections": a.conc,
        "targets": {name: f"{letters.get(name, '?')}: {processes.get(letters.get(name, ''), url)}"
                    for name, url in targets},
        "source_check": checks,
        "ratios": _ratios(cells, a.rounds, a.conc),
        "cells": cells,
    }
    write_json(a.out, out)
    md = _rounds_markdown(out)
    Path(a.out).with_suffix(".md").write_text(md)
    for r in out["ratios"]:
        log(f"{r['ratio']} c={r['connections']}: median {r['median']} rounds {r['rounds']} "
            f"(target {r['target']}: {'met' if r['met'] else 'not met'})")
