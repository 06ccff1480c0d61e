#!/usr/bin/env python
"""Classify image files offline: no server, no Java; the same pipeline the servers run.

    .venv/bin/python scripts/classify.py PATH... --model DIR_OR_MAR [--out results.jsonl|.parquet]
                                         [--batch-size N] [--device auto|cpu|cuda]
                                         [--ray ADDRESS|auto [--actors N] [--num-gpus G]]

PATH: files, folders (searched recursively for images) and globs. --model: a model directory
(index_to_name.json, weights, model-config.yaml) or a .mar archive. Writes one JSON line per
image: {"path", "label", "scores"} or {"path", "error", "reason"}; exit status 1 if any image
failed. With --ray the files are read and classified on that Ray cluster (``auto``: the one
running here) by a pool of classifier actors (``handler.doors.ray_data``); the rows are the same. An
--out ending in .parquet writes Parquet (``scores`` as a JSON string) instead of JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from handler.classifier import ImageClassifier, ImageError, ModelSpec, read_model
from handler.doors.ray_data import classify_dataset
from image_files import Progress, error_line, expand, finish, result_line, write_lines

# Images handed to the classifier per call, in forward batches: a few batches at a time keep
# the loader workers busy and the memory bounded however many files there are.
BATCHES_PER_CALL = 4


def with_batch_size(spec: ModelSpec, batch_size: int | None) -> ModelSpec:
    """``spec`` with ``--batch-size`` as its forward batch, and batch buckets that still reach it
    (validated as the config file's own keys are)."""
    if batch_size is None:
        return spec
    if batch_size < 1:
        raise SystemExit("classify: --batch-size must be at least 1")
    buckets = spec.config.batch_buckets
    if buckets and buckets[-1] < batch_size:
        buckets = tuple(b for b in buckets if b < batch_size) + (batch_size,)
    return replace(spec, config=replace(spec.config, batch_size=batch_size, batch_buckets=buckets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files, folders or globs")
    parser.add_argument("--model", required=True, type=Path, help="a model directory or a .mar archive")
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"))
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the model's batch_size)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--ray", metavar="ADDRESS", help="classify on this Ray cluster (auto: the running one)")
    parser.add_argument("--actors", type=int, help="with --ray: classifier actors (default: one per node)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="with --ray: GPUs per actor")
    args = parser.parse_args()

    if args.ray:
        classify_on_ray(args)
        return
    if args.out.suffix == ".parquet":
        raise SystemExit("classify: Parquet output is written with --ray; without it, use .jsonl")
    paths = expand(args.paths, "classify")
    began = time.perf_counter()
    try:
        spec = with_batch_size(read_model(args.model), args.batch_size)
        classifier = ImageClassifier.for_serving(spec, device=args.device)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"classify: {exc}")
    per_call = spec.config.batch_size * BATCHES_PER_CALL
    progress = Progress(len(paths))
    failed = 0
    ready = time.perf_counter()
    with classifier, args.out.open("w") as out:
        for start in range(0, len(paths), per_call):
            chunk = paths[start : start + per_call]
            results = classifier.classify(chunk)
            lines = [error_line(path, r.code, r.reason) if isinstance(r, ImageError) else result_line(path, r)
                     for path, r in zip(chunk, results)]
            failed += write_lines(out, lines, progress)
        elapsed = time.perf_counter() - ready
    # Start-up (model read, compiled batch sizes warmed up) apart from the images' own time.
    print(f"\nclassify: {len(paths)} images in {elapsed:.2f} s ({len(paths) / max(elapsed, 1e-9):.1f} images/s) "
          f"after {ready - began:.1f} s of start-up", file=sys.stderr)
    finish(len(paths), failed, args.out)


def classify_on_ray(args: argparse.Namespace) -> None:
    """The same rows, classified on a Ray cluster: local paths expanded here, URIs as given."""
    paths = [str(p.resolve()) for p in expand([p for p in args.paths if "://" not in p], "classify")]
    paths += [p for p in args.paths if "://" in p]
    try:
        spec = with_batch_size(read_model(args.model), args.batch_size)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"classify: {exc}")
    overrides = ({"batch_size": spec.config.batch_size, "batch_buckets": list(spec.config.batch_buckets)}
                 if args.batch_size else None)
    rows = list(classify_dataset(paths, args.model.resolve(), address=args.ray, actors=args.actors,
                                 num_gpus=args.num_gpus, device=args.device, overrides=overrides))
    failures = [row for row in rows if "error" in row]
    if args.out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {key: [row.get(key) for row in rows] for key in ("path", "label", "error", "reason")}
        columns["scores"] = [json.dumps(row["scores"]) if "scores" in row else None for row in rows]
        pq.write_table(pa.table(columns), args.out)
    else:
        with args.out.open("w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    finish(len(rows), len(failures), args.out, failures)


if __name__ == "__main__":
    main()
