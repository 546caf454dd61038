"""The report of a run: merges the JSON parts of its run directory and its
meta.json into bench/results/<name>.json with a summary of the headline
figures, then draws the plots and writes the Markdown next to it."""

from __future__ import annotations

import json
from pathlib import Path

from .markdown import markdown
from .output import log, write_json
from .plots import make_plots


def cmd_report(a):
    run_dir = Path(a.run_dir)
    parts = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "parts").glob("*.json"))}
    meta = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").exists() else {}
    result = {"name": a.name, **meta, **parts}
    result["summary"] = summarize(result)
    out = Path(a.out)
    write_json(out, result)  # before plotting too: a plot that fails still leaves the merged run
    plots = make_plots(result, out.parent, a.name)
    result["plots"] = plots
    write_json(out, result)
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    log(f"report: {out} and {len(plots)} plots")


def summarize(res: dict) -> dict:
    s = {}
    hp = res.get("hitpath")
    if hp:
        for level in hp["levels"]:
            c = level["connections"]
            t = level["targets"]
            row = {name: {"rps": v["rps"], "p50_ms": v["latency_ms"]["p50"], "p99_ms": v["latency_ms"]["p99"]}
                   for name, v in t.items()}
            ref, rb = t.get("reference"), t.get("redis-benchmark")
            for name in ("near", "redis"):
                if name in t and ref:
                    row[name]["rps_vs_reference"] = round(t[name]["rps"] / ref["rps"], 3)
                if name in t and rb:
                    row[name]["rps_vs_redis_benchmark"] = round(t[name]["rps"] / rb["rps"], 3)
            s[f"hit_c{c}"] = row
    lag = res.get("lag")
    if lag:
        s["lag_ms_all"] = {t: {k: v.get(k) for k in ("p50", "p99", "max")} for t, v in lag["lag_ms"]["all"].items()}
    st = res.get("stampede")
    if st:
        s["stampede_mongodb_finds"] = st["mongodb_finds_per_stampede"]
    for key in ("offload_warm", "offload_cold"):
        if key in res:
            s[key + "_fraction_reaching_mongodb"] = res[key]["fraction_of_reads_reaching_mongodb"]
    for key in sorted(res):
        if key.startswith("recovery10_"):
            r = res[key]
            s[key] = {"mongodb_finds": r["mongodb_finds_after_flush"], "hit_ratio": r["hit_ratio_after_flush"]}
        if key.startswith("storm_"):
            s[key] = {"mongodb_finds": res[key]["mongodb_finds"], "requests": res[key]["requests"]}
    mem = res.get("memory")
    if mem:
        s["memory"] = [{"entries": r["entries"], "rss_mib": round(r["VmRSS"] / 2**20, 1),
                        "bytes_per_entry": r.get("rss_bytes_per_entry")} for r in mem["rows"]]
    return s

