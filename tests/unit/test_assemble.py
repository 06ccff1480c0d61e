import pytest
import torch

from handler.assemble import BatchAssembler
from handler.dataset import DecodedBatch


def chunk(keys: list[int], failures: dict | None = None, releases: list | None = None) -> DecodedBatch:
    """A decoded chunk whose pixel rows encode their keys (every pixel = key)."""
    pixels = torch.stack([torch.full((3, 4, 4), k, dtype=torch.uint8) for k in keys]) if keys else None
    batch = DecodedBatch(list(keys), pixels, dict(failures or {}))
    if releases is not None:
        batch._release = lambda event: releases.append(tuple(keys))
    return batch


def assembler(size: int) -> BatchAssembler:
    # "Normalization" that keeps the pixel values readable, on a fresh tensor as the real one.
    return BatchAssembler(size, torch.device("cpu"), lambda px: px.float().contiguous(), lambda: None)


def run(size: int, chunks: list[DecodedBatch]) -> list:
    gather = assembler(size)
    out = [batch for c in chunks for batch in gather.add(c)]
    return out + gather.finish()


def rows(batch) -> list[int]:
    return [int(x[0, 0, 0]) for x in batch.inputs]


def test_small_chunks_are_gathered_into_full_batches_in_order():
    out = run(8, [chunk([0, 1, 2]), chunk([3, 4, 5]), chunk([6, 7, 8]), chunk([9, 10])])
    assert [b.keys for b in out] == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]
    assert [rows(b) for b in out] == [b.keys for b in out]  # each key's own pixels


def test_a_chunk_is_split_across_batches_and_no_batch_exceeds_the_size():
    out = run(4, [chunk([0, 1, 2]), chunk([3, 4, 5, 6, 7, 8, 9]), chunk([10])])
    assert [b.keys for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [rows(b) for b in out] == [b.keys for b in out]


def test_a_full_chunk_with_nothing_waiting_passes_without_a_copy():
    seen = []
    gather = BatchAssembler(4, torch.device("cpu"), lambda px: seen.append(px) or px.float(), lambda: None)
    full = chunk([0, 1, 2, 3])
    gather.add(full)
    assert seen[0].data_ptr() == full.pixels.data_ptr()


def test_every_chunk_is_released_once_and_buffer_reuse_keeps_earlier_batches():
    releases: list = []
    chunks = [chunk(list(range(i, i + 3)), releases=releases) for i in range(0, 30, 3)]
    out = run(4, chunks)
    assert sorted(releases) == sorted(tuple(c.keys) for c in chunks)
    assert [k for b in out for k in rows(b)] == list(range(30))  # later copies did not overwrite


def test_failures_travel_with_the_next_batch_and_are_never_lost():
    out = run(4, [chunk([0], {1: (400, "bad")}), chunk([], {2: (400, "worse")}), chunk([3, 4, 5])])
    assert [b.keys for b in out] == [[0, 3, 4, 5]]
    assert out[0].failures == {1: (400, "bad"), 2: (400, "worse")}
    only_bad = run(4, [chunk([], {0: (400, "bad")})])
    assert len(only_bad) == 1 and only_bad[0].inputs is None and only_bad[0].failures == {0: (400, "bad")}
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
    assert all(len(b.keys) <= size for b in out)
    assert [k for b in out for k in b.keys] == keys
    assert [k for b in out for k in rows(b)] == keys
