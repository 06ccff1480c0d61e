"""The torch Dataset the DataLoader workers run: encoded image -> uint8 tensor, errors kept per image.

The items of this Dataset are not indices but the work itself (``LoaderItem``: a key and the
image bytes), handed to the workers through the sampler. That lets a persistent DataLoader serve
a new set of images on every request without re-creating its worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, get_worker_info

from handler.errors import ImageError
from handler.images import ImageDecodeError
from handler.shared_memory import shared_uint8


@dataclass(frozen=True)
class LoaderItem:
    """One image to decode; ``key`` is its position in the flattened server-side batch. ``data``
    is the encoded image, or a uint8 (3, H, W) tensor that only needs resizing."""

    key: int
    data: bytes | torch.Tensor
    slot: int | None = None  # the pixel ring slot its batch is written to, if any
    span: tuple[int, int] | None = None  # where in the inbox ``data`` is, when it travels there


@dataclass(frozen=True)
class DecodedImage:
    """A worker's result for one item: pixels, or the ImageError that says why there are none."""

    key: int
    pixels: torch.Tensor | None
    error: ImageError | None = None
    slot: int | None = None


@dataclass
class DecodedBatch:
    """A collated loader batch: the good images stacked, the bad ones listed by key.

    A batch written into a pixel ring slot crosses from the worker without its pixels
    (``slot`` says where they are); the loader attaches the view in the handler process.
    """

    keys: list[int]
    pixels: torch.Tensor | None
    failures: dict[int, ImageError] = field(default_factory=dict)
    slot: int | None = None
    # CUDA events around work done on the device to make this batch (nvJPEG decode + resize).
    device_events: tuple[Any, Any] | None = field(default=None, repr=False, compare=False)
    _release: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)

    def pin_memory(self, device: str | None = None) -> "DecodedBatch":
        """Called by the DataLoader's pinning thread (pin_memory=True). A pixel ring slot is
        page-locked already: nothing to copy."""
        if self.pixels is None:
            return self
        pinned = self.pixels.pin_memory(device) if device else self.pixels.pin_memory()
        return DecodedBatch(self.keys, pinned, self.failures)

    def attach(self, pixels: torch.Tensor, release: Callable[[Any], None]) -> None:
        """The pixels this batch's worker wrote into a ring slot, and how to give it back."""
        self.pixels, self._release = pixels, release

    def release(self, event: Any = None) -> None:
        """The pixels are consumed (on CUDA: once ``event`` completes); their slot may be reused."""
        if self._release is not None:
            self._release(event)
            self._release = None


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
