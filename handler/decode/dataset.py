"""The torch Dataset the DataLoader workers run: encoded image -> uint8 tensor, errors kept per image.

The items of this Dataset are not indices but the work itself (``LoaderItem``: a key and the
image bytes), handed to the workers through the sampler. That lets a persistent DataLoader serve
a new set of images on every request without re-creating its worker processes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset, get_worker_info

from handler.decode.images import ImageDecodeError
from handler.decode.items import DecodedBatch, DecodedImage, LoaderItem
from handler.decode.shared_memory import shared_uint8
from handler.errors import ImageError

__all__ = ["DecodedBatch", "DecodedImage", "ImageBytesDataset", "LoaderItem", "collate_decoded"]


class ImageBytesDataset(Dataset):
    """Maps a LoaderItem to a DecodedImage with the given transform; never raises for bad data."""

    def __init__(self, transform: Callable[[bytes | torch.Tensor], torch.Tensor]) -> None:
        self.transform = transform

    def __getitem__(self, item: LoaderItem) -> DecodedImage:
        try:
            return DecodedImage(item.key, self.transform(item.data), slot=item.slot)
        except ImageDecodeError as exc:
            return DecodedImage(item.key, None, ImageError(exc.code, exc.reason), item.slot)
        except Exception as exc:  # a bug or an exotic codec failure must not take down the batch
            reason = f"image could not be processed ({type(exc).__name__})"
            return DecodedImage(item.key, None, ImageError("invalid_image", reason), item.slot)


def collate_decoded(results: list[DecodedImage], image_size: int, ring: torch.Tensor | None = None) -> DecodedBatch:
    """Stack the good images (uint8, channels_last); keep the failures beside them.

    The images are written into one NHWC block and handed on as its NCHW view, which is
    channels_last: the model's memory format, so the handler needs no reordering copy. The
    block is the batch's pixel ring slot when it has one (``ring``: the ring's pixels, shared
    with the handler process); otherwise, in a loader worker, a fresh shared-memory block (as
    torch's default_collate does), which saves the copy pickling would make.
    """
    good = [r for r in results if r.pixels is not None]
    failures = {r.key: r.error or ImageError("invalid_image", "unknown error") for r in results if r.pixels is None}
    slot = results[0].slot if results else None
    shape = (len(good), image_size, image_size, 3)
    if ring is not None and slot is not None:
        block = ring[slot, : len(good)]
    elif get_worker_info() is not None and good:
        block = shared_uint8(len(good) * image_size * image_size * 3).view(shape)
        slot = None
    else:
        block = torch.empty(shape, dtype=torch.uint8)
        slot = None
    for row, result in zip(block, good):
        row.copy_(result.pixels.permute(1, 2, 0))  # type: ignore[union-attr]
    keys = [r.key for r in good]
    if slot is not None:
        return DecodedBatch(keys, None, failures, slot)  # the pixels stay in the slot
    return DecodedBatch(keys, block.permute(0, 3, 1, 2), failures)
