"""Shared memory between the handler process and its loader workers, allocated before they fork.

    shared_uint8  a flat uint8 tensor on fresh shared memory (the one helper below everything)
    ImageInbox    encoded image bytes, handler -> workers: an arena filled front to back per epoch
    PixelRing     decoded pixels, workers -> handler: slots of model-size uint8 images, reused
                  batch after batch (page-locked on CUDA: the source of the host->device copies)
    LoaderBuffers the two of one loader, and what the loader does with them per batch

Without the inbox, encoded images travel to the workers inside the pickled batch, through a
pipe, 64 KB at a time; without the ring, every batch a worker returns is a new shared-memory
file, created, passed by descriptor, mapped and torn down. Both are allocated once, before the
workers fork, so both sides keep the same pages mapped; batches carry only (offset, length)
spans and slot numbers. Either falls back to the ordinary way (pickling, a block of its own)
when it is full or /dev/shm is too small.

A ring slot's life: ``acquire`` (when the DataLoader dispatches the batch) -> a worker writes it
-> ``attach`` (the batch reaches the handler) -> its release function (the pixels are on their
way to the model; on CUDA with the event that marks the copy done). A slot is handed out again
only once released and its copy has finished.
"""

from __future__ import annotations

import logging
import shutil
import threading
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from handler.decode.items import DecodedBatch, LoaderItem

log = logging.getLogger(__name__)

# Keep each shared-memory buffer to this share of the free space in /dev/shm (containers often
# give it 64 MB).
MAX_SHM_SHARE = 0.25

# One server-side batch of images rarely holds more; what does not fit is pickled as before.
DEFAULT_INBOX_BYTES = 64 << 20

# Smaller than this is not worth an inbox.
MIN_INBOX_BYTES = 1 << 20


def shm_budget() -> int:
    """Bytes one shared-memory buffer may take: a share of what /dev/shm has free (unlimited
    where there is no /dev/shm to measure: the allocation itself decides there)."""
    try:
        return int(MAX_SHM_SHARE * shutil.disk_usage("/dev/shm").free)
    except OSError:
        return 1 << 62


def shared_uint8(nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor on fresh shared memory: zero pages, nothing committed until written,
    passed to other processes by handle (or inherited across fork) rather than copied."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


class ImageInbox:
    """``nbytes`` of shared memory for encoded images, handed out front to back.

    Filled within one loader epoch and emptied when the next starts (``reset``): the DataLoader
    only starts an epoch after the workers have finished every batch of the previous one, so no
    worker still reads what is overwritten.
    """

    def __init__(self, nbytes: int) -> None:
        self._buffer = shared_uint8(nbytes)
        self._view = self._buffer.numpy().data  # a memoryview of the shared pages
        self.capacity = nbytes
        self._used = 0

    def __getstate__(self) -> dict:
        # A worker started by spawn/forkserver gets the shared buffer itself (torch passes it by
        # handle), not a copy; the memoryview is rebuilt there.
        return {"buffer": self._buffer, "capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self._buffer, self.capacity, self._used = state["buffer"], state["capacity"], 0
        self._view = self._buffer.numpy().data

    @classmethod
    def create(cls, nbytes: int = DEFAULT_INBOX_BYTES) -> "ImageInbox | None":
        """An inbox of up to ``nbytes`` (less where /dev/shm is small), or None."""
        nbytes = min(nbytes, shm_budget())
        if nbytes < MIN_INBOX_BYTES:
            log.warning("no room in /dev/shm for an image inbox; images travel to the loader in pickles")
            return None
        return cls(nbytes)

    def reset(self) -> None:
        """Empty the arena. Only when no worker can still read it: at the start of an epoch."""
        self._used = 0

    def put(self, data: bytes | bytearray) -> tuple[int, int] | None:
        """Copy ``data`` in; its (offset, length), or None when it does not fit."""
        start, end = self._used, self._used + len(data)
        if end > self.capacity:
            return None
        self._view[start:end] = data
        self._used = end
        return start, len(data)

    def read(self, span: tuple[int, int]) -> bytes:
        """The bytes ``put`` stored at ``span`` (a copy: the arena is reused)."""
        start, length = span
        return bytes(self._view[start : start + length])


class PixelRing:
    """``slots`` blocks of ``capacity`` uint8 NHWC images of side ``image_size``."""

    def __init__(self, slots: int, capacity: int, image_size: int) -> None:
        self.capacity = capacity
        self.pixels = shared_uint8(slots * capacity * image_size * image_size * 3).view(
            slots, capacity, image_size, image_size, 3)
        self._free = list(range(slots))
        self._pending: set[int] = set()  # handed to a worker, not yet back
        self._events: list[Any] = [None] * slots
        self._lock = threading.Lock()
        self._pinned = False

    @classmethod
    def create(cls, slots: int, capacity: int, image_size: int) -> "PixelRing | None":
        """A ring, or None where /dev/shm is too small to hold one comfortably."""
        nbytes = slots * capacity * image_size * image_size * 3
        budget = shm_budget()
        if nbytes > budget:
            log.warning("pixel ring of %d MB does not fit in /dev/shm (%d MB may be used); batches "
                        "travel in blocks of their own", nbytes >> 20, budget >> 20)
            return None
        return cls(slots, capacity, image_size)

    @property
    def pinned(self) -> bool:
        return self._pinned

    def pin(self) -> None:
        """Page-lock the ring for asynchronous host->device copies (CUDA only, once)."""
        if self._pinned:
            return
        cudart = torch.cuda.cudart()
        error = int(cudart.cudaHostRegister(self.pixels.data_ptr(), self.pixels.nbytes, 1))  # portable
        if error != 0:
            log.warning("could not page-lock the pixel ring (cudaError %d); copies stay synchronous", error)
            return
        self._pinned = True

    def acquire(self) -> int | None:
        """A free slot for the next batch, or None when all are in use."""
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop(0)
            event, self._events[slot] = self._events[slot], None
            self._pending.add(slot)
        if event is not None:
            event.synchronize()  # the previous copy out of this slot must be done
        return slot

    def reclaim_pending(self) -> None:
        """Free the slots of batches that were dispatched but never delivered (an abandoned
        request). Only call when no worker can still be writing them: at the start of an epoch,
        after the DataLoader has drained the previous one."""
        with self._lock:
            self._free.extend(sorted(self._pending))
            self._pending.clear()

    def attach(self, slot: int, count: int, owner: object) -> tuple[torch.Tensor, Callable[[Any], None]]:
        """The NCHW (channels_last) view of ``count`` images in ``slot``, and the function that
        gives the slot back (once; with the CUDA event that marks the copy out of it done).
        Should nobody call it, the slot comes back when ``owner`` is garbage collected."""
        with self._lock:
            self._pending.discard(slot)
        finalizer = weakref.finalize(owner, self._give_back, slot, None)

        def release(event: Any = None) -> None:
            if finalizer.detach() is not None:  # only the first call (or the finalizer) counts
                self._give_back(slot, event)

        return self.pixels[slot, :count].permute(0, 3, 1, 2), release

    def _give_back(self, slot: int, event: Any) -> None:
        with self._lock:
            self._events[slot] = event
            self._free.append(slot)

    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    def close(self) -> None:
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.pixels.data_ptr())
            self._pinned = False


@dataclass
class LoaderBuffers:
    """The image inbox and the pixel ring of one loader (either may be None: no room for it)."""

    inbox: ImageInbox | None
    ring: PixelRing | None

    def __getstate__(self) -> dict:
        # A worker started by spawn/forkserver needs only the inbox (it writes the ring through
        # the collate function's view of its pixels); the ring's lock and events stay here.
        return {"inbox": self.inbox, "ring": None}

    @classmethod
    def create(cls, slots: int, capacity: int, image_size: int) -> "LoaderBuffers":
        return cls(ImageInbox.create(), PixelRing.create(slots, capacity, image_size))

    def new_epoch(self) -> None:
        """Reuse both from the start. Only when no worker can still read or write them: when the
        DataLoader starts an epoch it has drained the previous one."""
        if self.ring is not None:
            self.ring.reclaim_pending()
        if self.inbox is not None:
            self.inbox.reset()

    def dispatch(self, batch: list[LoaderItem]) -> list[LoaderItem]:
        """``batch`` as sent to a worker: a ring slot for its pixels (if one is free) and its
        encoded bytes copied into the inbox (where they fit), so the pickled items carry only spans."""
        ring, inbox = self.ring, self.inbox
        slot = ring.acquire() if ring is not None and len(batch) <= ring.capacity else None
        sent = []
        for item in batch:
            span = inbox.put(item.data) if inbox is not None and isinstance(item.data, bytes) else None
            sent.append(replace(item, data=b"" if span else item.data, slot=slot, span=span))
        return sent

    def receive(self, item: LoaderItem) -> LoaderItem:
        """In a worker: ``item`` with its bytes read back from the inbox."""
        if item.span is None or self.inbox is None:
            return item
        return replace(item, data=self.inbox.read(item.span), span=None)

    def deliver(self, batch: DecodedBatch) -> DecodedBatch:
        """In the handler: a batch that came back through a ring slot gets its pixels (a view of
        the slot) and the function that gives the slot back."""
        if batch.slot is not None and self.ring is not None:
            batch.attach(*self.ring.attach(batch.slot, len(batch.keys), batch))
        return batch

    def pin(self) -> None:
        """Page-lock the ring (CUDA only, once CUDA is initialized)."""
        if self.ring is not None:
            self.ring.pin()

    def close(self) -> None:
        """Unpin the ring and drop both buffers (their memory is freed once no worker maps them)."""
        if self.ring is not None:
            self.ring.close()
        self.inbox = self.ring = None
