#!/usr/bin/env python
"""Classify image files offline: no server, no Java; the same pipeline the servers run.

    .venv/bin/python scripts/classify.py PATH... --model DIR_OR_MAR [--out results.jsonl]
                                         [--batch-size N] [--device auto|cpu|cuda]

PATH: files, folders (searched recursively for images) and globs. --model: a model directory
(index_to_name.json, weights, model-config.yaml) or a .mar archive. Writes one JSON line per
image: {"path", "label", "scores"} or {"path", "error", "reason"}; exit status 1 if any image
failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from handler.classifier import ImageClassifier, ImageError, read_model  # noqa: E402
from handler.devices import resolve_device  # noqa: E402
from handler.process import configure_process  # noqa: E402
from image_files import Progress, error_line, expand, finish, result_line, write_lines  # noqa: E402

# Images handed to the classifier per call, in forward batches: a few batches at a time keep
# the loader workers busy and the memory bounded however many files there are.
BATCHES_PER_CALL = 4


def batch_overrides(batch_size: int | None, buckets: tuple[int, ...]) -> dict:
    """Settings for ``--batch-size``: the forward batch, and batch buckets that still reach it."""
    if batch_size is None:
        return {}
    if batch_size < 1:
        raise SystemExit("classify: --batch-size must be at least 1")
    overrides: dict = {"batch_size": batch_size}
    if buckets and buckets[-1] < batch_size:
        overrides["batch_buckets"] = [b for b in buckets if b < batch_size] + [batch_size]
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files, folders or globs")
    parser.add_argument("--model", required=True, type=Path, help="a model directory or a .mar archive")
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"))
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the model's batch_size)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    args = parser.parse_args()

    paths = expand(args.paths, "classify")
    try:
        spec = read_model(args.model)
        spec = read_model(args.model, batch_overrides(args.batch_size, spec.config.batch_buckets))
        device = resolve_device(args.device)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"classify: {exc}")
    configure_process(spec.config, device=device)
    per_call = spec.config.batch_size * BATCHES_PER_CALL
    progress = Progress(len(paths))
    failed = 0
    with ImageClassifier(spec, device=device) as classifier, args.out.open("w") as out:
        for start in range(0, len(paths), per_call):
            chunk = paths[start : start + per_call]
            results = classifier.classify(chunk)
            lines = [error_line(path, r.code, r.reason) if isinstance(r, ImageError) else result_line(path, r)
                     for path, r in zip(chunk, results)]
            failed += write_lines(out, lines, progress)
    finish(len(paths), failed, args.out)


if __name__ == "__main__":
    main()
