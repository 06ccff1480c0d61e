#!/usr/bin/env python
"""JPEG bytes -> (3, 224, 224) uint8 model input: libjpeg-turbo's M/8 DCT scaling (simplejpeg)
beside the earlier handler path (Pillow's 1/2, 1/4, 1/8 draft, else torchvision's full decode),
each followed by the same antialiased resize + centre crop (handler.decode.images.resize_to_input).

Variants: pillow_draft (the baseline: that earlier path, jpeg_draft_margin 1.5), handler (today's
ImageTransform: simplejpeg at the draft's factors, header and EXIF checks included),
pillow_draft_m1.0 (the baseline with margin 1.0), sj_m8_m1.5 / sj_m8_m1.0 (simplejpeg at the
largest M/8 downscale keeping the short side >= ceil(resize_size * margin)), sj_pow2_m1.5
(simplejpeg at the baseline's factors), sj_m8_m1.5_fast (fastdct + fastupsample), sj_full
(simplejpeg full size). The sj_* rows time the decoder alone: no header or EXIF check.

Speed: per size, every variant on the same photos, interleaved over ``--rounds`` rounds (the order
rotated each round), one torch thread (as a loader worker): the median ms per image, and the
median of the per-round ratios to the ``pillow_draft`` baseline.
Accuracy: each variant's input against the stock pipeline's (PIL full decode, torchvision
``Resize(256, interpolation)`` + ``CenterCrop(224)`` on the PIL image, uint8): mean and max
|pixel difference|; then EfficientNet-Lite0 (models/efficientnet_lite0, its own mean/std) on both:
top-1 agreement with the stock input's top-1 and the max |probability difference|.

    .venv/bin/python benchmarks/bench_decode.py [--sizes 640x480 1280x960 4032x3024 1920x1080]
        [--images 16] [--rounds 7] [--accuracy-images 32] [--configs bicubic bilinear]
        [--json docs/results/bench_decode.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import simplejpeg  # type: ignore[import-untyped]  # ships a .pyi but no py.typed
import torch
from PIL import Image
from torchvision import transforms

from harness.bench_images import SIZES, photo_jpegs
from handler.config import HandlerConfig
from handler.decode.images import ImageTransform, decode_jpeg_fast, draft_target, open_image, resize_to_input, to_rgb_tensor
from handler.model.files import read_model
from handler.model.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "efficientnet_lite0"
CONFIGS = {
    # efficientnet_lite0's own settings (models/efficientnet_lite0/model-config.yaml) and the default.
    "bicubic": {"image_size": 224, "resize_size": 256, "resize_mode": "center_crop", "interpolation": "bicubic"},
    "bilinear": {"image_size": 224, "resize_size": 256, "resize_mode": "center_crop", "interpolation": "bilinear"},
}
Variant = Callable[[bytes], torch.Tensor]


def pillow_draft(config: HandlerConfig) -> Variant:
    """The handler's path before simplejpeg: Pillow's draft (1/2, 1/4, 1/8) where the short side is
    at least twice the target, else torchvision's full-size decode; then the resize."""
    target = draft_target(config)

    def run(data: bytes) -> torch.Tensor:
        image = open_image(data, config.max_image_pixels)
        pixels = None
        if config.jpeg_draft and min(image.size) >= 2 * target:
            image.draft("RGB", (target, target))
        else:
            pixels = decode_jpeg_fast(data)
        return resize_to_input(to_rgb_tensor(image) if pixels is None else pixels, config)

    return run


def simplejpeg_scaled(config: HandlerConfig, min_side: int, power_of_two: bool = False, **options: Any) -> Variant:
    """simplejpeg's decode at the largest M/8 downscale keeping both sides >= ``min_side`` (0: full
    size); ``power_of_two``: only the factors Pillow's draft has (1/2, 1/4, 1/8), used where the
    draft would be; then the resize. No header check or EXIF: the decoder alone."""

    def run(data: bytes) -> torch.Tensor:
        side = min_side
        if power_of_two:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            short = min(height, width)
            scale = 1
            while scale < 8 and short >= 2 * min_side * scale:
                scale *= 2
            side = math.ceil(short / scale) if scale > 1 else 0
        array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side, **options)
        return resize_to_input(torch.from_numpy(array).permute(2, 0, 1), config)

    return run


def variants(config: HandlerConfig) -> dict[str, Variant]:
    target = draft_target(config)  # margin 1.5 (the default): 384 for resize_size 256
    wide = dataclasses.replace(config, jpeg_draft_margin=1.0)
    return {
        "pillow_draft": pillow_draft(config),
        "handler": ImageTransform(config),
        "pillow_draft_m1.0": pillow_draft(wide),
        "sj_m8_m1.5": simplejpeg_scaled(config, target),
        "sj_m8_m1.0": simplejpeg_scaled(config, draft_target(wide)),
        "sj_pow2_m1.5": simplejpeg_scaled(config, target, power_of_two=True),
        "sj_m8_m1.5_fast": simplejpeg_scaled(config, target, fastdct=True, fastupsample=True),
        "sj_full": simplejpeg_scaled(config, 0),
    }


def decoded_side(data: bytes, name: str, config: HandlerConfig) -> str:
    """The decoded size (WxH) that reaches the resize, for the table."""
    seen: list[tuple[int, int]] = []
    import handler.decode.images as images

    original = images.resize_to_input

    def spy(pixels: torch.Tensor, config: HandlerConfig) -> torch.Tensor:
        seen.append((int(pixels.shape[-1]), int(pixels.shape[-2])))
        return original(pixels, config)

    images.resize_to_input = spy
    globals()["resize_to_input"] = spy
    try:
        variants(config)[name](data)
    finally:
        images.resize_to_input = original
        globals()["resize_to_input"] = original
    return f"{seen[0][0]}x{seen[0][1]}" if seen else "?"


def time_variants(images: list[bytes], config: HandlerConfig, rounds: int) -> dict[str, dict[str, float]]:
    funcs = variants(config)
    names = list(funcs)
    for name in names:  # warm-up
        funcs[name](images[0])
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            for data in images:
                funcs[name](data)
            per_round[name].append((time.perf_counter() - start) * 1000 / len(images))
    base = per_round["pillow_draft"]
    return {name: {"ms": round(statistics.median(times), 3),
                   "ratio": round(statistics.median(t / b for t, b in zip(times, base)), 3)}
            for name, times in per_round.items()}


def stock_uint8(data: bytes, interpolation: str) -> torch.Tensor:
    mode = transforms.InterpolationMode(interpolation)
    pipeline = transforms.Compose([transforms.Resize(256, interpolation=mode), transforms.CenterCrop(224),
                                   transforms.PILToTensor()])
    result: torch.Tensor = pipeline(Image.open(io.BytesIO(data)).convert("RGB"))
    return result


class Lite0:
    """EfficientNet-Lite0 (ImageNet) on uint8 inputs, normalized with its own mean/std."""

    def __init__(self) -> None:
        spec = read_model(MODEL_DIR)
        self.model = load_model(spec.config.arch, spec.weights, len(spec.labels))
        self.mean = torch.tensor(spec.config.mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(spec.config.std).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        out = [self.model((chunk.float() - self.mean) / self.std).softmax(1) for chunk in inputs.split(16)]
        return torch.cat(out)


def accuracy(images: list[bytes], config: HandlerConfig, model: Lite0) -> dict[str, dict[str, float]]:
    stock = torch.stack([stock_uint8(d, config.interpolation) for d in images])
    stock_p = model.probabilities(stock)
    out = {}
    for name, func in variants(config).items():
        ours = torch.stack([func(d) for d in images])
        diff = (ours.float() - stock.float()).abs()
        p = model.probabilities(ours)
        out[name] = {
            "pixel_mean_abs": round(float(diff.mean()), 3),
            "pixel_max_abs": int(diff.max()),
            "top1_agree": round(float((p.argmax(1) == stock_p.argmax(1)).float().mean()), 4),
            "max_abs_dp": round(float((p - stock_p).abs().max()), 4),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=[*SIZES, "1920x1080"],
                        help="names of bench_images.SIZES, or any WxH (default: those and 1920x1080, where "
                             "M/8 scaling picks 3/8 where Pillow's draft picks 1/2)")
    parser.add_argument("--images", type=int, default=16, help="photos per size for the timings")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--accuracy-images", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = Lite0()
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "simplejpeg": simplejpeg.__version__, "torch_threads": 1},
        "settings": vars(args) | {"json": str(args.json) if args.json else None},
        "sizes": {},
    }
    for size in args.sizes:
        if size not in SIZES:
            width, height = (int(side) for side in size.lower().split("x"))
            SIZES[size] = (width, height)  # photo_jpegs looks sizes up by name
        photos = photo_jpegs(size, max(args.images, args.accuracy_images))
        for config_name in args.configs:
            config = HandlerConfig.from_mapping(CONFIGS[config_name])
            timing = time_variants(photos[: args.images], config, args.rounds)
            torch.set_num_threads(threads)  # the model's forward passes: every core
            quality = accuracy(photos[: args.accuracy_images], config, model)
            torch.set_num_threads(1)
            rows: dict[str, dict[str, Any]] = {name: {"decoded": decoded_side(photos[0], name, config), **timing[name], **quality[name]}
                    for name in timing}
            results["sizes"].setdefault(size, {})[config_name] = rows
            print(f"\n### {size}, {config_name} ({args.images} photos x {args.rounds} rounds; "
                  f"accuracy on {args.accuracy_images})\n")
            print("| variant | decoded | ms/image | ratio to pillow_draft | mean abs px diff | max abs px diff "
                  "| top-1 agreement | max abs dp |")
            print("|---|---|---:|---:|---:|---:|---:|---:|")
            for name, row in rows.items():
                print(f"| {name} | {row['decoded']} | {row['ms']:.2f} | {row['ratio']:.3f} | {row['pixel_mean_abs']:.3f} "
                      f"| {row['pixel_max_abs']} | {row['top1_agree'] * 100:.1f} % | {row['max_abs_dp']:.4f} |",
                      flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
