"""Wire formats: one module each, parsing and encoding together, and the one request decoder.

    raw          one image's bytes                          -> {label: score}
    multipart    form-data fields, or a multipart/mixed body -> an object or a list
    json_images  {"images": [b64, ...]} / {"data": b64}     -> a list / an object
    kserve_v1    {"instances": [...]}                       -> {"predictions": [...]}
    kserve_v2    Open Inference Protocol, BYTES inputs       -> {"outputs": [{"name": "predictions", ...}]}

Every door calls ``parse_request`` with what its server hands it: a body as received (bytes or
text), JSON a frontend already parsed, decoded form fields (``FormFields``), or a KServe
``InferRequest``. It recognises a body by its content (clients' Content-Types are unreliable:
curl -d, octet-stream JSON), checks the request's image count and answers with a
``ParsedRequest``: the images, the encoder that answers in the request's own format, and the
request's own parameters (``handler.protocols.options``: top_k, deadline; from its body or its
headers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from handler.errors import RequestError
from handler.protocols import json_images, kserve_v1, kserve_v2, multipart, options, raw
from handler.protocols.common import (
    JSON_SHAPE_HELP,
    ParsedRequest,
    PlainJson,
    Prediction,
    Reply,
    check_images,
    decode_base64,
    error_reply,
)
from handler.protocols.options import RequestOptions

__all__ = ["FormFields", "ParsedRequest", "PlainJson", "Prediction", "Reply", "RequestOptions", "check_images",
           "decode_base64", "parse_request", "error_reply"]

_JSON_FORMATS = (json_images, kserve_v1, kserve_v2)


@dataclass(frozen=True)
class FormFields:
    """Fields a frontend decoded from a form upload (or a gRPC call's named inputs), in the
    order the images are answered in: one image each."""

    fields: Mapping[str, Any]


def parse_request(payload: Any, *, max_images: int, headers: Mapping[str, str] | None = None) -> ParsedRequest:
    """A request's images (1..``max_images`` of them) and its encoder; raises the RequestError
    (4xx) that rejects it. ``payload``: bytes / bytearray / str (a body as received), a dict or
    list (JSON a frontend parsed), ``FormFields``, or a KServe InferRequest. ``headers`` (names
    lower-cased) matter for two things: ``Inference-Header-Content-Length`` marks a body in the
    v2 binary tensor data extension, and the request's parameters (``X-Top-K``, ...)."""
    headers = headers or {}
    return check_images(_decode(payload, headers), max_images).with_options(options.from_headers(headers))


def _decode(payload: Any, headers: Mapping[str, str]) -> ParsedRequest:
    if isinstance(payload, FormFields):
        return multipart.parse_fields(payload.fields)
    if isinstance(payload, (dict, list)):
        return parse_json(payload)
    if isinstance(payload, (bytes, bytearray)):
        binary_header = headers.get(kserve_v2.HEADER_LENGTH.lower())
        if binary_header is not None:
            return kserve_v2.parse_binary(payload, binary_header)
        return parse_any_body(payload)
    if isinstance(payload, str):
        return parse_any_body(payload)
    if kserve_v2.is_infer_request(payload):
        return kserve_v2.parse_infer_request(payload)
    raise TypeError(f"cannot decode a request from {type(payload).__name__}")


def parse_any_body(body: bytes | bytearray | str) -> ParsedRequest:
    """A request body as received: JSON (whatever its Content-Type said), a multipart body, or
    one image's bytes. Text that is not JSON is a 400 ``unsupported_content``."""
    parsed_json = _json_or_none(body)
    if parsed_json is not None:
        return parse_json(parsed_json)
    if isinstance(body, (bytes, bytearray)):
        if body.startswith(b"--"):  # no image format starts so; a multipart body always does
            return multipart.parse_multipart_body(body)
        return raw.parse(body)
    raise RequestError(
        "unsupported_content",
        "the body is text, not an image; send image bytes (Content-Type: application/octet-stream "
        "or image/*), multipart files, or JSON with base64 images",
    )


def parse_json(body: Any) -> ParsedRequest:
    """A parsed JSON body, by its keys: images/data, KServe v1 instances, or v2 inputs."""
    if not isinstance(body, dict):
        raise RequestError("invalid_json", f"the JSON body must be an object; {JSON_SHAPE_HELP}")
    for wire_format in _JSON_FORMATS:
        if wire_format.matches(body):
            return wire_format.parse(body)
    raise RequestError("invalid_json", f"no images found in the JSON body; {JSON_SHAPE_HELP}")


def _json_or_none(body: str | bytes | bytearray) -> Any:
    """``body`` parsed as JSON if it is a JSON object or array, else None. Only a body whose first
    non-blank character is ``{`` or ``[`` is tried (no common image format starts so), so image
    bytes cost one look at their first bytes."""
    opener = body[:64].lstrip()[:1]
    if opener not in ("{", "[", b"{", b"["):
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        return None
