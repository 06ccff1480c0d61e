"""Response bodies: plain JSON, or the KServe v1 / v2 envelope the request came in."""

from __future__ import annotations

import json
from typing import Any

from handler.decode import ParsedRequest

Prediction = dict[str, float]


def success_body(request: ParsedRequest, results: list[Prediction], model_name: str | None) -> str:
    """One image -> an object; several -> a list; KServe requests -> their protocol's envelope."""
    if request.protocol == "kserve_v1":
        return json.dumps({"predictions": results})
    if request.protocol == "kserve_v2":
        body: dict[str, Any] = {
            "model_name": model_name,
            "outputs": [{
                "name": "predictions",
                "shape": [len(results)],
                "datatype": "BYTES",
                "data": [json.dumps(r) for r in results],
            }],
        }
        if request.request_id is not None:
            body["id"] = request.request_id
        return json.dumps(body)
    return json.dumps(results if request.as_list else results[0])
