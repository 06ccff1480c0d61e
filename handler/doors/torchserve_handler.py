"""The TorchServe door: the one class TorchServe loads, mapping its context to the serving loop.

TorchServe requires exactly one class in the handler module. The loop is ``handler.serving``;
TorchServe's request rows, statuses and metrics are ``handler.doors.torchserve_io``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from handler.classifier import ImageClassifier
from handler.devices import select_device
from handler.serving import ServingLoop
from handler.doors.torchserve_io import TorchServeMetrics, incoming, is_describe, request_headers, respond

log = logging.getLogger(__name__)


class ImageBatchHandler:
    """Many images per request, many requests per batch; bad requests fail alone."""

    def __init__(self) -> None:
        self.initialized = False
        self.classifier: ImageClassifier | None = None
        self.loop: ServingLoop | None = None

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
        self.loop = ServingLoop(self.classifier, getattr(context, "model_name", None) or self.classifier.spec.name)
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str | bytes]:
        """One response body per request, in order; bad requests get their own 4xx status. A
        describe call (``GET /models/NAME?customized=true``) is answered with the model's health."""
        loop = self._loop()
        if is_describe(context):
            return [json.dumps({"healthy": loop.healthy()})]
        rows = [incoming(row, request_headers(context, idx)) for idx, row in enumerate(data)]
        answers = loop.serve_batch(rows, exporter=TorchServeMetrics(getattr(context, "metrics", None)))
        return respond(context, answers)

    def _loop(self) -> ServingLoop:
        assert self.loop is not None, "initialize() has not run"
        return self.loop
