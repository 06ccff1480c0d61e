import gc

import torch
from PIL import Image

from handler.config import HandlerConfig
from handler.dataset import ImageBytesDataset, LoaderItem
from handler.images import ImageTransform
from handler.loader import PersistentImageLoader
from handler.staging import StagingRing
from helpers import encode

SIZE = 8


class Owner:
    """Stands in for the DecodedBatch a slot is attached to."""


def test_slots_cycle_and_run_out_without_blocking():
    ring = StagingRing(slots=2, capacity=3, image_size=SIZE)
    first, second = ring.acquire(), ring.acquire()
    assert {first, second} == {0, 1} and ring.acquire() is None
    owner = Owner()
    view, release = ring.attach(first, 2, owner)
    assert view.shape == (2, 3, SIZE, SIZE) and view.is_contiguous(memory_format=torch.channels_last)
    release()
    release()  # a second call must not free the slot twice
    assert ring.acquire() == first and ring.acquire() is None


def test_a_dropped_batch_gives_its_slot_back():
    ring = StagingRing(slots=1, capacity=1, image_size=SIZE)
    slot = ring.acquire()
    owner = Owner()
    ring.attach(slot, 1, owner)
    assert ring.acquire() is None
    del owner
    gc.collect()
    assert ring.acquire() == slot


def test_a_release_after_reuse_does_not_free_the_new_batch_slot():
    ring = StagingRing(slots=1, capacity=1, image_size=SIZE)
    old_owner = Owner()
    _, release = ring.attach(ring.acquire(), 1, old_owner)
    release()
    slot = ring.acquire()  # the slot now belongs to a new batch
    del old_owner  # the old batch's finalizer must not hand it out a second time
    gc.collect()
    assert slot == 0 and ring.acquire() is None


def test_undelivered_slots_are_reclaimed():
    ring = StagingRing(slots=2, capacity=1, image_size=SIZE)
    ring.acquire(), ring.acquire()
    ring.reclaim_pending()
    assert ring.free_slots() == 2


def colour_jpeg(i: int) -> bytes:
    return encode(Image.new("RGB", (12, 10), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)), "PNG")


def make_loader() -> PersistentImageLoader:
    config = HandlerConfig(image_size=SIZE, resize_size=SIZE)
    return PersistentImageLoader(ImageBytesDataset(ImageTransform(config)), batch_size=2, num_workers=2,
                                 image_size=SIZE, pin_memory=False, mp_context="fork")


def expected(i: int) -> list[float]:
    return [float((i * 37) % 256), float((i * 91) % 256), float((i * 53) % 256)]


def test_holding_more_batches_than_slots_keeps_every_pixel():
    loader = make_loader()
    try:
        assert loader.staging.ring is not None and loader.staging.ring.free_slots() == 6
        items = [LoaderItem(i, colour_jpeg(i)) for i in range(30)]  # 15 batches, all held at once
        for _ in range(2):  # the second time round, the slots of the first are back
            batches = list(loader.iterate(items))
            assert [b.slot is not None for b in batches] == [True] * 6 + [False] * 9
            means = [p.float().mean(dim=(1, 2)).tolist() for b in batches for p in b.pixels]
            assert means == [expected(i) for i in range(30)]
            del batches
            gc.collect()
            assert loader.staging.ring.free_slots() == 6
    finally:
        loader.close()


def test_an_abandoned_request_leaves_the_next_one_intact():
    loader = make_loader()
    try:
        items = [LoaderItem(i, colour_jpeg(i)) for i in range(20)]
        iterator = loader.iterate(items)
        next(iterator)
        iterator.close()  # e.g. the model raised on the first batch
        gc.collect()
        means = [p.float().mean(dim=(1, 2)).tolist() for b in loader.iterate(items) for p in b.pixels]
        assert means == [expected(i) for i in range(20)]
        gc.collect()
        assert loader.staging.ring.free_slots() == 6  # the abandoned request's slots came back too
    finally:
        loader.close()


def test_the_ring_is_skipped_when_dev_shm_is_small(monkeypatch, caplog):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(64 << 20, 60 << 20, 4 << 20))
    assert StagingRing.create(slots=6, capacity=16, image_size=224) is None  # 14 MB wanted, 4 MB free
    assert "does not fit in /dev/shm" in caplog.text

    def no_shm(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr("shutil.disk_usage", no_shm)
    assert StagingRing.create(slots=2, capacity=1, image_size=SIZE) is not None
