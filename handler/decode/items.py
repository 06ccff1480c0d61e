"""What travels through the decode path: an image to decode (``LoaderItem``), a worker's result
for it (``DecodedImage``), a collated batch of results (``DecodedBatch``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from handler.errors import ImageError


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
