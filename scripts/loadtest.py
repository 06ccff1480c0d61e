#!/usr/bin/env python
"""Load test: N concurrent clients for T seconds, mixed batch sizes, every result checked.

Requests go as multipart form uploads and as multipart/mixed bodies, half and half. Each image
in the pool has a reference result (the image sent alone). Every response is checked
image by image against those references, so a result mixed up between requests or images is
caught. Reports throughput, latency percentiles, errors, mismatches, and the TorchServe backend
workers' (with their DataLoader workers') RSS, open file descriptors and /dev/shm use before/after.

    .venv/bin/python scripts/loadtest.py [--clients 8] [--seconds 60] [--max-batch 64] [--json out.json]
        (starts its own TorchServe with model_store/shapes.mar; or --url URL --key-file key_file.json)
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

import harness.shapes as shapes
from harness.wire import multipart_mixed
from harness.shapes import shape_image
from harness.timing import percentile

ROOT = Path(__file__).resolve().parent.parent

MAX_REQUESTS = 200_000  # a hard bound besides the time limit
RSS_SAMPLE_S = 30.0  # how often the backend's memory is sampled during the run


@dataclass
class Target:
    """Where to send: the inference URL, the model and the token."""

    inference_url: str
    model: str
    token: str
    frontend_pid: int | None = None

    def post(self, headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        return requests.post(f"{self.inference_url}/predictions/{self.model}",
                             headers={"Authorization": f"Bearer {self.token}", **(headers or {})}, timeout=120,
                             **kwargs)


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    images: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    mismatches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def image_pool(count: int) -> list[bytes]:
    return [shape_image(shapes.CLASSES[i % 3], 10_000 + i, fmt="JPEG" if i % 2 else "PNG") for i in range(count)]


def references(target: Target, pool: list[bytes]) -> list[dict[str, float]]:
    out = []
    for data in pool:
        response = target.post(data=data)
        response.raise_for_status()
        out.append(response.json())
    return out


def matches(got: Any, want: list[dict[str, float]]) -> bool:
    if not isinstance(got, list) or len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if list(g) != list(w) or any(abs(g[k] - w[k]) > 1e-3 for k in w):
            return False
    return True


def client(target: Target, pool: list[bytes], refs: list[dict], tally: Tally, deadline: float, seed: int,
           max_batch: int, sent: list[int]) -> None:
    rng = random.Random(seed)
    while time.time() < deadline:
        with tally.lock:
            if sent[0] >= MAX_REQUESTS:
                return
            sent[0] += 1
        k = rng.randint(1, max_batch)
        picks = [rng.randrange(len(pool)) for _ in range(k)]
        files = [(f"f{i}", (f"{i}.img", pool[p], "application/octet-stream")) for i, p in enumerate(picks)]
        start = time.perf_counter()
        try:
            if rng.random() < 0.5:  # half as form uploads, half as multipart/mixed bodies
                response = target.post(files=files)
            else:
                body_bytes, content_type = multipart_mixed(files)
                response = target.post(data=body_bytes, headers={"Content-Type": content_type})
            status = str(response.status_code)
            body = response.json() if status == "200" else None
        except (requests.RequestException, ValueError) as exc:
            status, body = type(exc).__name__, None
        elapsed = (time.perf_counter() - start) * 1000
        with tally.lock:
            if status != "200":
                tally.errors[status] = tally.errors.get(status, 0) + 1
                continue
            tally.latencies_ms.append(elapsed)
            tally.images += k
            # One image comes back as an object, several as a list.
            got = [body] if k == 1 else body
            if not matches(got, [refs[p] for p in picks]):
                tally.mismatches += 1


def backend_stats(frontend_pid: int | None) -> dict[str, Any]:
    """RSS and open fds of the backend workers with their loader workers (RSS summed, so pages
    they share count once per process), the Java frontend's RSS apart; /dev/shm use."""
    stats: dict[str, Any] = {"rss_mb": None, "open_fds": None, "processes": 0, "frontend_rss_mb": None}
    if frontend_pid is not None:
        try:
            # Below the torchserve launcher: the Java frontend; its children are the backend
            # workers, theirs the DataLoader workers.
            procs = psutil.Process(frontend_pid).children(recursive=True)
            java = [p for p in procs if p.name().startswith("java")]
            backend = [p for p in procs if p not in java]
            stats["processes"] = len(backend)
            stats["rss_mb"] = round(sum(p.memory_info().rss for p in backend) / 2**20, 1)
            stats["open_fds"] = sum(p.num_fds() for p in backend)
            stats["frontend_rss_mb"] = round(sum(p.memory_info().rss for p in java) / 2**20, 1)
        except psutil.Error:
            pass
    shm = Path("/dev/shm")
    entries = list(shm.iterdir()) if shm.is_dir() else []
    stats["shm_files"] = len(entries)
    stats["shm_mb"] = round(sum(e.stat().st_size for e in entries if e.is_file()) / 2**20, 2)
    return stats


def prepare(target: Target, pool_size: int = 48) -> tuple[list[bytes], list[dict[str, float]]]:
    """The image pool and each image's reference result (sent alone)."""
    pool = image_pool(pool_size)
    return pool, references(target, pool)


def run(target: Target, clients: int, seconds: float, max_batch: int, seed: int = 0,
        prepared: tuple[list[bytes], list[dict[str, float]]] | None = None) -> dict:
    """Run the load and return the report (also used by the tests)."""
    pool, refs = prepared or prepare(target)
    before = backend_stats(target.frontend_pid)
    tally, sent = Tally(), [0]
    started = time.time()
    deadline = started + seconds
    threads = [threading.Thread(target=client, args=(target, pool, refs, tally, deadline, seed + i, max_batch, sent))
               for i in range(clients)]
    for t in threads:
        t.start()
    rss_samples = []  # (seconds into the run, backend RSS MB): shows where memory levels off
    while alive := [t for t in threads if t.is_alive()]:
        alive[0].join(timeout=1.0)
        if time.time() - started >= RSS_SAMPLE_S * (len(rss_samples) + 1) and time.time() < deadline:
            rss_samples.append((round(time.time() - started), backend_stats(target.frontend_pid)["rss_mb"]))
    wall = time.time() - started
    time.sleep(1.0)  # let released shared memory and descriptors settle before measuring again
    after = backend_stats(target.frontend_pid)
    ok = len(tally.latencies_ms)
    return {
        "clients": clients, "seconds": round(wall, 1), "max_batch": max_batch,
        "requests_ok": ok, "images_ok": tally.images,
        "requests_per_s": round(ok / wall, 2), "images_per_s": round(tally.images / wall, 1),
        "latency_ms": {"p50": percentile(tally.latencies_ms, 0.5), "p95": percentile(tally.latencies_ms, 0.95),
                       "p99": percentile(tally.latencies_ms, 0.99), "max": percentile(tally.latencies_ms, 1.0)},
        "errors": tally.errors, "mismatches": tally.mismatches,
        "backend_before": before, "backend_after": after, "backend_rss_mb_during": rss_samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--url", help="inference URL of a running server (default: start one)")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"))
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if args.url:
        token = json.loads(args.key_file.read_text())["inference"]["key"]
        report = run(Target(args.url, args.model, token), args.clients, args.seconds, args.max_batch)
    else:
        from harness.ts_server import start_server

        with tempfile.TemporaryDirectory(prefix="loadtest_") as tmp:
            server = start_server(Path(tmp), ROOT / "model_store", ["shapes.mar"])
            try:
                target = Target(server.inference_url, "shapes", server.keys()["inference"], server.process.pid)
                report = run(target, args.clients, args.seconds, args.max_batch)
            finally:
                server.stop()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
