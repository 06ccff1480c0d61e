#!/usr/bin/env python
"""Batching in the Ray Serve door: the serving loop's own batcher (``handler.batcher``, batches
counted in images) against Ray Serve's ``@serve.batch`` with ``batch_size_fn`` (Ray 2.60: also
counted in images), on one replica, side by side.

    .venv/bin/python benchmarks/bench_ray_batching.py [--rounds 3] [--seconds 20] [--clients 8]
                                                      [--json docs/results/bench_ray_batching.json]

One deployment serves both ways from the same classifier (so the model, its loader workers and
the replica's CPU are the same): ``POST /ours`` goes through ``ServingLoop.serve`` (the door's
path), ``POST /serve_batch`` parses and encodes with the same loop but gathers requests with
``@serve.batch(max_batch_size=batch_size, batch_wait_timeout_s=the door's delay,
batch_size_fn=images)``. ``--clients`` threads send multipart/mixed requests of 1-16 640x480
photos (a fixed random sequence) for ``--seconds``; the two ways alternate, ``--rounds`` times
each. Reported per way: images/s and p50 / p95 request latency, the median of the rounds and
their spread. The model: random-weight mobilenet_v3_small, batch 32, eager.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from harness.bench_images import photo_jpegs
from harness.model_dirs import random_model_dir
from harness.ray_cluster import HEAD_IP, RayCluster, free_port
from harness.timing import percentile
from harness.wire import multipart_mixed

ARCH = "mobilenet_v3_small"
WAYS = ("ours", "serve_batch")
DELAY_MS = 5.0

DEPLOYMENT = '''
import asyncio
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from starlette.responses import Response

from handler.classifier import ImageClassifier
from handler.errors import RequestError
from handler.serving import ServingLoop

DELAY_S = {delay_s}


@serve.deployment(num_replicas=1, ray_actor_options={{"num_cpus": 1}})
class BothWays:
    def __init__(self, model: str) -> None:
        classifier = ImageClassifier.for_serving(model, device="cpu")
        self.loop = ServingLoop(classifier, "bench", max_batch_delay_s=DELAY_S)
        self.pool = ThreadPoolExecutor(max_workers=1)  # one batch at a time, like the loop's batcher
        self.by_serve_batch.set_max_batch_size(classifier.config.batch_size)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=DELAY_S,
                 batch_size_fn=lambda requests: sum(len(r.images) for r in requests))
    async def by_serve_batch(self, requests):
        classify = self.loop.classifier.classify_requests
        result = await asyncio.get_running_loop().run_in_executor(self.pool, classify, [r.images for r in requests])
        return list(result.results)

    async def __call__(self, request):
        headers = {{k.lower(): v for k, v in request.headers.items()}}
        try:
            parsed = self.loop.parse(await request.body(), headers)
        except RequestError as error:
            answer = self.loop.refuse(error)
        else:
            if request.url.path.endswith("/serve_batch"):
                outcome = await self.by_serve_batch(parsed)
            else:
                outcome = await self.loop.classify(parsed)
            answer = self.loop.encode(parsed, outcome)
        return Response(answer.reply.body, status_code=answer.status, media_type=answer.reply.content_type)


app = BothWays.bind({model!r})
'''


def load(url: str, images: list[bytes], clients: int, seconds: float, seed: int) -> dict[str, float]:
    """``clients`` threads sending requests of 1-16 images until ``seconds`` have passed."""
    latencies: list[float] = []
    sent = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        session = requests.Session()
        while time.monotonic() < stop:
            count = rng.randint(1, 16)
            picked = [images[rng.randrange(len(images))] for _ in range(count)]
            body, content_type = multipart_mixed([(f"img{i}", (f"{i}.jpg", d, "image/jpeg"))
                                                  for i, d in enumerate(picked)])
            start = time.perf_counter()
            response = session.post(url, data=body, headers={"Content-Type": content_type}, timeout=300)
            elapsed = (time.perf_counter() - start) * 1000
            response.raise_for_status()
            assert len(response.json()) == count if count > 1 else isinstance(response.json(), dict)
            with lock:
                latencies.append(elapsed)
                sent[0] += count

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - began
    return {"images_per_s": round(sent[0] / wall, 1), "requests": len(latencies),
            "p50_ms": round(percentile(latencies, 0.5) or 0.0, 1), "p95_ms": round(percentile(latencies, 0.95) or 0.0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = photo_jpegs("640x480", 32)
    with tempfile.TemporaryDirectory(prefix="bench_ray_batching_") as tmp:
        model = random_model_dir(Path(tmp) / "bench", ARCH)
        (model / "model-config.yaml").write_text("handler:\n  arch: mobilenet_v3_small\n  compile: false\n"
                                                "  batch_size: 32\n  precision: fp32\n")
        script = Path(tmp) / "both_ways.py"
        script.write_text(DEPLOYMENT.format(delay_s=DELAY_MS / 1000, model=str(model)))
        with RayCluster(nodes=1, cpus_per_node=2) as cluster:
            port = free_port()
            cluster.run(["serve", "start", f"--http-host={HEAD_IP}", f"--http-port={port}", "--proxy-location=HeadOnly"])
            # --working-dir ships the deployment module to the replica (its cwd there).
            cluster.run(["serve", "run", "--non-blocking", "--app-dir", tmp, "--working-dir", tmp, "both_ways:app"],
                        timeout_s=600)
            base = f"http://{HEAD_IP}:{port}"
            deadline = time.monotonic() + 600
            while True:
                try:
                    load(f"{base}/ours", images, 1, 0.1, 0)
                    break
                except (requests.RequestException, AssertionError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(2)
            for way in WAYS:  # warm both paths
                load(f"{base}/{way}", images, args.clients, 3, 99)
            runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
            for round_ in range(args.rounds):
                order = WAYS if round_ % 2 == 0 else tuple(reversed(WAYS))
                for way in order:
                    runs[way].append(load(f"{base}/{way}", images, args.clients, args.seconds, round_))
                    print(f"round {round_ + 1} {way}: {runs[way][-1]}", file=sys.stderr)
    result: dict = {"arch": ARCH, "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
                    "images_per_request": "1-16", "delay_ms": DELAY_MS, "runs": runs, "median": {}}
    for way, samples in runs.items():
        result["median"][way] = {key: statistics.median(s[key] for s in samples)
                                 for key in ("images_per_s", "p50_ms", "p95_ms")}
        result["median"][way]["images_per_s_range"] = [min(s["images_per_s"] for s in samples),
                                                       max(s["images_per_s"] for s in samples)]
    ours, theirs = result["median"]["ours"], result["median"]["serve_batch"]
    result["ours_over_serve_batch"] = {"throughput": round(ours["images_per_s"] / theirs["images_per_s"], 3),
                                       "p50": round(ours["p50_ms"] / theirs["p50_ms"], 3)}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
