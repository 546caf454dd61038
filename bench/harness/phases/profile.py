"""For bench/profile.sh: instructions and allocations per request from
callgrind output files, and who calls the allocator."""

from __future__ import annotations

import re
from pathlib import Path

# glibc's entry point, or mimalloc's (the services' global allocator)
ALLOCATOR_ENTRIES = ("malloc", "mi_malloc_aligned", "mi_zalloc_aligned", "mi_malloc", "mi_zalloc")


def _callgrind_calls(path: str):
    """Instruction total and, per callee, calls by caller from a callgrind file."""
    names, total = {}, 0
    calls: dict[str, dict[str, int]] = {}
    fn = cfn = None
    with open(path, errors="replace") as f:
        lines = f.readlines()
    for line in lines:
        # Names are compressed: "(id) name" the first time, "(id)" after.
        m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?", line)
        if m:
            kind, id_, name = m.groups()
            if name:
                names[id_] = name
            if kind == "fn":
                fn, cfn = names.get(id_, id_), None
            else:
                cfn = names.get(id_, id_)
            continue
        m = re.match(r"^calls=(\d+)", line)
        if m and cfn:
            callee = cfn.split("'")[0]
            calls.setdefault(callee, {})
            calls[callee][fn] = calls[callee].get(fn, 0) + int(m.group(1))
            continue
        m = re.match(r"^(?:summary|totals): (\d+)", line)
        if m:
            total = int(m.group(1))
    return total, calls


def cmd_callgrind_summary(a):
    """Instructions and malloc calls per request, and the callers of malloc,
    for runs given as LABEL=CALLGRIND_FILE=WRK_OUTPUT."""
    rows = []
    for spec in a.runs:
        label, cg, wrk = spec.split("=", 2)
        requests = int(re.search(r"(\d+) requests in", Path(wrk).read_text()).group(1))
        total, calls = _callgrind_calls(cg)
        mallocs = {}
        for entry in ALLOCATOR_ENTRIES:
            for caller, n in calls.get(entry, {}).items():
                mallocs[caller] = mallocs.get(caller, 0) + n
        rows.append((label, requests, total, mallocs))
        print(f"{label}: {requests} requests, {total:,} instructions in all = {total / requests:,.0f} per request "
              f"(start-up and warm-up included); malloc calls {sum(mallocs.values()) / requests:.1f} per request")
    print()
    print("callers of malloc, calls per request:")
    for label, requests, _, mallocs in rows:
        print(f"  {label}:")
        for caller, n in sorted(mallocs.items(), key=lambda kv: -kv[1])[: a.top]:
            if n / requests >= 0.05:
                print(f"    {n / requests:6.2f}  {caller[:160]}")
