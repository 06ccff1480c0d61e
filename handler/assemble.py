"""Decoded chunks -> model batches of ``batch_size`` images, normalized on the model's device.

The loader splits a request so that every worker gets a share (``ceil(n / workers)`` images
each), nvJPEG batches and CPU leftovers arrive mixed, and a server-side batch ends in a
remainder: chunks are often smaller than a forward pass wants. A GPU needs full batches (a
forward pass of 6 images costs nearly what one of 64 does), so chunks are gathered here: each
is copied into a reusable uint8 buffer on the device as it arrives (its staging slot is free
again once the copy is done) and a batch leaves as soon as the buffer is full. A chunk that is
a whole batch by itself, with nothing waiting, goes through without the extra copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from handler.dataset import DecodedBatch


@dataclass
class ModelBatch:
    """Normalized model input for ``keys`` (None when the chunks held no good image), and the
    failures that arrived with them."""

    keys: list[int]
    inputs: torch.Tensor | None
    failures: dict[int, tuple[int, str]] = field(default_factory=dict)


class BatchAssembler:
    """Gathers decoded chunks into model batches of at most ``size`` images, in arrival order."""

    def __init__(self, size: int, device: torch.device, normalize: Callable[[torch.Tensor], torch.Tensor],
                 copied_event: Callable[[], Any]) -> None:
        self.size = size
        self.device = device
        self._normalize = normalize
        self._copied_event = copied_event
        self._buffer: torch.Tensor | None = None
        self._keys: list[int] = []
        self._failures: dict[int, tuple[int, str]] = {}

    def add(self, chunk: DecodedBatch) -> list[ModelBatch]:
        """Take ``chunk`` (its slot is released here); the batches it completed."""
        self._failures.update(chunk.failures)
        pixels = chunk.pixels
        if pixels is None or not chunk.keys:
            chunk.release()
            return []
        if not self._keys and len(chunk.keys) == self.size:
            inputs = self._normalize(pixels)
            chunk.release(self._copied_event())
            return [ModelBatch(list(chunk.keys), inputs, self._take_failures())]
        ready: list[ModelBatch] = []
        buffer = self._buffer_for(pixels)
        start = 0
        while start < len(chunk.keys):
            take = min(len(chunk.keys) - start, self.size - len(self._keys))
            filled = len(self._keys)
            # From a page-locked slot this is an asynchronous copy; the event below marks it done.
            buffer[filled : filled + take].copy_(pixels[start : start + take], non_blocking=True)
            self._keys.extend(chunk.keys[start : start + take])
            start += take
            if len(self._keys) == self.size:
                ready.append(self._flush())
        chunk.release(self._copied_event())
        return ready

    def finish(self) -> list[ModelBatch]:
        """The partial batch still waiting, and failures no batch has carried yet."""
        if self._keys:
            return [self._flush()]
        if self._failures:
            return [ModelBatch([], None, self._take_failures())]
        return []

    def _flush(self) -> ModelBatch:
        assert self._buffer is not None
        # Normalizing writes a new tensor, so the buffer may take the next chunk at once (on
        # CUDA the copies into it are ordered after this on the same stream).
        inputs = self._normalize(self._buffer[: len(self._keys)])
        batch = ModelBatch(self._keys, inputs, self._take_failures())
        self._keys = []
        return batch

    def _take_failures(self) -> dict[int, tuple[int, str]]:
        failures, self._failures = self._failures, {}
        return failures

    def _buffer_for(self, pixels: torch.Tensor) -> torch.Tensor:
        shape = (self.size, *pixels.shape[1:])
        if self._buffer is None or tuple(self._buffer.shape) != shape:
            self._buffer = torch.empty(shape, dtype=torch.uint8, device=self.device,
                                       memory_format=torch.channels_last)
        return self._buffer
