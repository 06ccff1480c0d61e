"""KServe v1 (``POST /v1/models/<m>:predict``): ``{"instances": [{"b64": ...} | b64, ...]}`` ->
``{"predictions": [...]}``; request-level ``parameters`` may set ``top_k`` and ``timeout`` (microseconds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from handler.errors import RequestError
from handler.protocols.common import JSON_SHAPE_HELP, ParsedRequest, Prediction, Reply, decode_base64_list
from handler.protocols.options import from_parameters


@dataclass(frozen=True)
class V1Encoder:
    """The v1 envelope: one prediction per instance, in order."""

    def encode(self, results: list[Prediction], model_name: str | None) -> Reply:
        return Reply({"predictions": results})


def parse(body: dict[str, Any]) -> ParsedRequest:
    instances = body["instances"]
    if not isinstance(instances, list):
        raise RequestError("invalid_json", f'"instances" must be a list; {JSON_SHAPE_HELP}')
    return ParsedRequest(decode_base64_list(instances, "instances"), V1Encoder(), from_parameters(body.get("parameters")))


def matches(body: dict[str, Any]) -> bool:
    return "instances" in body
