"""The KServe door (handler.doors.kserve_door) started as a real process on free ports, for the
end-to-end tests and the benchmarks."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from harness.ts_server import ROOT, free_port, stop_process_group


@dataclass
class Door:
    http_url: str
    grpc_target: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        stop_process_group(self.process)


def start_door(model_dir: Path, name: str, workdir: Path, *, max_batch_delay_ms: float = 5.0,
               timeout_s: float = 180) -> Door:
    """``python -m handler.doors.kserve_door`` as a container would run it, on free loopback-reachable
    ports; returns once ``/v2/models/NAME/ready`` answers 200."""
    http_port, grpc_port = free_port(), free_port()
    log = workdir / f"kserve_{name}.log"
    command = [sys.executable, "-m", "handler.doors.kserve_door", "--model_name", name, "--model_dir", str(model_dir),
               "--http_port", str(http_port), "--grpc_port", str(grpc_port),
               "--max_batch_delay_ms", str(max_batch_delay_ms)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    door = Door(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", process, log)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the KServe door exited with {process.returncode}; see {log}")
        try:
            if requests.get(f"{door.http_url}/v2/models/{name}/ready", timeout=5).status_code == 200:
                return door
        except requests.RequestException:
            pass
        time.sleep(0.5)
    door.stop()
    raise RuntimeError(f"the KServe door was not ready within {timeout_s}s; see {log}")
