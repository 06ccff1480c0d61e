"""The accuracy gate: top-1 accuracy on labelled held-out images, fp32 against each candidate
precision × runtime, each run as served (the classifier's own decode, compile or conversion).

    labelled_images(source, labels)   a folder per label, or a CSV of ``path,label`` -> (path, class)
    evaluate(spec, images, candidates) -> GateRecord (``handler.model.records``)
    calibration_batches(config, ...)  images -> model input batches for int8 calibration

Used by ``scripts/build_mar.py --eval`` (the record goes into the archive) and ``scripts/gate.py``
(the record goes beside a model folder's weights).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from handler.classifier import ImageClassifier
from handler.config import HandlerConfig
from handler.decode.images import ImageDecodeError
from handler.decode.path import model_inputs
from handler.errors import ImageError
from handler.model.files import ModelSpec
from handler.model.records import Candidate, GateRecord, compare, weights_sha256
from handler.offline import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

# Images classified per call while evaluating (bounded memory; the classifier batches inside).
CHUNK = 64
# Fewer labelled images than this and the gate refuses to speak: its bound would be meaningless.
MIN_IMAGES = 50
# Calibration images used at most (the first, sorted by path), and per calibration batch.
MAX_CALIBRATION_IMAGES = 1024
CALIBRATION_BATCH = 32


def calibration_batches(config: HandlerConfig, images: Sequence[bytes],
                        skipped: Callable[[str], None]) -> list[torch.Tensor]:
    """Normalized model input of ``images`` (the handler's own preprocessing), in batches of at
    least 2 images, for int8 calibration. An unreadable image is skipped and ``skipped`` told
    why; fewer than 2 readable images is a ValueError."""
    inputs = []
    for data in images[:MAX_CALIBRATION_IMAGES]:
        try:
            inputs.append(model_inputs(config, [data]))
        except ImageDecodeError as exc:  # one unreadable file does not spoil a calibration set
            skipped(exc.reason)
    if len(inputs) < 2:
        raise ValueError("fewer than 2 readable calibration images")
    return [c for c in torch.cat(inputs).split(CALIBRATION_BATCH) if len(c) >= 2]


def labelled_images(source: Path, labels: Sequence[str]) -> list[tuple[Path, int]]:
    """The labelled images of ``source``: a directory with one sub-folder per label (named by
    the label or its class index), or a CSV file of ``path,label`` rows (paths relative to the
    CSV's folder; a header row is allowed). ValueError naming what does not fit the model."""
    index = _label_index(labels)
    pairs: list[tuple[Path, str]] = []
    if source.is_dir():
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            pairs += [(f, folder.name) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    elif source.is_file():
        with source.open(newline="") as f:
            for number, row in enumerate(csv.reader(f), 1):
                if not row or (number == 1 and row[-1].strip().lower() == "label"):
                    continue
                if len(row) != 2:
                    raise ValueError(f"{source}:{number}: expected 'path,label', got {row!r}")
                pairs.append(((source.parent / row[0].strip()), row[1].strip()))
    else:
        raise ValueError(f"--eval {source}: neither a folder of label folders nor a CSV file")
    found: list[tuple[Path, int]] = []
    for path, label in pairs:
        if label not in index:
            raise ValueError(f"--eval {source}: label {label!r} ({path.name}) is not one of the model's "
                             f"{len(labels)} labels (nor a class index)")
        found.append((path, index[label]))
    if len(found) < MIN_IMAGES:
        raise ValueError(f"--eval {source}: {len(found)} labelled images; the gate needs at least {MIN_IMAGES} "
                         "(better a thousand: the bound it reports shrinks with the count)")
    return found


def _label_index(labels: Sequence[str]) -> dict[str, int]:
    """Label name or class index (as text) -> class. A name given to two classes means the first
    (ImageNet has two 'crane's): an answer is judged by its name, so either counts."""
    index = {str(i): i for i in range(len(labels))}
    for i, name in enumerate(labels):
        index.setdefault(name, i)
    return index


def evaluate(spec: ModelSpec, images: Sequence[tuple[Path, int]], candidates: Sequence[tuple[str, str]],
             source: str, *, progress: Callable[[str], None] = log.info) -> GateRecord:
    """fp32 (torch) and each ``(precision, runtime)`` candidate on the labelled ``images``, each
    classifier started as a server starts it (``precision`` and ``runtime`` set, compiled or
    converted); the figures as a GateRecord for ``spec``'s weights. Images that do not decode
    are left out of every figure (and said)."""
    weights_hash = weights_sha256(spec.weights)
    labels = _label_index(spec.labels)
    reference = _answers(spec, "fp32", "torch", images, labels, weights_hash)
    kept = [i for i, answer in enumerate(reference) if answer is not None]
    if len(kept) < len(images):
        progress(f"{len(images) - len(kept)} of {len(images)} images do not decode: left out")
    truth = [images[i][1] for i in kept]
    ref = [reference[i] for i in kept]
    assert all(r is not None for r in ref)
    fp32 = [(r[0], r[1]) for r in ref if r is not None]
    fp32_top1 = sum(a == t for (a, _), t in zip(fp32, truth)) / len(kept)
    progress(f"fp32 torch: top-1 {fp32_top1:.2%} on {len(kept)} images from {source}")
    results: list[Candidate] = []
    for precision, runtime in candidates:
        answers = _answers(spec, precision, runtime, images, labels, weights_hash)
        got = [answers[i] for i in kept]
        if any(a is None for a in got):
            raise RuntimeError(f"{runtime} {precision} failed on images fp32 decoded")
        artifact = (spec.artifacts.int8_sha256(runtime) or "") if precision == "int8" else ""
        result = compare(precision, runtime, truth, fp32, [a[0] for a in got if a is not None], artifact)
        progress(result.summary(len(kept), fp32_top1))
        results.append(result)
    return GateRecord(weights_hash, len(kept), source, round(fp32_top1, 6), tuple(results))


def _answers(spec: ModelSpec, precision: str, runtime: str, images: Sequence[tuple[Path, int]],
             labels: dict[str, int], weights_hash: str) -> list[tuple[int, float] | None]:
    """Each image's top-1 class and its probability (None: it did not decode), served in
    ``precision`` on ``runtime``. The classifier must run what it is asked, not fall back: a
    candidate that cannot run here is an error."""
    config = dataclasses.replace(spec.config, precision=precision, runtime=runtime, top_k=1,
                                 batch_buckets=(spec.config.batch_size,))
    # The record being measured does not exist yet; int8's program is trusted for this run only
    # (it was made from these weights by the caller).
    provisional = GateRecord(weights_hash, 0, "provisional", 0.0, (
        Candidate("int8", runtime, 0.0, 0, 0, 0, 0.0, 0.0, True, spec.artifacts.int8_sha256(runtime) or ""),)
    ) if precision == "int8" else None
    run = dataclasses.replace(spec, config=config, gate_record=provisional)
    out: list[tuple[int, float] | None] = []
    with ImageClassifier(run, device="cpu") as clf:
        ran = (clf.pipeline.runner.precision, clf.pipeline.runner.runtime)
        if ran != (precision, runtime):
            raise RuntimeError(f"asked for {runtime} {precision}, the classifier runs {ran[1]} {ran[0]} "
                               "(its log says why)")
        for start in range(0, len(images), CHUNK):
            chunk = [str(path) for path, _ in images[start:start + CHUNK]]
            for result in clf.classify(chunk):
                if isinstance(result, ImageError):
                    out.append(None)
                else:
                    label, score = next(iter(result.items()))
                    out.append((labels[label], score))
    return out
