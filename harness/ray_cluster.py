"""A real multi-node Ray cluster on this machine, on loopback only: for the Ray door's tests and
benchmarks.

Each node is its own ``ray start`` (raylet, object store, workers) with its own loopback address
(127.0.0.2 for the head, 127.0.0.3, ... for the others), one CPU each by default. Ray turns
``127.0.0.1`` into the machine's network address ("remotely reachable"), but keeps other loopback
addresses as given, so no traffic leaves loopback.

    with RayCluster(nodes=2) as cluster:
        cluster.address            # "127.0.0.2:PORT", for ray.init / serve run -a
        cluster.run(["serve", "start", ...])
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
HEAD_IP = "127.0.0.2"


def free_port(host: str = HEAD_IP) -> int:
    """A port free on ``host`` above Ray's default worker port range (10002-19999)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if port > 20000:
            return port
    raise RuntimeError("no free port above 20000")


def ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_IMPORT_WARNING": "1"}


class RayCluster:
    """A head node and ``nodes - 1`` more, each a separate ``ray start``; stopped on exit whatever happened."""

    def __init__(self, *, nodes: int = 2, cpus_per_node: int = 1) -> None:
        # Short: Ray's socket paths (under its temp dir) must fit in 107 characters.
        self.directory = Path(tempfile.mkdtemp(prefix="rc_", dir="/tmp"))
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.node_ips = [f"127.0.0.{2 + i}" for i in range(nodes)]
        # Each node's Prometheus endpoint (Ray's metrics agent): http://IP:PORT/metrics.
        self.metrics_ports: dict[str, int] = {}

    def __enter__(self) -> "RayCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        temp = self.directory
        self.run(["ray", "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
                  f"--num-cpus={self.cpus_per_node}", "--include-dashboard=false", f"--temp-dir={temp}",
                  "--disable-usage-stats", f"--metrics-export-port={self._metrics_port(HEAD_IP)}"])
        for ip in self.node_ips[1:]:
            self.start_node(ip)
        self.wait_for_nodes(self.nodes)

    def start_node(self, ip: str) -> None:
        self.run(["ray", "start", f"--address={self.address}", f"--node-ip-address={ip}",
                  f"--num-cpus={self.cpus_per_node}", f"--metrics-export-port={self._metrics_port(ip)}"])

    def _metrics_port(self, ip: str) -> int:
        self.metrics_ports[ip] = free_port(ip)
        return self.metrics_ports[ip]

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.alive_nodes()) >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} Ray nodes did not come up in {timeout_s:g} s: {self.alive_nodes()}")

    def alive_nodes(self) -> list[str]:
        """The loopback addresses of the nodes alive now (``ray status`` holds none: read from GCS)."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))" % self.address)
        out = subprocess.run([str(BIN / "python"), "-c", code], env=ray_env(), capture_output=True, text=True,
                             timeout=60)
        lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
        return json.loads(lines[-1]) if lines else []

    def run(self, command: list[str], timeout_s: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        """A Ray CLI command (``ray ...``, ``serve ...``) from this venv, against this cluster."""
        executable = str(BIN / command[0]) if (BIN / command[0]).exists() else command[0]
        result = subprocess.run([executable, *command[1:]], env={**ray_env(), "RAY_ADDRESS": self.address},
                                capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        return result

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=ray_env(), capture_output=True, timeout=120)
        shutil.rmtree(self.directory, ignore_errors=True)
