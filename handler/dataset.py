"""The torch Dataset the DataLoader workers run: encoded image -> uint8 tensor, errors kept per image.

The items of this Dataset are not indices but the work itself (``LoaderItem``: a key and the
image bytes), handed to the workers through the sampler. That lets a persistent DataLoader serve
a new set of images on every request without re-creating its worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import Dataset, get_worker_info

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
    """Stack the good images (uint8, channels_last); keep the failures beside them.

    The images are written into one NHWC block and handed on as its NCHW view, which is
    channels_last: the model's memory format, so the handler needs no reordering copy. In a
    loader worker the block is allocated in shared memory directly (as torch's default_collate
    does), which saves the copy pickling would otherwise make to send it to the handler.
    """
    good = [r for r in results if r.pixels is not None]
    failures = {r.key: (r.status, r.error or "unknown error") for r in results if r.pixels is None}
    shape = (len(good), image_size, image_size, 3)
    if get_worker_info() is not None and good:
        storage = torch.UntypedStorage._new_shared(len(good) * image_size * image_size * 3)
        block = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        block = torch.empty(shape, dtype=torch.uint8)
    for row, result in zip(block, good):
        row.copy_(result.pixels.permute(1, 2, 0))  # type: ignore[union-attr]
    return DecodedBatch([r.key for r in good], block.permute(0, 3, 1, 2), failures)
