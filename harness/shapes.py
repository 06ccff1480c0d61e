"""Procedurally drawn shapes: the demo model's training data and the tests' fresh examples.

Every image varies what the demo model must be robust to: fill colour, size (a fraction of the
shorter side), position, rotation, background (plain, noise, gradient, photo-like texture),
image size, aspect ratio, and JPEG compression.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle")
BACKGROUNDS = ("plain", "noise", "gradient", "texture")


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that decides one drawing."""

    label: str
    width: int
    height: int
    size_frac: float  # shape extent as a fraction of the shorter side
    background: str
    seed: int


def random_spec(rng: random.Random, label: str | None = None,
                min_side: int = 64, max_side: int = 512) -> ShapeSpec:
    """A random drawing: aspect 1:3..3:1, longer side log-uniform in [min_side, max_side]."""
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
    long_side = math.exp(rng.uniform(math.log(min_side), math.log(max_side)))
    if aspect >= 1:
        width, height = long_side, long_side / aspect
    else:
        width, height = long_side * aspect, long_side
    return ShapeSpec(
        label=label or rng.choice(CLASSES),
        width=max(16, round(width)),
        height=max(16, round(height)),
        size_frac=rng.uniform(0.2, 0.9),
        background=rng.choice(BACKGROUNDS),
        seed=rng.randrange(2**31),
    )


def draw(spec: ShapeSpec) -> Image.Image:
    """Render ``spec`` as an RGB image."""
    rng = np.random.default_rng(spec.seed)
    canvas = _background(spec.background, spec.width, spec.height, rng)
    base = np.asarray(canvas, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    fill = _contrasting_colour(base, rng)
    short = min(spec.width, spec.height)
    extent = spec.size_frac * short  # diameter / side / triangle's bounding circle diameter
    points = _outline(spec.label, extent, rng)
    # Place the shape so its rotated outline lies inside the canvas.
    xs, ys = points[:, 0], points[:, 1]
    cx = rng.uniform(-xs.min(), spec.width - xs.max()) if xs.max() - xs.min() < spec.width else spec.width / 2
    cy = rng.uniform(-ys.min(), spec.height - ys.max()) if ys.max() - ys.min() < spec.height else spec.height / 2
    draw_ctx = ImageDraw.Draw(canvas)
    if spec.label == "circle":
        r = extent / 2
        draw_ctx.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw_ctx.polygon([(float(x + cx), float(y + cy)) for x, y in points], fill=fill)
    return canvas


def _outline(label: str, extent: float, rng: np.random.Generator) -> np.ndarray:
    """Shape vertices centred on (0, 0) (a circle's bounding square), randomly rotated."""
    r = extent / 2
    if label == "circle":
        return np.array([[-r, -r], [r, -r], [r, r], [-r, r]])
    if label == "square":
        angles = np.array([45, 135, 225, 315], dtype=np.float64)
        radius = r * math.sqrt(2) * rng.uniform(0.72, 1.0)  # side between ~0.72*extent and extent
    elif label == "triangle":
        # Roughly equilateral with jittered corners: isosceles and scalene variants too.
        angles = np.array([90, 210, 330], dtype=np.float64) + rng.uniform(-22, 22, size=3)
        radius = r
    else:
        raise ValueError(f"unknown shape {label!r}")
    theta = np.deg2rad(angles + rng.uniform(0, 360))
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)


def _background(kind: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    if kind == "plain":
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        return Image.new("RGB", (width, height), colour)
    if kind == "noise":
        mean = rng.uniform(30, 225, 3)
        noise = rng.normal(0, rng.uniform(8, 40), (height, width, 3))
        return Image.fromarray(np.clip(mean + noise, 0, 255).astype(np.uint8))
    if kind == "gradient":
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        return Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8))
    if kind == "texture":
        return _texture(width, height, rng)
    raise ValueError(f"unknown background {kind!r}")


def _texture(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Photo-like clutter: blurred multi-scale noise with soft blobs and thin lines."""
    out = np.zeros((height, width, 3))
    for scale in (4, 16, 48):
        small = rng.uniform(0, 255, (max(1, height // scale), max(1, width // scale), 3)).astype(np.uint8)
        layer = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        out += np.asarray(layer, dtype=np.float64) * rng.uniform(0.2, 0.5)
    image = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    ctx = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = rng.uniform(0, width), rng.uniform(0, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        ctx.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 3)))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))


def _contrasting_colour(background: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random fill far enough from the background's mean colour to be visible."""
    for _ in range(100):
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - background) > 110:
            return tuple(int(c) for c in colour)
    return tuple(int(c) for c in np.where(background > 127, 0, 255))


def encode(image: Image.Image, rng: random.Random) -> bytes:
    """JPEG at a random quality most of the time, else PNG: the compression the model must survive."""
    buffer = io.BytesIO()
    if rng.random() < 0.75:
        image.save(buffer, format="JPEG", quality=rng.randint(35, 95))
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def make_example(seed: int, label: str | None = None, **spec_kwargs: int) -> tuple[str, bytes]:
    """A freshly drawn, encoded example: (label, image bytes)."""
    rng = random.Random(seed)
    spec = random_spec(rng, label, **spec_kwargs)
    return spec.label, encode(draw(spec), rng)


def shape_image(label: str, seed: int, *, fmt: str = "PNG", min_side: int = 160, max_side: int = 480,
                size_range: tuple[float, float] | None = None) -> bytes:
    """A freshly drawn shape of a known class, encoded as ``fmt``: the tests' and the demo
    scripts' (eval_demo.py, loadtest.py) images of known content."""
    rng = random.Random(seed)
    spec = random_spec(rng, label, min_side=min_side, max_side=max_side)
    if size_range is not None:
        spec = ShapeSpec(spec.label, spec.width, spec.height, rng.uniform(*size_range), spec.background, spec.seed)
    buffer = io.BytesIO()
    draw(spec).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()
