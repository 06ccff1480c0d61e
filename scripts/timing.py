"""Timing helpers shared by the benchmark scripts: percentiles, a stopwatch, and handle() timing."""

from __future__ import annotations

import base64
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


def json_request(images: list[bytes]) -> dict[str, Any]:
    """One TorchServe request row carrying ``images`` as base64 JSON."""
    return {"body": {"images": [base64.b64encode(b).decode() for b in images]}}


def request_rows(images: list[bytes], per_request: int, encoding: str = "json") -> list[dict[str, Any]]:
    """``images`` as TorchServe hands them to handle(): requests of up to ``per_request`` images,
    each base64 JSON (``json``) or a multipart form upload, one field per image (``form``)."""
    if encoding not in ("json", "form"):
        raise ValueError(f"encoding must be json or form, got {encoding!r}")
    chunks = [images[i : i + per_request] for i in range(0, len(images), per_request)]
    if encoding == "json":
        return [json_request(chunk) for chunk in chunks]
    return [{f"f{j}": bytearray(b) for j, b in enumerate(chunk)} for chunk in chunks]


def time_handle(handler: Any, context: Any, images: list[bytes], repeats: int,
                per_request: int | None = None) -> dict[str, float]:
    """handle() on ``images`` (base64 JSON; one request, or one server-side batch of requests of
    ``per_request`` images each), after a warm-up call: the median seconds per call, and the
    median of each figure the handler published (its stage times)."""
    rows = request_rows(images, per_request or len(images))
    handler.handle(rows, context)  # warm-up
    seconds: list[float] = []
    published: dict[str, list[float]] = {}
    metrics = getattr(context, "metrics", None)
    for _ in range(repeats):
        if metrics is not None:
            metrics.values.clear()
        start = time.perf_counter()
        handler.handle(rows, context)
        seconds.append(time.perf_counter() - start)
        for name, values in (metrics.values.items() if metrics is not None else ()):
            published.setdefault(name, []).append(values[-1])
    result = {"seconds": statistics.median(seconds)}
    result.update({name: statistics.median(values) for name, values in published.items()})
    return result
