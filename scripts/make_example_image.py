#!/usr/bin/env python3
"""Draw one demo image: make_example_image.py {circle|square|triangle} OUT.png|OUT.jpg [--seed N]."""

import argparse
import random
from pathlib import Path

import harness.shapes as shapes

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("label", choices=shapes.CLASSES)
parser.add_argument("out", type=Path)
parser.add_argument("--seed", type=int, default=1)
args = parser.parse_args()
spec = shapes.random_spec(random.Random(args.seed), args.label, min_side=200, max_side=640)
shapes.draw(spec).save(args.out)
print(args.out)
