#!/usr/bin/env python
"""Find the fastest DataLoader batch size x loader workers x TorchServe backend workers x compile
on/off x precision x runtime (torch or OpenVINO) for YOUR machine and model, and write it into a model-config.yaml (the blog's advice to
benchmark these on your own system, automated).

Drives the classifier directly (no TorchServe needed). For every combination it starts that many
backend-worker processes (each a classifier with its share of the cores, as TorchServe would run
them; a compiled one compiles first, which the timing leaves out), lets each serve requests of
--images-per-request images for --seconds, and keeps the combination with the most images/s in total.

    scripts/setup.sh --bench
    .venv/bin/python scripts/tune.py --arch mobilenet_v3_small [--images DIR] [--config in.yaml] [--out tuned.yaml]

Precision: fp32 and, on a CPU with bf16 matrix units, bf16 (``--precisions``); runtime: torch and,
where it is installed, OpenVINO (``--runtimes``; compile applies to torch only). Only speed is
measured here: build the archive from the tuned config with scripts/build_mar.py --eval DIR, whose
accuracy gate measures bf16 against fp32 on labelled images (an explicit bf16 needs it).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import time
import tempfile
from pathlib import Path
from typing import Any

import yaml

from handler.classifier import ImageClassifier
from handler.model.ov_runtime import openvino_problem
from handler.model.precision import cpu_bf16_feature
from harness.model_dirs import random_model_dir
from harness.timing import request_batch


COMPILE = {"false": False, "auto": "auto", "true": True}


def load_images(folder: Path | None, count: int, size: str) -> list[bytes]:
    if folder is None:
        from harness.bench_images import photo_jpegs

        return photo_jpegs(size, count)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise SystemExit(f"no files in {folder}")
    return [files[i % len(files)].read_bytes() for i in range(count)]


def _backend_worker(model_dir: str, settings: dict[str, Any], images: list[bytes], seconds: float,
                    start: Any, results: Any) -> None:
    """One stand-in backend worker: set up as TorchServe's would, wait for the others, then serve
    base64 JSON requests (parsed each time, as a server does)."""
    with ImageClassifier.for_serving(model_dir, backend_workers=settings.get("maxWorkers", 1),
                                     model_yaml=settings) as classifier:
        batch = request_batch(images, len(images))
        classifier.classify_requests(batch())  # warm-up
        start.wait()
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            classifier.classify_requests(batch())
            done += len(images)
        results.put(done)


def measure(model_dir: Path, model_config: dict[str, Any], images: list[bytes], seconds: float,
            backend_workers: int) -> float:
    """Images/s that ``backend_workers`` handlers with these settings serve together."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters, like TorchServe's workers
    start, results = context.Barrier(backend_workers + 1), context.Queue()
    config = {**model_config, "minWorkers": backend_workers, "maxWorkers": backend_workers}
    procs = [context.Process(target=_backend_worker, args=(str(model_dir), config, images, seconds, start, results))
             for _ in range(backend_workers)]
    for proc in procs:
        proc.start()
    start.wait(timeout=600)
    began = time.perf_counter()
    total = sum(results.get(timeout=600) for _ in procs)
    elapsed = time.perf_counter() - began
    for proc in procs:
        proc.join()
    return total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenet_v3_small")
    parser.add_argument("--weights", type=Path, help="state_dict to time (default: random weights; speed is the same)")
    parser.add_argument("--labels-count", type=int, default=1000)
    parser.add_argument("--images", type=Path, help="a folder of your images (default: real photos, 640x480)")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--images-per-request", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4], help="DataLoader workers")
    parser.add_argument("--backend-workers", type=int, nargs="+", default=[1, 2],
                        help="TorchServe backend workers (minWorkers = maxWorkers)")
    parser.add_argument("--compile", nargs="+", default=["false", "auto"], choices=["false", "auto", "true"],
                        help="handler.compile values to try (auto compiles where a C++ compiler works)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "auto"],
                        default=["fp32", "bf16"] if cpu_bf16_feature() else ["fp32"],
                        help="handler.precision values to try (default: fp32, and bf16 where the CPU has bf16 units)")
    parser.add_argument("--runtimes", nargs="+", choices=["torch", "openvino"],
                        default=["torch"] + (["openvino"] if openvino_problem() is None else []),
                        help="handler.runtime values to try (default: torch, and OpenVINO where it is installed)")
    parser.add_argument("--seconds", type=float, default=4.0, help="serving time per combination")
    parser.add_argument("--config", type=Path, help="model-config.yaml to start from")
    parser.add_argument("--out", type=Path, default=Path("model-config.tuned.yaml"))
    args = parser.parse_args()

    base: dict[str, Any] = yaml.safe_load(args.config.read_text()) if args.config else {}
    settings = dict(base.get("handler") or {})
    settings["arch"] = args.arch
    images = load_images(args.images, args.images_per_request, args.size)
    with tempfile.TemporaryDirectory(prefix="tune_") as tmp:
        model_dir = random_model_dir(Path(tmp), args.arch, args.labels_count)
        if args.weights:
            (model_dir / "weights.pt").write_bytes(args.weights.read_bytes())
        results = []
        print("| backend workers | batch_size | num_workers | runtime | compile | precision | images/s |\n"
              "|---|---|---|---|---|---|---|", flush=True)
        combinations = [c for c in itertools.product(args.backend_workers, args.batch_sizes, args.workers,
                                                     args.runtimes, args.compile, args.precisions)
                        if c[3] == "torch" or c[4] == args.compile[0]]  # OpenVINO compiles its own way
        for backends, batch_size, workers, runtime, compiled, precision in combinations:
            trial = {**settings, "batch_size": batch_size, "num_workers": workers, "compile": COMPILE[compiled],
                     "precision": precision, "runtime": runtime}
            trial.pop("batch_buckets", None)  # buckets must cover batch_size: derived from it when compiling
            speed = measure(model_dir, {**base, "handler": trial}, images, args.seconds, backends)
            results.append((speed, backends, batch_size, workers, runtime, compiled, precision))
            print(f"| {backends} | {batch_size} | {workers} | {runtime} | {compiled} | {precision} | {speed:.1f} |",
                  flush=True)
    best_speed, best_backends, best_batch, best_workers, best_runtime, best_compile, best_precision = max(results)
    settings.update(batch_size=best_batch, num_workers=best_workers, compile=COMPILE[best_compile],
                    precision=best_precision, runtime=best_runtime)
    settings.pop("batch_buckets", None)
    base.update(handler=settings, minWorkers=best_backends, maxWorkers=best_backends)
    args.out.write_text(yaml.safe_dump(base, sort_keys=False))
    print(f"\nbest: {best_backends} backend worker(s), batch_size={best_batch} num_workers={best_workers} "
          f"runtime={best_runtime} compile={best_compile} precision={best_precision} ({best_speed:.1f} images/s); "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
