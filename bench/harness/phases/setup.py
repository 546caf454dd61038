"""What bench/run.sh does before it measures: describe the machine (and how
idle it is), draw the Zipf-distributed ids the load generators request, warm
every key through an API, and measure document and response sizes."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import time
from pathlib import Path

from ..http import Http
from ..loadgen import oha_bin
from ..output import log, write_json
from ..stats import Window
from ..system import batch_read, customer_id, customer_ids, feature_path, near_cache_entries, redis_client, redis_key


def cmd_machine(a):
    info = {"nproc": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Hypervisor vendor", "CPU MHz", "L2 cache", "L3 cache"):
                info[k.strip()] = v.strip()
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                info["mem_total_mib"] = int(line.split()[1]) // 1024
    info["kernel"] = os.uname().release
    info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    for tool, args in (("wrk", ["--version"]), ("redis-benchmark", ["--version"]), ("redis-server", ["--version"]),
                       ("rustc", ["--version"])):
        try:
            p = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
            info[tool] = (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            info[tool] = None
    if oha_bin():
        p = subprocess.run([oha_bin(), "--version"], capture_output=True, text=True, check=False)
        info["oha"] = p.stdout.strip()
    win = Window()
    time.sleep(a.sample_seconds)
    info["idle_machine_before_run"] = win.close()
    write_json(a.part, info)
    log(f"machine: {info.get('nproc')} CPUs {info.get('Model name')}, {info.get('mem_total_mib')} MiB; "
        f"before the run: {info['idle_machine_before_run']}")


def cmd_zipf(a):
    """Precomputed Zipf draws over CUST00001..CUST{keys}: one id per line."""
    rng = random.Random(a.seed)
    ids = customer_ids(a.keys)
    rng.shuffle(ids)  # rank -> id: the hottest keys are spread over the id space
    weights = [1.0 / (k ** a.s) for k in range(1, a.keys + 1)]
    cum = list(itertools.accumulate(weights))
    draws = rng.choices(ids, cum_weights=cum, k=a.samples)
    Path(a.out).write_text("\n".join(draws) + "\n")
    for spec in a.urls or []:
        name, _, base = spec.partition("=")
        Path(f"{a.out}.{name}.urls").write_text(
            "".join(f"{base}{feature_path(i)}\n" for i in draws)
        )
    total = cum[-1]
    part = {
        "keys": a.keys,
        "s": a.s,
        "samples": a.samples,
        "seed": a.seed,
        "distinct_in_sample": len(set(draws)),
        "share_of_top_1": round(weights[0] / total, 4),
        "share_of_top_10": round(cum[9] / total, 4),
        "share_of_top_100": round(cum[99] / total, 4),
        "share_of_top_1000": round(cum[999] / total, 4),
    }
    write_json(a.part, part)
    log(f"zipf: {a.samples} draws over {a.keys} keys, s={a.s}; top-100 keys get {part['share_of_top_100']:.0%}")


def cmd_warm(a):
    """Reads every key once through an API with batch requests of 1000."""
    client = Http(a.api, timeout=60)
    ids = customer_ids(a.count)
    found = missing = 0
    t0 = time.perf_counter()
    for i in range(0, len(ids), 1000):
        data = batch_read(client, ids[i : i + 1000])
        found += len(data["found"])
        missing += len(data["missing"])
    elapsed = time.perf_counter() - t0
    entries = near_cache_entries(client)
    client.close()
    log(f"warm {a.api}: {found} found, {missing} missing in {elapsed:.1f}s; near-cache entries: {entries}")
    if missing:
        raise SystemExit(f"warm: {missing} ids missing")


def cmd_sizes(a):
    """Average stored document size (Redis) and response body size (API)."""
    r = redis_client(a.redis_port)
    rng = random.Random(1)
    sample = [customer_id(rng.randint(1, a.count)) for _ in range(300)]
    lens = [r.strlen(redis_key(i)) for i in sample]
    lens = [x for x in lens if x]
    client = Http(a.api)
    bodies = [len(client.get(feature_path(i))[2]) for i in sample[:100]]
    client.close()
    doc = round(sum(lens) / len(lens))
    body = round(sum(bodies) / len(bodies))
    write_json(a.part, {"doc_bytes_in_redis": doc, "response_body_bytes": body, "sampled": len(lens)})
    print(f"{doc} {body}")
