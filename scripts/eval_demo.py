#!/usr/bin/env python
"""Accuracy of the committed demo model on freshly drawn shapes, through the real pipeline
(ImageClassifier: decode, letterbox, model), by slice of the range it is specified for.

    .venv/bin/python scripts/eval_demo.py [--per-class 50]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import harness.shapes as shapes
from handler.classifier import ImageClassifier
from harness.shapes import shape_image

ROOT = Path(__file__).resolve().parent.parent

SLICES = {
    "clear shapes (>= 1/3 of the shorter side), PNG": dict(size_range=(0.35, 0.9)),
    "clear shapes (>= 1/3 of the shorter side), JPEG": dict(size_range=(0.35, 0.9), fmt="JPEG"),
    "full range, 64-1200 px, JPEG": dict(fmt="JPEG", min_side=64, max_side=1200),
    "full range, 2000-4000 px, JPEG": dict(fmt="JPEG", min_side=2000, max_side=4000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    with ImageClassifier.load(ROOT / "models" / "shapes") as classifier:
        for seed, (name, options) in enumerate(SLICES.items()):
            right, total, confusions = 0, 0, Counter()
            for label in shapes.CLASSES:
                images = [shape_image(label, 500_000 * (seed + 1) + i, **options) for i in range(args.per_class)]
                for result in classifier.classify(images):
                    predicted = next(iter(result))
                    total += 1
                    right += predicted == label
                    if predicted != label:
                        confusions[f"{label}->{predicted}"] += 1
            print(f"{name}: {right}/{total} = {right / total:.1%}  {dict(confusions)}", flush=True)


if __name__ == "__main__":
    main()
