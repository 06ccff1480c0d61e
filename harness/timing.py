"""Timing helpers shared by the benchmark scripts: percentiles, a stopwatch, and classifier timing."""

from __future__ import annotations

import base64
import json
import statistics
import time
from typing import Any, Callable


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0..1) of ``values``, rounded to 0.1; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))], 1)


def latency_summary(latencies_ms: list[float]) -> dict[str, float | None]:
    return {"p50_ms": percentile(latencies_ms, 0.50), "p95_ms": percentile(latencies_ms, 0.95),
            "p99_ms": percentile(latencies_ms, 0.99)}


def timed_ms(fn: Callable[[], object]) -> float:
    """Milliseconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def json_body(images: list[bytes]) -> bytes:
    """A request body carrying ``images`` as base64 JSON (``{"images": [...]}``)."""
    return json.dumps({"images": [base64.b64encode(b).decode() for b in images]}).encode()


def request_batch(images: list[bytes], per_request: int, encoding: str = "json") -> Callable[[], list[list[Any]]]:
    """A function that makes one server-side batch of ``images`` in requests of up to
    ``per_request`` images, as a server would hand them to ``classify_requests``: parsed from
    base64 JSON bodies each time (``json``, the parse is part of the work), or the image bytes
    as a multipart upload delivers them (``form``)."""
    if encoding not in ("json", "form"):
        raise ValueError(f"encoding must be json or form, got {encoding!r}")
    chunks = [images[i : i + per_request] for i in range(0, len(images), per_request)]
    if encoding == "form":
        return lambda: chunks
    from handler.protocols import parse_request

    bodies = [json_body(chunk) for chunk in chunks]
    return lambda: [parse_request(body, max_images=per_request).images for body in bodies]


def time_requests(classifier: Any, images: list[bytes], repeats: int, per_request: int | None = None,
                  encoding: str = "json") -> dict[str, float]:
    """``classify_requests`` on ``images`` (one request, or one server-side batch of requests of
    ``per_request`` images each), after a warm-up call: the median seconds per call, and the
    median of each stage time the classifier reported."""
    make = request_batch(images, per_request or len(images), encoding)
    classifier.classify_requests(make())  # warm-up
    seconds: list[float] = []
    stages: dict[str, list[float]] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = classifier.classify_requests(make())
        seconds.append(time.perf_counter() - start)
        for name, value in result.timings.items():
            stages.setdefault(name, []).append(value)
    out = {"seconds": statistics.median(seconds)}
    out.update({name: statistics.median(values) for name, values in stages.items()})
    return out
