"""KServe v2 / Open Inference Protocol (``POST /v2/models/<m>/infer``): every element of every
BYTES input is an image; the answer is one BYTES output ``predictions`` holding one JSON string
per image, in input order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from handler.errors import RequestError
from handler.inputs import ImageInput
from handler.protocols.common import JSON_SHAPE_HELP, ParsedRequest, Prediction, Reply, decode_base64_list


@dataclass(frozen=True)
class InferResponse:
    """The v2 response envelope; ``request_id`` echoes the request's ``id``."""

    request_id: str | None = None

    def encode(self, results: list[Prediction], model_name: str | None) -> Reply:
        body: dict[str, Any] = {
            "model_name": model_name,
            "outputs": [{
                "name": "predictions",
                "shape": [len(results)],
                "datatype": "BYTES",
                "data": [json.dumps(r) for r in results],
            }],
        }
        if self.request_id is not None:
            body["id"] = self.request_id
        return Reply(json.dumps(body))


def parse(body: dict[str, Any]) -> ParsedRequest:
    """The images of a JSON v2 request: base64 strings in BYTES inputs."""
    inputs, request_id = body["inputs"], body.get("id")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise RequestError("invalid_json", f'"inputs" must be a list of tensors; {JSON_SHAPE_HELP}')
    images: list[ImageInput] = []
    for tensor in inputs:
        name = str(tensor.get("name", "input"))
        if tensor.get("datatype", "BYTES") != "BYTES" or not isinstance(tensor.get("data"), list):
            raise RequestError("invalid_json", f'input {name!r} must have datatype "BYTES" and a "data" list of '
                                               "base64 images")
        images += decode_base64_list(tensor["data"], name)
    return ParsedRequest(images, InferResponse(str(request_id) if request_id is not None else None))


def matches(body: dict[str, Any]) -> bool:
    return "inputs" in body
