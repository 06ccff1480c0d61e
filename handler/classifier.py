"""The classifier as a library: images in, top-k labels out, no server needed.

    from handler.classifier import ImageClassifier, ImageError

    with ImageClassifier.load("models/shapes") as clf:      # a model directory or a .mar
        results = clf.classify([jpeg_bytes, "photo.png", pil_image, uint8_chw_tensor])
    # one result per image, in order: {label: score} (top-k, highest first) or an ImageError

Server adapters (TorchServe's ``handler.service``, the KServe door) use ``classify_requests``:
many requests at once, each answered with its results or one request-level error, and the
per-stage timings for their metrics. Nothing here imports TorchServe. Process-wide settings
(allocator, Pillow's pixel limit, torch threads) are ``handler.process.configure_process``'s,
called by whoever owns the process.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from handler.config import HandlerConfig
from handler.dataset import DecodedBatch, LoaderItem
from handler.devices import resolve_device
from handler.errors import ImageError, RequestError, error_for_images
from handler.images import ImageDecodeError
from handler.inputs import ImageInput, ImageLike, loader_data
from handler.metrics import StageClock
from handler.model_files import ModelSpec, read_model
from handler.pipeline import Pipeline, Prediction, Scores

__all__ = ["BatchResult", "ClassifierClosed", "ImageClassifier", "ImageError", "ImageInput", "ModelSpec",
           "Prediction", "RequestError", "read_model"]


class ClassifierClosed(RuntimeError):
    """The classifier was closed; load a new one."""


@dataclass
class BatchResult:
    """What ``classify_requests`` returns.

    Attributes:
        results: per request, in order: its predictions (one per image, in order), or the
            RequestError (400, or 413 for an oversized image) naming its bad images.
        timings: milliseconds per stage (DecodeTransformMs, HostToDeviceMs, InferenceMs,
            PostprocessMs).
        images: images in the batch; bad_images: how many of them failed.
    """

    results: list[list[Prediction] | RequestError]
    timings: dict[str, float]
    images: int
    bad_images: int


@dataclass
class Job:
    """One batch of requests on its way through the stages (preprocess -> inference ->
    postprocess). Request ``r`` holds the items ``starts[r]:starts[r + 1]``."""

    items: list[LoaderItem]
    fields: list[str | None]
    starts: list[int]
    clock: StageClock
    failures: dict[int, ImageError] = field(default_factory=dict)  # key -> failure before decoding
    batches: Iterator[DecodedBatch] | None = None
    scores: Scores | None = None


class ImageClassifier:
    """A model with its persistent loader workers; ``close()`` (or ``with``) stops them.

    ``classify`` and ``classify_requests`` may be called from several threads: they are
    serialized (one runs at a time; the others wait), since one set of loader workers serves
    one batch at a time. The stage methods ``preprocess`` / ``inference`` / ``postprocess`` are
    for an adapter that is the classifier's only caller (TorchServe's handler thread).
    """

    def __init__(self, spec: ModelSpec, *, device: str | torch.device = "auto") -> None:
        self.spec = spec
        self.config: HandlerConfig = spec.config
        self.labels: list[str] = spec.labels
        self.device = resolve_device(device)
        self._pipeline: Pipeline | None = Pipeline(spec.config, spec.labels, spec.weights, self.device)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "auto",
             overrides: Mapping[str, Any] | None = None) -> "ImageClassifier":
        """A classifier for the model directory or .mar at ``path``; ``overrides`` replace keys
        of its model-config.yaml ``handler:`` section (validated the same way)."""
        return cls(read_model(path, overrides), device=device)

    # ---- the two ways in --------------------------------------------------------------------

    def classify(self, images: Sequence[ImageLike | ImageInput]) -> list[Prediction | ImageError]:
        """One result per image, in order: its top-k ``{label: score}``, or an ImageError
        (returned, not raised) saying why it has none."""
        with self._serialized():
            job = self.inference(self.preprocess([images]))
            with job.clock.host("PostprocessMs"):
                return self._per_image(job)

    def classify_requests(self, requests: Sequence[Sequence[ImageLike | ImageInput]]) -> BatchResult:
        """Many requests in one pass (a server's batch): per request its predictions, or one
        RequestError listing its bad images; the other requests are unaffected."""
        with self._serialized():
            return self.postprocess(self.inference(self.preprocess(requests)))

    # ---- stages -----------------------------------------------------------------------------

    def preprocess(self, requests: Sequence[Sequence[ImageLike | ImageInput]]) -> Job:
        """The requests' images as one list of loader items, dispatched to the persistent
        DataLoader's workers (decoding starts now; batches are consumed by ``inference``)."""
        pipeline = self._open()
        job = Job([], [], [0], StageClock(self.device))
        for images in requests:
            for image in images:
                data, name = (image.data, image.field) if isinstance(image, ImageInput) else (image, None)
                key = len(job.fields)
                job.fields.append(name)
                try:
                    job.items.append(LoaderItem(key, loader_data(data, self.config.max_image_pixels)))
                except ImageDecodeError as exc:
                    job.failures[key] = ImageError(exc.code, exc.reason)
            job.starts.append(len(job.fields))
        job.batches = pipeline.decode(job.items)
        return job

    def inference(self, job: Job) -> Job:
        """Batches to the model as the workers deliver them; the outputs stay on the device."""
        assert job.batches is not None, "preprocess() first"
        pipeline = self._open()
        job.scores = pipeline.infer(job.batches, job.clock)
        job.batches = None
        job.clock.resolve()  # the device is done: what follows is postprocessing's own time
        return job

    def postprocess(self, job: Job) -> BatchResult:
        """Top-k per image, grouped back per request; a request with a bad image gets one
        RequestError naming each bad image (by position and field)."""
        with job.clock.host("PostprocessMs"):
            per_image = self._per_image(job)
            results: list[list[Prediction] | RequestError] = []
            for start, end in zip(job.starts, job.starts[1:]):
                mine = per_image[start:end]
                problems = [r for r in mine if isinstance(r, ImageError)]
                results.append(error_for_images(problems) if problems else mine)  # type: ignore[arg-type]
        bad = sum(isinstance(r, ImageError) for r in per_image)
        return BatchResult(results, dict(job.clock.ms), len(per_image), bad)

    def _per_image(self, job: Job) -> list[Prediction | ImageError]:
        assert job.scores is not None, "inference() first"
        predictions = self._open().top_k(job.scores)
        failures = {**job.failures, **job.scores.failures}
        out: list[Prediction | ImageError] = []
        for start, end in zip(job.starts, job.starts[1:]):
            for key in range(start, end):
                if key in failures:
                    out.append(failures[key].at(key - start, job.fields[key]))
                elif key in predictions:
                    out.append(predictions[key])
                else:
                    raise RuntimeError(f"no result for image {key}: the loader lost it")
        return out

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the loader workers and free their shared memory. Idempotent; any later call
        raises ClassifierClosed."""
        with self._lock:
            pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.close()

    @property
    def closed(self) -> bool:
        return self._pipeline is None

    def __enter__(self) -> "ImageClassifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _serialized(self) -> Iterator[None]:
        with self._lock:
            self._open()
            yield

    def _open(self) -> Pipeline:
        pipeline = self._pipeline
        if pipeline is None:
            raise ClassifierClosed("this ImageClassifier is closed; load a new one")
        return pipeline

    # For adapters and benchmarks that drive the model directly.
    @property
    def pipeline(self) -> Pipeline:
        return self._open()
