"""What every wire format shares: the parsed request, the reply, base64 and the request checks.

A wire format module parses a body into a ``ParsedRequest`` (the images, and the encoder that
answers in the same format) and raises ``RequestError`` for a body it cannot read.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from dataclasses import dataclass, replace
from typing import Any, Protocol

from handler.decode.inputs import ImageInput
from handler.errors import ImageError, RequestError
from handler.model.topk import Prediction  # one image's answer (re-exported for the doors)
from handler.protocols.options import NO_OPTIONS, RequestOptions

JSON_SHAPE_HELP = (
    'send {"images": ["<base64>", ...]}, {"data": "<base64>"}, KServe v1 {"instances": [{"b64": "<base64>"}]} '
    'or v2 {"inputs": [{"name": "images", "shape": [n], "datatype": "BYTES", "data": ["<base64>", ...]}]}'
)


class Reply:
    """An answer: its JSON ``document``, and how it goes on the wire (``body``, ``content_type``,
    ``headers``). A door that serializes answers itself (KServe) takes the document; the others
    send the body, made once, when first asked for."""

    content_type = "application/json"

    def __init__(self, document: Any) -> None:
        self.document = document

    @functools.cached_property
    def body(self) -> str | bytes:
        return json.dumps(self.document)

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return ()


class Encoder(Protocol):
    """Turns a request's results into the body its format answers with."""

    def encode(self, results: list[Prediction], model_name: str | None) -> Reply: ...


@dataclass(frozen=True)
class ParsedRequest:
    """The images of one request, how to answer it, and its own parameters (``top_k``, deadline)."""

    images: list[ImageInput]
    encoder: Encoder
    options: RequestOptions = NO_OPTIONS

    def reply(self, results: list[Prediction], model_name: str | None = None) -> Reply:
        return self.encoder.encode(results, model_name)

    def with_options(self, options: RequestOptions) -> "ParsedRequest":
        """This request with ``options`` added to its own (``RequestOptions.merged``)."""
        return self if options == NO_OPTIONS else replace(self, options=self.options.merged(options))


@dataclass(frozen=True)
class PlainJson:
    """One image -> its ``{label: score}`` object (the stock handler's shape); a list -> a list."""

    as_list: bool

    def encode(self, results: list[Prediction], model_name: str | None) -> Reply:
        return Reply(results if self.as_list else results[0])


class ErrorReply(Reply):
    """A rejected request's JSON body; a 503 also says when to retry (``Retry-After``)."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.as_json())
        self.retry_after_s = error.retry_after_s

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return () if self.retry_after_s is None else (("Retry-After", str(self.retry_after_s)),)


def error_reply(error: RequestError) -> Reply:
    """The JSON body every format answers a rejected request with (and its Retry-After)."""
    return ErrorReply(error)


def check_images(parsed: ParsedRequest, max_images: int) -> ParsedRequest:
    """``parsed`` if it holds 1..max_images non-empty images; else the RequestError (4xx)."""
    images = parsed.images
    if not images:
        raise RequestError("no_images", "the request holds no images; send at least one")
    if len(images) > max_images:
        raise RequestError(
            "too_many_images",
            f"the request holds {len(images)} images; the limit is {max_images} per request, "
            "split it into several requests",
        )
    empty = [ImageError("empty_image", "zero bytes", i, img.field)
             for i, img in enumerate(images) if isinstance(img.data, (bytes, bytearray)) and not img.data]
    if empty:
        raise RequestError("empty_image", "some images are empty (zero bytes)", empty)
    return parsed


def decode_base64_list(items: list[Any], field: str) -> list[ImageInput]:
    """Each item a base64 string, or KServe v1's ``{"b64": ...}`` / ``{"data": ...}`` wrapping one
    (accepted in every list: clients mix the two styles)."""
    images: list[ImageInput] = []
    problems: list[ImageError] = []
    for index, item in enumerate(items):
        if isinstance(item, dict):
            item = item.get("b64", item.get("data"))
        try:
            images.append(ImageInput(decode_base64(item), field))
        except ValueError as exc:
            problems.append(ImageError("invalid_base64", str(exc), index, field))
    if problems:
        raise RequestError("invalid_base64", "some images are not valid base64 strings", problems)
    return images


def decode_base64(item: Any) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, optional data: URL prefix, line breaks allowed)."""
    if not isinstance(item, str):
        raise ValueError(f"expected a base64 string, got {type(item).__name__}")
    text = item
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise ValueError("data: URL without a comma before the payload")
    try:  # the common case, a plain standard-alphabet string: one pass, no normalizing copies
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        pass  # line breaks, URL-safe alphabet, missing padding -- or invalid: normalize and see
    text = "".join(text.split())
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4) if "=" not in text else ""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None
