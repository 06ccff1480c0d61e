"""Batching across concurrent requests, counted in images, for servers that have none of their own.

TorchServe's frontend batches requests before the handler sees them; a KServe Python model
server calls the model once per request. ``ImageBatcher`` gathers the requests that arrive
together into one ``classify_requests`` call: a batch leaves when its images reach
``max_images`` (the model's batch size) or when its first request has waited ``max_delay_s``.
A request is never split, and one that is bigger than ``max_images`` goes alone (the pipeline
runs it in several forward passes). Each request gets its own outcome; a bad image fails only
its own request.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from handler.classifier import BatchResult
from handler.errors import RequestError
from handler.inputs import ImageInput
from handler.protocols import Prediction

Classify = Callable[[Sequence[Sequence[ImageInput]]], BatchResult]


@dataclass
class _Waiting:
    images: list[ImageInput]
    outcome: asyncio.Future
    since: float


class ImageBatcher:
    """Collects concurrent ``submit`` calls into batches of up to ``max_images`` images."""

    def __init__(self, classify: Classify, *, max_images: int, max_delay_s: float,
                 on_batch: Callable[[BatchResult, int], Any] | None = None,
                 executor: Executor | None = None) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        self._classify = classify
        self.max_images = max_images
        self.max_delay_s = max_delay_s
        self._on_batch = on_batch
        # One thread: the classifier runs one batch at a time; the event loop stays free to
        # accept the requests of the next batch meanwhile.
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="classify")
        self._queue: asyncio.Queue[_Waiting] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: _Waiting | None = None

    async def submit(self, images: list[ImageInput]) -> list[Prediction] | RequestError:
        """This request's predictions (one per image, in order) or its RequestError."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        assert self._queue is not None
        waiting = _Waiting(list(images), loop.create_future(), time.monotonic())
        await self._queue.put(waiting)
        return await waiting.outcome

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            requests = [w.images for w in batch]
            try:
                result = await loop.run_in_executor(self._executor, self._classify, requests)
            except Exception as exc:  # a server fault: every request of this batch gets it
                for waiting in batch:
                    if not waiting.outcome.done():
                        waiting.outcome.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(result, len(batch))
            for waiting, outcome in zip(batch, result.results):
                if not waiting.outcome.done():  # the client may have gone away
                    waiting.outcome.set_result(outcome)

    async def _gather(self) -> list[_Waiting]:
        """The next batch: the first waiting request, then whatever arrives before the deadline,
        while the images still fit."""
        assert self._queue is not None
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, images = [first], len(first.images)
        deadline = first.since + self.max_delay_s
        while images < self.max_images:
            try:
                if self._queue.empty():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    waiting = await asyncio.wait_for(self._queue.get(), remaining)
                else:
                    waiting = self._queue.get_nowait()
            except asyncio.TimeoutError:
                break
            if images + len(waiting.images) > self.max_images:
                self._carry = waiting  # first in the next batch
                break
            batch.append(waiting)
            images += len(waiting.images)
        return batch

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
