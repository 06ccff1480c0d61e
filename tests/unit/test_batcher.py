"""handler.batcher: concurrent requests gathered into batches counted in images."""

import asyncio

import pytest

from handler.batcher import ImageBatcher
from handler.classifier import BatchResult
from handler.errors import RequestError
from handler.inputs import ImageInput


class FakeClassifier:
    """Answers each image with its own bytes; records the batches it was given."""

    def __init__(self, fail_first: bool = False) -> None:
        self.batches: list[list[list[bytes]]] = []
        self.fail_first = fail_first

    def __call__(self, requests) -> BatchResult:
        self.batches.append([[i.data for i in r] for r in requests])
        if self.fail_first and len(self.batches) == 1:
            raise RuntimeError("model exploded")
        results = [RequestError("invalid_image", "bad") if any(i.data == b"bad" for i in r)
                   else [{i.data.decode(): 1.0} for i in r] for r in requests]
        return BatchResult(results, {}, sum(len(r) for r in requests), 0)


def request(*names: str) -> list[ImageInput]:
    return [ImageInput(n.encode()) for n in names]


async def submit_all(batcher: ImageBatcher, requests):
    """Submit every request at once, as concurrent clients do."""
    return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)


def test_concurrent_requests_share_a_batch_counted_in_images_and_each_gets_its_own_answers():
    fake = FakeClassifier()
    batcher = ImageBatcher(fake, max_images=8, max_delay_s=0.5)
    requests = [request("z"), request("a", "b", "c"), request("d"), request("e", "f", "g", "h"), request("i", "j")]
    answers = asyncio.run(submit_all(batcher, requests))
    assert answers == [[{n: 1.0} for n in names] for names in ("z", "abc", "d", "efgh", "ij")]
    # 1 + 3 + 1 = 5 images; the 4-image request would make 9, so it opens the next batch.
    assert [[len(r) for r in b] for b in fake.batches] == [[1, 3, 1], [4, 2]]
    batcher.close()


def test_a_request_bigger_than_a_batch_goes_alone_and_nothing_is_split():
    fake = FakeClassifier()
    batcher = ImageBatcher(fake, max_images=2, max_delay_s=5.0)
    answers = asyncio.run(submit_all(batcher, [request("a", "b", "c", "d", "e"), request("f")]))
    assert answers == [[{n: 1.0} for n in "abcde"], [{"f": 1.0}]]
    assert fake.batches == [[[b"a", b"b", b"c", b"d", b"e"]], [[b"f"]]]
    batcher.close()


def test_a_bad_request_fails_alone_and_a_server_fault_fails_only_its_batch():
    fake = FakeClassifier(fail_first=True)
    batcher = ImageBatcher(fake, max_images=4, max_delay_s=0.2)

    async def scenario():
        doomed = await submit_all(batcher, [request("x"), request("y")])
        return doomed, await submit_all(batcher, [request("a"), request("bad"), request("c")])

    doomed, later = asyncio.run(scenario())
    assert all(isinstance(d, RuntimeError) and "exploded" in str(d) for d in doomed)
    assert later[0] == [{"a": 1.0}] and later[2] == [{"c": 1.0}]
    assert isinstance(later[1], RequestError) and later[1].status == 400
    assert [[len(r) for r in b] for b in fake.batches] == [[1, 1], [1, 1, 1]]
    batcher.close()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_images"):
        ImageBatcher(FakeClassifier(), max_images=0, max_delay_s=0.01)
    with pytest.raises(ValueError, match="max_delay_s"):
        ImageBatcher(FakeClassifier(), max_images=1, max_delay_s=-1)
