#!/usr/bin/env python
"""A labelled CSV of ImageNet photos for the accuracy gate (scripts/gate.py --eval), from a clone of
https://github.com/EliSchwartz/imagenet-sample-images (one photo per ImageNet-1k class, named
``<wnid>_<name>.JPEG``; the photos are ImageNet's, not ours to commit: clone them).

    git clone https://github.com/EliSchwartz/imagenet-sample-images /tmp/imagenet-samples
    .venv/bin/python benchmarks/imagenet_samples.py /tmp/imagenet-samples > /tmp/imagenet-samples/labels.csv

A class's index is its WordNet id's rank among the 1,000 sorted ids (the order of every
ImageNet-1k model's outputs, and of the shipped labels). The photos come from ImageNet's
training split, which the shipped model saw: the absolute top-1 is flattering; what the gate
reads is the difference between fp32 and a candidate on the same photos.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1])
    photos = sorted(p for p in root.iterdir() if p.suffix.upper() == ".JPEG" and p.name.startswith("n"))
    wnids = sorted({p.name.split("_", 1)[0] for p in photos})
    if len(wnids) != 1000:
        raise SystemExit(f"{root}: expected photos of 1000 ImageNet classes, found {len(wnids)}")
    rank = {wnid: i for i, wnid in enumerate(wnids)}
    print("path,label")
    for photo in photos:
        print(f"{photo.name},{rank[photo.name.split('_', 1)[0]]}")


if __name__ == "__main__":
    main()
