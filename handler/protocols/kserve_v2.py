"""KServe v2 / Open Inference Protocol (``POST /v2/models/<m>/infer``): every element of every
BYTES input is an image; the answer is one BYTES output ``predictions`` holding one JSON string
per image, in input order.

Two encodings of a request:
    JSON     ``{"inputs": [{"name", "shape", "datatype": "BYTES", "data": ["<base64>", ...]}]}``
    binary   the tensor data extension (tritonclient's default): a JSON header of
             ``Inference-Header-Content-Length`` bytes, then each input's raw bytes
             (``parameters.binary_data_size`` of them; a BYTES element is a 4-byte
             little-endian length and the element's bytes)
The answer is JSON, or binary the same way when the request asks for it
(``parameters.binary_data_output``, or ``binary_data`` on the requested output). Request-level
``parameters`` may also set ``top_k`` and ``timeout`` (microseconds, Triton's extension).
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from typing import Any, Mapping

from handler.errors import ImageError, RequestError
from handler.decode.inputs import ImageInput
from handler.protocols.common import JSON_SHAPE_HELP, ParsedRequest, Prediction, Reply, decode_base64_list
from handler.protocols.options import from_parameters

OUTPUT = "predictions"
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class V2Encoder:
    """The v2 response; ``request_id`` echoes the request's ``id``; ``binary`` sends the output
    as raw tensor data after a JSON header (the binary tensor data extension)."""

    request_id: str | None = None
    binary: bool = False

    def encode(self, results: list[Prediction], model_name: str | None) -> Reply:
        output: dict[str, Any] = {"name": OUTPUT, "shape": [len(results)], "datatype": "BYTES",
                                  "data": [json.dumps(r) for r in results]}
        document: dict[str, Any] = {"model_name": model_name, "outputs": [output]}
        if self.request_id is not None:
            document["id"] = self.request_id
        return BinaryReply(document) if self.binary else Reply(document)


class BinaryReply(Reply):
    """A v2 answer sent with the binary tensor data extension: the JSON header without the
    output's ``data``, then the data as a raw BYTES tensor."""

    content_type = "application/octet-stream"

    @functools.cached_property
    def _wire(self) -> tuple[bytes, bytes]:
        (output,) = self.document["outputs"]
        raw = serialize_bytes([e.encode() for e in output["data"]])
        head = {k: v for k, v in output.items() if k != "data"}
        head["parameters"] = {"binary_data_size": len(raw)}
        return json.dumps({**self.document, "outputs": [head]}).encode(), raw

    @property
    def body(self) -> bytes:
        header, raw = self._wire
        return header + raw

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return ((HEADER_LENGTH, str(len(self._wire[0]))),)


def parse(body: dict[str, Any]) -> ParsedRequest:
    """The images of a JSON v2 request: base64 strings in BYTES inputs."""
    images: list[ImageInput] = []
    for tensor in _inputs(body):
        images += tensor_images(tensor, tensor.get("data"))
    return ParsedRequest(images, _encoder(body), from_parameters(body.get("parameters")))


def parse_binary(body: bytes | bytearray, header_length: int | str) -> ParsedRequest:
    """A request in the binary tensor data extension: the JSON header (``header_length`` bytes:
    the ``Inference-Header-Content-Length`` header's value), then the raw inputs. An input may
    still carry its elements as base64 ``data`` in the header instead."""
    header, tensors = split_binary(body, header_length)
    images: list[ImageInput] = []
    for tensor, elements in tensors:
        images += tensor_images(tensor, elements if elements is not None else tensor.get("data"))
    return ParsedRequest(images, _encoder(header), from_parameters(header.get("parameters")))


def parse_infer_request(request: Any) -> ParsedRequest:
    """The images of a KServe ``InferRequest`` (REST or gRPC, decoded by KServe's data plane):
    duck-typed, so the core needs no KServe. BYTES elements that arrived as bytes are images as
    they are; text elements are base64."""
    outputs = [{"name": output.name} for output in request.request_outputs or []]
    encoder = _encoder({"id": request.id, "outputs": outputs})  # KServe itself sends binary outputs
    images: list[ImageInput] = []
    for tensor in request.inputs:
        try:
            elements = tensor.as_numpy().ravel().tolist()
        except Exception as exc:  # a shape that does not fit its data, ...
            raise RequestError("invalid_json", f"input {tensor.name!r}: {str(exc)[:200]}") from None
        images += tensor_images({"name": tensor.name, "datatype": tensor.datatype}, elements)
    return ParsedRequest(images, encoder, from_parameters(getattr(request, "parameters", None)))


def is_infer_request(payload: Any) -> bool:
    """Whether ``payload`` is a KServe InferRequest (by its shape: the core imports no KServe)."""
    return hasattr(payload, "inputs") and hasattr(payload, "request_outputs")


def split_binary(body: bytes | bytearray, header_length: int | str,
                 ) -> tuple[dict[str, Any], list[tuple[dict, list | None]]]:
    """The JSON header of a binary request, and each input tensor with its raw BYTES elements
    (None for an input whose elements are in the header as ``data``). ``header_length`` may be
    the header's text as received."""
    try:
        header_length = int(header_length)
    except ValueError:
        raise RequestError("invalid_binary_tensor", f"{HEADER_LENGTH} must be a number of bytes, "
                                                    f"got {str(header_length)[:40]!r}") from None
    if not 0 < header_length <= len(body):
        raise RequestError("invalid_binary_tensor", f"{HEADER_LENGTH} is {header_length}, but the body has "
                                                    f"{len(body)} bytes")
    try:
        header = json.loads(bytes(body[:header_length]))
    except (ValueError, RecursionError):
        raise RequestError("invalid_json", f"the first {header_length} bytes ({HEADER_LENGTH}) are not a JSON "
                                           "inference request header") from None
    if not isinstance(header, dict):
        raise RequestError("invalid_json", f"the inference request header must be a JSON object; {JSON_SHAPE_HELP}")
    view = memoryview(body)
    offset = header_length
    tensors: list[tuple[dict, list | None]] = []
    for tensor in _inputs(header):
        name = str(tensor.get("name", "input"))
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            tensors.append((tensor, None))
            continue
        if tensor.get("datatype") != "BYTES":
            raise RequestError("invalid_binary_tensor", f'input {name!r} must have datatype "BYTES" (images), '
                                                        f"got {tensor.get('datatype')!r}")
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise RequestError("invalid_binary_tensor", f"input {name!r} says binary_data_size {size!r}, but only "
                                                        f"{len(body) - offset} bytes follow")
        tensors.append((tensor, deserialize_bytes(view[offset : offset + size], name)))
        offset += size
    if offset != len(body):
        raise RequestError("invalid_binary_tensor", f"{len(body) - offset} bytes follow the inputs' binary data "
                                                    "(check binary_data_size)")
    return header, tensors


def tensor_images(tensor: Mapping[str, Any], elements: Any) -> list[ImageInput]:
    """The images of one BYTES input: raw bytes elements as they are (binary data, gRPC), text
    elements as base64 (JSON cannot carry bytes)."""
    name = str(tensor.get("name", "input"))
    if tensor.get("datatype", "BYTES") != "BYTES" or not isinstance(elements, list):
        raise RequestError("invalid_json", f'input {name!r} must have datatype "BYTES" and a "data" list of '
                                           "base64 images")
    if all(isinstance(e, (bytes, bytearray)) for e in elements):
        return [ImageInput(bytes(e), name) for e in elements]
    return decode_base64_list(elements, name)


def serialize_bytes(elements: list[bytes]) -> bytes:
    """A BYTES tensor's raw data: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def deserialize_bytes(raw: memoryview, name: str) -> list[bytes]:
    """The elements of a BYTES tensor's raw data (the inverse of ``serialize_bytes``)."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise RequestError("invalid_binary_tensor", f"input {name!r}: element {len(elements)} is cut off in "
                                                        "its 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise RequestError("invalid_binary_tensor", f"input {name!r}: element {len(elements)} says {length} "
                                                        f"bytes, {len(raw) - offset} are left",
                               [ImageError("invalid_binary_tensor", "cut off", len(elements), name)])
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    return elements


def _inputs(body: dict[str, Any]) -> list[dict[str, Any]]:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise RequestError("invalid_json", f'"inputs" must be a list of tensors; {JSON_SHAPE_HELP}')
    return inputs


def _encoder(body: dict[str, Any]) -> V2Encoder:
    """How the request wants its answer: its id, and binary output when it asks for it."""
    request_id = body.get("id")
    binary = bool((body.get("parameters") or {}).get("binary_data_output", False))
    outputs = body.get("outputs") or []
    for output in outputs if isinstance(outputs, list) else []:
        if not isinstance(output, dict) or output.get("name") != OUTPUT:
            name = output.get("name") if isinstance(output, dict) else output
            raise RequestError("invalid_json", f"unknown output {name!r}: this model has one output, {OUTPUT!r}")
        binary = bool((output.get("parameters") or {}).get("binary_data", binary))
    return V2Encoder(str(request_id) if request_id is not None else None, binary)


def matches(body: dict[str, Any]) -> bool:
    return "inputs" in body
