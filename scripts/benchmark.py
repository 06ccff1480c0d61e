#!/usr/bin/env python
"""End-to-end REST benchmark: TorchServe's stock image_classifier vs this handler, same weights.

One TorchServe serves two models built from the SAME random-init weights of a torchvision
architecture: ``stock`` (``--handler image_classifier``) and ``ours``. Each has one worker on the
same cores. Clients send 32-image batches of real photos (skimage.data, re-encoded as JPEG):
to stock as 32 concurrent single-image requests (server-side batchSize 32), to ours as ONE
32-image request: multipart/mixed as scripts/client.py sends it, and also as multipart/form-data
(which TorchServe decodes itself, more slowly). Rounds interleave them all. Reports images/s and
p50/p95/p99 latency per batch, and TorchServe's own share (a handler that ignores the images).

    scripts/setup.sh --bench && .venv/bin/python scripts/benchmark.py [--quick] [--arch NAME] [--json PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import requests
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_images import photo_jpegs, stock_input  # noqa: E402
from model_dirs import random_model_dir  # noqa: E402
from client import multipart_mixed  # noqa: E402
from ts_server import Server, start_server  # noqa: E402
from timing import latency_summary  # noqa: E402

BATCH = 32

def stock_model_file(arch: str, classes: int) -> str:
    """A model file defining exactly one class that builds ``arch`` (TorchServe's eager path)."""
    return (
        "import torch\nimport torchvision\n\n\n"
        "class Model(torch.nn.Module):\n"
        f'    """torchvision {arch}, wrapped so that the state_dict keys match the bare model."""\n\n'
        "    def __new__(cls):\n"
        f'        return torchvision.models.get_model("{arch}", weights=None, num_classes={classes})\n'
    )


ECHO_HANDLER = '''"""Answers without looking at the images: what TorchServe's transport alone costs."""


def handle(data, context):
    # TorchServe calls the entry point once with no data to initialize it.
    return ["{}" for _ in data] if data else None
'''


def build_archives(arch: str, store: Path, work: Path) -> None:
    model_dir = random_model_dir(work / "weights", arch, calibration=stock_input(photo_jpegs("640x480", 16)))
    weights, labels = model_dir / "weights.pt", model_dir / "index_to_name.json"
    common = {"minWorkers": 1, "maxWorkers": 1, "responseTimeout": 300}
    stock_cfg = work / "stock.yaml"
    stock_cfg.write_text(yaml.safe_dump({**common, "batchSize": BATCH, "maxBatchDelay": 100}))
    ours_cfg = work / "ours.yaml"
    ours_cfg.write_text(yaml.safe_dump({**common, "batchSize": 8, "maxBatchDelay": 5,
                                        "handler": {"arch": arch, "batch_size": 16, "num_workers": 2}}))
    model_file = work / "stock_model.py"
    model_file.write_text(stock_model_file(arch, 1000))
    archiver = str(Path(sys.executable).parent / "torch-model-archiver")
    subprocess.run([archiver, "--model-name", "stock", "--version", "1.0", "--model-file", str(model_file),
                    "--serialized-file", str(weights), "--handler", "image_classifier",
                    "--extra-files", str(labels), "--config-file", str(stock_cfg),
                    "--export-path", str(store), "--force"], check=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--arch", arch, "--weights",
                    str(weights), "--labels", str(labels), "--name", "ours", "--export-path", str(store),
                    "--config", str(ours_cfg)], check=True, stdout=subprocess.DEVNULL)
    echo = work / "echo_handler.py"
    echo.write_text(ECHO_HANDLER)
    subprocess.run([archiver, "--model-name", "echo", "--version", "1.0", "--handler", str(echo),
                    "--config-file", str(ours_cfg), "--export-path", str(store), "--force"], check=True)


def send_stock(server: Server, pool: futures.ThreadPoolExecutor, images: list[bytes]) -> list[dict]:
    """32 concurrent single-image requests: the stock handler's one-image contract."""
    url = f"{server.inference_url}/predictions/stock"
    headers = server.auth()

    def one(data: bytes) -> dict:
        response = requests.post(url, data=data, headers=headers, timeout=300)
        response.raise_for_status()
        return response.json()

    return list(pool.map(one, images))


def send_ours(server: Server, images: list[bytes], model: str = "ours", form_data: bool = False) -> list[dict]:
    """One request with every image: multipart/mixed as scripts/client.py sends it, or a
    multipart/form-data upload (which TorchServe decodes itself, more slowly)."""
    files = [(f"img{i}", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    if form_data:
        response = server.predict(model, files=files)
    else:
        body, content_type = multipart_mixed(files)
        response = server.predict(model, data=body, headers={"Content-Type": content_type})
    response.raise_for_status()
    return response.json()


def agreement(stock: list[dict], ours: list[dict]) -> dict[str, float]:
    """Top-1 agreement and the largest difference of the stock top-1 probability."""
    same = sum(next(iter(s)) == next(iter(o)) for s, o in zip(stock, ours))
    diffs = [abs(s[next(iter(s))] - o.get(next(iter(s)), 0.0)) for s, o in zip(stock, ours)]
    # With random weights the top-1 class may barely vary; say how many distinct ones there were.
    return {"top1_agreement": round(same / len(stock), 3), "max_top1_prob_diff": round(max(diffs), 6),
            "distinct_top1": len({next(iter(s)) for s in stock})}


def request_kinds(server: Server, pool: futures.ThreadPoolExecutor, images: list[bytes]) -> dict[str, Callable[[], object]]:
    """Every kind of request a round sends ``images`` as, by name."""
    return {
        "stock": lambda: send_stock(server, pool, images),
        "ours": lambda: send_ours(server, images),
        "ours_form_data": lambda: send_ours(server, images, form_data=True),
        # The same 32-image request to a handler that ignores it: TorchServe's own share.
        "echo": lambda: send_ours(server, images, "echo"),
        "echo_form_data": lambda: send_ours(server, images, "echo", form_data=True),
    }


def warm_up(server: Server, seconds: float) -> None:
    """Traffic of every kind for ``seconds`` before anything is timed: the JVM compiles its hot
    paths during the first seconds of load (measured here: ours' mean latency fell from 124 to
    111 ms over three 60-request windows of one fresh server), which would count against
    whichever size is measured first."""
    deadline = time.monotonic() + seconds
    with futures.ThreadPoolExecutor(BATCH) as pool:
        sends = request_kinds(server, pool, photo_jpegs("640x480", BATCH)).values()
        while time.monotonic() < deadline:
            for send in sends:
                send()


def run_size(server: Server, size: str, rounds: int) -> dict:
    images = photo_jpegs(size, BATCH)
    with futures.ThreadPoolExecutor(BATCH) as pool:
        senders = request_kinds(server, pool, images)
        latencies: dict[str, list[float]] = {name: [] for name in senders}
        reference_stock = send_stock(server, pool, images)  # warm-up, also the agreement check
        reference_ours = send_ours(server, images)
        for _ in range(2):  # more warm-up: the JVM and both workers settle in
            for send in senders.values():
                send()
        for _ in range(rounds):  # interleaved: machine noise hits all alike
            for name, send in senders.items():
                start = time.perf_counter()
                send()
                latencies[name].append((time.perf_counter() - start) * 1000)
    result = {"image_size": size}
    for name in ("stock", "ours", "ours_form_data"):
        lat = latencies[name]
        result[name] = {"images_per_s": round(BATCH * len(lat) / (sum(lat) / 1000), 1), **latency_summary(lat)}
    result["throughput_ratio"] = round(result["ours"]["images_per_s"] / result["stock"]["images_per_s"], 2)
    result["p50_ratio"] = round(result["stock"]["p50_ms"] / result["ours"]["p50_ms"], 2)
    result["form_data_throughput_ratio"] = round(
        result["ours_form_data"]["images_per_s"] / result["stock"]["images_per_s"], 2)
    result["form_data_p50_ratio"] = round(result["stock"]["p50_ms"] / result["ours_form_data"]["p50_ms"], 2)
    result["outputs"] = agreement(reference_stock, reference_ours)
    result["transport_floor_p50_ms"] = latency_summary(latencies["echo"])["p50_ms"]
    result["transport_floor_form_data_p50_ms"] = latency_summary(latencies["echo_form_data"])["p50_ms"]
    return result


def markdown(result: dict) -> str:
    lines = [f"Model `{result['arch']}`, {BATCH}-image batches, 1 worker each "
             f"({result['machine']['cpu_count']} CPUs, {result['machine']['device']}).", "",
             "| image size | stock img/s | ours img/s | throughput × | stock p50/p95/p99 ms | ours p50/p95/p99 ms | p50 × "
             "| transport-only p50 ms | top-1 agreement |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["e2e"]:
        s, o = row["stock"], row["ours"]
        lines.append(f"| {row['image_size']} | {s['images_per_s']} | {o['images_per_s']} | {row['throughput_ratio']} | "
                     f"{s['p50_ms']}/{s['p95_ms']}/{s['p99_ms']} | {o['p50_ms']}/{o['p95_ms']}/{o['p99_ms']} | "
                     f"{row['p50_ratio']} | {row['transport_floor_p50_ms']} | {row['outputs']['top1_agreement']} |")
    lines += ["", "Ours sent as multipart/form-data instead (TorchServe then decodes the upload in its frontend):", "",
              "| image size | ours img/s | throughput × | ours p50/p95/p99 ms | p50 × | transport-only p50 ms |",
              "|---|---|---|---|---|---|"]
    for row in result["e2e"]:
        f = row["ours_form_data"]
        lines.append(f"| {row['image_size']} | {f['images_per_s']} | {row['form_data_throughput_ratio']} | "
                     f"{f['p50_ms']}/{f['p95_ms']}/{f['p99_ms']} | {row['form_data_p50_ratio']} | "
                     f"{row['transport_floor_form_data_p50_ms']} |")
    lines += ["", "transport-only: the same 32-image request to a handler that answers without reading it "
              "(TorchServe's HTTP, multipart and worker-socket cost, which ours pays too)."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["image_size"] for r in result["e2e"]]
    x = range(len(sizes))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bars = (("stock", "stock"), ("ours", "ours (multipart/mixed)"), ("ours_form_data", "ours (form upload)"))
    for offset, (name, label) in zip((-0.27, 0.0, 0.27), bars):
        left.bar([i + offset for i in x], [r[name]["images_per_s"] for r in result["e2e"]], 0.27, label=label)
        right.bar([i + offset for i in x], [r[name]["p50_ms"] for r in result["e2e"]], 0.27, label=label)
    left.set(title="throughput (images/s, higher is better)", xticks=list(x), xticklabels=sizes)
    right.set(title=f"p50 latency per {BATCH}-image batch (ms)", xticks=list(x), xticklabels=sizes)
    left.legend()
    fig.suptitle(f"TorchServe stock image_classifier vs this handler — {result['arch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenet_v3_small")
    parser.add_argument("--quick", action="store_true", help="two sizes, few rounds (under 90 s)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sizes", nargs="+", default=["640x480", "1280x960", "4032x3024"])
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmark.json")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds = ["640x480", "1280x960"], 3

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        tmp_path = Path(tmp)
        store = tmp_path / "store"
        store.mkdir()
        build_archives(args.arch, store, tmp_path)
        (tmp_path / "server").mkdir()
        server = start_server(tmp_path / "server", store, ["stock.mar", "ours.mar", "echo.mar"])
        try:
            warm_up(server, 5 if args.quick else 30)
            rows = []
            for size in args.sizes:
                rows.append(run_size(server, size, args.rounds))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    result = {"arch": args.arch, "images_per_request": BATCH, "e2e": rows,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "device": "cuda" if torch.cuda.is_available() else "cpu"},
              "rounds": args.rounds, "seconds": round(time.time() - started, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown(result) + "\n")
    plot(result, args.json.with_suffix(".png"))
    print("\n" + markdown(result))
    print(f"\nwrote {args.json}, .md and .png in {result['seconds']} s")


if __name__ == "__main__":
    main()
