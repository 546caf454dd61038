"""Private servers for the benchmarks that start their own (bench/cluster.py,
bench/feedsweep.py; bench/run.sh uses `cargo xtask` instead): free ports, a
group of child processes stopped together, a redis-server without
persistence and a 3-master + 3-replica Redis Cluster, all on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port(below: int = 50000) -> int:
    """A free port of 127.0.0.1 under `below` (a cluster's bus port is port + 10000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below and port != 6379:
            return port


class Procs:
    """Child processes in their own sessions, each logging to WORKDIR/NAME.log."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs = []

    def start(self, name, cmd, env=None, cwd=None):
        log = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=log,
                                cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def stop_all(self):
        for proc in reversed(self.procs):
            self.stop(proc)


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          check=True).stdout


def start_redis(procs, port, extra=()):
    d = procs.workdir / f"redis-{port}"
    d.mkdir()
    procs.start(f"redis-{port}", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no", "--dir", str(d), *extra])
    for _ in range(100):
        try:
            if redis_cli(port, "ping").strip() == "PONG":
                return
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis on {port} did not start")


def start_cluster(procs):
    """Six redis-servers made a cluster of 3 masters with a replica each;
    their ports, the masters' first (as `redis-cli --cluster create` assigns)."""
    ports = [free_port() for _ in range(6)]
    for port in ports:
        start_redis(procs, port, ["--cluster-enabled", "yes", "--cluster-config-file",
                                  f"nodes-{port}.conf", "--cluster-node-timeout", "1000"])
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                    "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, check=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        if all("cluster_state:ok" in redis_cli(p, "cluster", "info") for p in ports):
            return ports
        time.sleep(0.2)
    raise RuntimeError("cluster not ok")
