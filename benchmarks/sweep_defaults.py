#!/usr/bin/env python
"""Time one request through ``classify_requests`` for every combination of handler settings, each
in a fresh process, in interleaved rounds: how the shipped defaults were chosen.

    .venv/bin/python benchmarks/sweep_defaults.py --grid batch_size=16,32 intra_op_threads=1,2 compile=false,auto \\
        [--arch mobilenet_v3_small] [--size 640x480] [--images 32] [--rounds 2]
    .venv/bin/python benchmarks/sweep_defaults.py --grid precision=fp32,bf16 --arch resnet50

A setting may be any handler key (``precision=fp32,bf16,auto``: each row also says which precision
the model ran in; int8 needs an archive with a calibrated program, see build_mar.py --calibrate).

Values are JSON (false, "auto" may be written bare). Prints ms per request (median of 15 after a
warm-up) per round; compilation happens before the timing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word: auto, fp32, ...


def one_setting(settings: dict, model_dir: Path, size: str, images: int) -> dict:
    """Runs in a child process: the classifier set up as a server worker, then timed."""

    from harness.bench_images import photo_jpegs
    from handler.classifier import ImageClassifier
    from harness.timing import time_requests

    with ImageClassifier.for_serving(model_dir, device="cpu", overrides=settings) as classifier:
        timed = time_requests(classifier, photo_jpegs(size, images), 15, encoding="form")
        ran_in = classifier.pipeline.precision
    return {"ran_in": ran_in, "ms": round(timed["seconds"] * 1000, 1), "inference_ms": round(timed["InferenceMs"], 1),
            "decode_wait_ms": round(timed["DecodeTransformMs"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2")
    parser.add_argument("--arch", default="mobilenet_v3_small")
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        settings, model_dir = json.loads(args.child)
        print(json.dumps(one_setting(settings, Path(model_dir), args.size, args.images)))
        return
    from harness.model_dirs import random_model_dir

    keys, choices = zip(*((k, [parse_value(v) for v in vs.split(",")]) for k, vs in (g.split("=", 1) for g in args.grid)))
    grid = [{"arch": args.arch, **dict(zip(keys, combo))} for combo in itertools.product(*choices)]
    model_dir = random_model_dir(Path(tempfile.mkdtemp(prefix="sweep_")) / "model", args.arch)
    results: dict[int, list] = {i: [] for i in range(len(grid))}
    for round_ in range(args.rounds):  # alternate the order: machine noise hits all alike
        order = list(range(len(grid))) if round_ % 2 == 0 else list(reversed(range(len(grid))))
        for i in order:
            child = json.dumps([grid[i], str(model_dir)])
            run = subprocess.run([sys.executable, __file__, "--grid", "x=0", "--child", child, "--size", args.size,
                                  "--images", str(args.images)], capture_output=True, text=True)
            lines = run.stdout.strip().splitlines()
            results[i].append(json.loads(lines[-1]) if run.returncode == 0 and lines else {"error": run.stderr[-300:]})
            print(json.dumps({"round": round_, **grid[i], **results[i][-1]}), flush=True)
    print("\n| " + " | ".join(keys) + " | ms per request (per round) |\n|" + "---|" * (len(keys) + 1))
    for i, settings in enumerate(grid):
        cells = " / ".join(str(r.get("ms", "error")) for r in results[i])
        print("| " + " | ".join(json.dumps(settings[k]) for k in keys) + f" | {cells} |")


if __name__ == "__main__":
    main()
