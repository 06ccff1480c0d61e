"""Request bodies as clients send them."""

from __future__ import annotations

from urllib3 import encode_multipart_formdata


def multipart_mixed(files: list[tuple[str, tuple[str, bytes, str]]]) -> tuple[bytes, str]:
    """The body and Content-Type of a ``multipart/mixed`` request with these (field, (filename,
    bytes, type)) parts: the handler reads the same parts as from a form upload, but TorchServe
    passes the body through instead of decoding it in its frontend (benchmarks/benchmark.py,
    transport only: 19 vs 28 ms for 32 photos of 640x480, 27 vs 60 ms at 1280x960)."""
    body, content_type = encode_multipart_formdata(files)
    return body, content_type.replace("multipart/form-data", "multipart/mixed", 1)
