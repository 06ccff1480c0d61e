"""Offline classification of a dataset on a Ray cluster (Ray Data), with the core's own pipeline.

    rows = classify_dataset(["photos/", "more/*.jpg"], "models/shapes", address="auto")

Ray Data reads the files as bytes (``read_binary_files``: local paths, or anything Ray's
filesystems read, such as ``s3://``), and a pool of actors, each an ``ImageClassifier`` with its
own loader workers, decodes and classifies them in batches (not Ray's ``read_images``, which
decodes with PIL in tasks of its own, one image at a time). Every input file becomes exactly one
row, in input order: ``{"path", "label", "scores"}`` or, for a file that is not a readable image,
``{"path", "error", "reason"}``: a bad file never fails its block or the job.
``scripts/classify.py --ray ADDRESS`` is the command line over it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from handler.classifier import ImageClassifier, ImageError

# Rows handed to one classifier call: a few forward batches, so the loader workers stay busy.
DEFAULT_ROWS_PER_CALL = 64


def result_row(path: str, scores: dict[str, float]) -> dict[str, Any]:
    """The row of a classified image: its top-1 label and top-k scores."""
    return {"path": path, "label": next(iter(scores)), "scores": scores}


def error_row(path: str, code: str, reason: str) -> dict[str, Any]:
    """The row of a file that could not be classified, with why."""
    return {"path": path, "error": code, "reason": reason}


class ClassifyBatch:
    """The actor ``map_batches`` runs: one classifier, started once, for every batch it is given."""

    def __init__(self, model: str, device: str = "auto", overrides: dict[str, Any] | None = None) -> None:
        self.classifier = ImageClassifier.for_serving(model, device=device, overrides=overrides)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        # Columns, not row dicts: a block holds labels and failures side by side (nulls where absent).
        out: dict[str, list[Any]] = {"path": [], "label": [], "scores": [], "error": [], "reason": []}
        for path, result in zip(batch["path"], self.classifier.classify([bytes(b) for b in batch["bytes"]])):
            out["path"].append(str(path))
            if isinstance(result, ImageError):
                out["label"].append(None)
                out["scores"].append(None)
                out["error"].append(result.code)
                out["reason"].append(result.reason)
            else:
                out["label"].append(next(iter(result)))
                out["scores"].append(json.dumps(result))  # one string column: any label set fits
                out["error"].append(None)
                out["reason"].append(None)
        return out


def classify_dataset(paths: Sequence[str], model: str | Path, *, address: str = "auto", actors: int | None = None,
                     num_cpus: float = 1.0, num_gpus: float = 0.0, rows_per_call: int = DEFAULT_ROWS_PER_CALL,
                     device: str = "auto", overrides: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """One row per file under ``paths`` (files, folders, or what Ray's filesystems read), in
    input order, classified by ``actors`` classifier actors (default: one per node) on the Ray
    cluster at ``address`` (``auto``: the running one). ``model`` must be readable on every node;
    ``overrides`` replace keys of its ``handler:`` settings."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come out in input order
    pool = actors or max(1, sum(1 for node in ray.nodes() if node["Alive"]))
    files = ray.data.read_binary_files(list(paths), include_paths=True)
    rows = files.map_batches(
        ClassifyBatch, fn_constructor_kwargs={"model": str(model), "device": device, "overrides": overrides}, batch_size=rows_per_call,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
        num_cpus=num_cpus, num_gpus=num_gpus)
    for row in rows.iter_rows():
        if row.get("error") is not None:
            yield error_row(row["path"], row["error"], row["reason"])
        else:
            yield result_row(row["path"], json.loads(row["scores"]))
