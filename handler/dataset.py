"""The torch Dataset the DataLoader workers run: encoded image -> uint8 tensor, errors kept per image.

The items of this Dataset are not indices but the work itself (``LoaderItem``: a key and the
image bytes), handed to the workers through the sampler. That lets a persistent DataLoader serve
a new set of images on every request without re-creating its worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import Dataset

from handler.images import ImageDecodeError


@dataclass(frozen=True)
class LoaderItem:
    """One image to decode; ``key`` is its position in the flattened server-side batch."""

    key: int
    data: bytes


@dataclass(frozen=True)
class DecodedImage:
    """A worker's result for one item: pixels, or why there are none."""

    key: int
    pixels: torch.Tensor | None
    error: str | None = None
    status: int = 400


@dataclass
class DecodedBatch:
    """A collated loader batch: the good images stacked, the bad ones listed by key."""

    keys: list[int]
    pixels: torch.Tensor
    failures: dict[int, tuple[int, str]] = field(default_factory=dict)

    def pin_memory(self, device: str | None = None) -> "DecodedBatch":
        """Called by the DataLoader's pinning thread (pin_memory=True)."""
        pinned = self.pixels.pin_memory(device) if device else self.pixels.pin_memory()
        return DecodedBatch(self.keys, pinned, self.failures)


class ImageBytesDataset(Dataset):
    """Maps a LoaderItem to a DecodedImage with the given transform; never raises for bad data."""

    def __init__(self, transform: Callable[[bytes], torch.Tensor]):
        self.transform = transform

    def __getitem__(self, item: LoaderItem) -> DecodedImage:  # type: ignore[override]
        try:
            return DecodedImage(item.key, self.transform(item.data))
        except ImageDecodeError as exc:
            return DecodedImage(item.key, None, exc.reason, exc.status)
        except Exception as exc:  # a bug or an exotic codec failure must not take down the batch
            return DecodedImage(item.key, None, f"image could not be processed ({type(exc).__name__})")


def collate_decoded(results: list[DecodedImage], image_size: int) -> DecodedBatch:
    """Stack the good images (uint8); keep the failures beside them."""
    good = [r for r in results if r.pixels is not None]
    failures = {r.key: (r.status, r.error or "unknown error") for r in results if r.pixels is None}
    if good:
        pixels = torch.stack([r.pixels for r in good])  # type: ignore[misc]
    else:
        pixels = torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    return DecodedBatch([r.key for r in good], pixels, failures)
