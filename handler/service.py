"""The TorchServe handler: the one class TorchServe loads, mapping its context to the core.

TorchServe requires exactly one class in the handler module. The pipeline is
``handler.classifier``; TorchServe's request rows, statuses and metrics are ``handler.torchserve_io``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from handler.classifier import BatchResult, ImageClassifier, Job
from handler.devices import select_device
from handler.errors import RequestError
from handler.model_files import read_model
from handler.process import configure_process
from handler.protocols import ParsedRequest
from handler.torchserve_io import parse_row, publish, request_headers, respond

log = logging.getLogger(__name__)


class ImageBatchHandler:
    """Many images per request, many requests per batch; bad requests fail alone."""

    def __init__(self) -> None:
        self.initialized = False
        self.classifier: ImageClassifier | None = None

    def initialize(self, context: Any) -> None:
        """Read the model TorchServe unpacked, apply the process settings, start the classifier
        (its loader workers fork before the model is loaded onto the worker's device)."""
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        model_yaml = getattr(context, "model_yaml_config", None) or {}
        spec = read_model(model_dir, model_yaml=model_yaml,
                          weights=model_dir / context.manifest["model"]["serializedFile"])
        device = select_device(properties.get("gpu_id"))
        configure_process(spec.config, device=device, backend_workers=model_yaml.get("maxWorkers", 1))
        self.classifier = ImageClassifier(spec, device=device)
        self.initialized = True
        log.info("handler ready: arch=%s device=%s config=%s", spec.config.arch, device, spec.config)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str | bytes]:
        """One response body per request, in order; bad requests get their own 4xx status."""
        parsed, job = self.preprocess(data, context)
        return self.postprocess(parsed, self.inference(job), context)

    def preprocess(self, data: list[dict[str, Any]], context: Any) -> tuple[list[ParsedRequest | RequestError], Job]:
        """Each row -> its images (or its 4xx), all of them into the core's Dataset and
        persistent pinned DataLoader, whose workers start decoding at once."""
        assert self.classifier is not None, "initialize() has not run"
        limit = self.classifier.config.max_images_per_request
        parsed = [parse_row(row, limit, request_headers(context, idx)) for idx, row in enumerate(data)]
        return parsed, self.classifier.preprocess([p.images for p in parsed if isinstance(p, ParsedRequest)])

    def inference(self, job: Job) -> Job:
        """Decoded batches through the model as they arrive."""
        assert self.classifier is not None, "initialize() has not run"
        return self.classifier.inference(job)

    def postprocess(self, parsed: list[ParsedRequest | RequestError], job: Job, context: Any) -> list[str | bytes]:
        """Top-k per image, regrouped per request, answered in each request's format; metrics."""
        assert self.classifier is not None, "initialize() has not run"
        result: BatchResult = self.classifier.postprocess(job)
        start = time.perf_counter()
        bodies, rejected = respond(context, parsed, result, getattr(context, "model_name", None))
        result.timings["PostprocessMs"] += (time.perf_counter() - start) * 1000.0
        publish(getattr(context, "metrics", None), result, requests=len(parsed), rejected=rejected)
        return bodies
