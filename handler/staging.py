"""Shared-memory slots the loader workers write decoded batches into, reused batch after batch.

Without it every batch a worker returns is a new shared-memory file: created and faulted in by
the worker, passed by file descriptor, mapped and faulted in again by the handler, then torn
down -- several milliseconds per batch on a 2-core machine. The ring is allocated once, before
the workers fork, so both sides keep the same pages mapped. On CUDA it is also page-locked once
(``cudaHostRegister``): it is the pinned staging buffer the host->device copies read from,
asynchronously, with no pinning copy per batch.

A slot's life: ``acquire`` (when the DataLoader dispatches the batch) -> a worker writes it ->
``attach`` (the batch reaches the handler) -> its release function (its pixels are on their way to the
model; on CUDA with the event that marks the copy done). A slot is only handed out again once
released and its copy has finished. When no slot is free the batch simply travels the ordinary
way, in a shared-memory block of its own.
"""

from __future__ import annotations

import logging
import shutil
import threading
import weakref
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

# Keep each shared-memory buffer to this share of the free space in /dev/shm (containers often
# give it 64 MB).
MAX_SHM_SHARE = 0.25


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


class StagingRing:
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
    def create(cls, slots: int, capacity: int, image_size: int) -> "StagingRing | None":
        """A ring, or None where /dev/shm is too small to hold one comfortably."""
        nbytes = slots * capacity * image_size * image_size * 3
        budget = shm_budget()
        if nbytes > budget:
            log.warning("staging ring of %d MB does not fit in /dev/shm (%d MB may be used); batches "
                        "travel in blocks of their own", nbytes >> 20, budget >> 20)
            return None
        return cls(slots, capacity, image_size)

    def pin(self) -> None:
        """Page-lock the ring for asynchronous host->device copies (CUDA only, once)."""
        if self._pinned:
            return
        cudart = torch.cuda.cudart()
        error = int(cudart.cudaHostRegister(self.pixels.data_ptr(), self.pixels.nbytes, 1))  # portable
        if error != 0:
            log.warning("could not page-lock the staging ring (cudaError %d); copies stay synchronous", error)
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
