"""The benchmark harness behind bench/bench.py (driven by bench/run.sh and
bench/profile.sh, which start and stop the processes; this package only
measures and reports).

Layout, one job a module:

    cli.py            the command line: one subcommand per phase and its arguments
    output.py         progress lines and the JSON part each phase writes
    stats.py          percentiles, latency summaries, machine CPU/load, a process's CPU and RSS
    http.py           keep-alive HTTP client, Prometheus scrape, sums of metric samples
    system.py         the system under test: customer ids, API routes, Redis keys,
                      Redis and MongoDB clients
    loadgen.py        wrk, oha, redis-benchmark and invalidator-feedbench runners
    servers.py        for the scripts that start their own servers (bench/cluster.py,
                      bench/feedsweep.py): free ports, child processes, redis-server, a Redis Cluster
    phases/           one module per phase or family of phases, each a cmd_<phase>(args):
        setup.py          machine, zipf, warm, sizes
        hitpath.py        hitpath (wrk + redis-benchmark), hitpath-rounds (side by side in rounds,
                          with the ratios to the references), auth-cost, latency (oha at fixed rates)
        miss.py           miss (serial cold and warm reads), stampede
        offload.py        offload (95/5 read/write mix, reads reaching MongoDB)
        recovery.py       settle (wait for writes to finish), probe (can the API reach MongoDB)
        invalidation.py   lag (write to visible in Redis and replicas), throughput (invalidator)
        memory.py         memory (RSS by near-cache entries)
        warmup.py         recovery10 (the first seconds after a full flush), storm (GETs of missing ids)
        profile.py        callgrind-summary (for bench/profile.sh)
    report.py         report: merges the parts into bench/results/<name>.json, with a summary
    plots.py          the report's PNG plots
    markdown.py       the report's Markdown tables

Phases depend on the shared modules, never on each other. redis, pymongo and
matplotlib (bench/requirements.txt, installed into bench/.venv by run.sh) are
imported only where used, so --help and the phases without them run on a bare
python3.
"""
