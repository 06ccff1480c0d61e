"""Batching across concurrent requests, counted in images, for servers that have none of their own.

TorchServe's frontend batches requests before the handler sees them; a KServe Python model
server calls the model once per request. ``RequestBatcher`` gathers the requests that arrive
together into one ``classify_requests`` call: a batch leaves when its images reach
``max_images`` (the model's batch size) or when its first request has waited ``max_delay_s``.
A request is never split, and one that is bigger than ``max_images`` goes alone (the pipeline
runs it in several forward passes). Each request gets its own outcome; a bad image fails only
its own request.

Every request gets an answer, whatever fails:

- A fault while a batch runs (``classify`` raises, or its answer does not hold one result per
  request) is logged with its traceback and answers every request of that batch with a
  ``RequestError("internal_error", ...)`` (a 500), naming the exception's type and text. The
  batching task lives on: the next batch is served as usual.
- A fault in the ``on_batch`` callback (metrics) is logged with its traceback, and the batch's
  results are still delivered: the classification succeeded, and a client would rather have
  its answer than a 500 for a metric that was not recorded.
- A request whose client has gone (its ``submit`` was cancelled) is dropped: it is not
  classified if it had not been yet, and its result, if any, is thrown away.
- There is one queue for the batcher's lifetime (per event loop). Should the batching task
  ever stop (cancelled from outside, say), the requests it had taken off the queue are
  answered 500, and the next ``submit`` starts a new task over the same queue, so the
  requests still queued are served, not orphaned.
- After ``close()``, the requests still waiting are answered 500, and so is any later
  ``submit``.
- A request may carry a deadline (a monotonic time): if it passes before the request's batch
  starts, the request is answered 504 ``deadline_exceeded`` at that moment and is never
  decoded or run; a batch drops such requests before the model. Once its batch runs, a request
  is answered with its result.
- Each request may ask for its own ``top_k``: requests asking for different numbers share a
  batch (``classify`` gets one ``top_k`` per request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

from handler.classifier import BatchResult
from handler.errors import RequestError
from handler.decode.inputs import ImageInput
from handler.protocols import Prediction

log = logging.getLogger(__name__)

# classify(requests, top_k): one top_k per request (None: the model's own).
Classify = Callable[[Sequence[Sequence[ImageInput]], Sequence["int | None"]], BatchResult]
# What ``submit`` returns: the request's predictions (one per image, in order) or its error.
Outcome = Union[list[Prediction], RequestError]

# How much of an exception's text goes into the error a client is answered with.
MAX_REASON_CHARS = 200


@dataclass
class _Waiting:
    images: list[ImageInput]
    outcome: asyncio.Future[Outcome]
    since: float
    top_k: int | None = None
    started: bool = False  # its batch is running: it is answered with its result


@dataclass
class _Lane:
    """The queue of one event loop and what the batching task has taken off it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Waiting]
    carry: _Waiting | None = None  # taken off the queue; first in the next batch
    held: list[_Waiting] = field(default_factory=list)  # the batch being gathered or run


def internal_error(message: str) -> RequestError:
    """The 500 a request is answered with when the server, not the request, failed."""
    return RequestError("internal_error", message)


def deadline_exceeded() -> RequestError:
    """The 504 of a request whose deadline passed before it ran."""
    return RequestError("deadline_exceeded", "the request's deadline passed while it waited; it was not run")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _answer(waiting: _Waiting, outcome: Outcome) -> None:
    if not waiting.outcome.done():  # the client may have gone away
        waiting.outcome.set_result(outcome)


def _expire(waiting: _Waiting) -> None:
    """A request's deadline passed: a 504, unless its batch already runs."""
    if not waiting.started:
        _answer(waiting, deadline_exceeded())


class RequestBatcher:
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
        self._lane: _Lane | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, images: list[ImageInput], *, top_k: int | None = None,
                     deadline: float | None = None) -> Outcome:
        """This request's predictions (one per image, in order, ``top_k`` classes each) or its
        RequestError: a 500 ``internal_error`` if the server failed to run its batch, a 504
        ``deadline_exceeded`` if ``deadline`` (a ``time.monotonic()`` time) passed before its
        batch started."""
        if self._closed:
            return internal_error("the model server is shutting down")
        if deadline is not None and deadline <= time.monotonic():
            return deadline_exceeded()
        lane = self._ensure_worker()
        waiting = _Waiting(list(images), lane.loop.create_future(), time.monotonic(), top_k)
        timer = None
        if deadline is not None:
            # The 504 goes out when the deadline passes, not when the batching task next looks
            # at this request. (Relative: an event loop's clock need not be time.monotonic().)
            timer = lane.loop.call_later(max(0.0, deadline - time.monotonic()), _expire, waiting)
        lane.queue.put_nowait(waiting)
        try:
            return await waiting.outcome
        finally:
            if timer is not None:
                timer.cancel()

    def _ensure_worker(self) -> _Lane:
        """The running loop's lane, with a live batching task serving it."""
        loop = asyncio.get_running_loop()
        if self._lane is None or self._lane.loop is not loop:
            # First use, or a new event loop: the old one is gone, and with it whoever waited
            # in its queue.
            self._lane = _Lane(loop, asyncio.Queue())
            self._worker = None
        if self._worker is None or self._worker.done():
            # A task that stopped leaves its queue (and carried-over request) to this one.
            self._worker = loop.create_task(self._run(self._lane), name="image-batcher")
            self._worker.add_done_callback(self._worker_stopped)
        return self._lane

    def _worker_stopped(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the batching task stopped; the next request restarts it",
                      exc_info=task.exception())

    async def _run(self, lane: _Lane) -> None:
        try:
            while True:
                await self._gather(lane)
                await self._serve(lane.held)
                lane.held = []
        finally:
            # Cancelled (close(), the loop shutting down) or dying: nobody else will answer
            # the requests this task took off the queue.
            held, lane.held = lane.held, []
            for waiting in held:
                _answer(waiting, internal_error("the batching task stopped before this request was answered"))
            if self._closed:
                self._drain(lane)

    async def _gather(self, lane: _Lane) -> None:
        """The next batch, into ``lane.held``: the first waiting request, then whatever arrives
        before the deadline, while the images still fit. Requests whose client has gone are
        skipped."""
        queue = lane.queue
        first, lane.carry = lane.carry, None
        while first is None or first.outcome.done():
            first = await queue.get()
        lane.held = [first]
        images = len(first.images)
        deadline = first.since + self.max_delay_s
        while images < self.max_images:
            try:
                if queue.empty():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    waiting = await asyncio.wait_for(queue.get(), remaining)
                else:
                    waiting = queue.get_nowait()
            except asyncio.TimeoutError:
                break
            if waiting.outcome.done():
                continue  # its client has gone: nothing to classify
            if images + len(waiting.images) > self.max_images:
                lane.carry = waiting  # first in the next batch
                break
            lane.held.append(waiting)
            images += len(waiting.images)

    async def _serve(self, batch: list[_Waiting]) -> None:
        """Runs one batch and answers each of its requests: its own outcome, or a 500 if the
        batch failed. Requests answered while the batch gathered (their deadline passed, their
        client left) are not run."""
        loop = asyncio.get_running_loop()
        batch = [w for w in batch if not w.outcome.done()]
        if not batch:
            return
        for waiting in batch:
            waiting.started = True
        try:
            requests = [w.images for w in batch]
            result = await loop.run_in_executor(self._executor, self._classify, requests, [w.top_k for w in batch])
            outcomes = list(result.results)
            if len(outcomes) != len(batch):
                raise RuntimeError(f"classify answered {len(outcomes)} requests, "
                                   f"the batch held {len(batch)}")
            self._report(result, len(batch))
            for waiting, outcome in zip(batch, outcomes):
                _answer(waiting, outcome)
        except Exception as exc:  # a server fault: every request of this batch gets a 500
            log.exception("a batch of %d requests (%d images) failed; each is answered 500",
                          len(batch), sum(len(w.images) for w in batch))
            message = f"the server failed to classify this request's batch ({_describe(exc)})"
            for waiting in batch:
                _answer(waiting, internal_error(message))

    def _report(self, result: BatchResult, requests: int) -> None:
        """The ``on_batch`` callback; its failure is logged and the results go out anyway."""
        if self._on_batch is None:
            return
        try:
            self._on_batch(result, requests)
        except Exception:
            log.exception("the on_batch callback failed; the batch's results are delivered anyway")

    def _drain(self, lane: _Lane) -> None:
        """Answers every request still waiting in ``lane`` (after close())."""
        waiting = [lane.carry] if lane.carry is not None else []
        lane.carry = None
        while not lane.queue.empty():
            waiting.append(lane.queue.get_nowait())
        for w in waiting:
            _answer(w, internal_error("the model server is shutting down"))

    def close(self) -> None:
        self._closed = True
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()  # its last act answers whatever waits
        elif self._lane is not None and not self._lane.loop.is_closed():
            self._lane.loop.call_soon_threadsafe(self._drain, self._lane)
        self._executor.shutdown(wait=False, cancel_futures=True)
