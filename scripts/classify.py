#!/usr/bin/env python
"""Classify image files offline: no server, no Java; the same pipeline the servers run.

    .venv/bin/python scripts/classify.py PATH... --model DIR_OR_MAR [--out results.jsonl|.parquet]
                                         [--batch-size N] [--device auto|cpu|cuda]
                                         [--ray ADDRESS|auto [--actors N] [--num-gpus G]]

PATH: files, folders (searched recursively for images) and globs. --model: a model directory
(index_to_name.json, weights, model-config.yaml), a timm or transformers model folder, or a .mar
archive. Writes one row per image: {"path", "label", "scores"} or {"path", "error", "reason"},
as JSON lines, or Parquet for an --out ending in .parquet (``scores`` as a JSON string); exit
status 1 if any image failed. With --ray the files are read and classified on that Ray cluster
(``auto``: the one running here) by a pool of classifier actors (``handler.doors.ray_data``).
Both runs share the offline job's rows, chunking rule and writers (``handler.offline``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from handler.classifier import ImageClassifier, ModelSpec, read_model
from handler.doors.ray_data import classify_dataset
from handler.offline import OUTPUT_SUFFIXES, RowWriter, images_per_call, row
from image_files import Progress, expand_or_exit, finish, write_rows


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
    parser.add_argument("--model", required=True, type=Path, help="a model directory or folder, or a .mar archive")
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"), help="results: .jsonl or .parquet")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the model's batch_size)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--ray", metavar="ADDRESS", help="classify on this Ray cluster (auto: the running one)")
    parser.add_argument("--actors", type=int, help="with --ray: classifier actors (default: one per node)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="with --ray: GPUs per actor")
    args = parser.parse_args()
    if args.out.suffix not in OUTPUT_SUFFIXES:
        raise SystemExit(f"classify: --out {args.out} must end in {' or '.join(OUTPUT_SUFFIXES)}")
    run = classify_on_ray if args.ray else classify_here
    failures, writer = run(args)
    finish(writer, failures)


def classify_here(args: argparse.Namespace) -> tuple[list[dict], RowWriter]:
    """The files classified in this process, a chunk at a time; the output opened once the
    files and the model are known good (a failed start leaves an earlier output as it was)."""
    paths = expand_or_exit(args.paths, "classify")
    began = time.perf_counter()
    try:
        spec = with_batch_size(read_model(args.model), args.batch_size)
        classifier = ImageClassifier.for_serving(spec, device=args.device)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"classify: {exc}")
    per_call = images_per_call(spec.config)
    progress = Progress(len(paths))
    failures = []
    ready = time.perf_counter()
    with classifier, RowWriter(args.out) as writer:
        for start in range(0, len(paths), per_call):
            chunk = paths[start : start + per_call]
            rows = [row(str(path), result) for path, result in zip(chunk, classifier.classify(chunk))]
            write_rows(writer, rows, progress)
            failures += [r for r in rows if "error" in r]
        elapsed = time.perf_counter() - ready
    # Start-up (model read, compiled batch sizes warmed up) apart from the images' own time.
    print(f"\nclassify: {len(paths)} images in {elapsed:.2f} s ({len(paths) / max(elapsed, 1e-9):.1f} images/s) "
          f"after {ready - began:.1f} s of start-up", file=sys.stderr)
    return failures, writer


def classify_on_ray(args: argparse.Namespace) -> tuple[list[dict], RowWriter]:
    """The same rows, classified on a Ray cluster: local paths expanded here, URIs as given."""
    paths = [str(p.resolve()) for p in expand_or_exit([p for p in args.paths if "://" not in p], "classify")]
    paths += [p for p in args.paths if "://" in p]
    try:
        spec = with_batch_size(read_model(args.model), args.batch_size)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"classify: {exc}")
    overrides = ({"batch_size": spec.config.batch_size, "batch_buckets": list(spec.config.batch_buckets)}
                 if args.batch_size else None)
    progress = Progress(len(paths))
    per_call = images_per_call(spec.config)
    failures, chunk = [], []
    nodes: Counter[str] = Counter()
    rows = classify_dataset(paths, args.model.resolve(), address=args.ray, actors=args.actors,
                            num_gpus=args.num_gpus, device=args.device, overrides=overrides, rows_per_call=per_call,
                            nodes=nodes)
    with RowWriter(args.out) as writer:
        for result in rows:
            chunk.append(result)
            if len(chunk) == per_call:
                write_rows(writer, chunk, progress)
                failures += [r for r in chunk if "error" in r]
                chunk = []
        write_rows(writer, chunk, progress)
    print(f"\nclassify: on {len(nodes)} Ray node{'s' if len(nodes) != 1 else ''}: "
          + ", ".join(f"{node} ({count} files)" for node, count in sorted(nodes.items())), file=sys.stderr)
    return failures + [r for r in chunk if "error" in r], writer


if __name__ == "__main__":
    main()
