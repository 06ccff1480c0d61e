#!/usr/bin/env python
"""Find the fastest DataLoader batch size x worker count for YOUR machine and model, and write it
into a model-config.yaml (the blog's advice to benchmark these on your own system, automated).

Drives the handler directly (no TorchServe needed): for every combination it times handle() on
requests of --images-per-request images and keeps the best images/s.

    scripts/setup.sh --bench
    .venv/bin/python scripts/tune.py --arch mobilenet_v3_small [--images DIR] [--config in.yaml] [--out tuned.yaml]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from direct_context import DirectContext, random_model_dir  # noqa: E402
from handler.service import ImageBatchHandler  # noqa: E402
from timing import time_handle  # noqa: E402


def load_images(folder: Path | None, count: int, size: str) -> list[bytes]:
    if folder is None:
        from bench_images import photo_jpegs

        return photo_jpegs(size, count)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise SystemExit(f"no files in {folder}")
    return [files[i % len(files)].read_bytes() for i in range(count)]


def measure(model_dir: Path, handler_settings: dict[str, Any], images: list[bytes], repeats: int) -> float:
    """Median images/s of handle() on one request of ``images`` with these settings."""
    context = DirectContext(str(model_dir), {"handler": handler_settings})
    handler = ImageBatchHandler()
    handler.initialize(context)
    try:
        return len(images) / time_handle(handler, context, images, repeats)["seconds"]
    finally:
        assert handler.loader is not None
        handler.loader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenet_v3_small")
    parser.add_argument("--weights", type=Path, help="state_dict to time (default: random weights; speed is the same)")
    parser.add_argument("--labels-count", type=int, default=1000)
    parser.add_argument("--images", type=Path, help="a folder of your images (default: real photos, 640x480)")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--images-per-request", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
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
        print("| batch_size | num_workers | images/s |\n|---|---|---|", flush=True)
        for batch_size, workers in itertools.product(args.batch_sizes, args.workers):
            trial = {**settings, "batch_size": batch_size, "num_workers": workers}
            trial.pop("batch_buckets", None)  # buckets must cover batch_size; not part of this sweep
            speed = measure(model_dir, trial, images, args.repeats)
            results.append((speed, batch_size, workers))
            print(f"| {batch_size} | {workers} | {speed:.1f} |", flush=True)
    best_speed, best_batch, best_workers = max(results)
    settings.update(batch_size=best_batch, num_workers=best_workers)
    base["handler"] = settings
    args.out.write_text(yaml.safe_dump(base, sort_keys=False))
    print(f"\nbest: batch_size={best_batch} num_workers={best_workers} ({best_speed:.1f} images/s); wrote {args.out}")


if __name__ == "__main__":
    main()
