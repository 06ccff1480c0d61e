import gc
from collections import namedtuple

import torch
from PIL import Image

from handler.config import HandlerConfig
from handler.dataset import ImageBytesDataset, LoaderItem
from handler.images import ImageTransform
from handler.inbox import MIN_INBOX_BYTES, Inbox
from handler.loader import PersistentImageLoader, RequestBatchSampler
from handler.transport import SharedStaging
from helpers import encode

SIZE = 8


def test_bytes_come_back_as_put_until_the_arena_is_full():
    inbox = Inbox(10)
    first, second = inbox.put(b"abcd"), inbox.put(bytearray(b"efghij"))
    assert first == (0, 4) and second == (4, 6)
    assert inbox.put(b"k") is None  # full: the caller sends it the ordinary way
    assert inbox.read(first) == b"abcd" and inbox.read(second) == b"efghij"
    inbox.reset()
    assert inbox.put(b"xyz") == (0, 3) and inbox.read((0, 3)) == b"xyz"


def test_a_copy_made_for_another_process_reads_the_same_memory():
    inbox = Inbox(16)
    clone = Inbox.__new__(Inbox)
    clone.__setstate__(inbox.__getstate__())  # what pickling for a spawned worker does
    span = inbox.put(b"shared")
    assert clone.read(span) == b"shared"


def test_the_inbox_shrinks_to_dev_shm_or_is_skipped(monkeypatch, caplog):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(64 << 20, 0, 16 << 20))
    assert Inbox.create(64 << 20).capacity == 4 << 20  # a quarter of what is free
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(64 << 20, 62 << 20, 2 << 20))
    assert Inbox.create(64 << 20) is None and 2 << 20 < 4 * MIN_INBOX_BYTES
    assert "no room in /dev/shm" in caplog.text


def test_the_sampler_moves_bytes_into_the_inbox_and_sends_the_rest_as_they_are():
    inbox = Inbox(10)
    sampler = RequestBatchSampler(SharedStaging(inbox, None))
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
        assert loader.staging.inbox is not None
        items = [LoaderItem(i, colour_png(i)) for i in range(12)]
        loader.staging.inbox.capacity = sum(len(i.data) for i in items[:5])  # the rest overflow
        abandoned = loader.iterate(items)
        next(abandoned)
        abandoned.close()  # its workers may still be reading when the next request comes
        gc.collect()
        for _ in range(2):
            means = [p.float().mean(dim=(1, 2)).tolist() for b in loader.iterate(items) for p in b.pixels]
            assert means == [expected(i) for i in range(12)]
            assert loader.staging.inbox._used == loader.staging.inbox.capacity
        list(loader.iterate(items[:2]))
        assert loader.staging.inbox._used == len(items[0].data) + len(items[1].data)  # emptied per request
    finally:
        loader.close()
