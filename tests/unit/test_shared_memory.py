"""handler.decode.shared_memory: the image inbox (bytes out), the pixel ring (pixels back), and the
loader that uses both."""

import gc
from collections import namedtuple

import torch
from PIL import Image

from handler.config import HandlerConfig
from handler.decode.dataset import ImageBytesDataset, LoaderItem
from handler.decode.images import ImageTransform
from handler.decode.loader import PersistentImageLoader, RequestBatchSampler
from handler.decode.shared_memory import MIN_INBOX_BYTES, ImageInbox, LoaderBuffers, PixelRing
from helpers import encode

SIZE = 8


def test_bytes_come_back_as_put_until_the_arena_is_full():
    inbox = ImageInbox(10)
    first, second = inbox.put(b"abcd"), inbox.put(bytearray(b"efghij"))
    assert first == (0, 4) and second == (4, 6)
    assert inbox.put(b"k") is None  # full: the caller sends it the ordinary way
    assert inbox.read(first) == b"abcd" and inbox.read(second) == b"efghij"
    inbox.reset()
    assert inbox.put(b"xyz") == (0, 3) and inbox.read((0, 3)) == b"xyz"


def test_a_copy_made_for_another_process_reads_the_same_memory():
    inbox = ImageInbox(16)
    clone = ImageInbox.__new__(ImageInbox)
    clone.__setstate__(inbox.__getstate__())  # what pickling for a spawned worker does
    span = inbox.put(b"shared")
    assert clone.read(span) == b"shared"


def test_the_inbox_shrinks_to_dev_shm_or_is_skipped(monkeypatch, caplog):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(64 << 20, 0, 16 << 20))
    assert ImageInbox.create(64 << 20).capacity == 4 << 20  # a quarter of what is free
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(64 << 20, 62 << 20, 2 << 20))
    assert ImageInbox.create(64 << 20) is None and 2 << 20 < 4 * MIN_INBOX_BYTES
    assert "no room in /dev/shm" in caplog.text


def test_the_sampler_moves_bytes_into_the_inbox_and_sends_the_rest_as_they_are():
    inbox = ImageInbox(10)
    sampler = RequestBatchSampler(LoaderBuffers(inbox, None))
    sampler.set_batches([[LoaderItem(0, b"12345"), LoaderItem(1, b"678")], [LoaderItem(2, b"abcdef")]])
    assert len(sampler) == 2
    first, second = list(sampler)
    assert [(i.data, i.span) for i in first] == [(b"", (0, 5)), (b"", (5, 3))]
    assert [(i.data, i.span) for i in second] == [(b"abcdef", None)]  # did not fit
    assert inbox.read(first[1].span) == b"678"
    tensor = torch.zeros(3, 2, 2, dtype=torch.uint8)  # decoded pixels are never copied into the inbox
    sampler.set_batches([[LoaderItem(3, tensor)]])
    (only,) = list(sampler)
    assert only[0].span is None and only[0].data is tensor


def colour_png(i: int) -> bytes:
    return encode(Image.new("RGB", (12, 10), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)), "PNG")


def expected(i: int) -> list[float]:
    return [float((i * 37) % 256), float((i * 91) % 256), float((i * 53) % 256)]


def test_workers_decode_from_the_inbox_and_from_pickles_alike_request_after_request():
    config = HandlerConfig(image_size=SIZE, resize_size=SIZE)
    loader = PersistentImageLoader(ImageBytesDataset(ImageTransform(config)), batch_size=2, num_workers=2,
                                   image_size=SIZE, pin_memory=False, mp_context="fork")
    try:
        assert loader.buffers.inbox is not None
        items = [LoaderItem(i, colour_png(i)) for i in range(12)]
        loader.buffers.inbox.capacity = sum(len(i.data) for i in items[:5])  # the rest overflow
        abandoned = loader.iterate(items)
        next(abandoned)
        abandoned.close()  # its workers may still be reading when the next request comes
        gc.collect()
        for _ in range(2):
            means = [p.float().mean(dim=(1, 2)).tolist() for b in loader.iterate(items) for p in b.pixels]
            assert means == [expected(i) for i in range(12)]
            assert loader.buffers.inbox._used == loader.buffers.inbox.capacity
        list(loader.iterate(items[:2]))
        assert loader.buffers.inbox._used == len(items[0].data) + len(items[1].data)  # emptied per request
    finally:
        loader.close()


class Owner:
    """Stands in for the DecodedBatch a slot is attached to."""


def test_slots_cycle_and_run_out_without_blocking():
    ring = PixelRing(slots=2, capacity=3, image_size=SIZE)
    first, second = ring.acquire(), ring.acquire()
    assert {first, second} == {0, 1} and ring.acquire() is None
    owner = Owner()
    view, release = ring.attach(first, 2, owner)
    assert view.shape == (2, 3, SIZE, SIZE) and view.is_contiguous(memory_format=torch.channels_last)
    release()
    release()  # a second call must not free the slot twice
    assert ring.acquire() == first and ring.acquire() is None


def test_a_dropped_batch_gives_its_slot_back():
    ring = PixelRing(slots=1, capacity=1, image_size=SIZE)
    slot = ring.acquire()
    owner = Owner()
    ring.attach(slot, 1, owner)
    assert ring.acquire() is None
    del owner
    gc.collect()
    assert ring.acquire() == slot


def test_a_release_after_reuse_does_not_free_the_new_batch_slot():
    ring = PixelRing(slots=1, capacity=1, image_size=SIZE)
    old_owner = Owner()
    _, release = ring.attach(ring.acquire(), 1, old_owner)
    release()
    slot = ring.acquire()  # the slot now belongs to a new batch
    del old_owner  # the old batch's finalizer must not hand it out a second time
    gc.collect()
    assert slot == 0 and ring.acquire() is None


def test_undelivered_slots_are_reclaimed():
    ring = PixelRing(slots=2, capacity=1, image_size=SIZE)
    ring.acquire(), ring.acquire()
    ring.reclaim_pending()
    assert ring.free_slots() == 2


def make_loader() -> PersistentImageLoader:
    config = HandlerConfig(image_size=SIZE, resize_size=SIZE)
    return PersistentImageLoader(ImageBytesDataset(ImageTransform(config)), batch_size=2, num_workers=2,
                                 image_size=SIZE, pin_memory=False, mp_context="fork")


def test_holding_more_batches_than_slots_keeps_every_pixel():
    loader = make_loader()
    try:
        assert loader.buffers.ring is not None and loader.buffers.ring.free_slots() == 6
        items = [LoaderItem(i, colour_png(i)) for i in range(30)]  # 15 batches, all held at once
        for _ in range(2):  # the second time round, the slots of the first are back
            batches = list(loader.iterate(items))
            assert [b.slot is not None for b in batches] == [True] * 6 + [False] * 9
            means = [p.float().mean(dim=(1, 2)).tolist() for b in batches for p in b.pixels]
            assert means == [expected(i) for i in range(30)]
            del batches
            gc.collect()
            assert loader.buffers.ring.free_slots() == 6
    finally:
        loader.close()


def test_an_abandoned_request_leaves_the_next_one_intact():
    loader = make_loader()
    try:
        items = [LoaderItem(i, colour_png(i)) for i in range(20)]
        iterator = loader.iterate(items)
        next(iterator)
        iterator.close()  # e.g. the model raised on the first batch
        gc.collect()
        means = [p.float().mean(dim=(1, 2)).tolist() for b in loader.iterate(items) for p in b.pixels]
        assert means == [expected(i) for i in range(20)]
        gc.collect()
        assert loader.buffers.ring.free_slots() == 6  # the abandoned request's slots came back too
    finally:
        loader.close()


def test_the_ring_is_skipped_when_dev_shm_is_small(monkeypatch, caplog):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(64 << 20, 60 << 20, 4 << 20))
    assert PixelRing.create(slots=6, capacity=16, image_size=224) is None  # 14 MB wanted, 4 MB free
    assert "does not fit in /dev/shm" in caplog.text

    def no_shm(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr("shutil.disk_usage", no_shm)
    assert PixelRing.create(slots=2, capacity=1, image_size=SIZE) is not None
