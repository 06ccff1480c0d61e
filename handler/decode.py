"""TorchServe request rows -> the raw image bytes they carry.

A row is one request as TorchServe hands it to ``handle``:
    raw body (``curl -T``, octet-stream, image/*)  {"body": bytearray}
    multipart form, one file per field             {"a": bytearray, "b": bytearray, ...}
    multipart/mixed (the same parts, undecoded)    {"body": bytearray starting with "--boundary"}
    JSON (application/json, already parsed)        {"body": {"images": [b64, ...]}} or {"body": {"data": b64}}
    KServe v1 (/v1/models/M:predict)               {"body": {"instances": [{"b64"|"data": b64} | b64, ...]}}
    KServe v2 / Open Inference Protocol            {"body": {"inputs": [{"name", "shape", "datatype": "BYTES",
      (/v2/models/M/infer)                                              "data": [b64, ...]}, ...]}}
Text bodies arrive as ``str`` and are rejected (they are not images), unless they hold JSON: a JSON
body sent with another Content-Type (bytes or text) is read as if it had been sent as JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Mapping

from handler.errors import BadRequest, ImageProblem, PayloadTooLarge


@dataclass(frozen=True)
class RawImage:
    """One image of a request: where it came from and its encoded bytes."""

    index: int
    field: str | None
    data: bytes


@dataclass(frozen=True)
class ParsedRequest:
    """The images of one request; ``as_list`` says whether the client sent a list, ``protocol``
    which envelope the answer goes in (``plain``, ``kserve_v1``, ``kserve_v2``)."""

    images: list[RawImage]
    as_list: bool
    protocol: str = "plain"
    request_id: str | None = None


JSON_SHAPE_HELP = (
    'send {"images": ["<base64>", ...]}, {"data": "<base64>"}, KServe v1 {"instances": [{"b64": "<base64>"}]} '
    'or v2 {"inputs": [{"name": "images", "shape": [n], "datatype": "BYTES", "data": ["<base64>", ...]}]}'
)


def parse_request(row: Mapping[str, Any], max_images: int) -> ParsedRequest:
    """Extract a request's images; raise RequestError (4xx) if it carries none or too many."""
    if not row:
        # TorchServe also hands over an empty row for a url-encoded body without "=": JSON sent
        # by curl -d without its Content-Type, most likely.
        raise BadRequest(
            "empty_request",
            "the request has no body the server can read; send one or more images (JSON needs "
            "Content-Type: application/json: curl -d sends application/x-www-form-urlencoded)",
        )
    if "body" in row and len(row) == 1:
        parsed = _parse_body(row["body"])
    else:
        parsed = _parse_multipart(row)
    if not parsed.images:
        raise BadRequest("no_images", "the request holds no images; send at least one")
    if len(parsed.images) > max_images:
        raise PayloadTooLarge(
            "too_many_images",
            f"the request holds {len(parsed.images)} images; the limit is {max_images} per request, "
            "split it into several requests",
        )
    _reject_empty(parsed.images)
    return parsed


def _parse_body(body: Any) -> ParsedRequest:
    if isinstance(body, (str, bytes, bytearray)):
        # JSON sent without "Content-Type: application/json" (curl -d, a client's default
        # octet-stream) reaches us unparsed, as text or bytes: read it as JSON all the same.
        parsed_json = _json_or_none(body)
        if parsed_json is not None:
            return _parse_json(parsed_json)
    if isinstance(body, (bytes, bytearray)):
        if body.startswith(b"--"):  # no image format starts so; a multipart body always does
            return _parse_multipart_body(body)
        return ParsedRequest([RawImage(0, None, bytes(body))], as_list=False)
    if isinstance(body, (dict, list)):
        return _parse_json(body)
    raise BadRequest(
        "unsupported_content",
        "the body is text, not an image; send image bytes (Content-Type: application/octet-stream "
        "or image/*), multipart files, or JSON with base64 images",
    )


def _json_or_none(body: str | bytes | bytearray) -> Any:
    """``body`` parsed as JSON if it is a JSON object or array, else None. Only a body whose first
    non-blank character is ``{`` or ``[`` is tried (no common image format starts so), so image
    bytes cost one look at their first bytes."""
    head = body[:64].lstrip()
    opener = head[:1]
    if opener not in ("{", "[", b"{", b"["):
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        return None


def _parse_multipart(row: Mapping[str, Any]) -> ParsedRequest:
    # A single JSON part is treated like a JSON body, so clients may also post JSON as a form field.
    if len(row) == 1:
        (value,) = row.values()
        if isinstance(value, (dict, list)):
            return _parse_json(value)
    if any(str(name).lstrip()[:1] in ("{", "[") for name in row):
        # TorchServe's frontend split a url-encoded body into fields ("+" read as a space, the
        # first "=" as a separator): the JSON cannot be trusted back together.
        raise BadRequest(
            "form_encoded_json",
            "the body looks like JSON sent as application/x-www-form-urlencoded (curl -d's default), "
            "which corrupts base64; send it with Content-Type: application/json",
        )
    images: list[RawImage] = []
    problems: list[ImageProblem] = []
    for index, (name, value) in enumerate(row.items()):
        if isinstance(value, (bytes, bytearray)):
            images.append(RawImage(index, name, bytes(value)))
        else:
            problems.append(ImageProblem(index, name, "field is text or JSON, not an image file"))
    if problems:
        raise BadRequest("invalid_field", "multipart fields must be image files", problems)
    return ParsedRequest(images, as_list=len(images) > 1)


def _parse_multipart_body(body: bytes | bytearray) -> ParsedRequest:
    """A multipart body TorchServe passed through undecoded (``multipart/mixed``, or any
    multipart type but form-data): the parts are the images, named like form fields.

    TorchServe decodes ``multipart/form-data`` itself, in its frontend, which cost 9 ms per
    32 photos of 640x480 and 32 ms at 1280x960 (``benchmark.py``, transport-only figures); a
    ``multipart/mixed`` body of the same parts reaches the handler whole and is split here.
    """
    first_line_end = body.find(b"\r\n")
    delimiter = bytes(body[:first_line_end]).rstrip(b" \t") if first_line_end > 2 else b""
    if not 2 < len(delimiter) <= 72:  # "--" + a boundary of 1-70 characters (RFC 2046)
        raise BadRequest("invalid_multipart", "the body starts like a multipart body but has no boundary line")
    separator = b"\r\n" + delimiter
    view = memoryview(body)
    images: list[RawImage] = []
    start = first_line_end + 2
    search = start
    while True:
        end = body.find(separator, search)
        if end < 0:
            raise BadRequest("invalid_multipart", "the multipart body ends without its closing boundary "
                                                  f"{delimiter.decode('latin-1')}--")
        after = end + len(separator)
        closing = body[after : after + 2] == b"--"
        line_end = after
        while body[line_end : line_end + 1] in (b" ", b"\t"):
            line_end += 1
        if not closing and body[line_end : line_end + 2] != b"\r\n":
            search = end + 1  # the boundary text followed by more: part of the data, not a delimiter
            continue
        images.append(_multipart_part(body, view, start, end, len(images)))
        if closing:
            return ParsedRequest(images, as_list=len(images) > 1)
        start = search = line_end + 2


def _multipart_part(body: bytes | bytearray, view: memoryview, start: int, end: int, index: int) -> RawImage:
    """The part in ``body[start:end]``: headers (the name comes from Content-Disposition), a
    blank line, the image bytes."""
    if body[start : start + 2] == b"\r\n":  # a part without headers
        return RawImage(index, None, bytes(view[start + 2 : end]))
    head_end = body.find(b"\r\n\r\n", start, end)
    if head_end < 0:
        raise BadRequest("invalid_multipart", "a multipart part has no blank line after its headers",
                         [ImageProblem(index, None, "part headers are not terminated")])
    name = None
    for line in bytes(view[start:head_end]).decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            params = dict(_header_param(p) for p in value.split(";")[1:])
            name = params.get("name") or params.get("filename")
    return RawImage(index, name, bytes(view[head_end + 4 : end]))


def _header_param(text: str) -> tuple[str, str]:
    key, _, value = text.strip().partition("=")
    return key.strip().lower(), value.strip().strip('"')


def _parse_json(body: Any) -> ParsedRequest:
    if not isinstance(body, dict):
        raise BadRequest("invalid_json", f"the JSON body must be an object; {JSON_SHAPE_HELP}")
    if "images" in body:
        items = body["images"]
        if not isinstance(items, list):
            raise BadRequest("invalid_json", f'"images" must be a list; {JSON_SHAPE_HELP}')
        return ParsedRequest(_decode_base64_list(items, "images"), as_list=True)
    if "data" in body:
        return ParsedRequest(_decode_base64_list([body["data"]], "data"), as_list=False)
    if "instances" in body:
        return _parse_kserve_v1(body["instances"])
    if "inputs" in body:
        return _parse_kserve_v2(body["inputs"], body.get("id"))
    raise BadRequest("invalid_json", f"no images found in the JSON body; {JSON_SHAPE_HELP}")


def _parse_kserve_v1(instances: Any) -> ParsedRequest:
    if not isinstance(instances, list):
        raise BadRequest("invalid_json", f'"instances" must be a list; {JSON_SHAPE_HELP}')
    return ParsedRequest(_decode_base64_list(instances, "instances"), as_list=True, protocol="kserve_v1")


def _parse_kserve_v2(inputs: Any, request_id: Any) -> ParsedRequest:
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise BadRequest("invalid_json", f'"inputs" must be a list of tensors; {JSON_SHAPE_HELP}')
    images: list[RawImage] = []
    for tensor in inputs:
        name = str(tensor.get("name", "input"))
        if tensor.get("datatype", "BYTES") != "BYTES" or not isinstance(tensor.get("data"), list):
            raise BadRequest("invalid_json", f'input {name!r} must have datatype "BYTES" and a "data" list of '
                                             "base64 images")
        decoded = _decode_base64_list(tensor["data"], name)
        images += [RawImage(len(images) + i, img.field, img.data) for i, img in enumerate(decoded)]
    return ParsedRequest(images, as_list=True, protocol="kserve_v2",
                         request_id=str(request_id) if request_id is not None else None)


def _decode_base64_list(items: list[Any], field: str) -> list[RawImage]:
    """Each item a base64 string, or KServe v1's ``{"b64": ...}`` / ``{"data": ...}`` wrapping one
    (accepted in every list: clients mix the two styles)."""
    images: list[RawImage] = []
    problems: list[ImageProblem] = []
    for index, item in enumerate(items):
        if isinstance(item, dict):
            item = item.get("b64", item.get("data"))
        try:
            images.append(RawImage(index, field, decode_base64(item)))
        except ValueError as exc:
            problems.append(ImageProblem(index, field, str(exc)))
    if problems:
        raise BadRequest("invalid_base64", "some images are not valid base64 strings", problems)
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


def _reject_empty(images: list[RawImage]) -> None:
    problems = [ImageProblem(img.index, img.field, "zero bytes") for img in images if not img.data]
    if problems:
        raise BadRequest("empty_image", "some images are empty (zero bytes)", problems)

