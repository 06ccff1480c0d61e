#!/usr/bin/env python
"""Time preprocessing (image bytes -> normalized model input) per request, driving handlers directly.

No TorchServe and no Java are needed, so this also runs on a GPU machine. Compared side by side,
interleaved, on the same JPEGs of real photos:
(stock and ours interleaved; the blog's variant after them, in a process of its own: see BlogRunner)
  stock  TorchServe's image_classifier.preprocess: a serial PIL loop (Resize 256, CenterCrop 224)
  blog   the blog's literal code: a DataLoader(num_workers=2, pin_memory=True) created per request
  ours   this handler: persistent DataLoader workers, uint8 until the device, normalize per batch
On CUDA it also reports host->device and inference times, and end-to-end images/s (JPEG in -> labels out).

    .venv/bin/python benchmarks/bench_preprocess.py [--quick] [--arch mobilenet_v3_small] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from agreement import output_agreement, stock_pipeline
from harness.bench_images import photo_jpegs, stock_input, stock_transform
from handler.classifier import ImageClassifier, read_model
from handler.decode.dataset import LoaderItem
from handler.devices import copied_event
from handler.metrics import STAGE_METRICS
from handler.model.loading import load_model
from harness.model_dirs import random_model_dir
from harness.timing import timed_ms, time_requests


def stock_preprocess() -> Callable[[list[bytes]], torch.Tensor]:
    """TorchServe's own ImageClassifier.preprocess on one row per image (its contract); where
    torchserve is not installed, the same serial loop over the same transform."""
    try:
        from ts.torch_handler.image_classifier import ImageClassifier as StockClassifier
    except ImportError:
        print("torchserve is not installed: 'stock' is its image_classifier pipeline re-created", flush=True)
        return stock_input
    stock = StockClassifier()
    stock.device = torch.device("cpu")
    return lambda images: stock.preprocess([{"body": bytearray(b)} for b in images])


class _BytesDataset(Dataset):
    def __init__(self, images: list[bytes], transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.open(io.BytesIO(self.images[i])).convert("RGB"))


def blog_preprocess(workers: int = 2, batch_size: int = 16) -> Callable[[list[bytes]], torch.Tensor]:
    """A Dataset + DataLoader built for every request, as the blog post wrote it."""
    transform = stock_transform()

    def run(images: list[bytes]) -> torch.Tensor:
        loader = DataLoader(_BytesDataset(images, transform), batch_size=batch_size, num_workers=workers,
                            pin_memory=torch.cuda.is_available())
        return torch.cat(list(loader))

    return run


class BlogRunner:
    """Times the blog's method in a process of its own, forked before anything else is set up.

    The blog's method forks DataLoader workers from the process it runs in, on every call;
    afterwards that process's memory is copy-on-write and faults page by page, which slowed
    what was timed after it in the same process: in one full run our in-handler 32-image
    request took 134 ms (640x480) and 218 ms (1280x960) after the blog's runs, against 106-117
    and 171-179 ms in processes that never ran them.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        # Not a daemon: daemonic processes may not start the DataLoader's worker processes.
        self._process = context.Process(target=_serve_blog, args=(child,))
        self._process.start()

    def time_ms(self, images: list[bytes], repeats: int) -> list[float]:
        """One warm-up call, then ``repeats`` timed calls on ``images``."""
        self._conn.send((images, repeats))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=60)


def _serve_blog(conn) -> None:
    run = blog_preprocess()
    while (job := conn.recv()) is not None:
        images, repeats = job
        run(images)  # warm-up
        conn.send([timed_ms(lambda: run(images)) for _ in range(repeats)])


def ours_preprocess(classifier: ImageClassifier) -> Callable[[list[bytes]], list[torch.Tensor]]:
    """What the classifier does before its forward pass: decoded batches as the loader delivers
    them, each turned into normalized model input on the device (no concatenation: the model
    runs batch by batch)."""
    pipeline = classifier.pipeline

    def run(images: list[bytes]) -> list[torch.Tensor]:
        inputs = []
        for batch in pipeline.decode([LoaderItem(i, b) for i, b in enumerate(images)]):
            inputs.append(pipeline.to_model_input(batch.pixels))
            batch.release(copied_event(pipeline.device))
        if classifier.device.type == "cuda":
            torch.cuda.synchronize()
        return inputs

    return run


def pixel_difference(stock: torch.Tensor, ours: torch.Tensor, std: tuple[float, ...]) -> dict[str, float]:
    """How far our model input is from the stock pipeline's, in 0-255 pixel units."""
    std = torch.tensor(std).view(1, 3, 1, 1) * 255
    diff = ((stock.float().cpu() - ours.float().cpu()) * std).abs()
    return {"mean_abs_px_diff_vs_stock": round(float(diff.mean()), 3),
            "p99_abs_px_diff_vs_stock": round(float(diff.flatten().kthvalue(int(diff.numel() * 0.99)).values), 2)}


def build_classifier(arch: str, workdir: Path, settings: dict, model: Path | None = None) -> ImageClassifier:
    """Ours, set up as a server worker would be (process settings first), on the GPU if any:
    ``model`` (a directory or .mar) with its own settings, or ``arch`` with calibrated random weights."""
    if model is not None:
        spec = read_model(model, settings)
    else:
        model_dir = random_model_dir(workdir / arch, arch, calibration=stock_input(photo_jpegs("640x480", 16)))
        spec = read_model(model_dir, {"arch": arch, **settings})  # the shipped defaults otherwise
    return ImageClassifier.for_serving(spec, device="auto")


def end_to_end(classifier: ImageClassifier, images: list[bytes], repeats: int) -> dict:
    """``images`` as base64 JSON requests through classify_requests, as a server's batch:
    per-stage ms (from the classifier's own clock) and images/s."""
    # More images than one request may carry go as one server-side batch of full requests.
    timed = time_requests(classifier, images, repeats, per_request=classifier.config.max_images_per_request)
    result = {"images_per_s": round(len(images) / timed["seconds"], 1), "batch_ms": round(timed["seconds"] * 1000, 2)}
    result.update({name: round(timed[name], 2) for name in STAGE_METRICS})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenet_v3_small", help="with calibrated random weights")
    parser.add_argument("--model", type=Path, help="a real model (directory or .mar) instead of --arch")
    parser.add_argument("--sizes", nargs="+", default=["640x480", "1280x960", "4032x3024"])
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, counts and repeats")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a handler setting for ours, e.g. --set precision='\"fp16\"' --set decode_device='\"cuda\"'")
    parser.add_argument("--e2e-images", type=int, default=32, help="images per request in the end-to-end run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.counts, args.repeats = ["640x480", "1280x960"], [1, 32], 3

    blog = BlogRunner()
    with tempfile.TemporaryDirectory() as tmp:
        settings = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
        classifier = build_classifier(args.arch, Path(tmp), settings, args.model)
        model_name = args.model.name if args.model else f"{args.arch}, calibrated random weights"
        # A real model's own preprocessing differs from TorchServe's stock transform (ImageNet
        # normalization, bilinear): its stock loop is the same PIL steps with the model's settings.
        stock = stock_pipeline(classifier.config) if args.model else stock_preprocess()
        methods = {"stock": stock, "ours": ours_preprocess(classifier)}
        rows = []
        for size in args.sizes:
            pool = photo_jpegs(size, max(args.counts))
            for count in args.counts:
                images = pool[:count]
                # Big requests of big photos take seconds per run: fewer repeats there.
                repeats = max(1, args.repeats if count * len(images[0]) < 8e6 else args.repeats // 2)
                for fn in methods.values():
                    fn(images)  # warm-up
                times: dict[str, list[float]] = {name: [] for name in methods}
                for round_ in range(repeats):  # stock and ours interleaved, alternating who goes first
                    for name in ("stock", "ours") if round_ % 2 else ("ours", "stock"):
                        times[name].append(timed_ms(lambda: methods[name](images)))
                times["blog"] = blog.time_ms(images, repeats)  # in its own process, after them
                row = {"image_size": size, "images": count}
                row.update({f"{name}_ms": round(statistics.median(t), 2) for name, t in times.items()})
                row["speedup_vs_stock"] = round(row["stock_ms"] / row["ours_ms"], 2)
                row.update(pixel_difference(methods["stock"](images), torch.cat(methods["ours"](images)),
                                            classifier.config.std))
                row["speedup_vs_blog"] = round(row["blog_ms"] / row["ours_ms"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
        stock_model = load_model(classifier.config.arch, classifier.spec.weights, len(classifier.labels))
        agreement = {size: output_agreement(classifier, stock_model, size, 32) for size in args.sizes}
        e2e = {size: end_to_end(classifier, photo_jpegs(size, args.e2e_images), args.repeats)
               for size in args.sizes}
        classifier.close()
    blog.close()

    print("\n| image size | images/request | stock ms | blog (per-request DataLoader) ms | ours ms | ours vs stock | ours vs blog |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image_size']} | {r['images']} | {r['stock_ms']} | {r['blog_ms']} | {r['ours_ms']} | "
              f"{r['speedup_vs_stock']}x | {r['speedup_vs_blog']}x |")
    print(f"\nOutputs, stock pipeline vs ours ({model_name}, 32 photos):")
    for size, figures in agreement.items():
        print(f"  {size}: {json.dumps(figures)}")
    per_request = classifier.config.max_images_per_request
    shape = (f"one {args.e2e_images}-image request" if args.e2e_images <= per_request
             else f"{args.e2e_images} images in requests of up to {per_request}, one server-side batch")
    print(f"\nEnd to end through classify_requests, base64 JSON ({model_name}, {shape}, device {classifier.device}, "
          f"settings {json.dumps(settings)}):")
    for size, figures in e2e.items():
        print(f"  {size}: {json.dumps(figures)}")
    result = {
        "model": model_name, "device": str(classifier.device), "settings": settings, "preprocess": rows,
        "output_agreement": agreement, "end_to_end": {"images_per_request": args.e2e_images, "sizes": e2e},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
