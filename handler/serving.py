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
    healthy                   what every door's health probe answers

Every failure leaves as one type, ``RequestError``: a 4xx the client must fix, or a 500
``internal_error`` when the server failed; its ``Answer`` carries the status and the JSON body.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from handler.batcher import RequestBatcher, Outcome
from handler.classifier import BatchResult, ImageClassifier
from handler.errors import RequestError
from handler.protocols import ParsedRequest, Reply, parse_request, error_reply
from handler.telemetry import BatchFigures, Exporter, NoExporter

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
        self.batcher: RequestBatcher | None = None
        if max_batch_delay_s is not None:
            self.batcher = RequestBatcher(classifier.classify_requests, max_images=classifier.config.batch_size,
                                        max_delay_s=max_batch_delay_s, on_batch=self._report)

    # ---- the steps -----------------------------------------------------------------------

    def parse(self, payload: Any, headers: Mapping[str, str] | None = None) -> ParsedRequest:
        """A request's images and encoder; raises the RequestError (4xx) that rejects it."""
        return parse_request(payload, max_images=self.classifier.config.max_images_per_request, headers=headers)

    async def classify(self, request: ParsedRequest) -> Outcome:
        """Its predictions, from a batch shared with concurrent requests, or its RequestError."""
        if self.batcher is None:
            raise RuntimeError("this loop batches nothing itself (max_batch_delay_s is None): use serve_batch")
        return await self.batcher.submit(request.images)

    def encode(self, request: ParsedRequest, outcome: Outcome, *, count: bool = True,
               index: int | None = None) -> Answer:
        """The answer in the request's own format, or its error's (``refuse``)."""
        if isinstance(outcome, RequestError):
            return self.refuse(outcome, count=count, index=index)
        return Answer(200, request.reply(outcome, self.name))

    def refuse(self, error: RequestError, *, count: bool = True, index: int | None = None) -> Answer:
        """The answer to a request that fails: its status and JSON error body; a 4xx is logged
        (with the request's ``index`` in its server's batch, where there is one) and counted as
        rejected (``count`` False: the caller counts, or it is no rejection of a request)."""
        if error.status < 500:
            if index is None:
                log.info("request rejected: %s", error)
            else:
                log.info("request %d rejected: %s", index, error)
            if count:
                self.exporter.rejected(1)
        return Answer(error.status, error_reply(error), error)

    # ---- the loops -----------------------------------------------------------------------

    async def serve(self, payload: Any, headers: Mapping[str, str] | None = None) -> Answer:
        """One request, start to end."""
        try:
            request = self.parse(payload, headers)
        except RequestError as error:
            return self.refuse(error)
        return self.encode(request, await self.classify(request))

    def serve_batch(self, incoming: Sequence[Incoming], exporter: Exporter | None = None) -> list[Answer]:
        """A batch of requests the server formed: one answer each, in order; a bad request fails
        alone. Its metrics go out once, for the whole batch (to ``exporter`` where the server
        gives each batch its own, as TorchServe does, else to the loop's)."""
        exporter = exporter or self.exporter
        parsed: list[ParsedRequest | RequestError] = []
        for item in incoming:
            if isinstance(item, RequestError):
                parsed.append(item)
                continue
            try:
                parsed.append(self.parse(*item))
            except RequestError as error:
                parsed.append(error)
        result = self.classifier.classify_requests([p.images for p in parsed if isinstance(p, ParsedRequest)])
        started = time.perf_counter()
        outcomes = iter(result.results)
        answers = [self.refuse(p, count=False, index=i) if isinstance(p, RequestError)
                   else self.encode(p, next(outcomes), count=False, index=i) for i, p in enumerate(parsed)]
        for answer in answers:
            answer.reply.body  # serialized here (made once), so that postprocessing's time holds it
        result.timings["PostprocessMs"] += (time.perf_counter() - started) * 1000.0
        exporter.batch(figures(result, len(parsed)))
        # One count per batch (zero included), as TorchServe's metrics have always had it.
        exporter.rejected(sum(a.error is not None and a.status < 500 for a in answers))
        return answers

    # ---- health and lifetime ---------------------------------------------------------------

    def healthy(self) -> bool:
        """Whether the model can serve (what every door's health probe answers)."""
        return self.classifier.healthy()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.classifier.close()

    def _report(self, result: BatchResult, requests: int) -> None:
        self.exporter.batch(figures(result, requests))


def figures(result: BatchResult, requests: int) -> BatchFigures:
    """What the metrics take from one batch's result."""
    return BatchFigures(dict(result.timings), result.images, requests, result.bad_images)
