#!/usr/bin/env python
"""On a CUDA machine: the ceilings of each stage, then the handler end to end under several settings.

Ceilings (each alone, median of CUDA-event or wall-clock timings):
  model     the folded channels_last model's forward pass per batch size, in the chosen precision
  nvjpeg    batched GPU JPEG decode of the photos (decode only, then decode + resize)
  cpu       one core decoding and resizing one photo (libjpeg-turbo / Pillow, as a loader worker)
End to end: classify_requests on one server-side batch of requests (form uploads, or base64 JSON
parsed as a server does; JPEG bytes in, top-k labels out) for each handler setting of the sweep,
every setting initialized once and timed in interleaved rounds: images/s and the classifier's own
per-stage times.
Needs torch only (no TorchServe, no Java); photos from scikit-image or $BENCH_PHOTOS.

    python benchmarks/bench_gpu.py [--arch resnet50] [--size 640x480] [--images 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from harness.bench_images import photo_jpegs, stock_input
from harness.model_dirs import random_model_dir
from harness.timing import request_batch
from handler.config import HandlerConfig
from handler.decode.dataset import LoaderItem
from handler.decode.gpu import BatchedJpegDecoder, jpeg_job
from handler.decode.images import ImageTransform
from handler.metrics import STAGE_METRICS
from handler.model.loading import load_model
from handler.model.optimize import fold_batchnorm
from handler.classifier import ImageClassifier, read_model
from handler.devices import autocast_dtype


def cuda_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` on the GPU (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.inference_mode()
def model_ceiling(arch: str, weights: Path, precision: str, batch_sizes: list[int], repeats: int) -> dict:
    """Images/s of the forward pass alone, per batch size (input already on the GPU)."""
    device = torch.device("cuda")
    model = fold_batchnorm(load_model(arch, weights, 1000), torch.randn(2, 3, 224, 224))
    model = model.to(device, memory_format=torch.channels_last)
    dtype = autocast_dtype(precision, device)
    out = {}
    for size in batch_sizes:
        x = torch.randn(size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)

        def forward() -> None:
            if dtype is None:
                model(x)
            else:
                with torch.autocast("cuda", dtype=dtype):
                    model(x)

        ms = cuda_ms(forward, repeats)
        out[str(size)] = {"ms": round(ms, 3), "images_per_s": round(size / ms * 1000, 1)}
    return out


def nvjpeg_ceiling(images: list[bytes], config: HandlerConfig, repeats: int) -> dict:
    """Images/s of nvJPEG on one list: decode only, and decode + EXIF + resize as the handler does."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device("cuda")
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
    decode_ms = cuda_ms(lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device=device), repeats)
    decoder = BatchedJpegDecoder(config, device)
    jobs = [jpeg_job(LoaderItem(i, b), config.max_image_pixels) for i, b in enumerate(images)]
    assert all(jobs)
    # Wall clock: the handler's host-side work per image (header check, copies) counts here.
    torch.cuda.synchronize()
    full = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        decoder.decode(jobs)
        torch.cuda.synchronize()
        full.append((time.perf_counter() - start) * 1000)
    full_ms = statistics.median(full[2:])
    return {"images": len(images), "decode_ms": round(decode_ms, 3),
            "decode_images_per_s": round(len(images) / decode_ms * 1000, 1),
            "decode_resize_ms": round(full_ms, 3), "decode_resize_images_per_s": round(len(images) / full_ms * 1000, 1)}


def cpu_ceiling(images: list[bytes], config: HandlerConfig) -> dict:
    """One core's decode + resize per photo, as a loader worker does it."""
    transform = ImageTransform(config)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b in images[:8]:
            transform(b)
        start = time.perf_counter()
        for b in images:
            transform(b)
        ms = (time.perf_counter() - start) * 1000 / len(images)
    finally:
        torch.set_num_threads(previous)
    return {"ms_per_image": round(ms, 3), "images_per_s_per_core": round(1000 / ms, 1)}


class Contender:
    """One setting of the classifier, initialized and warmed up, timed a call at a time."""

    def __init__(self, name: str, model_dir: Path, arch: str, settings: dict, encoding: str,
                 images: list[bytes]) -> None:
        self.name, self.settings, self.encoding = name, settings, encoding
        spec = read_model(model_dir, {"arch": arch, **settings})
        started = time.perf_counter()
        self.classifier = ImageClassifier.for_serving(spec, device="cuda:0")
        self.initialize_s = time.perf_counter() - started
        self.batch = request_batch(images, spec.config.max_images_per_request, encoding)
        self.images = len(images)
        self.seconds: list[float] = []
        self.stages: dict[str, list[float]] = {name: [] for name in STAGE_METRICS}
        for _ in range(2):
            self.classifier.classify_requests(self.batch())  # warm-up

    def time_one(self) -> None:
        start = time.perf_counter()
        result = self.classifier.classify_requests(self.batch())
        self.seconds.append(time.perf_counter() - start)
        failed = [r for r in result.results if not isinstance(r, list)]
        assert not failed, failed
        for name in STAGE_METRICS:
            self.stages[name].append(result.timings[name])

    def summary(self) -> dict:
        median = statistics.median(self.seconds)
        result = {"images_per_s": round(self.images / median, 1), "batch_ms": round(median * 1000, 2),
                  "best_images_per_s": round(self.images / min(self.seconds), 1),
                  "initialize_s": round(self.initialize_s, 1), "rounds": len(self.seconds)}
        result.update({name: round(statistics.median(v), 2) for name, v in self.stages.items()})
        result.update({"gpu_decoded": self.classifier.pipeline.jpeg_decoder is not None,
                       "request_encoding": self.encoding,
                       "settings": self.settings})
        return result

    def close(self) -> None:
        self.classifier.close()


def default_sweep(workers: int) -> dict[str, tuple[dict, str]]:
    """Where the JPEGs are decoded (CPU workers, nvJPEG ahead or not, or split between them)
    around one fp16 setting with fixed 64-image batches (and 128); form uploads, and base64 JSON."""
    base = {"precision": "fp16", "num_workers": workers, "cudnn_benchmark": True, "batch_size": 64,
            "batch_buckets": [64], "loader_batch_size": 16}
    gpu = {**base, "decode_device": "cuda"}
    return {
        "cpu decode": (base, "form"),
        "nvjpeg, not decoded ahead": ({**gpu, "decode_ahead": False}, "form"),
        "nvjpeg": (gpu, "form"),
        "nvjpeg, batches of 128": ({**gpu, "batch_size": 128, "batch_buckets": [128]}, "form"),
        "nvjpeg + cpu 25%": ({**gpu, "cpu_decode_share": 0.25}, "form"),
        "nvjpeg, base64 JSON": (gpu, "json"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--images", type=int, default=512, help="images per server-side batch (requests of 64)")
    parser.add_argument("--rounds", type=int, default=15, help="timed batches per setting, interleaved")
    parser.add_argument("--repeats", type=int, default=7, help="timings per ceiling measurement")
    parser.add_argument("--precision", default="fp16", help="for the model ceiling")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--sweep", type=json.loads,
                        help='JSON {"name": [{handler settings}, "form"|"json"], ...} instead of the default')
    parser.add_argument("--skip-ceilings", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")

    images = photo_jpegs(args.size, args.images)
    result: dict[str, Any] = {
        "arch": args.arch, "image_size": args.size, "images_per_call": args.images,
        "machine": {"gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "platform": platform.platform()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model_dir(Path(tmp) / args.arch, args.arch, calibration=stock_input(images[:16]))
        sweep = args.sweep or default_sweep(args.workers)
        contenders = []
        for name, (settings, encoding) in sweep.items():
            try:
                contenders.append(Contender(name, model_dir, args.arch, settings, encoding, images))
            except Exception as exc:  # report and go on: one broken setting must not hide the rest
                print(f"{name}: {type(exc).__name__}: {exc}"[:500], flush=True)
        # Rounds interleave the settings, so drift on a shared machine hits them all alike.
        for _ in range(args.rounds):
            for contender in contenders:
                contender.time_one()
        result["end_to_end"] = {c.name: c.summary() for c in contenders}
        for contender in contenders:
            contender.close()
            print(f"e2e {contender.name}: {json.dumps(result['end_to_end'][contender.name])}", flush=True)
        if not args.skip_ceilings:
            config = HandlerConfig(arch=args.arch)
            result["ceilings"] = {
                "model": model_ceiling(args.arch, model_dir / "weights.pt", args.precision, [32, 64, 128, 256],
                                       args.repeats * 3),
                "nvjpeg_64": nvjpeg_ceiling(images[:64], config, args.repeats * 3),
                "cpu_core": cpu_ceiling(images[:64], config),
            }
            print(f"ceilings: {json.dumps(result['ceilings'])}", flush=True)

    print(f"\n{args.arch}, {args.images} JPEGs of {args.size} per batch, {result['machine']['gpu']}, "
          f"{result['machine']['cpus']} CPUs")
    print("| setting | images/s (median) | best | ms per call | decode wait ms | host->device ms | inference ms | postprocess ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in result["end_to_end"].items():
        print(f"| {name} | {row['images_per_s']} | {row['best_images_per_s']} | {row['batch_ms']} | {row['DecodeTransformMs']} | "
              f"{row['HostToDeviceMs']} | {row['InferenceMs']} | {row['PostprocessMs']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
