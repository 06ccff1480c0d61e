"""The TorchServe handler: the one class TorchServe loads, mapping its context to the core.

TorchServe requires exactly one class in the handler module. The pipeline is
``handler.classifier``; TorchServe's request rows, statuses and metrics are ``handler.torchserve_io``;
the wire formats are ``handler.protocols``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from handler.classifier import BatchResult, ImageClassifier
from handler.devices import select_device
from handler.errors import RequestError
from handler.protocols import ParsedRequest
from handler.torchserve_io import parse_row, publish, request_headers, respond

log = logging.getLogger(__name__)


class ImageBatchHandler:
    """Many images per request, many requests per batch; bad requests fail alone."""

    def __init__(self) -> None:
        self.initialized = False
        self.classifier: ImageClassifier | None = None

    def initialize(self, context: Any) -> None:
        """Start the classifier on the model TorchServe unpacked, on the GPU it assigned (its
        loader workers fork before the model is loaded onto the device)."""
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        model_yaml = getattr(context, "model_yaml_config", None) or {}
        self.classifier = ImageClassifier.for_serving(
            model_dir, device=select_device(properties.get("gpu_id")),
            backend_workers=model_yaml.get("maxWorkers", 1), model_yaml=model_yaml,
            weights=model_dir / context.manifest["model"]["serializedFile"])
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str | bytes]:
        """One response body per request, in order; bad requests get their own 4xx status."""
        parsed = self.preprocess(data, context)
        return self.postprocess(parsed, self.inference(parsed), context)

    def preprocess(self, data: list[dict[str, Any]], context: Any) -> list[ParsedRequest | RequestError]:
        """Each row -> its images and how to answer it, or the 4xx that rejects it."""
        limit = self._classifier().config.max_images_per_request
        return [parse_row(row, limit, request_headers(context, idx)) for idx, row in enumerate(data)]

    def inference(self, parsed: list[ParsedRequest | RequestError]) -> BatchResult:
        """The readable requests' images through the core in one pass: decoded by the persistent
        workers, batched to the model as they arrive, top-k per image."""
        return self._classifier().classify_requests([p.images for p in parsed if isinstance(p, ParsedRequest)])

    def postprocess(self, parsed: list[ParsedRequest | RequestError], result: BatchResult, context: Any,
                    ) -> list[str | bytes]:
        """Each request answered in its own format (or with its error); metrics."""
        start = time.perf_counter()
        bodies, rejected = respond(context, parsed, result, getattr(context, "model_name", None))
        result.timings["PostprocessMs"] += (time.perf_counter() - start) * 1000.0
        publish(getattr(context, "metrics", None), result, requests=len(parsed), rejected=rejected)
        return bodies

    def _classifier(self) -> ImageClassifier:
        assert self.classifier is not None, "initialize() has not run"
        return self.classifier
