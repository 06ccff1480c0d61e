"""Offline classification of a dataset on a Ray cluster (Ray Data), with the core's own pipeline.

    rows = classify_dataset(["photos/", "more/*.jpg"], "models/shapes", address="auto")

Ray Data reads the files as bytes (``read_binary_files``: local paths, or anything Ray's
filesystems read, such as ``s3://``), and a pool of actors, each an ``ImageClassifier`` with its
own loader workers, decodes and classifies them in batches (not Ray's ``read_images``, which
decodes with PIL in tasks of its own, one image at a time). Every input file becomes exactly one
row, in input order: ``{"path", "label", "scores"}`` or, for a file that is not a readable image,
``{"path", "error", "reason"}``: a bad file never fails its block or the job. Each actor's torch
(and OpenVINO) threads are its ``num_cpus``. An actor that dies mid-job is restarted by Ray and
its batches run again: every file still gives exactly one row.
``scripts/classify.py --ray ADDRESS`` is the command line over it.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

from handler.classifier import ImageClassifier
from handler.devices import threads_for_cpus
from handler.model.files import read_model
from handler.offline import Row, as_columns, from_columns, images_per_call, row

NODE_COLUMN = "node"  # the node that classified a row: counted into ``classify_dataset``'s ``nodes``


class ClassifyBatch:
    """The actor ``map_batches`` runs: one classifier, started once, for every batch it is given."""

    def __init__(self, model: str, device: str = "auto", overrides: dict[str, Any] | None = None,
                 num_cpus: float = 1.0) -> None:
        import ray

        # The actor's CPUs decide its threads, unless the caller's overrides set them.
        self.classifier = ImageClassifier.for_serving(
            model, device=device, overrides={"intra_op_threads": threads_for_cpus(num_cpus), **(overrides or {})})
        self.node = ray.util.get_node_ip_address()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        # The offline job's rows as columns: a block holds labels and failures side by side; and
        # the node that classified them, for the job's summary.
        paths = [str(path) for path in batch["path"]]
        results = self.classifier.classify([bytes(b) for b in batch["bytes"]])
        columns = as_columns([row(path, result) for path, result in zip(paths, results)])
        columns[NODE_COLUMN] = [self.node] * len(paths)
        return columns


def classify_dataset(paths: Sequence[str], model: str | Path, *, address: str = "auto", actors: int | None = None,
                     num_cpus: float = 1.0, num_gpus: float = 0.0, rows_per_call: int | None = None,
                     device: str = "auto", overrides: dict[str, Any] | None = None,
                     nodes: Counter[str] | None = None) -> Iterator[Row]:
    """One row per file under ``paths`` (files, folders, or what Ray's filesystems read), in
    input order, classified by ``actors`` classifier actors (default: one per node) on the Ray
    cluster at ``address`` (``auto``: the running one), ``rows_per_call`` files per classifier
    call (default: the offline job's rule, ``handler.offline.images_per_call``). ``model`` must be
    readable on every node; ``overrides`` replace keys of its ``handler:`` settings. ``nodes``, if
    given, counts the rows each node classified."""
    import ray

    if rows_per_call is None:
        rows_per_call = images_per_call(read_model(model, overrides).config)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come out in input order
    pool = actors or max(1, sum(1 for node in ray.nodes() if node["Alive"]))
    files = ray.data.read_binary_files(list(paths), include_paths=True)
    blocks = files.map_batches(
        ClassifyBatch, fn_constructor_kwargs={"model": str(model), "device": device, "overrides": overrides,
                                              "num_cpus": num_cpus},
        batch_size=rows_per_call, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=pool),
        num_cpus=num_cpus, num_gpus=num_gpus)
    for block in blocks.iter_batches(batch_size=rows_per_call, batch_format="pyarrow"):
        columns = block.to_pydict()  # type: ignore[union-attr]  # a pyarrow.Table
        if nodes is not None:
            nodes.update(columns[NODE_COLUMN])
        yield from from_columns(columns)
