"""The classifier as a library: images in, top-k labels out, no server needed.

    from handler.classifier import ImageClassifier, ImageError

    with ImageClassifier.load("models/shapes") as clf:      # a model directory or a .mar
        results = clf.classify([jpeg_bytes, "photo.png", pil_image, uint8_chw_tensor])
    # one result per image, in order: {label: score} (top-k, highest first) or an ImageError

Server adapters (TorchServe's ``handler.doors.torchserve_handler``, the KServe door, ``scripts/classify.py``)
start it with ``ImageClassifier.for_serving`` (the model read, the device chosen, the
process-wide settings applied) and use ``classify_requests``: many requests at once, each
answered with its results or one request-level error, and the per-stage timings for their
metrics. Nothing here imports TorchServe. ``load`` leaves the process alone: the process-wide
settings (allocator, Pillow's pixel limit, torch threads) are ``handler.process.configure_process``'s,
called by whoever owns the process.
"""

from __future__ import annotations

import itertools
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from handler.config import HandlerConfig
from handler.decode.dataset import LoaderItem
from handler.devices import resolve_device
from handler.errors import ImageError, RequestError, error_for_images
from handler.decode.images import ImageDecodeError
from handler.decode.inputs import ImageInput, ImageLike, loader_data
from handler.metrics import StageClock
from handler.model.files import ModelSpec, read_model
from handler.pipeline import Pipeline, Prediction
from handler.process import configure_process

log = logging.getLogger(__name__)

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


class ImageClassifier:
    """A model with its persistent loader workers; ``close()`` (or ``with``) stops them.

    ``classify`` and ``classify_requests`` may be called from several threads: they are
    serialized (one runs at a time; the others wait), since one set of loader workers serves
    one batch at a time.
    """

    def __init__(self, spec: ModelSpec, *, device: str | torch.device = "auto") -> None:
        self.spec = spec
        self.config: HandlerConfig = spec.config
        self.labels: list[str] = spec.labels
        self.device = resolve_device(device)
        self._pipeline: Pipeline | None = Pipeline.start(spec.config, spec.labels, spec.weights, self.device,
                                                           artifacts=spec.artifacts)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "auto",
             overrides: Mapping[str, Any] | None = None) -> "ImageClassifier":
        """A classifier for the model directory or .mar at ``path``; ``overrides`` replace keys
        of its model-config.yaml ``handler:`` section (validated the same way)."""
        return cls(read_model(path, overrides), device=device)

    @classmethod
    def for_serving(cls, model: str | Path | ModelSpec, *, device: str | torch.device = "auto",
                    backend_workers: int = 1, overrides: Mapping[str, Any] | None = None,
                    model_yaml: Mapping[str, Any] | None = None, weights: Path | None = None) -> "ImageClassifier":
        """What every door does at start-up: read the model (a directory or a .mar; ``model_yaml``
        / ``weights`` where the server already read them; or a ModelSpec already read), choose
        the device, apply the process-wide settings (``configure_process``: this process serves
        the model, ``backend_workers`` of them on this machine) and start the classifier."""
        if isinstance(model, ModelSpec):
            if overrides or model_yaml or weights:
                raise ValueError("overrides, model_yaml and weights apply when reading a model, not to a ModelSpec")
            spec = model
        else:
            spec = read_model(model, overrides, model_yaml=model_yaml, weights=weights)
        resolved = resolve_device(device)
        configure_process(spec.config, device=resolved, backend_workers=backend_workers)
        classifier = cls(spec, device=resolved)
        log.info("classifier ready: arch=%s device=%s config=%s", spec.config.arch, resolved, spec.config)
        return classifier

    # ---- the two ways in --------------------------------------------------------------------

    def classify(self, images: Sequence[ImageLike | ImageInput]) -> list[Prediction | ImageError]:
        """One result per image, in order: its top-k ``{label: score}``, or an ImageError
        (returned, not raised) saying why it has none."""
        with self._serialized() as pipeline:
            (results,), _ = self._run(pipeline, [images])
            return results

    def classify_requests(self, requests: Sequence[Sequence[ImageLike | ImageInput]],
                          top_k: Sequence[int | None] | None = None) -> BatchResult:
        """Many requests in one pass (a server's batch): per request its predictions, or one
        RequestError listing its bad images (by position and field); the other requests are
        unaffected. ``top_k``: per request, the classes it is answered with (None: the model's
        ``top_k``); requests asking for different numbers share the batch."""
        wanted = [k or self.config.top_k for k in top_k] if top_k is not None else [self.config.top_k] * len(requests)
        if len(wanted) != len(requests):
            raise ValueError(f"top_k has {len(wanted)} entries for {len(requests)} requests")
        with self._serialized() as pipeline:
            per_request, clock = self._run(pipeline, requests, max(wanted, default=None))
            with clock.host("PostprocessMs"):
                results: list[list[Prediction] | RequestError] = []
                for mine, k in zip(per_request, wanted):
                    problems = [r for r in mine if isinstance(r, ImageError)]
                    # The batch ran with the largest k asked for; each prediction is ordered
                    # highest first, so a request's own top-k is its first k entries.
                    if problems:
                        results.append(error_for_images(problems))
                    else:
                        results.append([_first(p, k) for p in mine if not isinstance(p, ImageError)])
        bad = sum(isinstance(r, ImageError) for mine in per_request for r in mine)
        return BatchResult(results, dict(clock.ms), sum(map(len, per_request)), bad)

    def _run(self, pipeline: Pipeline, requests: Sequence[Sequence[ImageLike | ImageInput]],
             top_k: int | None = None) -> tuple[list[list[Prediction | ImageError]], StageClock]:
        """Every request's images through the pipeline in one run; per request, per image, its
        prediction or ImageError (placed at its index and field)."""
        clock = StageClock(self.device)
        items: list[LoaderItem] = []
        fields: list[list[str | None]] = []
        unreadable: dict[int, ImageError] = {}  # key -> failure before decoding
        for images in requests:
            names: list[str | None] = []
            for image in images:
                data, name = (image.data, image.field) if isinstance(image, ImageInput) else (image, None)
                key = len(items) + len(unreadable)
                names.append(name)
                try:
                    items.append(LoaderItem(key, loader_data(data, self.config.max_image_pixels)))
                except ImageDecodeError as exc:
                    unreadable[key] = ImageError(exc.code, exc.reason)
            fields.append(names)
        run = pipeline.run(items, clock, top_k)
        failures = {**unreadable, **run.failures}
        with clock.host("PostprocessMs"):
            per_request: list[list[Prediction | ImageError]] = []
            key = 0
            for names in fields:
                mine: list[Prediction | ImageError] = []
                for index, name in enumerate(names):
                    if key in failures:
                        mine.append(failures[key].at(index, name))
                    elif key in run.predictions:
                        mine.append(run.predictions[key])
                    else:
                        raise RuntimeError(f"no result for image {key}: the loader lost it")
                    key += 1
                per_request.append(mine)
        return per_request, clock

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

    def healthy(self) -> bool:
        """Whether this classifier can serve: open, with its loader workers alive. A dead worker
        is replaced here and now (as the next batch would replace it), so unhealthy means one
        that cannot be replaced, or a closed classifier. What every door's health probe answers.
        While a batch runs, the batch itself replaces dead workers: the answer is then "open"."""
        if not self._lock.acquire(blocking=False):
            return self._pipeline is not None
        try:
            pipeline = self._pipeline
            return pipeline is not None and pipeline.loader.heal()
        except Exception:
            log.exception("the image loader's workers cannot be replaced")
            return False
        finally:
            self._lock.release()

    def __enter__(self) -> "ImageClassifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _serialized(self) -> Iterator[Pipeline]:
        with self._lock:
            yield self._open()

    def _open(self) -> Pipeline:
        pipeline = self._pipeline
        if pipeline is None:
            raise ClassifierClosed("this ImageClassifier is closed; load a new one")
        return pipeline

    @property
    def classes(self) -> int:
        """How many classes the model tells apart (the largest ``top_k``)."""
        return len(self.labels)

    # For adapters and benchmarks that drive the model directly.
    @property
    def pipeline(self) -> Pipeline:
        return self._open()


def _first(prediction: Prediction, k: int) -> Prediction:
    """The ``k`` best classes of a prediction ordered highest first."""
    return prediction if len(prediction) <= k else dict(itertools.islice(prediction.items(), k))
