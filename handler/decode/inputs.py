"""What the classifier accepts as an image, and how each kind becomes loader work.

    bytes / bytearray / memoryview   an encoded image (JPEG, PNG, ...), decoded by the loader
    str / os.PathLike                a file, read here, decoded by the loader
    PIL.Image.Image                  pixels already decoded: converted to RGB here, no re-encode
    torch.Tensor                     uint8 pixels, (3, H, W) or (1, H, W)

Encoded bytes go to the loader workers as they are; decoded pixels (PIL images, tensors) become a
uint8 tensor here and the workers only resize them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import torch
from PIL import Image

from handler.decode.images import ImageDecodeError, check_pixel_count, to_rgb_tensor

ImageLike = Union[bytes, bytearray, memoryview, str, os.PathLike, Image.Image, torch.Tensor]


@dataclass(frozen=True)
class ImageInput:
    """An image and the name its client gave it (a multipart field, a JSON key), if any."""

    data: ImageLike
    field: str | None = None


def loader_data(image: ImageLike, max_pixels: int) -> bytes | torch.Tensor:
    """``image`` as the loader takes it: encoded bytes, or a (3, H, W) uint8 tensor.

    Raises ImageDecodeError for what cannot be an image (a missing file, a float tensor, ...).
    """
    if isinstance(image, bytes):
        return image
    if isinstance(image, (bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as file:
                return file.read()
        except OSError as exc:
            raise ImageDecodeError(f"cannot read {os.fspath(image)!r}: {exc.strerror or exc}", "unreadable_file") from None
    if isinstance(image, Image.Image):
        check_pixel_count(*image.size, max_pixels)
        return to_rgb_tensor(image)
    if isinstance(image, torch.Tensor):
        return _checked_tensor(image, max_pixels)
    raise ImageDecodeError(
        f"cannot classify a {type(image).__name__}: pass encoded bytes, a file path, a PIL image "
        "or a uint8 (3, H, W) tensor", "unsupported_input")


def _checked_tensor(pixels: torch.Tensor, max_pixels: int) -> torch.Tensor:
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[0] not in (1, 3):
        raise ImageDecodeError(
            f"a tensor image must be uint8 of shape (3, H, W) or (1, H, W); got {pixels.dtype} "
            f"{tuple(pixels.shape)}", "invalid_tensor")
    height, width = pixels.shape[1:]
    if height < 1 or width < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})", "invalid_tensor")
    check_pixel_count(width, height, max_pixels)
    pixels = pixels.detach().cpu()
    # Channels-last strides: the antialiased uint8 resize is over twice as fast on them.
    return pixels.expand(3, -1, -1).permute(1, 2, 0).contiguous().permute(2, 0, 1)
