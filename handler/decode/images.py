"""Encoded image bytes -> a uint8 CHW tensor of the model's input size.

Pixels stay uint8 all the way (resizing uint8 tensors with antialiasing is several times faster
than PIL's float path); conversion to float and normalization happen once per batch, later.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from handler.config import HandlerConfig
from handler.errors import http_status

try:  # optional: without it, Pillow's draft does the DCT-scaled decodes (same pixels, slower)
    import simplejpeg  # type: ignore[import-untyped]  # ships a .pyi but no py.typed
except ImportError:  # pragma: no cover - exercised by monkeypatching it to None
    simplejpeg = None


# center_crop resizes the whole image first (the exact pixels of resize-then-crop) unless its
# longer side would exceed this many times resize_size (then it crops first: an 8000x16 banner
# would otherwise make a huge intermediate image).
MAX_CROP_INTERMEDIATE = 32

EXIF_ORIENTATION = 0x0112

INTERPOLATION_MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


class ImageDecodeError(Exception):
    """An image that cannot be turned into model input: its failure ``code`` (``invalid_image``,
    ``image_too_large``, ...) and a ``reason`` for a person."""

    def __init__(self, reason: str, code: str = "invalid_image"):
        super().__init__(reason)
        self.reason = reason
        self.code = code

    @property
    def status(self) -> int:
        return http_status(self.code)


@dataclass(frozen=True)
class ImageTransform:
    """Callable turning encoded bytes into a (3, S, S) uint8 tensor as the config describes."""

    config: HandlerConfig

    def __call__(self, data: bytes | torch.Tensor) -> torch.Tensor:
        if isinstance(data, torch.Tensor):  # already decoded (inputs.loader_data checked it)
            return resize_to_input(data, self.config)
        image = open_image(data, self.config.max_image_pixels)
        pixels = None
        if image.format == "JPEG":
            target = draft_target(self.config)
            if self.config.jpeg_draft and min(image.size) >= 2 * target:
                # libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 size (never below target):
                # far less work. simplejpeg where it can, else Pillow's draft (the same pixels).
                pixels = decode_jpeg_scaled(data, image, target)
                if pixels is None:
                    image.draft("RGB", (target, target))
            else:
                pixels = decode_jpeg_fast(data)
        if pixels is None:
            pixels = to_rgb_tensor(image)
        return resize_to_input(pixels, self.config)


def decode_jpeg_fast(data: bytes) -> torch.Tensor | None:
    """torchvision's libjpeg-turbo decode (faster than PIL's full-size decode), EXIF applied.

    Returns None where PIL should decode instead: a file without its end-of-image marker
    (libjpeg would pad a truncated image silently, PIL reports it) or one torchvision rejects.
    """
    if not has_jpeg_end_marker(data):
        return None
    try:
        return decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
            mode=ImageReadMode.RGB,
            apply_exif_orientation=True,
        )
    except RuntimeError:
        return None


def decode_jpeg_scaled(data: bytes, image: Image.Image, target: int) -> torch.Tensor | None:
    """simplejpeg's (libjpeg-turbo) DCT-scaled decode at the factor Pillow's draft picks for
    ``target``: the largest of 1/2, 1/4, 1/8 keeping the short side >= ``target``. The same pixels
    as the draft, 12-22 % faster end to end (benchmarks/bench_decode.py, docs/results/bench_decode.json).

    Not libjpeg-turbo's other M/8 factors (3/8, 5/8..7/8): their IDCT has no SIMD code; in
    bench_decode.py 7/8 was slower than a full decode, and 3/8 no faster than 1/2 while further
    from the stock pipeline's pixels.

    Returns None where Pillow's path must decode: simplejpeg not installed, a file without its
    end-of-image marker (Pillow reports truncation), CMYK/YCCK data, an EXIF orientation to apply
    (simplejpeg ignores EXIF), or data simplejpeg rejects (strict: warnings are errors).
    """
    if simplejpeg is None or image.mode not in ("RGB", "L") or not has_jpeg_end_marker(data):
        return None
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return None
    short = min(image.size)
    scale = 8
    while scale > 1 and short < scale * target:
        scale //= 2
    side = -(-short // scale)  # libjpeg rounds scaled sides up
    try:
        array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)
    except ValueError:
        return None
    # HWC memory viewed as CHW: the channels-last layout the resize is fastest on.
    return torch.from_numpy(array).permute(2, 0, 1)


def has_jpeg_end_marker(data: bytes) -> bool:
    """Whether JPEG ``data`` ends with its end-of-image marker (trailing zero padding allowed):
    libjpeg-turbo and nvJPEG would pad a truncated file silently, where Pillow reports it."""
    return data.rstrip(b"\0").endswith(b"\xff\xd9")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel count before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # Our own limit below is the guard; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"image has more than {max_pixels} pixels", "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(_describe_unreadable(exc)) from None
    width, height = image.size
    check_pixel_count(width, height, max_pixels)
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    return image


def check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    """Raise ``image_too_large`` for more than ``max_pixels`` pixels (decompression bombs)."""
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", "image_too_large"
        )


def to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """Decode: EXIF orientation applied, first frame, any mode -> (3, H, W) uint8 RGB."""
    try:
        image.seek(0)
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            # exif_transpose copies even an upright image: only call it when there is work.
            image = ImageOps.exif_transpose(image)
        array = _rgb_array(image)
    except ImageDecodeError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data; all mean the same here.
        raise ImageDecodeError(_describe_unreadable(exc)) from None
    return torch.from_numpy(array).permute(2, 0, 1)


def _rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels show what a viewer shows: white behind the image.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def _high_depth_to_rgb(image: Image.Image) -> np.ndarray:
    """16-bit and float grayscale: scale to 8 bits (Pillow's convert would clip to white)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = (np.nan_to_num(values) - low) * scale
    elif image.mode == "I" and values.max(initial=0) <= 255 and values.min(initial=0) >= 0:
        gray = values  # an "I" image that only holds 8-bit values
    else:
        gray = np.clip(values, 0, 65535) / 257.0
    gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray8[:, :, None], 3, axis=2)


def resize_to_input(pixels: torch.Tensor, config: HandlerConfig) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> (..., 3, S, S) uint8 by the configured resize mode, antialiased.
    Leading dimensions (a stack of same-sized images) are resized together. Sizes, crop offsets
    and padding follow the libraries each mode comes from (torchvision, timm, Hugging Face)
    exactly; only the resampling itself is torch's (PIL's filters, rounded slightly apart)."""
    size = config.image_size
    height, width = pixels.shape[-2:]
    mode = config.resize_mode
    if mode == "squash":
        return _resize(pixels, size, size, config.interpolation)
    if mode == "squash_center_crop":
        squashed = _resize(pixels, config.resize_size, config.resize_size, config.interpolation)
        return center_crop(squashed, size, config.crop_offset)
    if mode == "letterbox":
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        return _pad_to(_resize(pixels, new_h, new_w, config.interpolation), size, config.pad_rgb)
    if mode == "border":
        return _border(pixels, config)
    # center_crop, exactly as torchvision's Resize(resize_size) + CenterCrop(image_size) do it
    # (same output size rounding, same crop offsets), so outputs match the stock pipeline.
    short, long = min(height, width), max(height, width)
    new_long = int(config.resize_size * long / short)
    if new_long <= MAX_CROP_INTERMEDIATE * config.resize_size:
        new_h, new_w = (config.resize_size, new_long) if height <= width else (new_long, config.resize_size)
        return center_crop(_resize(pixels, new_h, new_w, config.interpolation), size, config.crop_offset)
    # An extreme aspect ratio (8000x16) would make a huge intermediate image: crop in source
    # pixels first, then resize only the crop (close to, not exactly, the full resize's pixels).
    scale = config.resize_size / short
    crop_h = min(height, max(1, round(size / scale)))
    crop_w = min(width, max(1, round(size / scale)))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return _resize(pixels[..., top : top + crop_h, left : left + crop_w], size, size, config.interpolation)


def center_crop(pixels: torch.Tensor, size: int, offset: str = "round") -> torch.Tensor:
    """The centre ``size`` x ``size`` of (..., H, W) pixels, both sides at least ``size``.
    ``offset`` places an odd margin's extra pixel: ``round`` as torchvision's CenterCrop (half
    the margin rounded, halves to even), ``floor`` as Hugging Face's ``center_crop``."""
    height, width = pixels.shape[-2:]
    if offset == "floor":
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return pixels[..., top : top + size, left : left + size]


def _border(pixels: torch.Tensor, config: HandlerConfig) -> torch.Tensor:
    """timm's ``border`` crop mode: ResizeKeepRatio(resize_size, longest=1) then
    CenterCropOrPad(image_size, fill=pad_value), with timm's own rounding."""
    height, width = pixels.shape[-2:]
    ratio = max(height / config.resize_size, width / config.resize_size)
    new_h, new_w = max(1, round(height / ratio)), max(1, round(width / ratio))
    resized = _resize(pixels, new_h, new_w, config.interpolation)
    size = config.image_size
    if new_h < size or new_w < size:
        resized = _pad_to(resized, size, config.pad_rgb, keep_larger=True)
    return center_crop(resized, size, config.crop_offset)


def _pad_to(pixels: torch.Tensor, size: int, fill: tuple[int, int, int], *, keep_larger: bool = False,
            ) -> torch.Tensor:
    """(..., 3, h, w) placed in the middle of a ``size`` canvas of ``fill`` (the smaller half of
    an odd margin before the image, as timm and our letterbox pad). ``keep_larger``: a side
    already above ``size`` keeps its length (a later crop takes it down)."""
    height, width = pixels.shape[-2:]
    out_h, out_w = (max(height, size), max(width, size)) if keep_larger else (size, size)
    top, left = (out_h - height) // 2, (out_w - width) // 2
    # Pad in HWC order: the batch is collated channels_last, so this layout copies fastest.
    lead = pixels.shape[:-3]
    canvas = torch.empty((*lead, out_h, out_w, 3), dtype=torch.uint8, device=pixels.device)
    canvas[...] = torch.tensor(fill, dtype=torch.uint8, device=pixels.device)
    canvas[..., top : top + height, left : left + width, :].copy_(pixels.movedim(-3, -1))
    return canvas.movedim(-1, -3)


def _resize(pixels: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    if pixels.shape[-2:] == (height, width):
        return pixels
    # No .contiguous(): a channels-last (HWC-strided) uint8 image takes torch's vectorized
    # antialiasing kernel, over twice as fast as a CHW one. Antialiased bilinear and bicubic
    # follow Pillow's filters, so the result stays close to the stock PIL pipeline.
    return TF.resize(pixels, [height, width], interpolation=INTERPOLATION_MODES[interpolation], antialias=True)


def draft_target(config: HandlerConfig) -> int:
    """The smallest side a DCT-scaled JPEG decode may produce: the side the resize needs, times
    ``jpeg_draft_margin``. With a margin the antialiased resize still downscales afterwards and
    smooths what DCT scaling does differently from it."""
    resized_first = config.resize_mode in ("center_crop", "squash_center_crop", "border")
    need = config.resize_size if resized_first else config.image_size
    return math.ceil(need * config.jpeg_draft_margin)


def _describe_unreadable(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    text = str(exc).strip() or type(exc).__name__
    # Keep messages short and free of image bytes.
    return f"image data is corrupt or truncated ({text[:120]})"

