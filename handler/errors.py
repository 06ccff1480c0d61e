"""Failures, one typed record each, and the one place that maps them to HTTP statuses.

    ImageError     one image that could not be classified (returned per image, never raised)
    RequestError   a request that cannot be served as sent (raised by the wire formats; the
                   client must change it); lists the ImageErrors behind it, if any. With code
                   ``internal_error`` it is instead a request the server failed to serve (500)

Both carry a failure ``code`` (``invalid_image``, ``image_too_large``, ``invalid_base64``, ...).
The HTTP status is derived from the code here, at the edge: the decoder and the pipeline say
what went wrong, never which status that is: 413 for a request above the limits, 500 for a
fault of the server itself (``internal_error``, e.g. a batch whose run failed: the client may
retry it unchanged), 503 for a request the server would not take now (``overloaded``: its queue
is full; ``shutting_down``: it drains; both say when to retry, ``retry_after_s``), 504 for a
request whose deadline passed before it ran (``deadline_exceeded``), 404 / 405 for a path or
method a self-routing door does not serve, 400 for everything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# Field names longer than this are shortened in error bodies.
MAX_FIELD_CHARS = 100

# Failure codes that mean "the request asks for more than the limits allow"; every other code
# but the server faults below is a 400 (the body or an image in it cannot be read).
PAYLOAD_TOO_LARGE = frozenset({"image_too_large", "too_many_images"})

# Failure codes that mean "the server failed, not the request" (a 500).
SERVER_FAULT = frozenset({"internal_error"})

# Failure codes of a request the server did not run: it would not take it now (503, retry later:
# ``Retry-After``), or its client's deadline passed while it waited (504).
NOT_RUN = {"overloaded": 503, "shutting_down": 503, "deadline_exceeded": 504}

# Failure codes of a request sent to the wrong place: a door that routes itself (Ray Serve) answers
# a path it does not serve, or a method a path does not take, with these.
ROUTING = {"not_found": 404, "method_not_allowed": 405}


def http_status(code: str) -> int:
    """The HTTP status a failure ``code`` is answered with."""
    if code in SERVER_FAULT:
        return 500
    if code in ROUTING:
        return ROUTING[code]
    if code in NOT_RUN:
        return NOT_RUN[code]
    return 413 if code in PAYLOAD_TOO_LARGE else 400


@dataclass(frozen=True)
class ImageError:
    """Why one image has no result.

    Attributes:
        code: the failure kind, e.g. ``invalid_image`` or ``image_too_large``.
        reason: what is wrong, for a person (never holds image bytes).
        index: the image's position in its request (or in the list given to ``classify``).
        field: the name the client gave the image (a multipart field, ``"images"``, ...), if any.
    """

    code: str
    reason: str
    index: int | None = None
    field: str | None = None

    @property
    def status(self) -> int:
        """The HTTP status of this failure (400, or 413 for an image above the pixel limit)."""
        return http_status(self.code)

    def at(self, index: int, field: str | None) -> "ImageError":
        """This failure, placed at ``index`` / ``field`` of its request."""
        return replace(self, index=index, field=field)

    def as_json(self) -> dict[str, Any]:
        name = self.field
        if name is not None and len(name) > MAX_FIELD_CHARS:
            # A field name is client text (a mangled upload can make it a whole image's base64):
            # enough of it to recognise, not an echo of the payload.
            name = name[:MAX_FIELD_CHARS] + "..."
        return {"index": self.index, "field": name, "reason": self.reason}


@dataclass
class RequestError(Exception):
    """A request that cannot be served as sent; other requests of its batch are unaffected."""

    code: str
    message: str
    images: list[ImageError] = field(default_factory=list)
    retry_after_s: int | None = None  # a 503's advice: retry after this many seconds

    @property
    def status(self) -> int:
        return http_status(self.code)

    @property
    def not_run(self) -> bool:
        """A 503 or 504: the request was not run (retry later, elsewhere, or with more time)."""
        return self.code in NOT_RUN

    @property
    def is_client_error(self) -> bool:
        """A 4xx: the request as sent cannot be served (counted as a rejected request)."""
        return 400 <= self.status < 500

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def as_json(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "images": [p.as_json() for p in self.images]}


def error_for_images(problems: list[ImageError]) -> RequestError:
    """One RequestError summarising the bad images of a request (413 if any image is too large)."""
    if any(p.code == "image_too_large" for p in problems):
        return RequestError(
            "image_too_large",
            "an image has more pixels than the server accepts; send a smaller image",
            problems,
        )
    count = len(problems)
    return RequestError(
        "invalid_image",
        f"{count} image{'s' if count != 1 else ''} could not be decoded; "
        "send JPEG, PNG, WebP, GIF, BMP or TIFF data",
        problems,
    )
