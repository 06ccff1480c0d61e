#!/usr/bin/env python
"""Do our answers stay with the stock pipeline's? Top-1 agreement and the largest probability
difference, per photo size, beside the same stock pipeline on the photos merely re-encoded.

    .venv/bin/python scripts/agreement.py --model model_store/efficientnet_lite0.mar \\
        [--sizes 640x480 1280x960 4032x3024] [--count 32] [--json docs/agreement.json]

stock  PIL decode, Resize(resize_size, the model's interpolation), CenterCrop, ToTensor,
       Normalize(the model's mean/std), the plain eager model (what TorchServe's stock
       image_classifier does, with the model's own preprocessing)
ours   the classifier's pipeline: DCT-scaled decode, uint8 resize, BatchNorm folded, ...
yardstick  the stock pipeline on the same photos re-encoded at JPEG quality 95 instead of 90
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from bench_images import SIZES, photo_jpegs
from handler.classifier import ImageClassifier
from handler.config import HandlerConfig
from handler.dataset import LoaderItem
from handler.devices import copied_event
from handler.model_loading import load_model

ROOT = Path(__file__).resolve().parent.parent


def stock_pipeline(config: HandlerConfig) -> Callable[[list[bytes]], torch.Tensor]:
    """The stock PIL pipeline with the model's own preprocessing settings (center crop)."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize(config.resize_size, interpolation=transforms.InterpolationMode(config.interpolation)),
        transforms.CenterCrop(config.image_size), transforms.ToTensor(),
        transforms.Normalize(mean=list(config.mean), std=list(config.std)),
    ])
    return lambda images: torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])


@torch.inference_mode()
def ours_probabilities(classifier: ImageClassifier, images: list[bytes]) -> torch.Tensor:
    """Every class's probability from our pipeline (the top-k answer is cut from these)."""
    pipeline = classifier.pipeline
    out = []
    for batch in pipeline.decode([LoaderItem(i, b) for i, b in enumerate(images)]):
        assert not batch.failures, batch.failures
        out.append(pipeline.forward(pipeline.to_model_input(batch.pixels)).float().softmax(dim=1).cpu())
        batch.release(copied_event(pipeline.device))
    return torch.cat(out)


@torch.inference_mode()
def output_agreement(classifier: ImageClassifier, stock_model: torch.nn.Module, size: str, count: int) -> dict:
    """Stock against ours on ``count`` photos of ``size``; the re-encode yardstick beside it."""
    stock_input_of = stock_pipeline(classifier.config)
    images = photo_jpegs(size, count)
    stock = stock_model(stock_input_of(images)).softmax(dim=1)
    ours = ours_probabilities(classifier, images)
    reencoded = stock_model(stock_input_of(photo_jpegs(size, count, quality=95))).softmax(dim=1)
    return {"top1_agreement": round(float((stock.argmax(1) == ours.argmax(1)).float().mean()), 3),
            "max_prob_diff": round(float((stock - ours).abs().max()), 5),
            "distinct_top1": len(set(stock.argmax(1).tolist())),
            "reencode_q95_top1_agreement": round(float((stock.argmax(1) == reencoded.argmax(1)).float().mean()), 3),
            "reencode_q95_max_prob_diff": round(float((stock - reencoded).abs().max()), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "efficientnet_lite0.mar")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with ImageClassifier.load(args.model, device="cpu") as classifier:
        stock_model = load_model(classifier.config.arch, classifier.spec.weights, len(classifier.labels))
        rows = {size: output_agreement(classifier, stock_model, size, args.count) for size in args.sizes}
        config = classifier.config
    print(f"\n{args.model.name}: {args.count} photos per size; {config.interpolation}, resize {config.resize_size}, "
          f"crop {config.image_size}, mean {list(config.mean)}, std {list(config.std)}\n")
    print("| image size | top-1 agreement | max probability difference | re-encoded at q95: top-1 agreement "
          "| re-encoded: max probability difference |\n|---|---|---|---|---|")
    for size, r in rows.items():
        print(f"| {size} | {r['top1_agreement']:.1%} | {r['max_prob_diff']:.3f} | "
              f"{r['reencode_q95_top1_agreement']:.1%} | {r['reencode_q95_max_prob_diff']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model.name, "count": args.count, "sizes": rows}, indent=2))


if __name__ == "__main__":
    main()
