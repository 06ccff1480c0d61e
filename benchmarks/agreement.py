#!/usr/bin/env python
"""Do our answers stay with the stock pipeline's? Top-1 agreement and the largest probability
difference, per photo size, beside the same stock pipeline on the photos merely re-encoded.

    .venv/bin/python benchmarks/agreement.py --model model_store/efficientnet_lite0.mar \\
        [--sizes 640x480 1280x960 4032x3024] [--count 32] [--precisions fp32 bf16 int8] [--json docs/results/agreement_efficientnet_lite0.json]

stock  PIL decode, Resize(resize_size, the model's interpolation), CenterCrop, ToTensor,
       Normalize(the model's mean/std), the plain eager model (what TorchServe's stock
       image_classifier does, with the model's own preprocessing)
ours   the classifier's pipeline: DCT-scaled decode, uint8 resize, BatchNorm folded, ...
yardstick  the stock pipeline on the same photos re-encoded at JPEG quality 95 instead of 90

Ours runs in each precision side by side (fp32, bf16, and int8 when the model holds a calibrated
program), each against the stock pipeline and against ours in fp32.
"""

from __future__ import annotations

import argparse
import io
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from harness.bench_images import SIZES, photo_jpegs
from handler.classifier import ImageClassifier, read_model
from handler.config import HandlerConfig
from handler.decode.dataset import LoaderItem
from handler.devices import copied_event
from handler.model.loading import load_model
from handler.model.precision import agreement

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


def probability_agreement(reference: torch.Tensor, probabilities: torch.Tensor) -> dict:
    """Top-1 agreement and max probability difference of two sets of probabilities."""
    # agreement() takes logits; the log of a probability is a logit with the same softmax.
    result = agreement(reference.clamp_min(1e-30).log(), probabilities.clamp_min(1e-30).log())
    return {"top1_agreement": round(result.top1_agreement, 3), "max_prob_diff": round(result.max_prob_diff, 5)}


@torch.inference_mode()
def output_agreement(classifiers: dict[str, ImageClassifier], stock_model: torch.nn.Module, size: str,
                     count: int) -> dict:
    """Stock against ours in each precision on ``count`` photos of ``size``; the re-encode
    yardstick beside it."""
    config = next(iter(classifiers.values())).config
    stock_input_of = stock_pipeline(config)
    images = photo_jpegs(size, count)
    stock = stock_model(stock_input_of(images)).softmax(dim=1)
    ours = {precision: ours_probabilities(clf, images) for precision, clf in classifiers.items()}
    reencoded = stock_model(stock_input_of(photo_jpegs(size, count, quality=95))).softmax(dim=1)
    row: dict = {"distinct_top1": len(set(stock.argmax(1).tolist())),
                 "reencode_q95": probability_agreement(stock, reencoded)}
    for precision, probabilities in ours.items():
        row[precision] = {"vs_stock": probability_agreement(stock, probabilities)}
        if "fp32" in ours:
            row[precision]["vs_ours_fp32"] = probability_agreement(ours["fp32"], probabilities)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model_store" / "efficientnet_lite0.mar")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "int8"],
                        help="ours in these precisions (default: fp32, bf16, and int8 if the model has its program)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    precisions = args.precisions or ["fp32", "bf16"] + (["int8"] if read_model(args.model).int8_program else [])
    with ExitStack() as stack:
        classifiers = {}
        for precision in precisions:
            # One compiled batch size (the photos come in batches of up to batch_size).
            config = read_model(args.model).config
            clf = stack.enter_context(ImageClassifier.load(args.model, device="cpu", overrides={
                "precision": precision, "batch_buckets": [config.batch_size]}))
            if clf.pipeline.precision != precision:
                raise SystemExit(f"{args.model} does not run in {precision} here (see the log)")
            classifiers[precision] = clf
        stock_model = load_model(config.arch, clf.spec.weights, len(clf.labels))
        rows = {size: output_agreement(classifiers, stock_model, size, args.count) for size in args.sizes}
    print(f"\n{args.model.name}: {args.count} photos per size; {config.interpolation}, resize {config.resize_size}, "
          f"crop {config.image_size}, mean {list(config.mean)}, std {list(config.std)}; stock: fp32\n")
    print("| image size | ours in | top-1 agreement with stock | max probability difference | "
          "with ours fp32: top-1 / max difference |\n|---|---|---|---|---|")
    for size, r in rows.items():
        for precision in precisions:
            vs_stock, vs_fp32 = r[precision]["vs_stock"], r[precision].get("vs_ours_fp32")
            fp32_cell = f"{vs_fp32['top1_agreement']:.1%} / {vs_fp32['max_prob_diff']:.3f}" if vs_fp32 else "n/a"
            print(f"| {size} | {precision} | {vs_stock['top1_agreement']:.1%} | {vs_stock['max_prob_diff']:.3f} | "
                  f"{fp32_cell} |")
        q95 = r["reencode_q95"]
        print(f"| {size} | yardstick: stock on a q95 re-encode | {q95['top1_agreement']:.1%} | "
              f"{q95['max_prob_diff']:.3f} | |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model.name, "count": args.count, "precisions": precisions,
                                         "sizes": rows}, indent=2))


if __name__ == "__main__":
    main()
