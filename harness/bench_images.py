"""Real photos for the benchmarks: the colour photos shipped in scikit-image, re-encoded as JPEG."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

SIZES = {"640x480": (640, 480), "1280x960": (1280, 960), "4032x3024": (4032, 3024)}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field",
          "motorcycle_left")


def photos() -> list[Image.Image]:
    """The RGB photos of ``skimage.data`` (install with ``scripts/setup.sh --bench``), or the
    images in the folder ``$BENCH_PHOTOS`` names (for a machine without scikit-image: export
    them with ``python harness/bench_images.py --export DIR`` where it is installed)."""
    folder = os.environ.get("BENCH_PHOTOS")
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise RuntimeError(f"no .png/.jpg files in BENCH_PHOTOS={folder}")
        return [Image.open(p).convert("RGB") for p in files]
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
    """``count`` JPEGs of ``size`` (e.g. "640x480"): each photo cover-resized, varied by mirroring
    and, after each photo has been used mirrored and not, by zooming in a quarter more."""
    width, height = SIZES[size]
    sources = photos()
    out = []
    for i in range(count):
        image = sources[i % len(sources)]
        zoom = 1 + 0.25 * (i // (2 * len(sources)))
        scale = max(width / image.width, height / image.height) * zoom
        resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                               Image.Resampling.BICUBIC)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        image = resized.crop((left, top, left + width, top + height))
        if (i // len(sources)) % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def stock_transform() -> Callable[[Image.Image], torch.Tensor]:
    """TorchServe's image_classifier transform (Resize 256, CenterCrop 224, ToTensor, ImageNet
    Normalize); re-created with the same torchvision calls where torchserve is not installed
    (e.g. on a GPU machine that has only torch)."""
    try:
        from ts.torch_handler.image_classifier import ImageClassifier

        return ImageClassifier.image_processing
    except ImportError:
        from torchvision import transforms

        return transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ])


def stock_input(images: list[bytes]) -> torch.Tensor:
    """The stock image_classifier's model input for ``images``, as its preprocess builds it."""
    import torch

    transform = stock_transform()
    return torch.stack([transform(Image.open(io.BytesIO(b))) for b in images])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Export the benchmark photos as PNG files.")
    parser.add_argument("--export", type=Path, required=True, metavar="DIR")
    args = parser.parse_args()
    args.export.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(photos()):
        photo.save(args.export / f"photo_{i}.png")
    print(f"wrote {len(photos())} photos to {args.export}")
