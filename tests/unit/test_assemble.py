import pytest
import torch

from handler.assemble import BatchAssembler
from handler.dataset import DecodedBatch


def chunk(keys: list[int], failures: dict | None = None, releases: list | None = None) -> DecodedBatch:
    """A decoded chunk whose pixel rows encode their keys (every pixel = key)."""
    pixels = torch.stack([torch.full((3, 4, 4), k, dtype=torch.uint8) for k in keys]) if keys else None
    batch = DecodedBatch(list(keys), None, dict(failures or {}))
    batch.attach(pixels, lambda event: releases.append(tuple(keys)) if releases is not None else None)
    return batch


def assembler(size: int) -> BatchAssembler:
    # "Normalization" that keeps the pixel values readable, on a fresh tensor as the real one.
    return BatchAssembler(size, torch.device("cpu"), lambda px: px.float().contiguous(), lambda: None)


def run(size: int, chunks: list[DecodedBatch]) -> list:
    gather = assembler(size)
    out = [batch for c in chunks for batch in gather.add(c)]
    return out + gather.finish()


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
