"""handler.batcher: concurrent requests gathered into batches counted in images."""

import asyncio
import logging
import threading
import time

import pytest

from handler.batcher import RequestBatcher
from handler.classifier import BatchResult
from handler.errors import RequestError
from handler.decode.inputs import ImageInput

# Every wait in these tests is bounded: a request left without an answer fails the test.
TIMEOUT_S = 10.0


class FakeClassifier:
    """Answers each image with its own bytes; records the batches it was given.

    ``faults`` maps a batch number (1 for the first batch) to the fault it suffers: ``"raise"``
    (classify raises), ``"short"`` / ``"long"`` (one result too few / too many). With a
    ``gate``, the first batch waits for it to open before it is answered (``started`` is set
    once it has begun), so a test can act while that batch runs."""

    def __init__(self, fail_first: bool = False, *, faults: dict[int, str] | None = None,
                 gate: threading.Event | None = None) -> None:
        self.batches: list[list[list[bytes]]] = []
        self.top_k: list[list[int | None]] = []  # per batch, the top_k of each request
        self.faults = dict(faults or {})
        if fail_first:
            self.faults[1] = "raise"
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, requests, top_k) -> BatchResult:
        self.batches.append([[i.data for i in r] for r in requests])
        self.top_k.append(list(top_k))
        number = len(self.batches)
        if number == 1 and self.gate is not None:
            self.started.set()
            assert self.gate.wait(TIMEOUT_S), "the test never opened the gate"
        fault = self.faults.get(number)
        if fault == "raise":
            raise RuntimeError("model exploded")
        results = [RequestError("invalid_image", "bad") if any(i.data == b"bad" for i in r)
                   else [{i.data.decode(): 1.0} for i in r] for r in requests]
        if fault == "short":
            results = results[:-1]
        elif fault == "long":
            results = results + [[{"extra": 1.0}]]
        return BatchResult(results, {}, sum(len(r) for r in requests), 0)


def request(*names: str) -> list[ImageInput]:
    return [ImageInput(n.encode()) for n in names]


async def submit_all(batcher: RequestBatcher, requests):
    """Submit every request at once, as concurrent clients do; a request that gets no answer
    fails the test (asyncio.TimeoutError) instead of hanging it."""
    return await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True), TIMEOUT_S)


def run(scenario):
    """Runs a test's coroutine; a hang anywhere in it fails the test."""
    return asyncio.run(asyncio.wait_for(scenario, TIMEOUT_S * 2))


async def until_started(fake: FakeClassifier) -> None:
    """Waits until the fake's first batch is running (it then waits for the gate)."""
    while not fake.started.is_set():
        await asyncio.sleep(0.005)


def assert_internal_error(outcome, *words: str) -> None:
    assert isinstance(outcome, RequestError), outcome
    assert outcome.code == "internal_error" and outcome.status == 500, outcome
    for word in words:
        assert word in outcome.message, outcome.message
    assert outcome.as_json()["error"] == "internal_error"


def logged_tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "handler.batcher" and r.levelno >= logging.ERROR and r.exc_info]


def test_concurrent_requests_share_a_batch_counted_in_images_and_each_gets_its_own_answers():
    fake = FakeClassifier()
    batcher = RequestBatcher(fake, max_images=8, max_delay_s=0.5)
    requests = [request("z"), request("a", "b", "c"), request("d"), request("e", "f", "g", "h"), request("i", "j")]
    answers = run(submit_all(batcher, requests))
    assert answers == [[{n: 1.0} for n in names] for names in ("z", "abc", "d", "efgh", "ij")]
    # 1 + 3 + 1 = 5 images; the 4-image request would make 9, so it opens the next batch.
    assert [[len(r) for r in b] for b in fake.batches] == [[1, 3, 1], [4, 2]]
    batcher.close()


def test_a_request_bigger_than_a_batch_goes_alone_and_nothing_is_split():
    fake = FakeClassifier()
    batcher = RequestBatcher(fake, max_images=2, max_delay_s=5.0)
    answers = run(submit_all(batcher, [request("a", "b", "c", "d", "e"), request("f")]))
    assert answers == [[{n: 1.0} for n in "abcde"], [{"f": 1.0}]]
    assert fake.batches == [[[b"a", b"b", b"c", b"d", b"e"]], [[b"f"]]]
    batcher.close()


def test_a_bad_request_fails_alone_and_a_server_fault_answers_its_batch_500_and_serving_goes_on(caplog):
    fake = FakeClassifier(fail_first=True)
    batcher = RequestBatcher(fake, max_images=4, max_delay_s=0.2)

    async def scenario():
        doomed = await submit_all(batcher, [request("x"), request("y")])
        return doomed, await submit_all(batcher, [request("a"), request("bad"), request("c")])

    doomed, later = run(scenario())
    # The fault is an answer (a 500 naming the exception), not an exception raised to the door.
    for outcome in doomed:
        assert_internal_error(outcome, "RuntimeError", "model exploded")
    assert later[0] == [{"a": 1.0}] and later[2] == [{"c": 1.0}]
    assert isinstance(later[1], RequestError) and later[1].status == 400
    assert [[len(r) for r in b] for b in fake.batches] == [[1, 1], [1, 1, 1]]
    # Logged with its traceback.
    [record] = logged_tracebacks(caplog)
    assert record.exc_info is not None and "model exploded" in str(record.exc_info[1])
    batcher.close()


def test_a_failing_on_batch_callback_is_logged_and_the_results_are_still_delivered(caplog):
    fake = FakeClassifier()
    calls: list[int] = []

    def on_batch(result: BatchResult, requests: int) -> None:
        calls.append(requests)
        if len(calls) == 1:
            raise ValueError("metrics broke")

    batcher = RequestBatcher(fake, max_images=4, max_delay_s=0.2, on_batch=on_batch)

    async def scenario():
        first = await submit_all(batcher, [request("x"), request("y", "z")])
        return first, await submit_all(batcher, [request("a"), request("b")])

    first, later = run(scenario())
    assert first == [[{"x": 1.0}], [{"y": 1.0}, {"z": 1.0}]]
    assert later == [[{"a": 1.0}], [{"b": 1.0}]]
    assert calls == [2, 2]  # called for every batch, the failing one included
    [record] = logged_tracebacks(caplog)
    assert record.exc_info is not None and "metrics broke" in str(record.exc_info[1])
    batcher.close()


@pytest.mark.parametrize("fault", ["short", "long"])
def test_a_result_count_that_does_not_match_the_batch_answers_its_requests_500(fault, caplog):
    fake = FakeClassifier(faults={1: fault})
    calls: list[int] = []
    batcher = RequestBatcher(fake, max_images=4, max_delay_s=0.2, on_batch=lambda _r, n: calls.append(n))

    async def scenario():
        doomed = await submit_all(batcher, [request("x"), request("y"), request("z")])
        return doomed, await submit_all(batcher, [request("a"), request("b")])

    doomed, later = run(scenario())
    # None of the three gets another request's answer, nor none at all.
    for outcome in doomed:
        assert_internal_error(outcome, "RuntimeError", "the batch held 3")
    assert later == [[{"a": 1.0}], [{"b": 1.0}]]
    assert calls == [2]  # a failed batch is not reported as served
    assert len(logged_tracebacks(caplog)) == 1
    batcher.close()


def test_requests_queued_while_a_failing_batch_runs_are_all_answered():
    gate = threading.Event()
    fake = FakeClassifier(fail_first=True, gate=gate)
    batcher = RequestBatcher(fake, max_images=2, max_delay_s=0.05)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(request("x")))
        await until_started(fake)  # the first batch is running, and will fail
        queued = [asyncio.ensure_future(batcher.submit(request(n))) for n in "abcde"]
        await asyncio.sleep(0.1)  # they are all waiting in the queue
        assert not any(q.done() for q in queued)
        gate.set()
        return await submit_all_futures([first, *queued])

    first, *queued = run(scenario())
    assert_internal_error(first, "model exploded")
    assert queued == [[{n: 1.0}] for n in "abcde"]
    assert fake.batches == [[[b"x"]], [[b"a"], [b"b"]], [[b"c"], [b"d"]], [[b"e"]]]
    batcher.close()


async def submit_all_futures(futures):
    return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), TIMEOUT_S)


def test_a_stopped_batching_task_is_restarted_over_the_same_queue_and_orphans_nothing():
    gate = threading.Event()
    fake = FakeClassifier(gate=gate)
    batcher = RequestBatcher(fake, max_images=1, max_delay_s=0.05)

    async def scenario():
        running = asyncio.ensure_future(batcher.submit(request("x")))
        await until_started(fake)
        queued = [asyncio.ensure_future(batcher.submit(request(n))) for n in "ab"]
        await asyncio.sleep(0.05)
        worker = batcher._worker
        assert worker is not None
        worker.cancel()  # the batching task dies with requests held and queued
        stopped = await asyncio.wait_for(running, TIMEOUT_S)
        assert worker.done() and not any(q.done() for q in queued)
        gate.set()
        # The next request starts a new task over the same queue: the queued ones are served.
        later = await asyncio.wait_for(batcher.submit(request("c")), TIMEOUT_S)
        return stopped, await submit_all_futures(queued), later

    stopped, queued, later = run(scenario())
    assert_internal_error(stopped, "stopped")
    assert queued == [[{"a": 1.0}], [{"b": 1.0}]]
    assert later == [{"c": 1.0}]
    assert fake.batches == [[[b"x"]], [[b"a"]], [[b"b"]], [[b"c"]]]
    batcher.close()


def test_a_request_whose_client_has_gone_breaks_nothing():
    gate = threading.Event()
    fake = FakeClassifier(gate=gate)
    batcher = RequestBatcher(fake, max_images=1, max_delay_s=0.05)

    async def scenario():
        running = asyncio.ensure_future(batcher.submit(request("x")))
        await until_started(fake)
        gone = asyncio.ensure_future(batcher.submit(request("gone")))
        kept = asyncio.ensure_future(batcher.submit(request("kept")))
        await asyncio.sleep(0.05)
        running.cancel()  # its batch is running
        gone.cancel()  # still in the queue
        gate.set()
        answers = await submit_all_futures([running, gone, kept])
        return answers, await submit_all(batcher, [request("later")])

    (running, gone, kept), later = run(scenario())
    assert isinstance(running, asyncio.CancelledError) and isinstance(gone, asyncio.CancelledError)
    assert kept == [{"kept": 1.0}] and later == [[{"later": 1.0}]]
    assert fake.batches == [[[b"x"]], [[b"kept"]], [[b"later"]]]  # "gone" was never classified
    batcher.close()


def test_close_answers_every_waiting_request_and_later_ones():
    gate = threading.Event()
    fake = FakeClassifier(gate=gate)
    batcher = RequestBatcher(fake, max_images=1, max_delay_s=0.05)

    async def scenario():
        running = asyncio.ensure_future(batcher.submit(request("x")))
        await until_started(fake)
        queued = asyncio.ensure_future(batcher.submit(request("a")))
        await asyncio.sleep(0.05)
        batcher.close()
        answers = await submit_all_futures([running, queued])
        return answers, await submit_all(batcher, [request("late")])

    try:
        (running, queued), (late,) = run(scenario())
    finally:
        gate.set()
    for outcome in (running, queued, late):
        assert_internal_error(outcome)
    assert fake.batches == [[[b"x"]]]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_images"):
        RequestBatcher(FakeClassifier(), max_images=0, max_delay_s=0.01)
    with pytest.raises(ValueError, match="max_delay_s"):
        RequestBatcher(FakeClassifier(), max_images=1, max_delay_s=-1)


def test_a_request_queued_behind_a_running_batch_whose_deadline_passes_gets_504_and_is_not_run():
    gate = threading.Event()
    fake = FakeClassifier(gate=gate)
    batcher = RequestBatcher(fake, max_images=2, max_delay_s=0.05)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(request("a", "b")))  # a full batch
        await until_started(fake)
        # Queued while the first batch runs; its deadline passes before that batch ends.
        late = asyncio.ensure_future(batcher.submit(request("c", "d"), deadline=time.monotonic() + 0.05))
        later = asyncio.ensure_future(batcher.submit(request("e"), top_k=2))
        answered_late = await asyncio.wait_for(late, TIMEOUT_S)  # 504 while the first still runs
        gate.set()
        return await first, answered_late, await later

    first, late, later = run(scenario())
    assert isinstance(late, RequestError) and late.code == "deadline_exceeded" and late.status == 504
    assert first == [{"a": 1.0}, {"b": 1.0}] and later == [{"e": 1.0}]
    assert [b"c", b"d"] not in [r for batch in fake.batches for r in batch]  # never run
    assert fake.top_k[-1] == [2]


def test_a_request_cancelled_while_queued_is_never_run_and_leaves_the_queue_count():
    from handler.config import HandlerConfig
    from handler.serving import ServingLoop

    gate = threading.Event()
    fake = FakeClassifier(gate=gate)
    fake.config = HandlerConfig(arch="shapes_cnn", batch_size=1, max_images_per_request=1, max_queued_images=4)
    fake.classes = 3
    fake.classify_requests = fake
    loop = ServingLoop(fake, "m", max_batch_delay_s=0.01)  # type: ignore[arg-type]

    async def scenario():
        first = asyncio.ensure_future(loop.serve(b"a", {}))
        await until_started(fake)
        queued = asyncio.ensure_future(loop.serve(b"b", {}))
        while loop.queued_requests < 2:
            await asyncio.sleep(0.005)
        queued.cancel()  # its client left
        await asyncio.sleep(0.05)
        depth = (loop.queued_requests, loop.queued_images)
        gate.set()
        return depth, await first

    depth, first = run(scenario())
    assert depth == (1, 1) and first.status == 200
    assert fake.batches == [[[b"a"]]]  # b was never run
    assert (loop.queued_requests, loop.queued_images) == (0, 0)
