"""The decode path: request items in, normalized model batches on the device out, as wrapped
iterables in the manner of timm's ``create_loader`` / ``PrefetchLoader``:

    chunks(items)          decoded uint8 chunks, as the persistent loader's workers finish them
                           (``handler.decode.loader``; with ``decode_device: cuda`` nvJPEG lists on the GPU
                           first, ``handler.decode.gpu``)
    batches(items, clock)  those chunks gathered into full model batches on the device and
                           normalized (``handler.decode.assemble.DeviceBatches``)

Built in two steps because of the order the process must take: ``start`` forks the loader's
workers while the process is small and has no CUDA context; ``attach`` (once the model is on its
device) makes the normalizer there, pins the pixel ring and sets up nvJPEG.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import torch

from handler.decode.assemble import DeviceBatches
from handler.config import HandlerConfig
from handler.decode.dataset import DecodedBatch, ImageBytesDataset, LoaderItem
from handler.decode.gpu import BatchedJpegDecoder
from handler.decode.images import ImageTransform
from handler.decode.loader import PersistentImageLoader
from handler.metrics import StageClock
from handler.decode.normalize import Normalizer

log = logging.getLogger(__name__)


class DecodePath:
    """The persistent loader (and nvJPEG decoder) of one model, and its normalizer."""

    def __init__(self, config: HandlerConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.loader = PersistentImageLoader(
            ImageBytesDataset(ImageTransform(config)),
            batch_size=config.loader_chunk,
            num_workers=config.num_workers,
            image_size=config.image_size,
            pin_memory=config.pin_memory and device.type == "cuda",
            mp_context=config.mp_context,
            inline_max_images=config.inline_max_images,
            worker_nice=config.worker_nice if device.type == "cuda" else 0,
        )
        self.jpeg_decoder: BatchedJpegDecoder | None = None
        self._normalize: Normalizer | None = None

    def start(self) -> None:
        """Fork the loader's workers (before the model, or CUDA, is loaded)."""
        self.loader.start()

    def attach(self) -> None:
        """Normalization constants on the device; on CUDA the pinned pixel ring and the nvJPEG
        decoder (``decode_device: cuda``)."""
        cfg = self.config
        self._normalize = Normalizer(cfg.mean, cfg.std, self.device)
        if self.device.type == "cuda" and cfg.pin_memory:
            self.loader.pin_ring()
        self.jpeg_decoder = None
        if cfg.decode_device == "cuda":
            if self.device.type != "cuda":
                log.warning("decode_device cuda needs the model on a GPU; decoding on the CPU")
            else:
                self.jpeg_decoder = BatchedJpegDecoder(cfg, self.device)

    def warm_up(self) -> None:
        """nvJPEG sets up on first use: here, not in the first request. One that does not work
        leaves every JPEG to the CPU workers."""
        if self.jpeg_decoder is not None and not self.jpeg_decoder.warm_up():
            log.warning("batched GPU JPEG decode does not work here; decoding every image on the CPU")
            self.jpeg_decoder = None

    # ---- the iterables ------------------------------------------------------------------

    def chunks(self, items: list[LoaderItem]) -> Iterator[DecodedBatch]:
        """Decoded, resized uint8 chunks of ``items``, yielded as they are ready, so the model
        can run on the first while the workers still decode the next. The first chunks are
        dispatched to the workers at once."""
        if self.jpeg_decoder is None:
            return self.loader.iterate(items)
        return self._decode_on_device(items)

    def batches(self, items: list[LoaderItem], clock: StageClock) -> DeviceBatches:
        """Full, normalized model batches of ``items`` on the device (failed images collected in
        its ``failures``)."""
        return DeviceBatches(self.chunks(items), size=self.config.batch_size, device=self.device,
                             normalize=self.to_model_input, clock=clock)

    def to_model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (pinned on CUDA) -> normalized float on the device, channels_last."""
        assert self._normalize is not None, "attach() has not run"
        return self._normalize(pixels)

    def _decode_on_device(self, items: list[LoaderItem]) -> Iterator[DecodedBatch]:
        assert self.jpeg_decoder is not None
        jobs, rest = self.jpeg_decoder.split(items)
        # The CPU's share goes out first: the workers decode it while nvJPEG decodes the rest.
        on_gpu = len(jobs) - round(len(jobs) * self.config.cpu_decode_share)
        rest.extend(job.item for job in jobs[on_gpu:])
        cpu_batches = self.loader.iterate(sorted(rest, key=lambda item: item.key)) if rest else iter(())
        rejected: list[LoaderItem] = []
        size = self.config.batch_size
        chunks = [jobs[start : min(start + size, on_gpu)] for start in range(0, on_gpu, size)]
        for chunk, batch in zip(chunks, self.jpeg_decoder.decode_lists(chunks, ahead=self.config.decode_ahead)):
            if batch is None:
                rejected.extend(job.item for job in chunk)
            else:
                yield batch
        yield from cpu_batches
        if rejected:  # lists nvJPEG refused: the workers decode them and report per image
            yield from self.loader.iterate(rejected)

    def close(self) -> None:
        """Stop the loader workers and free their shared memory."""
        self.loader.close()


def model_inputs(config: HandlerConfig, images: Sequence[bytes]) -> torch.Tensor:
    """The normalized fp32 batch the decode path feeds the model for encoded ``images`` (the
    loader's decode and resize, then the model's mean and std), on the CPU, without a loader:
    what archive builders measure a precision on."""
    transform = ImageTransform(config)
    pixels = torch.stack([transform(data) for data in images])
    return Normalizer(config.mean, config.std, torch.device("cpu"))(pixels)
