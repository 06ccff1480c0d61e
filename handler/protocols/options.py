"""Per-request parameters: how many classes to answer (``top_k``) and when the client stops
waiting (a deadline). Every wire format carries them its own way; they all end up here.

    header (any body)   X-Top-K: 3     X-Request-Timeout-Ms: 250     X-Request-Deadline-Ms: <Unix ms>
    JSON images         {"images": [...], "top_k": 3, "timeout_ms": 250}
    KServe v1 / v2      {"parameters": {"top_k": 3, "timeout": 250000}, ...}   (timeout in microseconds,
                        as Triton's Open Inference Protocol extension has it)

A timeout counts from when the server first sees the request (``received``): on a door that
queues requests itself (KServe, Ray Serve) the time queued counts. A deadline is an absolute
Unix time in milliseconds, for a server whose own queue is out of the handler's sight
(TorchServe's frontend): it needs the client's and server's clocks to agree. Values are
checked here (a bad one is a 400 ``invalid_parameter`` naming it); the upper bound of ``top_k``
(the model's classes) is the serving loop's.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

from handler.errors import RequestError

TOP_K_HEADER = "x-top-k"
TIMEOUT_HEADER = "x-request-timeout-ms"
DEADLINE_HEADER = "x-request-deadline-ms"
# What a door's transport says the client still waits, in ms (the KServe door's gRPC deadline);
# one more limit beside the request's own, never in conflict with them.
TRANSPORT_TIMEOUT_HEADER = "x-transport-timeout-ms"
# An absolute deadline below this is not a Unix time in milliseconds (it would be 2001-09-09):
# most likely seconds, which would expire every request.
MIN_UNIX_MS = 1e12
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")


@dataclass(frozen=True)
class RequestOptions:
    """A request's own parameters; None where it sets none (the model's settings apply).

    Attributes:
        top_k: classes answered per image.
        timeout_s: seconds the client waits, counted from the request's receipt.
        deadline_unix_s: the Unix time (seconds) after which the client no longer waits.
        transport_timeout_s: what the transport says the client still waits (a gRPC deadline).
    """

    top_k: int | None = None
    timeout_s: float | None = None
    deadline_unix_s: float | None = None
    transport_timeout_s: float | None = None

    def merged(self, other: "RequestOptions") -> "RequestOptions":
        """These options with ``other``'s where it sets them; a parameter both set differently
        is a 400 (a header and the body that disagree: which did the client mean?)."""
        values = {}
        for name, shown in (("top_k", "top_k"), ("timeout_s", "the timeout"), ("deadline_unix_s", "the deadline"),
                            ("transport_timeout_s", "")):
            mine, theirs = getattr(self, name), getattr(other, name)
            if shown and mine is not None and theirs is not None and mine != theirs:
                raise RequestError("invalid_parameter", f"{shown} is given twice, in the body and in a header, "
                                                        "with different values; give it once")
            values[name] = mine if theirs is None else theirs
        return RequestOptions(**values)

    def deadline(self, received: float, default_timeout_s: float = 0.0) -> float | None:
        """The monotonic time after which this request is not worth running (the earliest of its
        timeout, its deadline, its transport's and the server's default timeout), or None."""
        candidates = []
        timeout = self.timeout_s if self.timeout_s is not None else (default_timeout_s or None)
        if timeout is not None:
            candidates.append(received + timeout)
        if self.transport_timeout_s is not None:
            candidates.append(received + self.transport_timeout_s)
        if self.deadline_unix_s is not None:
            candidates.append(time.monotonic() + (self.deadline_unix_s - time.time()))
        return min(candidates) if candidates else None


NO_OPTIONS = RequestOptions()


def from_headers(headers: Mapping[str, str]) -> RequestOptions:
    """The options a request's headers (names lower-cased) set."""
    top_k = headers.get(TOP_K_HEADER)
    timeout = headers.get(TIMEOUT_HEADER)
    deadline = headers.get(DEADLINE_HEADER)
    transport = headers.get(TRANSPORT_TIMEOUT_HEADER)
    if top_k is None and timeout is None and deadline is None and transport is None:
        return NO_OPTIONS
    deadline_ms = None if deadline is None else _positive(_number_text(deadline, "X-Request-Deadline-Ms"),
                                                          "X-Request-Deadline-Ms")
    if deadline_ms is not None and deadline_ms < MIN_UNIX_MS:
        raise RequestError("invalid_parameter", f"X-Request-Deadline-Ms must be a Unix time in milliseconds, "
                                                f"got {str(deadline)[:40]!r} (seconds?)")
    return RequestOptions(
        top_k=None if top_k is None else top_k_value(_number_text(top_k, "X-Top-K"), "X-Top-K"),
        timeout_s=None if timeout is None else _positive(_number_text(timeout, "X-Request-Timeout-Ms"),
                                                         "X-Request-Timeout-Ms") / 1000.0,
        deadline_unix_s=None if deadline_ms is None else deadline_ms / 1000.0,
        transport_timeout_s=None if transport is None else _number_text(transport, "the transport's timeout") / 1000.0,
    )


def from_body(top_k: Any = None, timeout_ms: Any = None) -> RequestOptions:
    """The options a JSON images body sets."""
    return RequestOptions(
        top_k=None if top_k is None else top_k_value(top_k, "top_k"),
        timeout_s=None if timeout_ms is None else _positive(timeout_ms, "timeout_ms") / 1000.0,
    )


def from_parameters(parameters: Any) -> RequestOptions:
    """The options of KServe v1 / v2 request-level ``parameters`` (``top_k``; ``timeout`` in
    microseconds, where 0 means none, as in Triton). Values may be plain JSON or KServe's gRPC
    parameter messages."""
    if parameters is None:
        return NO_OPTIONS
    if not isinstance(parameters, Mapping):
        raise RequestError("invalid_parameter", f'"parameters" must be an object, got {type(parameters).__name__}')
    top_k, timeout = _plain(parameters.get("top_k")), _plain(parameters.get("timeout"))
    if timeout == 0 and not isinstance(timeout, bool):
        timeout = None
    return RequestOptions(
        top_k=None if top_k is None else top_k_value(top_k, "parameters.top_k"),
        timeout_s=None if timeout is None else _positive(timeout, "parameters.timeout") / 1e6,
    )


def top_k_value(value: Any, name: str, classes: int | None = None) -> int:
    """``value`` as a top_k: an integer from 1 to ``classes``; else a 400 naming ``name``."""
    limit = f" to {classes}" if classes is not None else " or more"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (classes is not None and value > classes):
        shown = repr(value)[:40]
        raise RequestError("invalid_parameter", f"{name} must be an integer from 1{limit}, got {shown}")
    return value


def _number_text(text: str, name: str) -> int | float:
    """A header's number: ASCII digits, an integer or a decimal for the times."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        raise RequestError("invalid_parameter", f"{name} must be a number, got {text[:40]!r}")
    return int(text) if text.isdigit() else float(text)


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RequestError("invalid_parameter", f"{name} must be a number above 0, got {repr(value)[:40]}")
    return float(value)


def _plain(value: Any) -> Any:
    """A parameter's Python value: KServe's gRPC ``InferParameter`` holds it in one of its fields."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    which = getattr(value, "WhichOneof", None)
    if which is not None:
        field = which("parameter_choice")
        return getattr(value, field) if field else None
    return value
