"""Per-stage timings of one batch (servers publish them: TorchServe's custom metrics are declared
in metrics.yaml).

GPU work is asynchronous, so device stages on CUDA are timed with CUDA events recorded on the
stream around the work: each figure is the time the GPU really spent, and taking it does not
stall the pipeline (the CPU decodes the next batch while the GPU runs this one). ``resolve``
waits for the last event once, at the end of the batch.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

# Stage names (TorchServe's Prometheus names are ts_<name>).
STAGE_METRICS = ("DecodeTransformMs", "HostToDeviceMs", "InferenceMs", "PostprocessMs")


class StageClock:
    """Accumulates milliseconds per stage for one server-side batch."""

    def __init__(self, device: torch.device):
        self.ms: dict[str, float] = dict.fromkeys(STAGE_METRICS, 0.0)
        self._cuda = device.type == "cuda"
        self._pending: list[tuple[str, Any, Any]] = []

    @contextmanager
    def host(self, name: str) -> Iterator[None]:
        """Wall time of CPU-side work (or of waiting for it, e.g. for the loader workers)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] += (time.perf_counter() - start) * 1000.0

    @contextmanager
    def device(self, name: str) -> Iterator[None]:
        """Time of work on the model's device: CUDA events on a GPU, wall time on the CPU."""
        if not self._cuda:
            with self.host(name):
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._pending.append((name, start, end))

    def add_events(self, name: str, start: Any, end: Any) -> None:
        """Count the device time between two CUDA events recorded elsewhere under ``name``."""
        self._pending.append((name, start, end))

    def resolve(self) -> None:
        """Wait for the device stages recorded so far and add them up (one synchronization)."""
        if self._pending:
            self._pending[-1][2].synchronize()
        for name, start, end in self._pending:
            self.ms[name] += start.elapsed_time(end)
        self._pending.clear()

