"""Real photos for the benchmarks: the colour photos shipped in scikit-image, re-encoded as JPEG."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

SIZES = {"640x480": (640, 480), "1280x960": (1280, 960), "4032x3024": (4032, 3024)}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field",
          "motorcycle_left")


def photos() -> list[Image.Image]:
    """The RGB photos of ``skimage.data`` (install with ``scripts/setup.sh --bench``)."""
    import skimage.data

    images = []
    for name in PHOTOS:
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # a data set that needs a download (pooch) is skipped
            continue
        if array.ndim == 3 and array.shape[2] >= 3:
            images.append(Image.fromarray(np.asarray(array[:, :, :3], dtype=np.uint8)))
    if not images:
        raise RuntimeError("no photos found in skimage.data")
    return images


def photo_jpegs(size: str, count: int, quality: int = 90) -> list[bytes]:
    """``count`` JPEGs of ``size`` (e.g. "640x480"): each photo cover-resized, varied by mirroring."""
    width, height = SIZES[size]
    sources = photos()
    out = []
    for i in range(count):
        image = sources[i % len(sources)]
        scale = max(width / image.width, height / image.height)
        resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                               Image.BICUBIC)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        image = resized.crop((left, top, left + width, top + height))
        if (i // len(sources)) % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def stock_input(images: list[bytes]) -> torch.Tensor:
    """The stock image_classifier's model input for ``images`` (Resize 256, CenterCrop 224, ImageNet
    normalization), e.g. to calibrate a random model on real photos."""
    import torch
    from ts.torch_handler.image_classifier import ImageClassifier

    return torch.stack([ImageClassifier.image_processing(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
