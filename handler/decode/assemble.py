"""Decoded chunks -> model batches on the device: one iterable, in the shape of timm's PrefetchLoader.

The loader splits a request so that every worker gets a share (``ceil(n / workers)`` images
each), nvJPEG batches and CPU leftovers arrive mixed, and a server-side batch ends in a
remainder: chunks are often smaller than a forward pass wants. A GPU needs full batches (a
forward pass of a few images costs nearly what a full one does), so chunks are gathered here:
each is copied into a reusable uint8 buffer on the device as it arrives (its ring slot is free
again once the copy is done) and a batch leaves, normalized, as soon as the buffer is full. A
chunk that is a whole batch by itself, with nothing waiting, goes through without the extra copy.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from handler.decode.dataset import DecodedBatch
from handler.devices import copied_event
from handler.errors import ImageError
from handler.metrics import StageClock

# A model batch: the keys of its images and their normalized input on the device.
ModelBatch = tuple[list[int], torch.Tensor]


class DeviceBatches:
    """Model batches of at most ``size`` images, in arrival order, from decoded ``chunks``.

    Iterating pulls chunks as the loader delivers them (timed as ``DecodeTransformMs`` on
    ``clock``; the copies and normalization as ``HostToDeviceMs``) and yields each batch as soon
    as it is complete. The chunks' failed images are collected in ``failures`` (by key).
    """

    def __init__(self, chunks: Iterable[DecodedBatch], *, size: int, device: torch.device,
                 normalize: Callable[[torch.Tensor], torch.Tensor], clock: StageClock | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        self.device = device
        self.failures: dict[int, ImageError] = {}
        self._chunks = chunks
        self._normalize = normalize
        self._clock = clock if clock is not None else StageClock(device)
        self._buffer: torch.Tensor | None = None
        self._keys: list[int] = []

    def __iter__(self) -> Iterator[ModelBatch]:
        clock = self._clock
        pending = iter(self._chunks)
        while True:
            with clock.host("DecodeTransformMs"):  # waiting for the loader workers
                chunk = next(pending, None)
            if chunk is not None:
                self.failures.update(chunk.failures)
                if chunk.device_events is not None:  # decoded on the GPU: device time
                    clock.add_events("DecodeTransformMs", *chunk.device_events)
            with clock.device("HostToDeviceMs"):
                ready = self._finish() if chunk is None else self._add(chunk)
            yield from ready  # outside the timer: the consumer's work is not ours
            if chunk is None:
                return

    def _add(self, chunk: DecodedBatch) -> list[ModelBatch]:
        """Take ``chunk`` (its slot is released here); the batches it completed."""
        pixels = chunk.pixels
        if pixels is None or not chunk.keys:
            chunk.release()
            return []
        if not self._keys and len(chunk.keys) == self.size:
            inputs = self._normalize(pixels)
            chunk.release(copied_event(self.device))
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
        chunk.release(copied_event(self.device))
        return ready

    def _finish(self) -> list[ModelBatch]:
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
