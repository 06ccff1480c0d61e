"""Wire formats: one module each, parsing and encoding together.

    raw          one image's bytes                          -> {label: score}
    multipart    form-data fields, or a multipart/mixed body -> an object or a list
    json_images  {"images": [b64, ...]} / {"data": b64}     -> a list / an object
    kserve_v1    {"instances": [...]}                       -> {"predictions": [...]}
    kserve_v2    Open Inference Protocol, BYTES inputs       -> {"outputs": [{"name": "predictions", ...}]}

``parse_body`` recognises a body by its content (clients' Content-Types are unreliable: curl
-d, octet-stream JSON); ``parse_json`` takes a body some frontend already parsed as JSON.
"""

from __future__ import annotations

import json
from typing import Any

from handler.errors import RequestError
from handler.protocols import json_images, kserve_v1, kserve_v2, multipart, raw
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

__all__ = ["ParsedRequest", "PlainJson", "Prediction", "Reply", "check_images", "decode_base64",
           "error_reply", "parse_body", "parse_json"]

_JSON_FORMATS = (json_images, kserve_v1, kserve_v2)


def parse_body(body: bytes | bytearray | str) -> ParsedRequest:
    """A request body as received: JSON (whatever its Content-Type said), a multipart body, or
    one image's bytes. Text that is not JSON is a 400 ``unsupported_content``."""
    parsed_json = _json_or_none(body)
    if parsed_json is not None:
        return parse_json(parsed_json)
    if isinstance(body, (bytes, bytearray)):
        if body.startswith(b"--"):  # no image format starts so; a multipart body always does
            return multipart.parse_body(body)
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
