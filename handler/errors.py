"""Errors a request can fail with; each carries the HTTP status it maps to.

    RequestError (4xx for one request; other requests in the batch are unaffected)
    ├── BadRequest        400  malformed body, undecodable image, empty input
    └── PayloadTooLarge   413  too many images, or an image above the pixel limit

ImageProblem describes one bad image inside a request; a RequestError lists them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


# Field names longer than this are shortened in error bodies.
MAX_FIELD_CHARS = 100


@dataclass(frozen=True)
class ImageProblem:
    """What is wrong with one image of a request."""

    index: int
    field: str | None
    reason: str
    status: int = 400

    def as_json(self) -> dict[str, Any]:
        body = asdict(self)
        del body["status"]
        if body["field"] is not None and len(body["field"]) > MAX_FIELD_CHARS:
            # A field name is client text (a mangled upload can make it a whole image's base64):
            # enough of it to recognise, not an echo of the payload.
            body["field"] = body["field"][:MAX_FIELD_CHARS] + "..."
        return body


@dataclass
class RequestError(Exception):
    """A request that cannot be served as sent; the client must change it."""

    code: str
    message: str
    images: list[ImageProblem] = field(default_factory=list)
    status: int = 400

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def as_json(self) -> dict[str, Any]:
        return {
            "error": self.code,
            "message": self.message,
            "images": [p.as_json() for p in self.images],
        }


class BadRequest(RequestError):
    """400: the body or an image in it cannot be read."""

    def __init__(self, code: str, message: str, images: list[ImageProblem] | None = None):
        super().__init__(code, message, images or [], 400)


class PayloadTooLarge(RequestError):
    """413: the request asks for more work than the configured limits allow."""

    def __init__(self, code: str, message: str, images: list[ImageProblem] | None = None):
        super().__init__(code, message, images or [], 413)


def error_for_images(problems: list[ImageProblem]) -> RequestError:
    """One RequestError summarising the bad images of a request (413 if any image is too large)."""
    if any(p.status == 413 for p in problems):
        return PayloadTooLarge(
            "image_too_large",
            "an image has more pixels than the server accepts; send a smaller image",
            problems,
        )
    count = len(problems)
    return BadRequest(
        "invalid_image",
        f"{count} image{'s' if count != 1 else ''} could not be decoded; "
        "send JPEG, PNG, WebP, GIF, BMP or TIFF data",
        problems,
    )
