#!/usr/bin/env python
"""The loader's own overhead per request, with and without its shared memory, side by side.

A transform that returns a fixed image (no decoding) leaves only what the DataLoader machinery
costs: dispatching the image bytes to the workers, collating, and bringing the batches back.
"pickled": the bytes travel to the workers in the pickled batches and every decoded batch comes
back in a shared-memory block of its own; "shared": the bytes go through the inbox and the
batches come back in the pixel ring (the handler's default). The same requests are also timed
with the real decode, for scale. The allocator is set up as the handler does it.

    .venv/bin/python benchmarks/bench_loader.py [--images 32] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from harness.bench_images import photo_jpegs
from handler.config import HandlerConfig
from handler.decode.dataset import ImageBytesDataset, LoaderItem
from handler.decode.images import ImageTransform
from handler.decode.loader import PersistentImageLoader
from handler.memory import keep_freed_memory
from harness.timing import timed_ms


class FixedImage:
    """Stands in for decoding: the same channels-last uint8 image for any bytes."""

    def __init__(self, size: int) -> None:
        self.pixels = torch.zeros((size, size, 3), dtype=torch.uint8).permute(2, 0, 1)

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", default="640x480")
    args = parser.parse_args()
    config = HandlerConfig()
    keep_freed_memory()  # as the handler does before its workers fork
    items = [LoaderItem(i, data) for i, data in enumerate(photo_jpegs(args.size, args.images))]
    loaders = {
        (transform, shared): PersistentImageLoader(
            ImageBytesDataset(FixedImage(config.image_size) if transform == "no decode" else ImageTransform(config)),
            batch_size=config.batch_size, num_workers=config.num_workers, image_size=config.image_size,
            pin_memory=False, mp_context="fork", shared_buffers=shared)
        for transform in ("no decode", "decode") for shared in (False, True)
    }
    for loader in loaders.values():
        loader.start()
        list(loader.iterate(items))  # warm-up
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in loaders}
    for _ in range(args.rounds):  # interleaved, so machine noise hits every variant alike
        for key, loader in loaders.items():
            times[key].append(timed_ms(lambda: list(loader.iterate(items))))
    print(f"One request of {args.images} JPEGs ({args.size}), {config.num_workers} workers, batch "
          f"{config.batch_size}, median of {args.rounds} interleaved rounds (ms):\n")
    print("| transform | pickled | shared (inbox + pixel ring) |\n|---|---|---|")
    for transform in ("no decode", "decode"):
        pickled, shared = (statistics.median(times[(transform, s)]) for s in (False, True))
        print(f"| {transform} | {pickled:.2f} | {shared:.2f} |")
    for loader in loaders.values():
        loader.close()


if __name__ == "__main__":
    main()
