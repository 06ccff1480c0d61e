"""What every door reports about the batches it serves: each metric's names, kind, unit and buckets,
defined once here. Each door exports them with its server's own mechanism (an ``Exporter``):
TorchServe's metrics cache (names declared in metrics.yaml), Prometheus (the KServe door), Ray
Serve's metrics (the Ray door).

    stage time     ms per stage of one batch (DecodeTransformMs, HostToDeviceMs, InferenceMs,
                   PostprocessMs; ``handler.metrics.STAGE_METRICS``)
    batch images   images in one batch
    batch requests requests in one batch
    bad images     images that could not be classified
    rejected       requests answered with a 4xx
    shed           requests refused with a 503 (queue full, or draining)
    expired        requests whose deadline passed before they ran (504)
    queued         requests and images admitted and not yet answered (gauges; the doors that
                   queue requests themselves: KServe, Ray Serve)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from handler.metrics import STAGE_METRICS


@dataclass(frozen=True)
class MetricSpec:
    """One metric, for every door.

    Attributes:
        name: its name where metrics are named freely (Prometheus, Ray).
        torchserve: its name in TorchServe's metrics (metrics.yaml); the stage metric is one
            TorchServe metric per stage, named after the stage.
        kind: ``histogram``, ``counter`` or ``gauge`` (TorchServe, which has no histograms, keeps the
            last value of a histogram as a gauge).
        unit: ``ms`` or ``count``.
        help: one line for a person.
        buckets: a histogram's bucket bounds.
        labels: its label names beside the model's (``model_name``).
    """

    name: str
    torchserve: str
    kind: str
    unit: str
    help: str
    buckets: tuple[float, ...] = ()
    labels: tuple[str, ...] = ()


STAGE_MS = MetricSpec("image_classifier_stage_ms", "", "histogram", "ms", "Milliseconds per stage of one batch",
                      (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000), ("stage",))
BATCH_IMAGES = MetricSpec("image_classifier_batch_images", "ImagesPerBatch", "histogram", "count",
                          "Images per batch", (1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_REQUESTS = MetricSpec("image_classifier_batch_requests", "RequestsPerBatch", "histogram", "count",
                            "Requests per batch", (1, 2, 4, 8, 16, 32, 64))
BAD_IMAGES = MetricSpec("image_classifier_bad_images", "BadImages", "counter", "count",
                        "Images that could not be classified")
REJECTED = MetricSpec("image_classifier_rejected_requests", "RejectedRequests", "counter", "count",
                      "Requests answered with a 4xx")
SHED = MetricSpec("image_classifier_shed_requests", "", "counter", "count",
                  "Requests refused with a 503: the queue was full or the server was draining")
EXPIRED = MetricSpec("image_classifier_expired_requests", "ExpiredRequests", "counter", "count",
                     "Requests whose deadline passed before they ran (504)")
QUEUED_REQUESTS = MetricSpec("image_classifier_queued_requests", "", "gauge", "count",
                             "Requests admitted and not yet answered")
QUEUED_IMAGES = MetricSpec("image_classifier_queued_images", "", "gauge", "count",
                           "Images admitted and not yet answered")
METRICS = (STAGE_MS, BATCH_IMAGES, BATCH_REQUESTS, BAD_IMAGES, REJECTED, SHED, EXPIRED, QUEUED_REQUESTS,
           QUEUED_IMAGES)


def torchserve_names() -> dict[str, str]:
    """Every TorchServe metric name and its kind there (``gauge`` or ``counter``): what
    metrics.yaml must declare."""
    names = {stage: "gauge" for stage in STAGE_METRICS}
    names.update({m.torchserve: "counter" if m.kind == "counter" else "gauge" for m in METRICS if m.torchserve})
    return names


@dataclass(frozen=True)
class BatchFigures:
    """What one served batch tells the metrics."""

    timings: dict[str, float]
    images: int
    requests: int
    bad_images: int


class Exporter(Protocol):
    """A door's way of publishing the METRICS."""

    def batch(self, figures: BatchFigures) -> None:
        """One batch's stage times, image and request counts, bad images."""

    def rejected(self, count: int) -> None:
        """``count`` more requests answered with a 4xx."""

    def refused(self, spec: MetricSpec, count: int) -> None:
        """``count`` more requests not run: ``SHED`` (503) or ``EXPIRED`` (504)."""

    def queue(self, requests: int, images: int) -> None:
        """The queue's depth now: requests and images admitted and not yet answered."""


class NoExporter:
    """Metrics go nowhere (the library alone, tests)."""

    def batch(self, figures: BatchFigures) -> None:
        pass

    def rejected(self, count: int) -> None:
        pass

    def refused(self, spec: MetricSpec, count: int) -> None:
        pass

    def queue(self, requests: int, images: int) -> None:
        pass
