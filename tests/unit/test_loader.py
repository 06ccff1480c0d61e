import os
import signal
import time

import pytest
import torch

from handler.config import HandlerConfig
from handler.decode.dataset import ImageBytesDataset, LoaderItem
from handler.decode.images import ImageTransform
from handler.decode.loader import PersistentImageLoader
from helpers import encode
from PIL import Image

SIZE = 16


def grey(value: int) -> bytes:
    return encode(Image.new("L", (20, 20), value))


def make_loader(num_workers: int = 2, batch_size: int = 3, **options) -> PersistentImageLoader:
    config = HandlerConfig(image_size=SIZE, resize_size=SIZE)
    return PersistentImageLoader(
        ImageBytesDataset(ImageTransform(config)),
        batch_size=batch_size, num_workers=num_workers, image_size=SIZE,
        pin_memory=False, mp_context="fork", **options,
    )


def worker_pids(loader: PersistentImageLoader) -> list[int]:
    return loader.workers.worker_pids()


@pytest.fixture
def loader():
    instance = make_loader()
    yield instance
    instance.close()


def run(loader: PersistentImageLoader, values: list[int]):
    items = [LoaderItem(key, grey(v)) for key, v in enumerate(values)]
    return list(loader.iterate(items))


def test_batches_come_back_in_order_with_every_image(loader):
    values = list(range(0, 250, 25))  # 10 images -> batches of 3, 3, 3, 1
    batches = run(loader, values)
    assert [len(b.keys) for b in batches] == [3, 3, 3, 1]  # batch_size 3
    keys = [k for b in batches for k in b.keys]
    assert keys == list(range(10))
    means = [int(p.float().mean().round()) for b in batches for p in b.pixels]
    assert means == values


def test_batches_arrive_channels_last_with_the_pixels_in_place(loader):
    # Colour images, so a channel mix-up in the NHWC collate would show.
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (10, 120, 240)]
    items = [LoaderItem(k, encode(Image.new("RGB", (24, 20), c))) for k, c in enumerate(colours)]
    batches = list(loader.iterate(items))
    for batch in batches:
        assert batch.pixels.is_contiguous(memory_format=torch.channels_last)
        assert batch.pixels.is_shared()  # written straight into shared memory by the worker
    pixels = torch.cat([b.pixels for b in batches])
    assert pixels.float().mean(dim=(2, 3)).round().tolist() == [list(map(float, c)) for c in colours]


def test_workers_persist_across_requests(loader):
    run(loader, [1, 2, 3])
    first = worker_pids(loader)
    for _ in range(3):
        run(loader, [4, 5, 6, 7])
    assert worker_pids(loader) == first
    assert all(p is not None for p in first)


def merged(batches):
    keys = [k for b in batches for k in b.keys]
    pixels = torch.cat([b.pixels for b in batches])
    failures = {k: v for b in batches for k, v in b.failures.items()}
    return keys, pixels, failures


def test_bad_images_are_reported_by_key_without_losing_the_rest(loader):
    items = [LoaderItem(0, grey(10)), LoaderItem(1, b"garbage"), LoaderItem(2, grey(30))]
    keys, pixels, failures = merged(list(loader.iterate(items)))
    assert keys == [0, 2]
    assert pixels.shape == (2, 3, SIZE, SIZE)
    assert set(failures) == {1} and failures[1].status == 400 and failures[1].code == "invalid_image"


def test_all_bad_batch_has_an_empty_tensor(loader):
    (batch,) = list(loader.iterate([LoaderItem(0, b"x")]))
    assert batch.keys == [] and batch.pixels.shape == (0, 3, SIZE, SIZE)


def test_empty_request_yields_nothing(loader):
    assert list(loader.iterate([])) == []


def test_killed_worker_is_replaced_and_the_request_still_succeeds(loader):
    run(loader, [1])
    victim = worker_pids(loader)[0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.5)  # no SIGCHLD handler may raise here (as it would in a TorchServe worker)
    batches = run(loader, list(range(0, 200, 20)))
    assert [k for b in batches for k in b.keys] == list(range(10))
    assert victim not in worker_pids(loader)


def test_worker_killed_during_a_request_is_survived(loader):
    run(loader, [1])
    victim = worker_pids(loader)[1]
    items = [LoaderItem(k, grey(k)) for k in range(30)]
    keys = []
    for i, batch in enumerate(loader.iterate(items)):
        if i == 0:
            os.kill(victim, signal.SIGKILL)
        keys.extend(batch.keys)
    assert keys == list(range(30))


def test_zero_workers_decodes_in_process():
    loader = make_loader(num_workers=0)
    batches = run(loader, [50, 60])
    assert [k for b in batches for k in b.keys] == [0, 1]
    assert batches[0].pixels.dtype == torch.uint8


def test_small_batches_decode_inline_with_the_same_result(loader):
    config = HandlerConfig(image_size=SIZE, resize_size=SIZE)
    inline = PersistentImageLoader(ImageBytesDataset(ImageTransform(config)), batch_size=3, num_workers=2,
                                   image_size=SIZE, pin_memory=False, mp_context="fork", inline_max_images=2)
    try:
        items = [LoaderItem(0, grey(40)), LoaderItem(1, b"bad")]
        got = merged(list(inline.iterate(items)))
        want = merged(list(loader.iterate(items)))
        assert not inline.workers.has_workers()  # no worker was involved
        assert got[0] == want[0] == [0] and torch.equal(got[1], want[1])
        assert got[2] == want[2] and set(got[2]) == {1}
    finally:
        inline.close()


def test_small_requests_are_split_across_all_workers(loader):
    batches = run(loader, [10, 20, 30, 40])  # batch_size 3, 2 workers: 2 + 2, not 3 + 1
    assert [len(b.keys) for b in batches] == [2, 2]


def test_start_forks_the_workers_even_when_small_batches_decode_inline():
    loader = make_loader(inline_max_images=1)
    try:
        loader.start()
        pids = worker_pids(loader)
        assert len(pids) == 2 and all(pids)
        run(loader, [1, 2, 3, 4])
        assert worker_pids(loader) == pids  # the request used the workers forked at start
    finally:
        loader.close()


def test_iterate_hands_out_the_first_batches_before_anything_is_consumed(loader):
    """So the handler can decode on the GPU while the workers decode their share."""
    items = [LoaderItem(key, grey(10 * key)) for key in range(8)]
    batches = loader.iterate(items)
    assert loader.buffers.inbox._used >= sum(len(item.data) for item in items[:4])  # dispatched: bytes in the inbox
    assert [k for b in batches for k in b.keys] == list(range(8))


def test_workers_can_run_at_a_lower_priority_than_the_handler():
    nice = make_loader(batch_size=2, worker_nice=5)
    try:
        nice.start()
        own = os.getpriority(os.PRIO_PROCESS, 0)
        deadline = time.monotonic() + 10  # a worker runs its init once it is scheduled
        while True:
            priorities = [os.getpriority(os.PRIO_PROCESS, pid) for pid in worker_pids(nice)]
            if priorities == [min(19, own + 5)] * 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert priorities == [min(19, own + 5)] * 2
    finally:
        nice.close()
