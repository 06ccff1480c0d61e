"""JSON with base64 images: ``{"images": ["<base64>", ...]}`` (a list) or ``{"data": "<base64>"}`` (one),
with optional ``"top_k"`` and ``"timeout_ms"`` beside them."""

from __future__ import annotations

from typing import Any

from handler.errors import RequestError
from handler.protocols.common import JSON_SHAPE_HELP, ParsedRequest, PlainJson, decode_base64_list
from handler.protocols.options import from_body


def parse(body: dict[str, Any]) -> ParsedRequest:
    """``images`` -> a list answered with a list (even of one); ``data`` -> one image, one object."""
    options = from_body(body.get("top_k"), body.get("timeout_ms"))
    if "images" in body:
        items = body["images"]
        if not isinstance(items, list):
            raise RequestError("invalid_json", f'"images" must be a list; {JSON_SHAPE_HELP}')
        return ParsedRequest(decode_base64_list(items, "images"), PlainJson(as_list=True), options)
    return ParsedRequest(decode_base64_list([body["data"]], "data"), PlainJson(as_list=False), options)


def matches(body: dict[str, Any]) -> bool:
    return "images" in body or "data" in body
