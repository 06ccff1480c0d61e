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

from typing import Any, Callable

import torch

from handler.dataset import DecodedBatch

# A model batch: the keys of its images and their normalized input on the device.
ModelBatch = tuple[list[int], torch.Tensor]


class BatchAssembler:
    """Gathers decoded chunks into model batches of at most ``size`` images, in arrival order.
    The chunks' failures are not its concern: the caller reads them off each chunk."""

    def __init__(self, size: int, device: torch.device, normalize: Callable[[torch.Tensor], torch.Tensor],
                 copied_event: Callable[[], Any]) -> None:
        self.size = size
        self.device = device
        self._normalize = normalize
        self._copied_event = copied_event
        self._buffer: torch.Tensor | None = None
        self._keys: list[int] = []

    def add(self, chunk: DecodedBatch) -> list[ModelBatch]:
        """Take ``chunk`` (its slot is released here); the batches it completed."""
        pixels = chunk.pixels
        if pixels is None or not chunk.keys:
            chunk.release()
            return []
        if not self._keys and len(chunk.keys) == self.size:
            inputs = self._normalize(pixels)
            chunk.release(self._copied_event())
            return [(list(chunk.keys), inputs)]
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
        """The partial batch still waiting, if any."""
        return [self._flush()] if self._keys else []

    def _flush(self) -> ModelBatch:
        assert self._buffer is not None
        # Normalizing writes a new tensor, so the buffer may take the next chunk at once (on
        # CUDA the copies into it are ordered after this on the same stream).
        inputs = self._normalize(self._buffer[: len(self._keys)])
        keys, self._keys = self._keys, []
        return keys, inputs

    def _buffer_for(self, pixels: torch.Tensor) -> torch.Tensor:
        shape = (self.size, *pixels.shape[1:])
        if self._buffer is None or tuple(self._buffer.shape) != shape:
            self._buffer = torch.empty(shape, dtype=torch.uint8, device=self.device,
                                       memory_format=torch.channels_last)
        return self._buffer
