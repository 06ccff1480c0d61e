"""Multipart requests: one image per part, named by the part's ``name``, in part order.

Two ways in:
    ``parse_fields``  the parts a frontend already decoded (a ``multipart/form-data`` upload:
                      TorchServe hands them over as one field each)
    ``parse_multipart_body``    an undecoded body (``multipart/mixed``, or any multipart type a frontend
                      passes through): split here, without copying the parts twice.
One part is answered with its ``{label: score}`` object, several with a list.
"""

from __future__ import annotations

from typing import Any, Mapping

from handler.errors import ImageError, RequestError
from handler.decode.inputs import ImageInput
from handler.protocols.common import ParsedRequest, PlainJson


def parse_fields(fields: Mapping[str, Any]) -> ParsedRequest:
    """Decoded form fields -> their images; a text field is a 400 ``invalid_field``."""
    images: list[ImageInput] = []
    problems: list[ImageError] = []
    for index, (name, value) in enumerate(fields.items()):
        if isinstance(value, (bytes, bytearray)):
            images.append(ImageInput(bytes(value), name))
        else:
            problems.append(ImageError("invalid_field", "field is text or JSON, not an image file", index, name))
    if problems:
        raise RequestError("invalid_field", "multipart fields must be image files", problems)
    return ParsedRequest(images, PlainJson(as_list=len(images) > 1))


def parse_multipart_body(body: bytes | bytearray) -> ParsedRequest:
    """An undecoded multipart body (it starts with its ``--boundary`` line) -> its parts' images.

    TorchServe decodes ``multipart/form-data`` itself, in its frontend, which costs more than
    splitting here (docs/performance.md: transport-only figures); a ``multipart/mixed`` body of
    the same parts reaches the handler whole.
    """
    first_line_end = body.find(b"\r\n")
    delimiter = bytes(body[:first_line_end]).rstrip(b" \t") if first_line_end > 2 else b""
    if not 2 < len(delimiter) <= 72:  # "--" + a boundary of 1-70 characters (RFC 2046)
        raise RequestError("invalid_multipart", "the body starts like a multipart body but has no boundary line")
    separator = b"\r\n" + delimiter
    view = memoryview(body)
    images: list[ImageInput] = []
    start = first_line_end + 2
    search = start
    while True:
        end = body.find(separator, search)
        if end < 0:
            raise RequestError("invalid_multipart", "the multipart body ends without its closing boundary "
                                                    f"{delimiter.decode('latin-1')}--")
        after = end + len(separator)
        closing = body[after : after + 2] == b"--"
        line_end = after
        while body[line_end : line_end + 1] in (b" ", b"\t"):
            line_end += 1
        if not closing and body[line_end : line_end + 2] != b"\r\n":
            search = end + 1  # the boundary text followed by more: part of the data, not a delimiter
            continue
        images.append(_part(body, view, start, end, len(images)))
        if closing:
            return ParsedRequest(images, PlainJson(as_list=len(images) > 1))
        start = search = line_end + 2


def _part(body: bytes | bytearray, view: memoryview, start: int, end: int, index: int) -> ImageInput:
    """The part in ``body[start:end]``: headers (the name comes from Content-Disposition), a
    blank line, the image bytes."""
    if body[start : start + 2] == b"\r\n":  # a part without headers
        return ImageInput(bytes(view[start + 2 : end]), None)
    head_end = body.find(b"\r\n\r\n", start, end)
    if head_end < 0:
        raise RequestError("invalid_multipart", "a multipart part has no blank line after its headers",
                           [ImageError("invalid_multipart", "part headers are not terminated", index, None)])
    name = None
    for line in bytes(view[start:head_end]).decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            params = dict(_header_param(p) for p in value.split(";")[1:])
            name = params.get("name") or params.get("filename")
    return ImageInput(bytes(view[head_end + 4 : end]), name)


def _header_param(text: str) -> tuple[str, str]:
    key, _, value = text.strip().partition("=")
    return key.strip().lower(), value.strip().strip('"')
