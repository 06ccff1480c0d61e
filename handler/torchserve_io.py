"""TorchServe's side of the adapter: request rows in, statuses, bodies and metrics out.

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
The wire formats themselves are ``handler.protocols``; what is TorchServe's own is here. Nothing
but this module and ``service`` imports ``ts``.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any, Mapping

from handler.classifier import BatchResult
from handler.errors import RequestError
from handler.protocols import FormFields, ParsedRequest, decode_request, error_reply

log = logging.getLogger(__name__)


def request_headers(context: Any, idx: int) -> dict[str, str]:
    """Request ``idx``'s HTTP headers, names lower-cased; empty for a gRPC call. (TorchServe mixes
    in one ``{"content-type": ...}`` entry per form field or gRPC input: those are not headers.)"""
    getter = getattr(context, "get_all_request_header", None)
    headers = getter(idx) if getter is not None else {}
    return {str(k).lower(): v for k, v in (headers or {}).items() if isinstance(v, str)}


def parse_row(row: Mapping[str, Any], max_images: int, headers: Mapping[str, str]) -> ParsedRequest | RequestError:
    """A request row -> its images (1..max_images of them), or the RequestError that rejects it.
    ``headers`` are the request's (``request_headers``)."""
    try:
        return decode_request(row_payload(row, headers), max_images=max_images, headers=headers)
    except RequestError as exc:
        return exc


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts ``img2`` before ``img10`` and ``9`` before ``10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", str(name)) if part)


def row_payload(row: Mapping[str, Any], headers: Mapping[str, str]) -> Any:
    """What the row holds, in the form ``decode_request`` takes: the body as the frontend left it
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


def respond(context: Any, parsed: list[ParsedRequest | RequestError], result: BatchResult,
            model_name: str | None) -> tuple[list[str | bytes], int]:
    """One body per request, in order, with its status and content type set on ``context``;
    and how many requests were rejected. ``result`` holds the parsed requests' outcomes."""
    outcomes = iter(result.results)
    bodies: list[str | bytes] = []
    rejected = 0
    for idx, request in enumerate(parsed):
        outcome = request if isinstance(request, RequestError) else next(outcomes)
        if isinstance(outcome, RequestError):
            log.info("request %d rejected: %s", idx, outcome)
            context.set_response_status(outcome.status, HTTPStatus(outcome.status).phrase, idx)
            reply = error_reply(outcome)
            rejected += 1
        else:
            assert isinstance(request, ParsedRequest)
            reply = request.reply(outcome, model_name)
        context.set_response_content_type(idx, reply.content_type)
        for key, value in reply.headers:
            context.set_response_header(idx, key, value)
        bodies.append(reply.body)
    return bodies, rejected


def publish(metrics: Any, result: BatchResult, *, requests: int, rejected: int) -> None:
    """Send one batch's figures to TorchServe's metrics cache (declared in metrics.yaml; a
    no-op without a cache)."""
    if metrics is None:
        return
    try:
        from ts.metrics.metric_type_enum import MetricTypes

        gauge = {"metric_type": MetricTypes.GAUGE}
    except ImportError:  # driven without TorchServe installed (a fake context in tests)
        gauge = {}
    # idx=0 tags the figures with the model (Level=Model); fresh dimension lists each call,
    # since TorchServe appends its default dimensions to the list it is given.
    for name, value in result.timings.items():
        metrics.add_time(name, round(value, 3), idx=0, unit="ms", dimensions=[])
    for name, value in (("ImagesPerBatch", result.images), ("RequestsPerBatch", requests)):
        metrics.add_metric(name, value, "count", idx=0, dimensions=[], **gauge)
    metrics.add_counter("BadImages", result.bad_images, idx=0, dimensions=[])
    metrics.add_counter("RejectedRequests", rejected, idx=0, dimensions=[])
