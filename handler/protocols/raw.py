"""A raw body: the request is one image's bytes (``curl -T``, octet-stream, image/*)."""

from __future__ import annotations

from handler.decode.inputs import ImageInput
from handler.protocols.common import ParsedRequest, PlainJson


def parse(body: bytes | bytearray) -> ParsedRequest:
    """One image, answered with its ``{label: score}`` object."""
    return ParsedRequest([ImageInput(bytes(body), None)], PlainJson(as_list=False))
