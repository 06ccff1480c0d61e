"""TorchServe's side of the door: request rows in, statuses, bodies and metrics out.

A row is one request as TorchServe hands it to ``handle``:
    raw body (``curl -T``, octet-stream, image/*)  {"body": bytearray}
    multipart/form-data, one file per field        {"a": bytearray, "b": bytearray, ...}
    multipart/mixed (the same parts, undecoded)    {"body": bytearray starting with "--boundary"}
    application/json                               {"body": <already parsed JSON>}
    JSON sent url-encoded (curl -d)                {"<json up to its first '='>": "<the rest>"}, or {}
    v2 with binary tensor data (tritonclient)      {"body": bytearray}, Inference-Header-Content-Length set
    gRPC Predictions (inference.proto)             {"<input name>": bytearray, ...}, in wire order
Request headers come separately (``context.get_all_request_header``): every HTTP request carries
at least ``Host``; a gRPC call carries none at all (TorchServe's gRPC service passes no metadata).
The wire formats themselves are ``handler.protocols`` and the loop ``handler.serving``; what is
TorchServe's own is here. Nothing but this module imports ``ts``.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any, Mapping

from handler.errors import RequestError
from handler.protocols import FormFields
from handler.serving import Answer, Incoming
from handler.telemetry import BAD_IMAGES, BATCH_IMAGES, BATCH_REQUESTS, REJECTED, STAGE_MS, BatchFigures, MetricSpec

log = logging.getLogger(__name__)


def request_headers(context: Any, idx: int) -> dict[str, str]:
    """Request ``idx``'s HTTP headers, names lower-cased; empty for a gRPC call. (TorchServe mixes
    in one ``{"content-type": ...}`` entry per form field or gRPC input: those are not headers.)"""
    getter = getattr(context, "get_all_request_header", None)
    headers = getter(idx) if getter is not None else {}
    return {str(k).lower(): v for k, v in (headers or {}).items() if isinstance(v, str)}


def incoming(row: Mapping[str, Any], headers: Mapping[str, str]) -> Incoming:
    """A request row as the serving loop takes it: its payload and ``headers`` (the request's,
    from ``request_headers``), or the RequestError for a row TorchServe made out of a body it
    misread."""
    try:
        return row_payload(row, headers), headers
    except RequestError as exc:
        return exc


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts ``img2`` before ``img10`` and ``9`` before ``10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", str(name)) if part)


def row_payload(row: Mapping[str, Any], headers: Mapping[str, str]) -> Any:
    """What the row holds, in the form ``parse_request`` takes: the body as the frontend left it
    (bytes, or JSON it parsed), or the form fields / gRPC inputs; raises the RequestError for a
    row TorchServe made out of a body it misread."""
    if not row:
        # TorchServe also hands over an empty row for a url-encoded body without "=": JSON sent
        # by curl -d without its Content-Type, most likely.
        raise RequestError(
            "empty_request",
            "the request has no body the server can read; send one or more images (JSON needs "
            "Content-Type: application/json: curl -d sends application/x-www-form-urlencoded)",
        )
    if "body" in row and len(row) == 1:
        body = row["body"]
        return body if isinstance(body, (bytes, bytearray, str, dict, list)) else str(body)
    if len(row) == 1:
        (value,) = row.values()
        if isinstance(value, (dict, list)):  # a single JSON form field: read like a JSON body
            return value
    if any(str(name).lstrip()[:1] in ("{", "[") for name in row):
        # The frontend split a url-encoded body into fields ("+" read as a space, the first
        # "=" as a separator): the JSON cannot be trusted back together.
        raise RequestError(
            "form_encoded_json",
            "the body looks like JSON sent as application/x-www-form-urlencoded (curl -d's default), "
            "which corrupts base64; send it with Content-Type: application/json",
        )
    if not headers:
        # gRPC: its input map reached us in wire order, which protobuf does not keep; the
        # client's names are all there is to order the answers by.
        row = {name: row[name] for name in sorted(row, key=natural_key)}
    return FormFields(row)


def is_describe(context: Any) -> bool:
    """Whether this call is TorchServe's describe (``GET /models/NAME?customized=true``), not a
    batch of requests: the frontend marks it with a ``describe`` header."""
    getter = getattr(context, "get_request_header", None)
    return getter is not None and getter(0, "describe") == "True"


def respond(context: Any, answers: list[Answer]) -> list[str | bytes]:
    """One body per request, in order, with its status, content type and headers set on
    ``context`` (a request that failed gets its own status; the others 200)."""
    bodies: list[str | bytes] = []
    for idx, answer in enumerate(answers):
        if answer.status != 200:
            context.set_response_status(answer.status, HTTPStatus(answer.status).phrase, idx)
        context.set_response_content_type(idx, answer.reply.content_type)
        for key, value in answer.reply.headers:
            context.set_response_header(idx, key, value)
        bodies.append(answer.reply.body)
    return bodies


class TorchServeMetrics:
    """The METRICS (``handler.telemetry``) into TorchServe's metrics cache of one call (declared in
    metrics.yaml; a no-op without a cache). TorchServe has no histograms: a batch's figures are
    gauges, its counts counters."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    def batch(self, figures: BatchFigures) -> None:
        if self.metrics is None:
            return
        # idx=0 tags the figures with the model (Level=Model); fresh dimension lists each call,
        # since TorchServe appends its default dimensions to the list it is given.
        for name, value in figures.timings.items():
            self.metrics.add_time(name, round(value, 3), idx=0, unit=STAGE_MS.unit, dimensions=[])
        for spec, value in ((BATCH_IMAGES, figures.images), (BATCH_REQUESTS, figures.requests)):
            self.metrics.add_metric(spec.torchserve, value, spec.unit, idx=0, dimensions=[], **_gauge())
        self.metrics.add_counter(BAD_IMAGES.torchserve, figures.bad_images, idx=0, dimensions=[])

    def rejected(self, count: int) -> None:
        if self.metrics is not None:
            self.metrics.add_counter(REJECTED.torchserve, count, idx=0, dimensions=[])

    def refused(self, spec: MetricSpec, count: int) -> None:
        if self.metrics is not None and spec.torchserve:  # the handler sheds nothing: TorchServe's queue does
            self.metrics.add_counter(spec.torchserve, count, idx=0, dimensions=[])

    def queue(self, requests: int, images: int) -> None:
        """TorchServe's frontend owns the queue (its depth: the management API's describe)."""


def _gauge() -> dict[str, Any]:
    try:
        from ts.metrics.metric_type_enum import MetricTypes
    except ImportError:  # driven without TorchServe installed (a fake context in tests)
        return {}
    return {"metric_type": MetricTypes.GAUGE}
