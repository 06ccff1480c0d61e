"""The ways a request carries its own parameters (top_k), for the doors' end-to-end tests: each
form's request, and how to read the per-image answers back out of its response."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Callable

import requests

from harness.wire import multipart_mixed


@dataclass(frozen=True)
class Form:
    """One way to send images with a top_k: the route it goes to (``predictions``, ``v1`` or
    ``v2``), the keyword arguments of ``requests.post``, and how to read its answers."""

    name: str
    route: str
    kwargs: dict[str, Any]
    answers: Callable[[Any], list[dict[str, float]]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _v2_answers(document: dict) -> list[dict[str, float]]:
    return [json.loads(item) for item in document["outputs"][0]["data"]]


def top_k_forms(images: list[bytes], k: int, *, routes: tuple[str, ...] = ("predictions", "v1", "v2")) -> list[Form]:
    """Every form of a request for ``images`` that asks for ``k`` classes, on these routes."""
    header = {"X-Top-K": str(k)}
    files = [(f"f{i}", (f"f{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    mixed, mixed_type = multipart_mixed(files)
    forms = [
        Form("json images", "predictions", {"json": {"images": [b64(d) for d in images], "top_k": k}}, list),
        Form("raw + X-Top-K", "predictions", {"data": images[0], "headers": {**header, "Content-Type": "image/jpeg"}},
             lambda doc: [doc]),
        Form("multipart form + X-Top-K", "predictions", {"files": files, "headers": header},
             lambda doc: doc if isinstance(doc, list) else [doc]),
        Form("multipart/mixed + X-Top-K", "predictions",
             {"data": mixed, "headers": {**header, "Content-Type": mixed_type}},
             lambda doc: doc if isinstance(doc, list) else [doc]),
        Form("v1 parameters", "v1", {"json": {"instances": [{"b64": b64(d)} for d in images],
                                              "parameters": {"top_k": k}}}, lambda doc: doc["predictions"]),
        Form("v2 parameters", "v2", {"json": {"inputs": [{"name": "images", "shape": [len(images)], "datatype": "BYTES",
                                                          "data": [b64(d) for d in images]}],
                                              "parameters": {"top_k": k}}}, _v2_answers),
    ]
    return [form for form in forms if form.route in routes]


def bad_top_k_requests(image: bytes, classes: int) -> list[tuple[str, str, dict[str, Any]]]:
    """Requests whose top_k is out of range or no integer: (what, route, requests kwargs)."""
    return [
        ("X-Top-K 0", "predictions", {"data": image, "headers": {"X-Top-K": "0", "Content-Type": "image/jpeg"}}),
        ("X-Top-K above the classes", "predictions",
         {"data": image, "headers": {"X-Top-K": str(classes + 1), "Content-Type": "image/jpeg"}}),
        ("X-Top-K text", "predictions", {"data": image, "headers": {"X-Top-K": "three", "Content-Type": "image/jpeg"}}),
        ("JSON top_k a string", "predictions", {"json": {"images": [b64(image)], "top_k": "3"}}),
        ("v2 top_k negative", "v2", {"json": {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                                          "data": [b64(image)]}], "parameters": {"top_k": -1}}}),
    ]


def check_bad_top_k(response: requests.Response, what: str) -> None:
    """A 400 whose JSON error names top_k (the KServe door's v2 errors come in KServe's envelope)."""
    assert response.status_code == 400, (what, response.status_code, response.text)
    assert "top_k" in response.text.lower() or "x-top-k" in response.text.lower(), (what, response.text)
    assert "invalid_parameter" in response.text, (what, response.text)


def first(prediction: dict[str, float], k: int) -> dict[str, float]:
    return dict(list(prediction.items())[:k])
