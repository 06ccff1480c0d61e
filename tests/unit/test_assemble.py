import pytest
import torch

from handler.decode.assemble import DeviceBatches
from handler.decode.dataset import DecodedBatch


def chunk(keys: list[int], failures: dict | None = None, releases: list | None = None) -> DecodedBatch:
    """A decoded chunk whose pixel rows encode their keys (every pixel = key)."""
    pixels = torch.stack([torch.full((3, 4, 4), k, dtype=torch.uint8) for k in keys]) if keys else None
    batch = DecodedBatch(list(keys), None, dict(failures or {}))
    batch.attach(pixels, lambda event: releases.append(tuple(keys)) if releases is not None else None)
    return batch


def batches(size: int, chunks: list[DecodedBatch]) -> DeviceBatches:
    # "Normalization" that keeps the pixel values readable, on a fresh tensor as the real one.
    return DeviceBatches(chunks, size=size, device=torch.device("cpu"), normalize=lambda px: px.float().contiguous())


def run(size: int, chunks: list[DecodedBatch]) -> list:
    return list(batches(size, chunks))


def rows(batch) -> list[int]:
    _, inputs = batch
    return [int(x[0, 0, 0]) for x in inputs]


def keys_of(out) -> list[list[int]]:
    return [keys for keys, _ in out]


def test_small_chunks_are_gathered_into_full_batches_in_order():
    out = run(8, [chunk([0, 1, 2]), chunk([3, 4, 5]), chunk([6, 7, 8]), chunk([9, 10])])
    assert keys_of(out) == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]
    assert [rows(b) for b in out] == keys_of(out)  # each key's own pixels


def test_a_chunk_is_split_across_batches_and_no_batch_exceeds_the_size():
    out = run(4, [chunk([0, 1, 2]), chunk([3, 4, 5, 6, 7, 8, 9]), chunk([10])])
    assert keys_of(out) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [rows(b) for b in out] == keys_of(out)


def test_a_full_chunk_with_nothing_waiting_passes_without_a_copy():
    seen = []
    full = chunk([0, 1, 2, 3])
    pixels = full.pixels
    gather = DeviceBatches([full], size=4, device=torch.device("cpu"),
                           normalize=lambda px: seen.append(px) or px.float())
    next(iter(gather))
    assert seen[0].data_ptr() == pixels.data_ptr()


def test_every_chunk_is_released_once_and_buffer_reuse_keeps_earlier_batches():
    releases: list = []
    chunks = [chunk(list(range(i, i + 3)), releases=releases) for i in range(0, 30, 3)]
    out = run(4, chunks)
    assert sorted(releases) == sorted(tuple(c.keys) for c in chunks)
    assert [k for b in out for k in rows(b)] == list(range(30))  # later copies did not overwrite


def test_chunks_without_good_images_complete_no_batch_and_are_released():
    releases: list = []
    out = run(4, [chunk([0], releases=releases), chunk([], {2: "worse"}, releases=releases), chunk([3, 4, 5])])
    assert keys_of(out) == [[0, 3, 4, 5]]
    assert sorted(releases) == [(), (0,)]
    assert run(4, [chunk([], {0: "bad"})]) == []
    assert run(4, []) == []


@pytest.mark.parametrize("size", [1, 2, 5, 16])
def test_any_chunking_gives_every_key_exactly_once(size):
    generator = torch.Generator().manual_seed(size)
    keys = list(range(40))
    chunks, start = [], 0
    while start < len(keys):
        n = int(torch.randint(1, 9, (1,), generator=generator))
        chunks.append(chunk(keys[start : start + n]))
        start += n
    out = run(size, chunks)
    assert all(len(k) <= size for k in keys_of(out))
    assert [k for ks in keys_of(out) for k in ks] == keys
    assert [k for b in out for k in rows(b)] == keys


def test_failures_of_every_chunk_are_collected_by_key():
    gather = batches(4, [chunk([0], {1: "bad"}), chunk([], {2: "worse"}), chunk([3])])
    assert keys_of(list(gather)) == [[0, 3]]
    assert gather.failures == {1: "bad", 2: "worse"}


def test_batches_are_yielded_as_soon_as_they_are_complete():
    """The consumer gets a full batch before the next chunk is pulled (the model runs while the
    workers decode): the iterable is lazy."""
    pulled = []

    def chunks():
        for keys in ([0, 1], [2, 3], [4]):
            pulled.append(keys)
            yield chunk(keys)

    iterator = iter(DeviceBatches(chunks(), size=4, device=torch.device("cpu"), normalize=lambda px: px.float()))
    keys, _ = next(iterator)
    assert keys == [0, 1, 2, 3] and pulled == [[0, 1], [2, 3]]
    assert [k for k, _ in iterator] == [[4]]


def test_the_stage_clock_counts_waiting_for_chunks_and_assembly():
    from handler.metrics import StageClock

    clock = StageClock(torch.device("cpu"))
    list(DeviceBatches([chunk([0, 1])], size=2, device=torch.device("cpu"), normalize=lambda px: px.float(),
                       clock=clock))
    assert clock.ms["DecodeTransformMs"] > 0 and clock.ms["HostToDeviceMs"] > 0
    assert clock.ms["InferenceMs"] == 0


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="size must be at least 1"):
        DeviceBatches([], size=0, device=torch.device("cpu"), normalize=lambda px: px)
