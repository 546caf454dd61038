"""The Markdown summary of a run (bench/results/<name>.md): one section per
phase the run has, most of them a table."""

from __future__ import annotations


def _table(title: str, header: str, align: str, rows: list[str], intro: str | None = None) -> list[str]:
    """A section: its title, an optional paragraph, and a table of the given rows."""
    return [title, "", *([intro, ""] if intro else []), header, align, *rows, ""]


def _section(key: str):
    """A section that shows only when the run has the phase `key`."""
    def wrap(render):
        def section(res: dict) -> list[str]:
            return render(res) if res.get(key) else []
        return section
    return wrap


def _machine(res: dict) -> list[str]:
    m = res.get("machine", {})
    machine = (f"Machine: {m.get('nproc')} CPUs ({m.get('Model name')}, {m.get('Hypervisor vendor', 'bare')}), "
               f"{m.get('mem_total_mib')} MiB RAM, kernel {m.get('kernel')}; load average at start "
               f"{m.get('loadavg')}; idle sample before the run: {m.get('idle_machine_before_run')}.")
    return [machine, ""]


def _hitpath_row(conns, name: str, v: dict) -> str:
    l = v["latency_ms"]
    tiers = v.get("tiers")
    tiers_s = ", ".join(f"{k} {int(x)}" for k, x in tiers.items() if x) if tiers else ""
    mach = v.get("machine", {})
    return (f"| {conns} | {name} | {v['rps']:,.0f} | {l['p50']} | {l.get('p90')} | {l['p99']} | "
            f"{l.get('p99.9')} | {v.get('error_total', 0)} | {mach.get('busy_pct')}/{mach.get('steal_pct')} "
            f"| {tiers_s} |")


def _ratio_row(key: str, row: dict) -> str:
    n, r = row.get("near", {}), row.get("redis", {})
    return (f"| {key[5:]} | {n.get('rps_vs_reference')} | {r.get('rps_vs_reference')} | "
            f"{n.get('rps_vs_redis_benchmark')} | {r.get('rps_vs_redis_benchmark')} |")


@_section("hitpath")
def _hitpath(res: dict) -> list[str]:
    hp = res["hitpath"]
    cells = _table(
        f"## Hit path (wrk, Zipf s=1.0 over 10,000 keys, {hp['seconds']} s per cell)",
        "| conns | target | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | machine busy/steal % | tiers (delta) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
        [_hitpath_row(level["connections"], name, v) for level in hp["levels"] for name, v in level["targets"].items()],
    )
    ratios = _table(
        "Ratios (req/s of the cache-api over the reference server and over redis-benchmark GET):",
        "| conns | near/ref | redis/ref | near/redis-benchmark | redis/redis-benchmark |",
        "|---:|---:|---:|---:|---:|",
        [_ratio_row(k, row) for k, row in res["summary"].items() if k.startswith("hit_c")],
    )
    return cells + ratios


def _latency_row(name: str, r: dict) -> str:
    l = r["latency_ms"]
    return (f"| {name} | {r['offered_rps']:,} | {r['achieved_rps']:,.0f} | {l['p50']} | {l['p90']} | "
            f"{l['p99']} | {l['p99.9']} | {l['max']} | {'yes' if r['saturated'] else 'no'} |")


@_section("latency")
def _latency(res: dict) -> list[str]:
    lat = res["latency"]
    if "skipped" in lat:
        return [f"## Latency under fixed offered load: skipped ({lat['skipped']})", ""]
    return _table(
        f"## Latency under fixed offered load (oha, {lat['seconds']} s, {lat['connections']} connections, "
        "latency correction on)",
        "| target | offered/s | achieved/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | saturated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        [_latency_row(name, r) for name, t in lat["targets"].items() for r in t["runs"]],
    )


@_section("miss")
def _miss(res: dict) -> list[str]:
    miss = res["miss"]
    passes = [("cold key (Redis flushed, B restarted)", miss["cold"]),
              ("same keys again (warm)", miss["warm"])]
    if "near_hit_same_client" in miss:
        passes.append(("near-cache hit on A, same client", miss["near_hit_same_client"]))
    rows = []
    for label, v in passes:
        l = v["latency_ms"]
        rows.append(f"| {label} | {l['n']} | {l['p50']} | {l['p90']} | {l['p99']} | {l['max']} | {v['sources']} |")
    return _table("## Miss path (serial, one keep-alive connection, Python client)",
                  "| what | n | p50 ms | p90 ms | p99 ms | max ms | sources |", "|---|---:|---:|---:|---:|---:|---|",
                  rows)


@_section("stampede")
def _stampede(res: dict) -> list[str]:
    st = res["stampede"]
    rows = []
    for r in st["runs"]:
        d = r["metrics_delta"]
        rows.append(f"| {r['key']} | {d['mongodb_find']:.0f} | {d['coalesced_waits']:.0f} | {r['statuses']} | "
                    f"{r['sources']} | {r['latency_ms']['p50']} | {r['latency_ms']['max']} |")
    return _table(f"## Stampede ({st['concurrent_requests']} concurrent GETs of one cold key)",
                  "| key | MongoDB finds | coalesced waits | statuses | sources | p50 ms | max ms |",
                  "|---|---:|---:|---|---|---:|---:|",
                  rows)


def _offload(res: dict) -> list[str]:
    lines = []
    for key in ("offload_warm", "offload_cold"):
        o = res.get(key)
        if not o:
            continue
        title = (f"## Database offload, {o['label']} (wrk mixed 95/5, {o['wrk']['connections']} connections, "
                 f"{o['wrk']['seconds']} s)")
        requests = (f"- requests/s {o['wrk']['rps']:,.0f}; reads {o['reads']:.0f}, writes {o['writes']:.0f} "
                    f"(by status: {o.get('writes_by_status')})")
        reached = (f"- reads that reached MongoDB (Redis misses): {o['reads_reaching_mongodb']:.0f} = "
                   f"{100 * (o['fraction_of_reads_reaching_mongodb'] or 0):.3f} % of reads "
                   f"(offload {o['database_read_offload_pct']} %)")
        lines += [title, "", requests, reached, f"- tier counters: {o['tiers']}", ""]
    return lines


def _probes(res: dict) -> list[str]:
    probes = [res[k] for k in ("probe_after_offload_warm", "probe_after_offload_cold") if k in res]
    if not probes:
        return []
    rows = []
    for p in probes:
        tries = "; ".join(f"{x['write_status']}/{x['write_ms']:.0f}, {x['cold_read_status']}/{x['cold_read_ms']:.0f}"
                          for x in p["attempts"])
        rows.append(f"| {p['label']} | {p['mongodb_reachable']} | {p['mongodb_commands_sent_meanwhile']:.0f} | "
                    f"{p['health_status']} | {tries} |")
    return _table("## Can the API still reach MongoDB after the mixed phase?",
                  "| after | reachable | MongoDB commands sent during the probe | /api/health/ "
                  "| attempts (write status/ms, read of an absent id status/ms) |",
                  "|---|---|---:|---:|---|",
                  rows)


@_section("lag")
def _lag(res: dict) -> list[str]:
    lag = res["lag"]
    rows = [f"| {path} | {target} | {v.get('p50')} | {v.get('p90')} | {v.get('p99')} | {v.get('max')} | "
            f"{v.get('seen_at_first_poll')} | {v['not_seen_within_timeout']} |"
            for path, row in lag["lag_ms"].items() for target, v in row.items()]
    acks = (f"Write acknowledgement: API {lag.get('api_write_ack_ms')}, direct {lag.get('direct_write_ack_ms')}; "
            f"retried after 503: {lag.get('writes_retried_after_503')}.")
    polls = (f"Poll cycle: {lag['poll_cycle_ms']}; invalidator's own mean lag (event wall time to Redis / "
             f"published): {lag['invalidator_reported_mean_lag_ms']}")
    table = _table(f"## Invalidation lag ({lag['writes']} writes: {lag['api_writes']} through API A, "
                   f"{lag['direct_writes']} directly in MongoDB)",
                   "| writes | seen in | p50 ms | p90 ms | p99 ms | max ms | seen at the first poll | not seen in time |",
                   "|---|---|---:|---:|---:|---:|---:|---:|",
                   rows)
    return table + [acks, "", polls, ""] + _lag_stages(lag)


def _lag_stages(lag: dict) -> list[str]:
    stages = lag.get("stages")
    if not stages:
        return []
    rows = [f"| {name} | {v['what']} | {v['count']:.0f} | {v['p50_ms']} (<= {v['p50_bucket_le_ms']}) | "
            f"{v['p99_ms']} (<= {v['p99_bucket_le_ms']}) | {v['mean_ms']} |" for name, v in stages.items()]
    return _table("Lag per stage, as the services record it (`invalidation_lag_seconds{stage}`, over this phase):",
                  "| stage | from -> to | n | p50 ms (bucket bound) | p99 ms (bucket bound) | mean ms |",
                  "|---|---|---:|---:|---:|---:|",
                  rows, intro=lag.get("stage_note"))


@_section("throughput")
def _throughput(res: dict) -> list[str]:
    tp = res["throughput"]
    writes = (f"- writes acknowledged: {tp['writes_acknowledged']} in {tp['seconds']} s = {tp['write_rps']}/s; "
              f"write latency {tp['write_latency_ms']}")
    events = (f"- invalidator events/s over the same window: {tp['invalidator_events_per_s']}; events in all "
              f"{tp['invalidator_events_total']:.0f}; drained {tp['drain_after_last_write_s']} s after the last write")
    cpu = f"- CPU (% of one core) during the writes: {tp['cpu_pct_of_one_core_during_writes']}"
    return ["## Invalidator throughput", "", f"- writer: {tp['writer']}", writes, events, cpu, ""]


def _memory_table(mem: dict, title: str) -> list[str]:
    doc = mem["avg_document_json_bytes"]
    rows = []
    for r in mem["rows"]:
        per = r.get("rss_bytes_per_entry")
        times = f"{per / doc:.2f}" if per and doc else ""
        rows.append(f"| {r['entries']} | {r['VmRSS'] / 2**20:.1f} | {r.get('RssAnon', 0) / 2**20:.1f} | "
                    f"{per if per is not None else ''} | {times} | {r.get('fill_seconds', '')} |")
    return _table(title,
                  "| near-cache entries | RSS MiB | RssAnon MiB | bytes/entry over baseline | × document JSON | fill s |",
                  "|---:|---:|---:|---:|---:|---:|",
                  rows,
                  intro=f"Average document: {doc} bytes of JSON; Redis: "
                  f"{mem['redis_used_memory_bytes_per_key']} bytes per key.")


@_section("memory")
def _memory(res: dict) -> list[str]:
    lines = _memory_table(res["memory"], "## Memory")
    if res.get("memory_baseline"):
        lines += _memory_table(res["memory_baseline"], "## Memory, baseline binary (--baseline-bin-dir)")
    return lines


def _recovery10(res: dict) -> list[str]:
    runs = [res[k] for k in sorted(res) if k.startswith("recovery10_")]
    if not runs:
        return []
    n = runs[0]["seconds_after_flush"]
    rows = [f"| {r['label']} | {r['mongodb_finds_after_flush']:.0f} | {r['hit_ratio_after_flush']} | "
            f"{r['near_hit_ratio_after_flush']} | {r['hit_ratio_before_flush']} | {r['warm_keys_loaded']:.0f} | "
            f"{r['responses_after_flush']} |" for r in runs]
    per_second = [f"| {r['label']} | " + " | ".join(
        f"{x['mongodb_finds']:.0f} / {x['hit_ratio']}" for x in r["per_second"]) + " |" for r in runs]
    return _table(
        f"## The first {n} s after a full flush ({runs[0]['offered_rps']:g} GET/s, Zipf s=1.0, "
        f"{len(runs[0]['replicas'])} replicas)",
        "| configuration | MongoDB finds | hit ratio | near-hit ratio | hit ratio before | keys preloaded | responses |",
        "|---|---:|---:|---:|---:|---:|---:|",
        rows,
        intro=runs[0]["flush"] + ".",
    ) + _table(
        "Per second after the flush (MongoDB finds / hit ratio):",
        "| configuration | " + " | ".join(f"{s}-{s + 1} s" for s in range(n)) + " |",
        "|---|" + "---:|" * n,
        per_second,
    )


def _storm(res: dict) -> list[str]:
    runs = [res[k] for k in sorted(res) if k.startswith("storm_")]
    if not runs:
        return []
    rows = [f"| {r['label']} | {r['requests']} | {r['missing_ids']} | {r['mongodb_finds']:.0f} | "
            f"{r['mongodb_finds_per_id']} | {r['negative_hits']:.0f} | {r['statuses']} | {r['seconds']} |"
            for r in runs]
    return _table(
        "## 404 storm (GETs of ids that exist nowhere)",
        "| configuration | requests | missing ids | MongoDB finds | finds per id | negative hits | statuses | s |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
        rows,
    )


# In the order of the report.
SECTIONS = (_machine, _hitpath, _latency, _miss, _stampede, _offload, _probes, _lag, _throughput, _memory,
            _recovery10, _storm)


def markdown(res: dict) -> str:
    lines = [f"# Benchmark run `{res['name']}`", ""]
    for section in SECTIONS:
        lines += section(res)
    return "\n".join(lines) + "\n"
