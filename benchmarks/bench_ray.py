#!/usr/bin/env python
"""The Ray doors measured on this machine, side by side with what they replace.

    .venv/bin/python benchmarks/bench_ray.py [--rounds 20] [--files 320] [--json docs/results/bench_ray.json]

serve   one archive served by TorchServe and by the Ray Serve door (one replica, on a one-node
        cluster on loopback) at the same time; 32-photo 640x480 multipart/mixed requests to each in
        interleaved rounds (the order flipped every round): images/s and p50 per door.
data    ``--files`` 640x480 photos in a folder classified end to end by ``scripts/classify.py``
        alone, with ``--ray`` on one node (2 CPUs) and on two nodes (1 CPU each): wall time of the
        whole command (start-up included) and images/s; Ray's cost per image against the library.

Both use the same random-weight mobilenet_v3_small archive (batch 32, eager: both doors run the same
settings; compiling would only lengthen the start-up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from harness.bench_images import photo_jpegs
from harness.wire import multipart_mixed
from compare_commits import build
from harness.model_dirs import random_model_dir
from harness.ray_cluster import HEAD_IP, RayCluster, free_port, ray_env
from harness.timing import percentile
from harness.ts_server import ROOT, start_server

ARCH = "mobilenet_v3_small"
NAME = "bench"


def post_mixed(url: str, images: list[bytes], auth: dict[str, str] | None = None) -> float:
    """Milliseconds for one multipart/mixed request of ``images``."""
    body, content_type = multipart_mixed([(f"img{i}", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(images)])
    start = time.perf_counter()
    response = requests.post(url, data=body, headers={"Content-Type": content_type, **(auth or {})}, timeout=300)
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    assert len(response.json()) == len(images)
    return elapsed


def summary(latencies: list[float], images: int) -> dict[str, float]:
    return {"images_per_s": round(images * len(latencies) / (sum(latencies) / 1000), 1),
            "p50_ms": percentile(latencies, 0.5) or 0.0}


def bench_serve(store: Path, work: Path, rounds: int) -> dict:
    images = photo_jpegs("640x480", 32)
    (work / "ts").mkdir()
    server = start_server(work / "ts", store, [f"{NAME}.mar"])
    try:
        with RayCluster(nodes=1, cpus_per_node=2) as cluster:
            port = free_port()
            cluster.run(["serve", "start", f"--http-host={HEAD_IP}", f"--http-port={port}",
                         "--proxy-location=HeadOnly"])
            cluster.run(["serve", "run", "--non-blocking", "handler.doors.ray_serve:app", f"model={store / f'{NAME}.mar'}",
                         "num_replicas=1", "num_cpus=1"], timeout_s=600)
            urls = {"torchserve": f"{server.inference_url}/predictions/{NAME}",
                    "ray_serve": f"http://{HEAD_IP}:{port}/predictions/{NAME}"}
            deadline = time.monotonic() + 600
            while True:  # the replica is up when it answers
                try:
                    post_mixed(urls["ray_serve"], images[:2])
                    break
                except requests.RequestException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(2)
            auth = {"torchserve": server.auth(), "ray_serve": {}}
            for _ in range(3):  # warm-up
                for door, url in urls.items():
                    post_mixed(url, images, auth[door])
            latencies: dict[str, list[float]] = {door: [] for door in urls}
            for round_ in range(rounds):
                order = list(urls) if round_ % 2 == 0 else list(reversed(urls))
                for door in order:
                    latencies[door].append(post_mixed(urls[door], images, auth[door]))
    finally:
        server.stop()
    result = {door: summary(values, len(images)) for door, values in latencies.items()}
    result["ray_serve/torchserve"] = {
        "throughput": round(result["ray_serve"]["images_per_s"] / result["torchserve"]["images_per_s"], 3),
        "p50_torchserve_over_ray": round(result["torchserve"]["p50_ms"] / result["ray_serve"]["p50_ms"], 3)}
    return result


def timed_classify(folder: Path, model: Path, out: Path, *extra: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "classify.py"), str(folder), "--model", str(model),
                           "--out", str(out), *extra], env=ray_env(), capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return seconds


def bench_data(model: Path, work: Path, files: int) -> dict:
    folder = work / "photos"
    folder.mkdir()
    for i, data in enumerate(photo_jpegs("640x480", files)):
        (folder / f"{i:05d}.jpg").write_bytes(data)
    seconds = {"library": timed_classify(folder, model, work / "alone.jsonl")}
    for nodes, cpus in ((1, 2), (2, 1)):
        with RayCluster(nodes=nodes, cpus_per_node=cpus) as cluster:
            seconds[f"ray_{nodes}_node"] = timed_classify(folder, model, work / f"ray{nodes}.jsonl", "--ray",
                                                          cluster.address, "--actors", str(nodes))
    alone = {json.loads(line)["path"]: json.loads(line)["label"] for line in (work / "alone.jsonl").open()}
    for nodes in (1, 2):
        ray_rows = [json.loads(line) for line in (work / f"ray{nodes}.jsonl").open()]
        assert {row["path"]: row["label"] for row in ray_rows} == alone, "Ray's labels differ from the library's"
    result: dict = {"files": files}
    for key, value in seconds.items():
        result[key] = {"seconds": round(value, 1), "images_per_s": round(files / value, 1)}
    for nodes in (1, 2):
        extra = seconds[f"ray_{nodes}_node"] - seconds["library"]
        result[f"ray_{nodes}_node"]["ray_cost_ms_per_image"] = round(1000 * extra / files, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--files", type=int, default=320)
    parser.add_argument("--skip", choices=["serve", "data"], help="leave one part out")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    model_dir = random_model_dir(work / "model", ARCH)
    config = work / "model-config.yaml"
    config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "responseTimeout": 300,
                                      "startupTimeout": 600,
                                      "handler": {"arch": ARCH, "batch_size": 32, "compile": False}}))
    store = work / "store"
    store.mkdir()
    build(ROOT, NAME, model_dir, ARCH, config, store)
    result: dict = {"arch": ARCH, "date": time.strftime("%Y-%m-%d")}
    if args.skip != "serve":
        result["serve"] = bench_serve(store, work, args.rounds)
        print(json.dumps(result["serve"], indent=1), flush=True)
    if args.skip != "data":
        result["data"] = bench_data(store / f"{NAME}.mar", work, args.files)
        print(json.dumps(result["data"], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
