#!/usr/bin/env python
"""How close the pipeline serves timm and transformers folders to the zoos' own fp32 pipelines.

    .venv/bin/python benchmarks/zoo_parity.py [--out docs/results/zoo_parity.json]

For each folder of ``zoo_folders.PARITY_CASES`` (random, image-sensitive weights; no hub here) and
the photos of ``zoo_folders.photos()`` (tests/data at several sizes and aspect ratios): the model
input the pipeline builds against the zoo's own transform (in 0-255 pixel levels), and the answers
of the library (fp32) against the zoo's own model and transform in fp32 (top-1 agreement, largest
probability difference); the same again with ``jpeg_draft`` on (DCT-scaled JPEG decoding, which
zoo folders leave off by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from handler.classifier import ImageClassifier, read_model
from handler.decode.images import ImageTransform
from handler.decode.normalize import Normalizer
from harness.zoo_folders import PARITY_CASES, decoded, hf_reference, photos, timm_reference


def input_levels(folder: Path, zoo: str, images: list[bytes], settings: dict) -> dict[str, float]:
    """Pixel-level differences between the pipeline's model input and the zoo transform's."""
    config = read_model(folder, settings).config
    transform, normalize = ImageTransform(config), Normalizer(config.mean, config.std, torch.device("cpu"))
    ours = torch.cat([normalize(transform(data)[None]) for data in images])
    _, reference_transform = timm_reference(folder) if zoo == "timm" else hf_reference(folder)
    reference = torch.stack([reference_transform(decoded(data)) for data in images])
    levels = (ours - reference).abs() * torch.tensor(config.std).view(1, 3, 1, 1) * 255
    return {"max_levels": round(float(levels.max()), 2), "mean_levels": round(float(levels.mean()), 4),
            "share_above_2_levels": float((levels > 2.01).float().mean())}


def answers(folder: Path, want: torch.Tensor, images: list[bytes], settings: dict) -> dict[str, float]:
    with ImageClassifier.load(folder, device="cpu", overrides={"precision": "fp32", "top_k": 10, **settings}) as clf:
        got = clf.classify(images)
        labels = clf.labels
    top1 = sum(next(iter(g)) == labels[int(row.argmax())] for g, row in zip(got, want))
    diff = max(abs(score - float(row[labels.index(label)])) for g, row in zip(got, want) for label, score in g.items())
    return {"top1_agreement": f"{top1}/{len(images)}", "max_prob_diff": float(f"{diff:.2e}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    images = [data for _, data in photos()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo_parity_") as tmp:
        for case in PARITY_CASES:
            folder = case.build(Path(tmp) / case.name)
            want = case.reference(folder, images)
            config = read_model(folder).config
            row = {"case": case.name, "zoo": case.zoo, "model": case.model, "data_config": case.data_config,
                   "preprocessing": {k: getattr(config, k) for k in ("image_size", "resize_size", "resize_mode",
                                                                    "interpolation", "crop_offset")}}
            for label, settings in (("default", {}), ("jpeg_draft", {"jpeg_draft": True})):
                row[label] = {**input_levels(folder, case.zoo, images, settings),
                              **answers(folder, want, images, settings)}
            rows.append(row)
            d, j = row["default"], row["jpeg_draft"]
            print(f"{case.name:22s} {config.resize_mode:12s} input max {d['max_levels']:5.2f} mean {d['mean_levels']:.4f} "
                  f"levels; top-1 {d['top1_agreement']}, max |dp| {d['max_prob_diff']:.1e} | jpeg_draft on: "
                  f"max {j['max_levels']:5.2f} mean {j['mean_levels']:.4f}, top-1 {j['top1_agreement']}, "
                  f"max |dp| {j['max_prob_diff']:.1e}", file=sys.stderr)
    result = {"photos": len(images), "torch": torch.__version__, "cases": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
