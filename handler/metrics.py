"""Per-stage timings and counts, published as TorchServe custom metrics (declared in metrics.yaml).

GPU work is asynchronous: a stage boundary on CUDA synchronizes the device first, so each stage's
time is the time its work really took, not the time to enqueue it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

# Prometheus names: ts_<name> with labels ModelName, Level, Hostname.
STAGE_METRICS = ("DecodeTransformMs", "HostToDeviceMs", "InferenceMs", "PostprocessMs")


class StageClock:
    """Accumulates wall time per stage for one server-side batch."""

    def __init__(self, device: torch.device):
        self.ms: dict[str, float] = dict.fromkeys(STAGE_METRICS, 0.0)
        self._device = device

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name] += (time.perf_counter() - start) * 1000.0


def publish(metrics: Any, clock: StageClock, *, images: int, requests: int, bad_images: int,
            rejected: int) -> None:
    """Send one batch's figures to TorchServe's metrics cache (a no-op without one)."""
    if metrics is None:
        return
    from ts.metrics.metric_type_enum import MetricTypes

    # idx=0 tags the figures with the model (Level=Model); fresh dimension lists each call,
    # since TorchServe appends its default dimensions to the list it is given.
    for name, value in clock.ms.items():
        metrics.add_time(name, round(value, 3), idx=0, unit="ms", dimensions=[])
    for name, value in (("ImagesPerBatch", images), ("RequestsPerBatch", requests)):
        metrics.add_metric(name, value, "count", idx=0, dimensions=[], metric_type=MetricTypes.GAUGE)
    metrics.add_counter("BadImages", bad_images, idx=0, dimensions=[])
    metrics.add_counter("RejectedRequests", rejected, idx=0, dimensions=[])
