"""The plots of a run, as PNG files next to its JSON: one function per plot,
drawn only when the run has that phase. matplotlib comes from bench/.venv;
without it the report has no plots."""

from __future__ import annotations

from pathlib import Path

from .output import log

COLORS = {"near": "tab:green", "redis": "tab:blue", "reference": "tab:gray", "redis-benchmark": "tab:red"}
LABELS = {"near": "cache-api, near-cache hit (A)", "redis": "cache-api, Redis hit (B)",
          "reference": "reference axum server (C)", "redis-benchmark": "redis-benchmark GET"}


def _two_panels(plt):
    """Throughput or load on the left, latency on the right."""
    return plt.subplots(1, 2, figsize=(12, 4.5))


def _two_panel_legends(axes) -> None:
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=6, ncol=2)  # a line per target and percentile


def _labelled(fig, ax, xlabel: str, ylabel: str, title: str, **legend):
    """Axis labels, title, a light grid and the legend (`legend`: its options)."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    return fig


def _hitpath(res: dict, plt):
    hp = res.get("hitpath")
    if not hp:
        return None
    conc = [l["connections"] for l in hp["levels"]]
    fig, axes = _two_panels(plt)
    for tname in ("near", "redis", "reference", "redis-benchmark"):
        if tname not in hp["levels"][0]["targets"]:
            continue
        rps = [l["targets"][tname]["rps"] for l in hp["levels"]]
        p50 = [l["targets"][tname]["latency_ms"]["p50"] for l in hp["levels"]]
        p99 = [l["targets"][tname]["latency_ms"]["p99"] for l in hp["levels"]]
        axes[0].plot(conc, rps, "o-", color=COLORS[tname], label=LABELS[tname])
        axes[1].plot(conc, p50, "o-", color=COLORS[tname], label=LABELS[tname] + " p50")
        axes[1].plot(conc, p99, "s--", color=COLORS[tname], alpha=0.7, label=LABELS[tname] + " p99")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent connections")
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="requests/s", title="Hit path throughput (Zipf s=1.0 over 10,000 keys)")
    axes[1].set(yscale="log", ylabel="latency (ms, log)", title="Hit path latency")
    _two_panel_legends(axes)
    return fig


def _latency(res: dict, plt):
    lat = res.get("latency")
    if not lat or "targets" not in lat:  # skipped without oha
        return None
    fig, axes = _two_panels(plt)
    for tname, t in lat["targets"].items():
        rates = [r["offered_rps"] for r in t["runs"]]
        c = COLORS.get(tname, None)
        axes[0].plot(rates, [r["achieved_rps"] for r in t["runs"]], "o-", color=c, label=LABELS.get(tname, tname))
        for p, style in (("p50", "o-"), ("p99", "s--"), ("p99.9", "^:")):
            axes[1].plot(rates, [r["latency_ms"][p] for r in t["runs"]], style, color=c,
                         label=f"{LABELS.get(tname, tname)} {p}")
    rmax = max(r["offered_rps"] for t in lat["targets"].values() for r in t["runs"])
    axes[0].plot([0, rmax], [0, rmax], color="black", lw=0.8, ls=":", label="achieved = offered")
    axes[0].set(xlabel="offered req/s", ylabel="achieved req/s", title="Open-loop load (oha, latency-corrected)")
    axes[1].set(xlabel="offered req/s", ylabel="latency (ms, log)", yscale="log",
                title="Latency at a fixed offered rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    _two_panel_legends(axes)
    return fig


def _lag(res: dict, plt):
    lag = res.get("lag")
    if not lag or not lag.get("samples"):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"redis": "-", "A": "--", "D": ":"}
    pcolors = {"api": "tab:blue", "direct": "tab:orange"}
    for path in ("api", "direct"):
        for target in ("redis", "A", "D"):
            vals = sorted(x[target] * 1000 for x in lag["samples"] if x["path"] == path and x[target] is not None)
            if not vals:
                continue
            ys = [(i + 1) / len(vals) for i in range(len(vals))]
            ax.step(vals, ys, where="post", ls=styles[target], color=pcolors[path],
                    label=f"{path} write -> {'Redis' if target == 'redis' else 'replica ' + target}")
    ax.set_xscale("symlog", linthresh=0.1)
    return _labelled(fig, ax, "time from write acknowledgement to new content visible (ms)",
                      "fraction of writes", "Invalidation lag (CDF)", fontsize=7)


def _bars(ax, rows: list[tuple[str, float | None, float | None]], title: str) -> None:
    """p50 and p99 bars side by side, one pair per row (label, p50, p99)."""
    xs = range(len(rows))
    for shift, idx, label in ((-0.2, 1, "p50"), (0.2, 2, "p99")):
        values = [r[idx] or 0 for r in rows]
        bars = ax.bar([x + shift for x in xs], values, width=0.4, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
    ax.set(ylabel="ms", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def _lag_stages(res: dict, plt):
    lag = res.get("lag")
    if not lag or not lag.get("stages"):
        return None
    fig, axes = _two_panels(plt)
    polled = lag["lag_ms"]
    where = {"redis": "Redis", "A": "replica A", "D": "replica D"}
    _bars(axes[0], [(f"{'API' if path == 'api' else 'MongoDB'}\n-> {where[t]}", polled[path][t].get("p50"),
                     polled[path][t].get("p99")) for path in ("api", "direct") for t in ("redis", "A", "D")],
          f"Write acknowledged -> visible, polled ({lag['writes']} writes: half API, half MongoDB)")
    stages = lag["stages"]
    _bars(axes[1], [(name.replace(" ", "\n"), v.get("p50_ms"), v.get("p99_ms")) for name, v in stages.items()],
          "Recorded by the services, per stage (histograms)")
    fig.text(0.5, 0.005, "invalidator stages: from the change's wall time in MongoDB; replica stages: from the "
             "stream entry's time (both whole ms: a stage reads up to 1 ms long); interpolated within buckets",
             ha="center", fontsize=7)
    return fig


def _feed_throughput(res: dict, plt):
    feed = res.get("feed")
    if not feed:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for series, rows in feed["series"].items():
        ax.plot([r["batch"] for r in rows], [r["changes_per_s_median"] for r in rows], "o-", label=series)
    ax.axhline(feed["target_changes_per_s"], color="black", ls="--", lw=0.9,
               label=f"target {feed['target_changes_per_s']:,}/s")
    top = max([feed["target_changes_per_s"]] + [r["changes_per_s_median"] for rows in feed["series"].values()
                                                for r in rows])
    ax.set_ylim(0, top * 1.1)  # from zero, the target always in view
    batches = sorted({r["batch"] for rows in feed["series"].values() for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    return _labelled(fig, ax, "changes applied together (batch size)", "changes/s (median over rounds)",
                     f"Invalidator apply pipeline (invalidator-feedbench, {feed['seconds']} s a run)", fontsize=8)


def _feed_lag(res: dict, plt):
    feed = res.get("feed")
    if not feed:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (series, rows) in enumerate(feed["series"].items()):
        color = f"C{i}"
        batches = [r["batch"] for r in rows]
        ax.plot(batches, [r["lag_p50_ms_median"] for r in rows], "o-", color=color, label=f"{series} p50")
        ax.plot(batches, [r["lag_p99_ms_median"] for r in rows], "s--", color=color, alpha=0.7,
                label=f"{series} p99")
    batches = sorted({r["batch"] for rows in feed["series"].values() for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    return _labelled(fig, ax, "changes applied together (batch size)", "lag (ms, log; median over rounds)",
                     "Lag of a change: due -> its batch announced", fontsize=7)


def _memory(res: dict, plt):
    mem = res.get("memory")
    if not mem:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    runs = [("this build", mem, "o-")]
    if res.get("memory_baseline"):
        runs.append(("baseline (--baseline-bin-dir)", res["memory_baseline"], "s--"))
    for label, run, style in runs:
        rows = run["rows"]
        filled = [r for r in rows[1:] if r["entries"]]
        ax.plot([r["entries"] for r in filled], [r["VmRSS"] / 2**20 for r in filled], style,
                label=f"RSS, {label}")
        for r in filled:
            ax.annotate(f"{r['VmRSS'] / 2**20:.0f} MiB, {r.get('rss_bytes_per_entry', 0):.0f} B/entry",
                        (r["entries"], r["VmRSS"] / 2**20), textcoords="offset points", xytext=(-40, 8),
                        fontsize=8)
    empty = mem["rows"][0]["VmRSS"] / 2**20
    ax.axhline(empty, color="gray", ls="--", lw=0.8, label=f"empty process ({empty:.1f} MiB)")
    ax.set(xscale="log", yscale="log")
    return _labelled(fig, ax, "near-cache entries", "RSS (MiB, log)", "cache-api resident memory",
                     fontsize=8, loc="upper left")


def _tiers(res: dict, plt):
    miss = res.get("miss")
    if not miss:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = []
    if "near_hit_same_client" in miss:
        rows.append(("near-cache hit (A)", miss["near_hit_same_client"]["latency_ms"]))
    rows.append(("Redis hit (B, warm)", miss["warm"]["latency_ms"]))
    rows.append(("MongoDB, cold key (B)", miss["cold"]["latency_ms"]))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1]["p50"] for r in rows], width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [r[1]["p99"] for r in rows], width=0.4, label="p99")
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
    ax.set(ylabel="ms (serial requests, one client)", yscale="log", title="Latency by the tier that answers")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return fig


# (file name suffix, drawing function), in the order the report lists them.
PLOTS = (("hitpath", _hitpath), ("latency-vs-load", _latency), ("lag", _lag), ("lag-stages", _lag_stages),
         ("memory", _memory), ("tiers", _tiers), ("feed-throughput", _feed_throughput), ("feed-lag", _feed_lag))


def make_plots(res: dict, out_dir: Path, name: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        log("report: matplotlib missing; no plots")
        return []
    made = []
    for stem, draw in PLOTS:
        fig = draw(res, plt)
        if fig is None:
            continue
        path = out_dir / f"{name}-{stem}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)
    return made
