"""A real TorchServe (Java frontend + Python workers) started from a temp dir on free ports
(used by the end-to-end tests and the benchmarks)."""

from __future__ import annotations

import getpass
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
TORCHSERVE = Path(sys.executable).parent / "torchserve"
# torch's default compile cache (torch._inductor.runtime.cache_dir_utils.default_cache_dir).
INDUCTOR_CACHE = os.path.join(tempfile.gettempdir(), "torchinductor_" + getpass.getuser())


def free_port() -> int:
    """A port free on loopback now, chosen below Linux's ephemeral range (32768 and up): a port
    from that range can be taken as the source port of any outgoing connection before the
    server binds it."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-32000")


@dataclass
class Server:
    workdir: Path
    inference_url: str
    management_url: str
    metrics_url: str
    process: subprocess.Popen
    grpc_target: str = ""  # host:port of TorchServe's gRPC inference API

    def keys(self) -> dict[str, str]:
        data = json.loads((self.workdir / "key_file.json").read_text())
        return {name: data[name]["key"] for name in ("inference", "management")}

    def auth(self, kind: str = "inference") -> dict[str, str]:
        """The token header; none for a server started with token authorization disabled."""
        if not (self.workdir / "key_file.json").is_file():
            return {}
        return {"Authorization": f"Bearer {self.keys()[kind]}"}

    def predict(self, model: str = "shapes", **kwargs: Any) -> requests.Response:
        headers = {**self.auth(), **kwargs.pop("headers", {})}
        return requests.post(f"{self.inference_url}/predictions/{model}", headers=headers, timeout=120, **kwargs)

    def manage(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.management_url}{path}", headers=self.auth("management"),
                                timeout=180, **kwargs)

    def ready_workers(self, model: str) -> list[dict[str, Any]]:
        response = self.manage("GET", f"/models/{model}")
        response.raise_for_status()
        return [w for w in response.json()[0]["workers"] if w["status"] == "READY"]

    def stop(self) -> None:
        stop_process_group(self.process)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM a server started in a session of its own, and its children; SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


class PortTaken(RuntimeError):
    """TorchServe could not bind a port chosen as free: another process took it in between."""


def start_server(workdir: Path, model_store: Path, models: list[str], extra_config: str = "",
                 timeout_s: float = 900, base_config: Path = ROOT / "config.properties",
                 snapshot: bool = False, env: dict[str, str] | None = None) -> Server:
    """``start_once`` on fresh ports, again (up to three times) when a port was taken meanwhile."""
    arguments = (workdir, model_store, models, extra_config, timeout_s, base_config, snapshot, env)
    for _ in range(2):
        try:
            return start_once(*arguments)
        except PortTaken:
            pass
    return start_once(*arguments)


def start_once(workdir: Path, model_store: Path, models: list[str], extra_config: str = "",
               timeout_s: float = 900, base_config: Path = ROOT / "config.properties",
               snapshot: bool = False, env: dict[str, str] | None = None) -> Server:
    """Start ``torchserve --foreground`` in ``workdir`` (never the repo root, so that workers can
    only import what the .mar holds) and wait until every model has a READY worker.

    ``base_config`` is rewritten to loopback addresses on free ports and ``model_store``; the models
    are ``load_models`` unless ``snapshot`` (then the config's ``model_snapshot`` decides, as in KServe).
    ``env`` adds to the server's environment. The default timeout allows for models compiled at
    start-up with a cold cache on two cores.
    """
    ports: list[int] = []
    while len(ports) < 5:  # five different ones
        ports += [port for port in [free_port()] if port not in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    config = base_config.read_text()
    token_auth = "disable_token_authorization=true" not in config
    replaced = {
        "inference_address": urls[0], "management_address": urls[1], "metrics_address": urls[2],
        "model_store": str(model_store), "metrics_config": str(ROOT / "metrics.yaml"),
        **({} if snapshot else {"load_models": ",".join(models)}),
        # gRPC listens too (on loopback); free ports let several servers run side by side.
        "grpc_inference_port": str(ports[3]), "grpc_management_port": str(ports[4]),
    }
    lines = [ln for ln in config.splitlines() if ln.split("=", 1)[0].strip() not in replaced]
    lines += [f"{k}={v}" for k, v in replaced.items()]
    (workdir / "config.properties").write_text("\n".join(lines) + "\n" + extra_config)
    # TorchServe keeps its pid file (and unpacked models) in the temp dir; one of its own lets
    # this server run beside another (./scripts/serve.sh, a benchmark) instead of refusing to start.
    (workdir / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "LOG_LOCATION": str(workdir / "logs"), "METRICS_LOCATION": str(workdir / "logs"),
           "TMPDIR": str(workdir / "tmp"), "PATH": f"{TORCHSERVE.parent}:{os.environ['PATH']}",
           # torch's compile cache lives under the temp dir by default: keep the machine's one, so
           # that a server started here compiles from the cache as one started by hand would.
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_CACHE), **(env or {})}
    with open(workdir / "torchserve.out", "wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [str(TORCHSERVE), "--start", "--foreground", "--ncs", "--ts-config", "config.properties",
             "--model-store", str(model_store)],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(workdir, urls[0], urls[1], urls[2], process, f"127.0.0.1:{ports[3]}")
    deadline = time.time() + timeout_s
    names = [m.removesuffix(".mar") for m in models]
    last = "starting"
    while time.time() < deadline:
        if process.poll() is not None:
            message = f"torchserve exited with {process.returncode}; see {workdir}/torchserve.out"
            if "Address already in use" in (workdir / "torchserve.out").read_text(errors="replace"):
                raise PortTaken(message)
            raise RuntimeError(message)
        try:
            keys_ready = (workdir / "key_file.json").is_file() or not token_auth
            if keys_ready and all(server.ready_workers(n) for n in names):
                return server
        except (requests.RequestException, KeyError, ValueError) as exc:
            last = repr(exc)
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"models {names} not READY within {timeout_s}s ({last}); see {workdir}/logs")
