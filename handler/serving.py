"""The serving loop every door calls: parse -> admit -> classify (batched by image count) ->
encode -> reply or error -> telemetry. A door adapts its transport only: what its server hands
over becomes a payload here, and an ``Answer`` goes back out through the server's own status
mechanism.

    ServingLoop.serve_batch   a batch the server formed itself (TorchServe's frontend)
    ServingLoop.serve         one request; concurrent ones share batches counted in images
                              (``handler.batcher``): the KServe and Ray Serve doors
    parse / classify / encode / refuse
                              the same steps one at a time, for a host that drives them from
                              hooks of its own (KServe's preprocess -> predict -> postprocess)
    healthy / ready           what every door's health and readiness probes answer
    drain                     SIGTERM: stop admitting, finish what was admitted

Production traffic, for the doors that queue requests themselves (``serve`` / ``classify``):
- admission: a request that would take the images admitted and not yet answered past the
  model's ``max_queued_images`` is refused at once, 503 ``overloaded`` with a ``Retry-After``
  (the queue's images over the measured throughput); readiness is false from then until the
  queue is back to half the bound, so a balancer sends the traffic elsewhere;
- deadlines: a request's own timeout or deadline (``handler.protocols.options``), else the
  model's ``request_timeout_ms``; one that passes before the request's batch starts is a 504
  ``deadline_exceeded``, and its images are never decoded (``serve_batch`` drops such requests
  before the model too);
- draining: after ``start_draining`` new requests are refused (503 ``shutting_down``) and
  readiness is false; ``drained`` waits for the admitted ones;
- queue depth (requests, images) goes to the exporter at every change.

Every failure leaves as one type, ``RequestError``: a 4xx the client must fix, a 503 / 504 for a
request not run, or a 500 ``internal_error`` when the server failed; its ``Answer`` carries the
status, the JSON body and the headers (``Retry-After``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from handler.batcher import RequestBatcher, Outcome, deadline_exceeded
from handler.classifier import BatchResult, ImageClassifier
from handler.errors import RequestError
from handler.protocols import ParsedRequest, Reply, parse_request, error_reply
from handler.protocols.options import top_k_value
from handler.telemetry import EXPIRED, SHED, BatchFigures, Exporter, NoExporter

# Bounds of the Retry-After a 503 advises, in seconds.
RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1, 60
# Weight of the newest batch in the throughput estimate behind Retry-After.
THROUGHPUT_WEIGHT = 0.2

log = logging.getLogger(__name__)

# What a door hands ``serve_batch`` per request: the payload for ``parse_request`` and the
# request's headers (names lower-cased), or the RequestError its transport already found.
Incoming = Union[tuple[Any, Mapping[str, str]], RequestError]


@dataclass(frozen=True)
class Answer:
    """One request's answer, for any transport.

    Attributes:
        status: the HTTP status (200, a 4xx, or 500).
        reply: the body, its content type and headers, and the JSON document behind them (a
            door that serializes answers itself takes the document).
        error: the RequestError answered, if any.
    """

    status: int
    reply: Reply
    error: RequestError | None = None


class ServingLoop:
    """One model behind a door: its classifier, its name, where its metrics go, and (for doors
    whose server does not batch) the batcher that gathers concurrent requests."""

    def __init__(self, classifier: ImageClassifier, name: str, exporter: Exporter | None = None, *,
                 max_batch_delay_s: float | None = None) -> None:
        """``max_batch_delay_s``: how long a request given to ``serve`` may wait for others to
        share its batch; None for a door whose server forms the batches (``serve_batch``)."""
        self.classifier = classifier
        self.name = name
        self.exporter: Exporter = exporter or NoExporter()
        config = classifier.config
        self.max_queued_images = config.max_queued_images
        self.default_timeout_s = config.request_timeout_ms / 1000.0
        self.drain_timeout_s = config.drain_timeout_s
        self.queued_requests = 0  # admitted by ``classify`` and not yet answered
        self.queued_images = 0
        self.shedding = False  # refused a request for a full queue; until it is half empty
        self.draining = False
        self._images_per_s: float | None = None  # measured throughput, for Retry-After
        self.batcher: RequestBatcher | None = None
        if max_batch_delay_s is not None:
            self.batcher = RequestBatcher(self._classify_timed, max_images=classifier.config.batch_size,
                                        max_delay_s=max_batch_delay_s, on_batch=self._report)

    # ---- the steps -----------------------------------------------------------------------

    def parse(self, payload: Any, headers: Mapping[str, str] | None = None) -> ParsedRequest:
        """A request's images, encoder and parameters; raises the RequestError (4xx) that
        rejects it (a ``top_k`` above the model's classes included)."""
        request = parse_request(payload, max_images=self.classifier.config.max_images_per_request, headers=headers)
        if request.options.top_k is not None:
            top_k_value(request.options.top_k, "top_k", self.classifier.classes)
        return request

    def deadline(self, request: ParsedRequest, received: float) -> float | None:
        """When ``request`` (received at monotonic time ``received``) stops being worth running."""
        return request.options.deadline(received, self.default_timeout_s)

    async def classify(self, request: ParsedRequest, received: float | None = None) -> Outcome:
        """Its predictions, from a batch shared with concurrent requests, or its RequestError:
        503 if it is not admitted, 504 if its deadline passes before it runs. ``received``: when
        the door got it (``time.monotonic()``; default now), from which its timeout counts."""
        if self.batcher is None:
            raise RuntimeError("this loop batches nothing itself (max_batch_delay_s is None): use serve_batch")
        deadline = self.deadline(request, received if received is not None else time.monotonic())
        images = len(request.images)
        refusal = self.admit(images)
        if refusal is not None:
            return refusal
        self.queued_requests += 1
        self.queued_images += images
        try:
            self._export_queue()
            return await self.batcher.submit(request.images, top_k=request.options.top_k, deadline=deadline)
        finally:
            self.queued_requests -= 1
            self.queued_images -= images
            if self.shedding and self.queued_images <= self.max_queued_images // 2:
                self.shedding = False
            self._export_queue()

    def admit(self, images: int) -> RequestError | None:
        """None if a request of ``images`` may join the queue now, else its 503."""
        if self.draining:
            return RequestError("shutting_down", "the server is shutting down and takes no new requests; "
                                                 "retry on another replica", retry_after_s=RETRY_AFTER_MIN_S)
        if self.queued_images and self.queued_images + images > self.max_queued_images:
            # A request holds at most max_images_per_request <= max_queued_images images: a
            # refusal means the queue is nearly full, never one large request beside an empty one.
            self.shedding = True
            wait = self.retry_after_s()
            return RequestError("overloaded", f"the server has {self.queued_images} images queued and takes at "
                                              f"most {self.max_queued_images}; retry in {wait} s",
                                retry_after_s=wait)
        return None

    def retry_after_s(self) -> int:
        """Seconds until the queue's images are likely served, at the measured throughput."""
        rate = self._images_per_s
        if not rate:
            return RETRY_AFTER_MIN_S
        return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, math.ceil(self.queued_images / rate)))

    def _export_queue(self) -> None:
        """The queue's depth to the exporter; a failure there is logged, never the request's."""
        try:
            self.exporter.queue(self.queued_requests, self.queued_images)
        except Exception:
            log.exception("exporting the queue depth failed")

    def encode(self, request: ParsedRequest, outcome: Outcome, *, count: bool = True,
               index: int | None = None) -> Answer:
        """The answer in the request's own format, or its error's (``refuse``)."""
        if isinstance(outcome, RequestError):
            return self.refuse(outcome, count=count, index=index)
        return Answer(200, request.reply(outcome, self.name))

    def refuse(self, error: RequestError, *, count: bool = True, index: int | None = None) -> Answer:
        """The answer to a request that fails: its status, JSON error body and headers. A 4xx is
        logged (with the request's ``index`` in its server's batch, where there is one) and
        counted as rejected, a 503 as shed, a 504 as expired (``count`` False: the caller
        counts, or it is no rejection of a request)."""
        if error.is_client_error:
            if index is None:
                log.info("request rejected: %s", error)
            else:
                log.info("request %d rejected: %s", index, error)
            if count:
                self.exporter.rejected(1)
        elif error.not_run:
            log.debug("request not run: %s", error)  # one line per refusal would flood a shedding server's log
            if count:
                self.exporter.refused(SHED if error.status == 503 else EXPIRED, 1)
        return Answer(error.status, error_reply(error), error)

    # ---- the loops -----------------------------------------------------------------------

    async def serve(self, payload: Any, headers: Mapping[str, str] | None = None,
                    received: float | None = None) -> Answer:
        """One request, start to end (``received``: see ``classify``)."""
        received = received if received is not None else time.monotonic()
        try:
            request = self.parse(payload, headers)
        except RequestError as error:
            return self.refuse(error)
        return self.encode(request, await self.classify(request, received))

    def serve_batch(self, incoming: Sequence[Incoming], exporter: Exporter | None = None) -> list[Answer]:
        """A batch of requests the server formed: one answer each, in order; a bad request fails
        alone, and one whose deadline has passed is answered 504 without being decoded. Its
        metrics go out once, for the whole batch (to ``exporter`` where the server gives each
        batch its own, as TorchServe does, else to the loop's)."""
        exporter = exporter or self.exporter
        received = time.monotonic()
        parsed: list[ParsedRequest | RequestError] = []
        for item in incoming:
            if isinstance(item, RequestError):
                parsed.append(item)
                continue
            try:
                parsed.append(self.parse(*item))
            except RequestError as error:
                parsed.append(error)
        now = time.monotonic()  # parsing took its time: a deadline is checked after it, just before the model
        for i, request in enumerate(parsed):
            deadline = self.deadline(request, received) if isinstance(request, ParsedRequest) else None
            if deadline is not None and deadline <= now:
                parsed[i] = deadline_exceeded()
        running = [p for p in parsed if isinstance(p, ParsedRequest)]
        result = self.classifier.classify_requests([p.images for p in running], [p.options.top_k for p in running])
        started = time.perf_counter()
        outcomes = iter(result.results)
        answers = [self.refuse(p, count=False, index=i) if isinstance(p, RequestError)
                   else self.encode(p, next(outcomes), count=False, index=i) for i, p in enumerate(parsed)]
        for answer in answers:
            answer.reply.body  # serialized here (made once), so that postprocessing's time holds it
        result.timings["PostprocessMs"] += (time.perf_counter() - started) * 1000.0
        exporter.batch(figures(result, len(parsed)))
        # One count per batch (zero included), as TorchServe's metrics have always had it.
        exporter.rejected(sum(a.error is not None and a.error.is_client_error for a in answers))
        expired = sum(a.error is not None and a.error.code == "deadline_exceeded" for a in answers)
        if expired:
            exporter.refused(EXPIRED, expired)
        return answers

    # ---- health and lifetime ---------------------------------------------------------------

    def healthy(self) -> bool:
        """Whether the model can serve (what every door's health probe answers)."""
        return self.classifier.healthy()

    @property
    def ready(self) -> bool:
        """Whether to send this door more traffic: not draining, not shedding load (the model's
        health aside: ``healthy``)."""
        return not (self.draining or self.shedding)

    def start_draining(self) -> None:
        """From now on every new request is refused (503 ``shutting_down``), readiness false."""
        if not self.draining:
            log.info("draining: %d requests (%d images) admitted; no new ones taken", self.queued_requests,
                     self.queued_images)
        self.draining = True

    async def drained(self, timeout_s: float | None = None) -> bool:
        """Waits until every admitted request is answered, at most ``timeout_s`` (default the
        model's ``drain_timeout_s``); whether they all were."""
        limit = time.monotonic() + (self.drain_timeout_s if timeout_s is None else timeout_s)
        while self.queued_requests and time.monotonic() < limit:
            await asyncio.sleep(0.01)
        if self.queued_requests:
            log.warning("drain timed out with %d requests (%d images) unanswered", self.queued_requests,
                        self.queued_images)
        return not self.queued_requests

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.classifier.close()

    def _report(self, result: BatchResult, requests: int) -> None:
        self.exporter.batch(figures(result, requests))

    def _classify_timed(self, requests: Sequence[Sequence[Any]], top_k: Sequence[int | None]) -> BatchResult:
        """The classifier's batch, its images per second of wall clock measured for Retry-After
        (the stage timings overlap on a GPU: their sum is no wall time)."""
        started = time.perf_counter()
        result = self.classifier.classify_requests(requests, top_k)
        seconds = time.perf_counter() - started
        if result.images and seconds > 0:
            rate = result.images / seconds
            previous = self._images_per_s
            self._images_per_s = rate if previous is None else previous + THROUGHPUT_WEIGHT * (rate - previous)
        return result


def figures(result: BatchResult, requests: int) -> BatchFigures:
    """What the metrics take from one batch's result."""
    return BatchFigures(dict(result.timings), result.images, requests, result.bad_images)
