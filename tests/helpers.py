"""Helpers shared by unit and end-to-end tests: images of known content, a fake TorchServe context."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

import shapes


def encode(image: Image.Image, fmt: str = "PNG", **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def shape_image(label: str, seed: int, *, fmt: str = "PNG", min_side: int = 160, max_side: int = 480,
                size_range: tuple[float, float] | None = None) -> bytes:
    """A freshly drawn shape of a known class, encoded as ``fmt``."""
    import random

    rng = random.Random(seed)
    spec = shapes.random_spec(rng, label, min_side=min_side, max_side=max_side)
    if size_range is not None:
        spec = shapes.ShapeSpec(spec.label, spec.width, spec.height, rng.uniform(*size_range),
                                spec.background, spec.seed)
    save_args = {"quality": 90} if fmt == "JPEG" else {}
    return encode(shapes.draw(spec), fmt, **save_args)


def write_model_dir(directory: Path, model: Any, labels: list[str]) -> Path:
    """A model directory as TorchServe unpacks a .mar: ``weights.pt`` (the state_dict) and
    ``index_to_name.json``."""
    import torch

    torch.save(model.state_dict(), directory / "weights.pt")
    (directory / "index_to_name.json").write_text(json.dumps(dict(enumerate(labels))))
    return directory


# The handler's stand-in context lives in scripts/ so that benchmarks can use it too.
from direct_context import DirectContext as FakeContext  # noqa: E402,F401
