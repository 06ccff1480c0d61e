"""Production traffic in the serving loop (handler.serving) and the request parameters
(handler.protocols.options): per-request top_k, deadlines, admission control, queue depth,
readiness and draining. The doors' end-to-end tests repeat these over the wire."""

import asyncio
import base64
import json
import threading
import time

import pytest

from handler.classifier import BatchResult, ImageClassifier
from handler.config import HandlerConfig
from handler.decode.inputs import ImageInput
from handler.errors import RequestError
from handler.protocols import parse_request
from handler.protocols.options import RequestOptions, from_headers, from_parameters
from handler.serving import ServingLoop
from handler.telemetry import EXPIRED, SHED
from helpers import shape_image
from harness.ts_server import ROOT

TIMEOUT_S = 10.0
IMAGE = shape_image("circle", seed=1)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- the parameters, from every wire format ---------------------------------------------


@pytest.mark.parametrize("payload, headers, want", [
    ({"images": [b64(IMAGE)], "top_k": 2, "timeout_ms": 250}, {}, RequestOptions(2, 0.25)),
    ({"instances": [{"b64": b64(IMAGE)}], "parameters": {"top_k": 1, "timeout": 500_000}}, {},
     RequestOptions(1, 0.5)),
    ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(IMAGE)]}],
      "parameters": {"top_k": 3}}, {}, RequestOptions(3)),
    (IMAGE, {"x-top-k": "2", "x-request-timeout-ms": "40"}, RequestOptions(2, 0.04)),
    (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n" + IMAGE + b"\r\n--b--\r\n",
     {"x-top-k": "1"}, RequestOptions(1)),
    (IMAGE, {"x-request-deadline-ms": "1700000000000"}, RequestOptions(deadline_unix_s=1_700_000_000.0)),
    ({"images": [b64(IMAGE)], "top_k": 2}, {"x-top-k": "2"}, RequestOptions(2)),  # the same value twice
])
def test_each_wire_format_carries_the_request_parameters(payload, headers, want):
    assert parse_request(payload, max_images=4, headers=headers).options == want


@pytest.mark.parametrize("payload, headers, named", [
    ({"images": [b64(IMAGE)], "top_k": 0}, {}, "top_k"),
    ({"images": [b64(IMAGE)], "top_k": "3"}, {}, "top_k"),
    ({"images": [b64(IMAGE)], "top_k": True}, {}, "top_k"),
    ({"images": [b64(IMAGE)], "top_k": 2.5}, {}, "top_k"),
    ({"images": [b64(IMAGE)], "timeout_ms": -1}, {}, "timeout_ms"),
    ({"instances": [b64(IMAGE)], "parameters": {"top_k": -2}}, {}, "parameters.top_k"),
    ({"instances": [b64(IMAGE)], "parameters": "top_k=3"}, {}, '"parameters"'),
    ({"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [b64(IMAGE)]}],
      "parameters": {"timeout": "soon"}}, {}, "parameters.timeout"),
    (IMAGE, {"x-top-k": "three"}, "X-Top-K"),
    (IMAGE, {"x-top-k": "1.5"}, "X-Top-K"),
    (IMAGE, {"x-request-timeout-ms": "0"}, "X-Request-Timeout-Ms"),
    (IMAGE, {"x-request-timeout-ms": "nan"}, "X-Request-Timeout-Ms"),
    (IMAGE, {"x-request-timeout-ms": "1_000"}, "X-Request-Timeout-Ms"),
    (IMAGE, {"x-top-k": "\u0663"}, "X-Top-K"),  # an Arabic-Indic 3: digits, but not ASCII
    (IMAGE, {"x-request-deadline-ms": "1765090000"}, "Unix time in milliseconds"),  # seconds
    ({"images": [b64(IMAGE)], "top_k": 2}, {"x-top-k": "3"}, "top_k is given twice"),
    ({"images": [b64(IMAGE)], "timeout_ms": 20}, {"x-request-timeout-ms": "30"}, "the timeout is given twice"),
])
def test_a_bad_parameter_is_a_400_that_names_it(payload, headers, named):
    with pytest.raises(RequestError) as caught:
        parse_request(payload, max_images=4, headers=headers)
    assert caught.value.status == 400 and caught.value.code == "invalid_parameter"
    assert named in caught.value.message


def test_a_transport_deadline_is_one_more_limit_never_a_conflict():
    # The KServe door turns a gRPC call's deadline into this header; the request may set its own.
    v2 = {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [b64(IMAGE)]}],
          "parameters": {"timeout": 1_000_000}}
    options = parse_request(v2, max_images=4, headers={"x-transport-timeout-ms": "450.5"}).options
    assert options == RequestOptions(timeout_s=1.0, transport_timeout_s=0.4505)
    assert options.deadline(100.0) == pytest.approx(100.4505)  # the earliest


def test_a_v2_timeout_of_zero_means_none_as_in_triton():
    assert from_parameters({"timeout": 0}) == RequestOptions()


class InferParameterLike:
    """Stands in for KServe's gRPC ``InferParameter`` message (a oneof ``parameter_choice``):
    importing KServe's generated proto here would clash in the test process with tritonclient's,
    which declares the same ``inference`` package. The real messages: tests/e2e/test_traffic_kserve.py."""

    def __init__(self, **field) -> None:
        ((self.name, self.value),) = field.items()
        setattr(self, self.name, self.value)

    def WhichOneof(self, group: str) -> str:  # noqa: N802 (protobuf's name)
        assert group == "parameter_choice"
        return self.name


def test_grpc_parameters_are_read_from_their_messages():
    options = from_parameters({"top_k": InferParameterLike(int64_param=4),
                               "timeout": InferParameterLike(int64_param=2000)})
    assert options == RequestOptions(4, 0.002)


def test_a_timeout_counts_from_receipt_and_the_earliest_limit_wins():
    received = time.monotonic() - 1.0
    assert RequestOptions(timeout_s=0.5).deadline(received) == pytest.approx(received + 0.5)
    assert RequestOptions().deadline(received, default_timeout_s=2.0) == pytest.approx(received + 2.0)
    assert RequestOptions().deadline(received) is None
    soon = RequestOptions(timeout_s=5.0, deadline_unix_s=time.time() + 0.1).deadline(received)
    assert soon == pytest.approx(time.monotonic() + 0.1, abs=0.05)
    assert from_headers({}) == RequestOptions()


# ---- the loop, over a classifier that can be held ---------------------------------------


class GatedClassifier:
    """Stands in for ImageClassifier: answers each image with its own top_k labels; records
    what it ran; a batch waits while ``gate`` is closed (``running`` set while it waits)."""

    def __init__(self, **settings) -> None:
        self.config = HandlerConfig(arch="shapes_cnn", batch_size=4, max_images_per_request=4, **settings)
        self.classes = 5
        self.ran: list[list[bytes]] = []  # per batch, every image's bytes
        self.top_k: list[list[int | None]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()

    def classify_requests(self, requests, top_k=None) -> BatchResult:
        self.ran.append([i.data for r in requests for i in r])
        self.top_k.append(list(top_k or []))
        self.running.set()
        assert self.gate.wait(TIMEOUT_S), "the test never opened the gate"
        self.running.clear()
        results = [[{f"class{c}": 1.0 / (c + 1) for c in range(k or self.config.top_k)} for _ in r]
                   for r, k in zip(requests, top_k or [None] * len(requests))]
        return BatchResult(results, {"InferenceMs": 10.0, "PostprocessMs": 0.0}, sum(map(len, requests)), 0)

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        pass


class Recorder:
    """An exporter that keeps what it was told."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.depths: list[tuple[int, int]] = []

    def batch(self, figures) -> None:
        pass

    def rejected(self, count: int) -> None:
        pass

    def refused(self, spec, count: int) -> None:
        self.counts[spec.name] = self.counts.get(spec.name, 0) + count

    def refused_count(self, spec) -> int:
        return self.counts.get(spec.name, 0)

    def queue(self, requests: int, images: int) -> None:
        self.depths.append((requests, images))


def raw(tag: bytes, **headers: str):
    return tag, {k.lower(): v for k, v in headers.items()}


def make_loop(**settings) -> tuple[ServingLoop, GatedClassifier, Recorder]:
    fake = GatedClassifier(**settings)
    recorder = Recorder()
    return ServingLoop(fake, "m", recorder, max_batch_delay_s=0.01), fake, recorder  # type: ignore[arg-type]


async def until(predicate) -> None:
    limit = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < limit, "timed out waiting"
        await asyncio.sleep(0.002)


def run(scenario):
    return asyncio.run(asyncio.wait_for(scenario, TIMEOUT_S * 2))


async def running_batch(loop: ServingLoop, fake: GatedClassifier, tag: bytes, **headers: str) -> asyncio.Future:
    """A request whose batch runs and is held there (the gate closed) until the test opens it."""
    fake.gate.clear()
    held = asyncio.ensure_future(loop.serve(*raw(tag, **headers)))
    await until(fake.running.is_set)
    return held


def test_requests_with_different_top_k_share_one_batch_and_each_gets_its_own():
    loop, fake, _ = make_loop()

    async def scenario():
        return await asyncio.gather(loop.serve(*raw(b"a", **{"X-Top-K": "1"})), loop.serve(*raw(b"b")),
                                    loop.serve(*raw(b"c", **{"X-Top-K": "3"})))

    answers = run(scenario())
    assert [a.status for a in answers] == [200, 200, 200]
    assert [len(a.reply.document) for a in answers] == [1, fake.config.top_k, 3]
    assert fake.ran == [[b"a", b"b", b"c"]] and fake.top_k == [[1, None, 3]]


def test_a_top_k_above_the_models_classes_is_a_400():
    loop, fake, _ = make_loop()
    answer = run(loop.serve(*raw(b"a", **{"X-Top-K": "6"})))
    assert answer.status == 400 and answer.reply.document["error"] == "invalid_parameter"
    assert "1 to 5" in answer.reply.document["message"] and fake.ran == []


def test_a_flood_past_the_bound_gets_503_with_retry_after_and_readiness_follows():
    loop, fake, recorder = make_loop(max_queued_images=8)  # two full batches

    async def scenario():
        first = await running_batch(loop, fake, b"first")
        flood = [asyncio.ensure_future(loop.serve(b"x", {})) for _ in range(20)]
        await until(lambda: sum(f.done() for f in flood) >= 13)  # 7 fit beside the first, the others at once
        refused = [f.result() for f in flood if f.done()]
        depth_at_peak = (loop.queued_requests, loop.queued_images)
        ready_while_shedding = loop.ready
        fake.gate.set()
        rest = await asyncio.gather(first, *flood)
        return refused, depth_at_peak, ready_while_shedding, rest

    refused, depth, ready_while_shedding, answers = run(scenario())
    assert len(refused) == 13 and {a.status for a in refused} == {503}
    for answer in refused:
        assert answer.reply.document["error"] == "overloaded"
        assert dict(answer.reply.headers)["Retry-After"].isdigit()
    assert depth == (8, 8) and not ready_while_shedding
    assert sorted(a.status for a in answers) == [200] * 8 + [503] * 13
    assert recorder.refused_count(SHED) == 13
    assert loop.ready and (loop.queued_requests, loop.queued_images) == (0, 0) and recorder.depths[-1] == (0, 0)
    assert run(loop.serve(b"after", {})).status == 200  # serves normally afterwards


def test_retry_after_follows_the_measured_throughput():
    loop, fake, _ = make_loop(max_queued_images=8)
    assert loop.retry_after_s() == 1  # nothing measured yet
    slow = fake.classify_requests

    def one_image_in_half_a_second(requests, top_k):
        time.sleep(0.5)
        return slow(requests, top_k)

    fake.classify_requests = one_image_in_half_a_second
    loop._classify_timed([[ImageInput(b"x")]], [None])  # 2 images/s (a little less), by the wall clock
    loop.queued_images = 7
    assert loop.retry_after_s() == 4  # ceil(7 images / ~2 per s)
    loop.queued_images = 4000
    assert loop.retry_after_s() == 60  # capped


def test_a_request_whose_deadline_passes_behind_a_long_batch_gets_504_and_is_never_run():
    loop, fake, recorder = make_loop()

    async def scenario():
        long = await running_batch(loop, fake, b"long")
        started = time.monotonic()
        late = await loop.serve(*raw(b"late", **{"X-Request-Timeout-Ms": "50"}))
        waited = time.monotonic() - started
        fake.gate.set()
        return late, waited, await long

    late, waited, long = run(scenario())
    assert late.status == 504 and late.reply.document["error"] == "deadline_exceeded"
    assert waited < 2.0  # answered when the deadline passed, not when the long batch ended
    assert long.status == 200 and b"late" not in [d for batch in fake.ran for d in batch]
    assert recorder.refused_count(EXPIRED) == 1


def test_the_models_default_timeout_applies_to_requests_without_their_own():
    loop, fake, _ = make_loop(request_timeout_ms=30.0)

    async def scenario():
        long = await running_batch(loop, fake, b"long", **{"X-Request-Timeout-Ms": "5000"})
        behind = [loop.serve(*raw(b"default")), loop.serve(*raw(b"own", **{"X-Request-Timeout-Ms": "5000"}))]
        waiting = asyncio.gather(*behind)
        await asyncio.sleep(0.2)
        fake.gate.set()
        return await waiting, await long

    (default, own), long = run(scenario())
    assert default.status == 504 and own.status == 200 and long.status == 200


def test_serve_batch_drops_an_expired_request_before_the_model():
    loop, fake, _ = make_loop()
    loop.batcher = None  # a server that batches itself (TorchServe) calls serve_batch
    past = str(int((time.time() - 1) * 1000))
    answers = loop.serve_batch([raw(b"ok"), raw(b"stale", **{"X-Request-Deadline-Ms": past}),
                                raw(b"k2", **{"X-Top-K": "2"})])
    assert [a.status for a in answers] == [200, 504, 200]
    assert fake.ran == [[b"ok", b"k2"]] and fake.top_k == [[None, 2]]
    assert len(answers[2].reply.document) == 2


def test_draining_refuses_new_requests_and_waits_for_the_admitted():
    loop, fake, recorder = make_loop()

    async def scenario():
        admitted = await running_batch(loop, fake, b"admitted")
        loop.start_draining()
        refused = await loop.serve(*raw(b"new"))
        too_soon = await loop.drained(timeout_s=0.05)
        threading.Timer(0.1, fake.gate.set).start()
        finished = await loop.drained(timeout_s=TIMEOUT_S)
        return refused, too_soon, finished, await admitted

    refused, too_soon, finished, admitted = run(scenario())
    assert refused.status == 503 and refused.reply.document["error"] == "shutting_down"
    assert "Retry-After" in dict(refused.reply.headers)
    assert not too_soon and finished and admitted.status == 200
    assert not loop.ready


def test_the_bound_must_admit_the_largest_request():
    with pytest.raises(ValueError, match="max_queued_images"):
        HandlerConfig(max_images_per_request=64, max_queued_images=32)


# ---- the real classifier: per-request top_k in one batch ---------------------------------


def test_the_classifier_answers_each_request_with_its_own_top_k():
    demo = ROOT / "models" / "shapes"
    images = [shape_image(s, seed=i) for i, s in enumerate(["circle", "square", "triangle"])]
    with ImageClassifier.load(demo, device="cpu", overrides={"num_workers": 0, "top_k": 2}) as clf:
        full = clf.classify_requests([images], [3]).results[0]
        mixed = clf.classify_requests([images, images, images], [1, None, 3]).results
    assert [len(p) for p in mixed[0]] == [1] * 3 and [len(p) for p in mixed[1]] == [2] * 3
    for k, answer in zip((1, 2, 3), mixed):
        for got, want in zip(answer, full):
            assert json.dumps(got) == json.dumps(dict(list(want.items())[:k]))
