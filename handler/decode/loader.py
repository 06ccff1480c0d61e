"""A DataLoader whose worker processes persist across requests.

Creating a DataLoader with workers per request forks new processes every time, which costs
more than a plain loop saves. Here the DataLoader is built once with ``persistent_workers=True``;
each request swaps the batches in a ``RequestBatchSampler`` and iterates the loader again, which
resets the same workers to a new epoch. The items the sampler yields carry the request's images,
so the workers need no other state from the handler. Both ways use shared memory allocated
before the workers fork (``handler.decode.shared_memory.LoaderBuffers``): the image bytes go out
through an inbox, the decoded pixels come back through a ring of slots.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from handler.decode.dataset import DecodedBatch, DecodedImage, ImageBytesDataset, LoaderItem, collate_decoded
from handler.decode.supervisor import WorkerSupervisor, disarm_sigchld_handler
from handler.decode.shared_memory import LoaderBuffers

log = logging.getLogger(__name__)

# How often a request may rebuild a loader whose worker died before the error is given up on.
MAX_REBUILDS_PER_RUN = 2

# Batches each worker is given ahead (DataLoader's prefetch_factor); the pixel ring holds
# that many per worker plus the batch being consumed and the one still being copied out.
PREFETCH_PER_WORKER = 2


class RequestBatchSampler(Sampler[list[LoaderItem]]):
    """Yields the batches of the current request; replaced before every epoch.

    Runs in the handler process, as the DataLoader dispatches each batch: that is when a batch
    gets its shared memory (a ring slot for its pixels, its bytes into the inbox).
    """

    def __init__(self, buffers: LoaderBuffers | None = None) -> None:
        self._batches: list[list[LoaderItem]] = []
        self._buffers = buffers

    def set_batches(self, batches: list[list[LoaderItem]]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[list[LoaderItem]]:
        buffers = self._buffers
        if buffers is None:
            yield from self._batches
            return
        # The DataLoader asks for the first batch only after draining the previous epoch, so
        # no worker still writes a slot, or reads the inbox, of an abandoned request now.
        buffers.new_epoch()
        for batch in self._batches:
            yield buffers.dispatch(batch)

    def __len__(self) -> int:
        return len(self._batches)


class InboxDataset(Dataset):
    """Gives ``dataset`` each item with its bytes, reading them from the inbox where the sampler
    put them."""

    def __init__(self, dataset: ImageBytesDataset, buffers: LoaderBuffers) -> None:
        self.dataset, self.buffers = dataset, buffers

    def __getitem__(self, item: LoaderItem) -> DecodedImage:
        return self.dataset[self.buffers.receive(item)]


def _init_worker(_worker_id: int, nice: int = 0) -> None:
    # One intra-op thread per worker: parallelism comes from the worker count, and the
    # handler process keeps its own threads for the model.
    torch.set_num_threads(1)
    if nice:
        os.nice(nice)


class PersistentImageLoader:
    """Decodes lists of LoaderItems in parallel with long-lived DataLoader workers."""

    def __init__(
        self,
        dataset: ImageBytesDataset,
        *,
        batch_size: int,
        num_workers: int,
        image_size: int,
        pin_memory: bool,
        mp_context: str,
        inline_max_images: int = 0,
        shared_buffers: bool = True,
        worker_nice: int = 0,
    ) -> None:
        self.batch_size = batch_size
        self.inline_max_images = inline_max_images
        self._dataset = dataset
        self._num_workers = num_workers
        # Allocated before the workers fork, so they share its pages with this process.
        self.buffers = (
            LoaderBuffers.create(PREFETCH_PER_WORKER * num_workers + 2, batch_size, image_size)
            if shared_buffers and num_workers
            else None
        )
        ring = self.buffers.ring if self.buffers else None
        self._collate = functools.partial(collate_decoded, image_size=image_size)
        self._worker_collate = functools.partial(
            collate_decoded, image_size=image_size, ring=ring.pixels if ring else None
        )
        self._pin_memory = pin_memory
        self._mp_context = mp_context
        self._worker_init = functools.partial(_init_worker, nice=worker_nice)
        self._sampler = RequestBatchSampler(self.buffers)
        self.workers = WorkerSupervisor(self._build)

    def _build(self) -> DataLoader:
        workers = self._num_workers
        return DataLoader(
            self._dataset if self.buffers is None else InboxDataset(self._dataset, self.buffers),
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=self._worker_collate,
            pin_memory=self._pin_memory,
            persistent_workers=workers > 0,
            multiprocessing_context=multiprocessing.get_context(self._mp_context) if workers else None,
            worker_init_fn=self._worker_init if workers else None,
            prefetch_factor=PREFETCH_PER_WORKER if workers else None,
        )

    def start(self) -> None:
        """Fork the workers now (an empty epoch), e.g. before the model is moved to a GPU.

        Iterates the DataLoader itself: ``iterate([])`` would take the inline path and fork nothing.
        """
        if self._num_workers:
            self._sampler.set_batches([])
            for _ in self.workers.loader:
                pass
        disarm_sigchld_handler()

    def iterate(self, items: Sequence[LoaderItem]) -> Iterator[DecodedBatch]:
        """Decoded batches of ``items`` in order; rebuilds the loader if a worker died.

        The first batches go to the workers at once, before anything is consumed: the caller
        can do other work (decode on the GPU) while they decode.
        """
        # DataLoader parallelism is per batch: split small requests so every worker gets a share.
        size = max(1, min(self.batch_size, -(-len(items) // max(1, self._num_workers))))
        batches = [list(items[i : i + size]) for i in range(0, len(items), size)]
        if len(items) <= self.inline_max_images:
            # A handful of images decode faster here than the round trip to a worker takes.
            return (self._collate([self._dataset[item] for item in batch]) for batch in batches)
        self._replace_dead_workers()
        self._sampler.set_batches(batches)
        return self._deliver(batches, iter(self.workers.loader))

    def _deliver(self, batches: list[list[LoaderItem]], iterator: Iterator[DecodedBatch]) -> Iterator[DecodedBatch]:
        delivered = 0
        rebuilds = 0
        while True:
            try:
                for batch in iterator:
                    disarm_sigchld_handler()
                    delivered += 1
                    yield self.buffers.deliver(batch) if self.buffers is not None else batch
                return
            except Exception as exc:
                # A worker that died mid-request: torch checks worker liveness every 5 s while it
                # waits ("DataLoader worker (pid N) exited unexpectedly"); a worker killed while
                # writing can also leave a torn message that fails to unpickle. Either way a dead
                # worker is the cause: rebuild and resume. A worker that hangs is bounded by the
                # server's own timeout (TorchServe's responseTimeout restarts the backend worker).
                died = "DataLoader worker" in str(exc) or self.workers.dead_workers()
                if rebuilds >= MAX_REBUILDS_PER_RUN or not died:
                    raise
                rebuilds += 1
                log.warning("image loader failed (%s); rebuilding its workers", exc)
                self.workers.restart()
                self._sampler.set_batches(batches[delivered:])
                iterator = iter(self.workers.loader)

    def _replace_dead_workers(self) -> None:
        """A worker killed between requests would stall the next one until a liveness timeout:
        check first and rebuild."""
        dead = self.workers.dead_workers()
        if dead:
            log.warning("image loader workers %s died; rebuilding the loader", dead)
            self.workers.restart()

    def heal(self) -> bool:
        """Replace dead workers now, forking the new ones (what the next request would do), so
        that a health probe finds the loader whole. True when every worker is alive after it.
        Not while a request iterates the loader (the caller holds the classifier's lock)."""
        if self.workers.dead_workers():
            self._replace_dead_workers()
            self.start()
        return not self.workers.dead_workers()

    def pin_ring(self) -> None:
        """Page-lock the pixel ring (call once CUDA is initialized)."""
        if self.buffers is not None:
            self.buffers.pin()

    def close(self) -> None:
        """Stop the worker processes and free the shared memory (idempotent)."""
        self.workers.stop()
        if self.buffers is not None:
            self.buffers.close()
