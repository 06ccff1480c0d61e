"""TorchServe's side of the adapter: request rows in, statuses, bodies and metrics out.

A row is one request as TorchServe hands it to ``handle``:
    raw body (``curl -T``, octet-stream, image/*)  {"body": bytearray}
    multipart/form-data, one file per field        {"a": bytearray, "b": bytearray, ...}
    multipart/mixed (the same parts, undecoded)    {"body": bytearray starting with "--boundary"}
    application/json                               {"body": <already parsed JSON>}
    JSON sent url-encoded (curl -d)                {"<json up to its first '='>": "<the rest>"}, or {}
The wire formats themselves are ``handler.protocols``; what is TorchServe's own is here. Nothing
but this module and ``service`` imports ``ts``.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, Mapping

from handler.classifier import BatchResult
from handler.errors import RequestError
from handler.protocols import ParsedRequest, check_images, error_reply, multipart, parse_body, parse_json

log = logging.getLogger(__name__)


def parse_row(row: Mapping[str, Any], max_images: int) -> ParsedRequest | RequestError:
    """A request row -> its images (1..max_images of them), or the RequestError that rejects it."""
    try:
        return check_images(_parse(row), max_images)
    except RequestError as exc:
        return exc


def _parse(row: Mapping[str, Any]) -> ParsedRequest:
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
        if isinstance(body, (dict, list)):  # application/json: the frontend parsed it
            return parse_json(body)
        return parse_body(body if isinstance(body, (bytes, bytearray, str)) else str(body))
    if len(row) == 1:
        (value,) = row.values()
        if isinstance(value, (dict, list)):  # a single JSON form field: read like a JSON body
            return parse_json(value)
    if any(str(name).lstrip()[:1] in ("{", "[") for name in row):
        # The frontend split a url-encoded body into fields ("+" read as a space, the first
        # "=" as a separator): the JSON cannot be trusted back together.
        raise RequestError(
            "form_encoded_json",
            "the body looks like JSON sent as application/x-www-form-urlencoded (curl -d's default), "
            "which corrupts base64; send it with Content-Type: application/json",
        )
    return multipart.parse_fields(row)


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
