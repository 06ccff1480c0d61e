"""Batched JPEG decoding on the GPU (nvJPEG), for ``decode_device: cuda``.

On a GPU server the CPU cores, not the GPU, bound a JPEG -> label pipeline; nvJPEG decodes a
list of JPEGs in one call several times faster than libjpeg-turbo on a core. Only what nvJPEG
does well comes here: baseline/progressive JPEGs with an end-of-image marker, in RGB or
grayscale, within the pixel limit. Everything else -- other formats, CMYK, truncated files --
and any batch nvJPEG rejects goes through the CPU DataLoader path, which reports per image.
The same code runs with a CPU ``device`` (libjpeg-turbo), which is how it is tested without a GPU.
"""

from __future__ import annotations

import io
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from handler.config import HandlerConfig
from handler.decode.dataset import DecodedBatch, LoaderItem
from handler.decode.images import has_jpeg_end_marker, resize_to_input
from handler.decode.jpeg_header import read_jpeg_header

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JpegJob:
    """A JPEG to decode on the GPU, with its EXIF orientation (nvJPEG ignores EXIF)."""

    item: LoaderItem
    orientation: int


def apply_orientation(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> as displayed, for EXIF orientations 1-8 (PIL's exif_transpose)."""
    if orientation == 2:
        return pixels.flip(2)
    if orientation == 3:
        return pixels.flip(1, 2)
    if orientation == 4:
        return pixels.flip(1)
    if orientation == 5:
        return pixels.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(pixels, -1, dims=(1, 2))
    if orientation == 7:
        return pixels.transpose(1, 2).flip(1, 2)
    if orientation == 8:
        return torch.rot90(pixels, 1, dims=(1, 2))
    return pixels


def jpeg_job(item: LoaderItem, max_pixels: int) -> JpegJob | None:
    """A job when ``item`` is a JPEG nvJPEG can take (8-bit Huffman-coded, greyscale or colour, with
    an end-of-image marker, within the pixel limit); None sends it down the CPU path, which
    gives the precise per-image error for anything odd."""
    data = item.data
    if not isinstance(data, bytes):
        return None
    header = read_jpeg_header(data)
    if header is None or header.components not in (1, 3) or not has_jpeg_end_marker(data):
        return None
    if header.width * header.height > max_pixels:
        return None
    return JpegJob(item, header.orientation)


class BatchedJpegDecoder:
    """Decodes lists of JPEGs on ``device`` and resizes them there, as the config says."""

    def __init__(self, config: HandlerConfig, device: torch.device) -> None:
        self.config = config
        self.device = device

    def split(self, items: list[LoaderItem]) -> tuple[list[JpegJob], list[LoaderItem]]:
        """The items for this decoder, and the rest (for the CPU loader)."""
        jobs: list[JpegJob] = []
        rest: list[LoaderItem] = []
        for item in items:
            # Pixels that arrived decoded (a PIL image, a tensor) only need the CPU's resize.
            job = jpeg_job(item, self.config.max_image_pixels) if isinstance(item.data, bytes) else None
            if job is None:
                rest.append(item)
            else:
                jobs.append(job)
        return jobs, rest

    def warm_up(self) -> bool:
        """Decode one small JPEG, so the decoder's setup is not paid by the first request;
        False if it does not work here at all."""
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 60, 30)).save(buffer, format="JPEG")
        return self.decode([JpegJob(LoaderItem(0, buffer.getvalue()), 1)]) is not None

    def decode_lists(self, lists: list[list[JpegJob]], ahead: bool = True) -> Iterator[DecodedBatch | None]:
        """``decode`` of each list, in order. nvJPEG blocks its caller until a list is decoded;
        with ``ahead`` a thread of its own decodes the lists ahead, so the caller's thread keeps
        launching the model meanwhile (both release the GIL while they wait)."""
        if not ahead:
            yield from (self.decode(jobs) for jobs in lists)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvjpeg") as decoding:
            for future in [decoding.submit(self.decode, jobs) for jobs in lists]:
                yield future.result()

    def decode(self, jobs: list[JpegJob]) -> DecodedBatch | None:
        """One batch of model-size uint8 images on the device; None if nvJPEG rejected the list
        (it fails a whole list for one bad image), so the caller can take the CPU path."""
        with warnings.catch_warnings():
            # The bytes are only read: a view of them saves a copy per image on the GPU's feeder
            # thread (torch warns that an immutable buffer is not writable).
            warnings.simplefilter("ignore", UserWarning)
            data = [torch.frombuffer(job.item.data, dtype=torch.uint8) for job in jobs]
        events = _recorded_events(self.device)
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            log.info("batched JPEG decode failed (%s); decoding these %d on the CPU", str(exc)[:200], len(jobs))
            return None
        size = self.config.image_size
        batch = torch.empty((len(jobs), size, size, 3), dtype=torch.uint8, device=self.device)
        upright = [apply_orientation(pixels, job.orientation) for job, pixels in zip(jobs, decoded)]
        # Photos of one request often share a size: resize each such group in one call (a few
        # kernel launches per group instead of per image).
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, pixels in enumerate(upright):
            groups.setdefault(tuple(pixels.shape), []).append(index)
        for indices in groups.values():
            resized = resize_to_input(torch.stack([upright[i] for i in indices]), self.config)
            batch[torch.tensor(indices, device=self.device)] = resized.permute(0, 2, 3, 1)
        if events is not None:
            events[1].record()
        return DecodedBatch([job.item.key for job in jobs], batch.permute(0, 3, 1, 2), device_events=events)


def _recorded_events(device: torch.device) -> tuple[Any, Any] | None:
    """A started (start, end) pair of CUDA timing events, or None off CUDA."""
    if device.type != "cuda":
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    return start, end
