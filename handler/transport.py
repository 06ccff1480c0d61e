"""How images travel between the handler process and its loader workers: the shared-memory
inbox (encoded bytes out) and staging ring (decoded pixels back), allocated together before
the workers fork so both sides map the same pages. Either one falls back to pickling when it is
full or /dev/shm is too small.
"""

from __future__ import annotations

from dataclasses import dataclass

from handler.dataset import DecodedBatch, LoaderItem
from handler.inbox import Inbox
from handler.staging import StagingRing


@dataclass
class SharedStaging:
    """The inbox and the staging ring of one loader (either may be None: no room for it)."""

    inbox: Inbox | None
    ring: StagingRing | None

    def __getstate__(self) -> dict:
        # A worker started by spawn/forkserver needs only the inbox (it writes the ring through
        # the collate function's view of its pixels); the ring's lock and events stay here.
        return {"inbox": self.inbox, "ring": None}

    @classmethod
    def create(cls, slots: int, capacity: int, image_size: int) -> "SharedStaging":
        return cls(Inbox.create(), StagingRing.create(slots, capacity, image_size))

    def new_epoch(self) -> None:
        """Reuse both from the start. Only when no worker can still read or write them: when the
        DataLoader starts an epoch it has drained the previous one."""
        if self.ring is not None:
            self.ring.reclaim_pending()
        if self.inbox is not None:
            self.inbox.reset()

    def stage(self, batch: list[LoaderItem]) -> list[LoaderItem]:
        """``batch`` as dispatched: a ring slot for its pixels (if one is free) and its encoded
        bytes copied into the inbox (where they fit), so the pickled items carry only spans."""
        ring, inbox = self.ring, self.inbox
        slot = ring.acquire() if ring is not None and len(batch) <= ring.capacity else None
        staged = []
        for item in batch:
            span = inbox.put(item.data) if inbox is not None and isinstance(item.data, bytes) else None
            staged.append(LoaderItem(item.key, b"" if span else item.data, slot, span))
        return staged

    def unstage(self, item: LoaderItem) -> LoaderItem:
        """In a worker: ``item`` with its bytes read back from the inbox."""
        if item.span is None or self.inbox is None:
            return item
        return LoaderItem(item.key, self.inbox.read(item.span), item.slot)

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
