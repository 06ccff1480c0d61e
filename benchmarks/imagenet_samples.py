#!/usr/bin/env python
"""A labelled CSV of ImageNet photos for the accuracy gate (scripts/gate.py --eval), from a clone of
https://github.com/EliSchwartz/imagenet-sample-images (one photo per ImageNet-1k class, named
``<wnid>_<name>.JPEG``; the photos are ImageNet's, not ours to commit: clone them).

    git clone https://github.com/EliSchwartz/imagenet-sample-images /tmp/imagenet-samples
    .venv/bin/python benchmarks/imagenet_samples.py /tmp/imagenet-samples > /tmp/imagenet-samples/labels.csv
    # or split: every 4th photo (the 2nd, 6th, ...) linked into a calibration folder, the rest labelled
    .venv/bin/python benchmarks/imagenet_samples.py /tmp/imagenet-samples --calibrate-dir /tmp/inet_calib \
        > /tmp/imagenet-samples/eval750.csv

A class's index is its WordNet id's rank among the 1,000 sorted ids (the order of every
ImageNet-1k model's outputs, and of the shipped labels). The photos come from ImageNet's
training split, which the shipped model saw: the absolute top-1 is flattering; what the gate
reads is the difference between fp32 and a candidate on the same photos.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--calibrate-dir", type=Path, help="link every 4th photo here and leave it out of the CSV")
    args = parser.parse_args()
    root = args.root
    photos = sorted(p for p in root.iterdir() if p.suffix.upper() == ".JPEG" and p.name.startswith("n"))
    wnids = sorted({p.name.split("_", 1)[0] for p in photos})
    if len(wnids) != 1000:
        raise SystemExit(f"{root}: expected photos of 1000 ImageNet classes, found {len(wnids)}")
    rank = {wnid: i for i, wnid in enumerate(wnids)}
    print("path,label")
    if args.calibrate_dir:
        args.calibrate_dir.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(photos):
        if args.calibrate_dir and i % 4 == 1:
            link = args.calibrate_dir / photo.name
            if not link.exists():
                link.symlink_to(photo.resolve())
            continue
        print(f"{photo.name},{rank[photo.name.split('_', 1)[0]]}")


if __name__ == "__main__":
    main()
