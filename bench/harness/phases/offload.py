"""Database offload: a 95/5 read/write mix (wrk, bench/wrk/mixed.lua) on one
API, and how many of its reads reached MongoDB (the API's Redis misses)."""

from __future__ import annotations

from ..http import delta, feature_gets, feature_posts, is_feature_post, scrape, tier_counts
from ..loadgen import WRK_SCRIPTS, run_wrk
from ..output import log, write_json
from ..stats import Window


def writes_by_status(before, after) -> dict:
    """Writes during the phase by HTTP status (from the request counters)."""
    out = {}
    for n, l, v in after:
        if is_feature_post(n, l):
            prev = sum(v2 for n2, l2, v2 in before if n2 == n and l2 == l)
            if v - prev:
                out[l.get("status")] = v - prev
    return out


def cmd_offload(a):
    before_s = scrape(a.api)
    win = Window()
    res = run_wrk(a.api, a.conc, a.seconds, WRK_SCRIPTS / "mixed.lua", [a.ids, str(a.write_fraction)], a.raw_log)
    res["machine"] = win.close()
    after_s = scrape(a.api)
    reads = feature_gets(after_s) - feature_gets(before_s)
    writes = feature_posts(after_s) - feature_posts(before_s)
    tiers = delta(tier_counts(after_s), tier_counts(before_s))
    out = {
        "label": a.label,
        "api": a.api,
        "wrk": res,
        "reads": reads,
        "writes": writes,
        "writes_by_status": writes_by_status(before_s, after_s),
        "tiers": tiers,
        "reads_reaching_mongodb": tiers["redis_miss"],
        "fraction_of_reads_reaching_mongodb": (tiers["redis_miss"] / reads) if reads else None,
        "mongodb_find_commands": tiers["mongodb_find"],
        "database_read_offload_pct": round(100.0 * (1 - tiers["redis_miss"] / reads), 3) if reads else None,
    }
    write_json(a.part, out)
    log(
        f"offload[{a.label}]: {reads:.0f} reads, {writes:.0f} writes in {res['seconds']}s; reads reaching MongoDB "
        f"{tiers['redis_miss']:.0f} ({out['fraction_of_reads_reaching_mongodb']:.4%}); tiers {tiers}"
    )
