"""Production traffic on the KServe door, a real process over HTTP and gRPC with the clients KServe
users have (requests, tritonclient): a flood past max_queued_images (200 and 503 + Retry-After
only, readiness false while shedding, the queue depth in /metrics), a deadline behind a long batch
(504 / DEADLINE_EXCEEDED, never decoded), top_k per request (mixed in one batch), and SIGTERM
under steady load (every admitted request answered, new ones refused, exit 0 within the drain)."""

import concurrent.futures as futures
import json
import re
import signal
import threading
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from harness.door_server import start_door
from helpers import demo_model_dir, shape_image
from traffic_forms import b64, check_bad_top_k, first, top_k_forms

pytestmark = pytest.mark.e2e

NAME = "shapes"
LABELS = ("circle", "square", "triangle")
BOUND = 320  # max_queued_images: five requests of 64 images


def images(n: int, seed: int, side: int = 96) -> list[bytes]:
    return [shape_image(LABELS[(seed + i) % 3], seed=seed + i, min_side=side, max_side=side + 32) for i in range(n)]


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    model = demo_model_dir(tmp_path_factory.mktemp("traffic") / NAME, compile=False, max_queued_images=BOUND,
                           max_images_per_request=64, drain_timeout_s=30.0)
    instance = start_door(model, NAME, tmp_path_factory.mktemp("door"), max_batch_delay_ms=20)
    try:
        yield instance
    finally:
        instance.stop()


def url(door, route: str) -> str:
    return door.http_url + {"v1": f"/v1/models/{NAME}:predict", "v2": f"/v2/models/{NAME}/infer"}[route]


def v2_body(batch: list[bytes], **parameters) -> dict:
    body = {"inputs": [{"name": "images", "shape": [len(batch)], "datatype": "BYTES", "data": [b64(d) for d in batch]}]}
    if parameters:
        body["parameters"] = parameters
    return body


def metric(door, name: str) -> float:
    text = requests.get(f"{door.http_url}/metrics", timeout=30).text
    found = re.findall(rf'^{name}{{model_name="{NAME}"}} ([0-9.e+]+)$', text, re.M)
    return float(found[0]) if found else 0.0


def test_a_flood_past_the_bound_gets_only_200_and_503_with_retry_after(door):
    batch = images(64, seed=1)
    ready_seen: list[int] = []
    stop = threading.Event()

    def watch_readiness():
        while not stop.is_set():
            ready_seen.append(requests.get(f"{door.http_url}/v2/models/{NAME}/ready", timeout=30).status_code)
            time.sleep(0.01)

    shed_before = metric(door, "image_classifier_shed_requests_total")
    watcher = threading.Thread(target=watch_readiness)
    watcher.start()
    barrier = threading.Barrier(48)

    def send(_):
        barrier.wait(30)
        return requests.post(url(door, "v2"), json=v2_body(batch), timeout=120)

    def send_grpc(_):
        client = triton_grpc.InferenceServerClient(door.grpc_target)
        tensor = triton_grpc.InferInput("images", [len(batch)], "BYTES")
        tensor.set_data_from_numpy(np.array(batch, dtype=np.object_))
        barrier.wait(30)
        try:
            client.infer(NAME, [tensor], client_timeout=120)
            return "OK"
        except InferenceServerException as exc:
            return f"{exc.status()} {exc.message()}"

    with futures.ThreadPoolExecutor(48) as pool:
        grpc_calls = [pool.submit(send_grpc, i) for i in range(8)]
        flood = list(pool.map(send, range(40)))  # a request that hangs fails here (timeout)
        grpc_outcomes = [call.result() for call in grpc_calls]
    stop.set()
    watcher.join(60)
    for outcome in grpc_outcomes:  # gRPC: served, or UNAVAILABLE with the door's error
        assert outcome == "OK" or ("UNAVAILABLE" in outcome and "overloaded" in outcome), outcome
    codes = [r.status_code for r in flood]
    assert set(codes) <= {200, 503} and 503 in codes, codes
    assert codes.count(200) + grpc_outcomes.count("OK") >= BOUND // 64, (codes, grpc_outcomes)  # what fits was served
    for refused in (r for r in flood if r.status_code == 503):
        assert refused.json()["error"] == "overloaded", refused.text
        assert int(refused.headers["Retry-After"]) >= 1
    assert 503 in ready_seen, "readiness stayed true while the door shed load"
    grpc_shed = sum(o != "OK" for o in grpc_outcomes)
    assert metric(door, "image_classifier_shed_requests_total") - shed_before == codes.count(503) + grpc_shed
    # Afterwards: ready again, the queue empty, and serving normally.
    deadline = time.monotonic() + 30
    while requests.get(f"{door.http_url}/v2/models/{NAME}/ready", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after the flood"
        time.sleep(0.1)
    assert metric(door, "image_classifier_queued_images") == 0
    assert requests.post(url(door, "v2"), json=v2_body(batch[:3]), timeout=60).status_code == 200


def long_requests(door, pool, count: int = 5):
    """Requests of 64 larger images each (five: the door's bound), which keep the door busy for a
    while; returns once the door holds two of them (its queue gauge), so that what is sent next
    waits behind at least one whole request and the rest of the running one."""
    batch = images(64, seed=7, side=800)
    sent = [pool.submit(requests.post, url(door, "v2"), json=v2_body(batch), timeout=120) for _ in range(count)]
    deadline = time.monotonic() + 60
    while metric(door, "image_classifier_queued_images") < 64 * 2:  # one runs, one waits
        assert time.monotonic() < deadline, "the long requests never queued"
        time.sleep(0.02)
    return sent


def test_a_deadline_behind_a_long_batch_is_a_504_and_never_decoded(door):
    expired_before = metric(door, "image_classifier_expired_requests_total")
    with futures.ThreadPoolExecutor(5) as pool:
        long = long_requests(door, pool)
        # Not an image: decoded, it would be a 400; a 504 shows it never was.
        started = time.monotonic()
        late = requests.post(url(door, "v2"), json={"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                                                                 "data": [b64(b"not an image")]}]},
                             headers={"X-Request-Timeout-Ms": "100"}, timeout=60)
        waited = time.monotonic() - started
        assert all(f.result().status_code == 200 for f in long)
    assert late.status_code == 504, late.text
    assert late.json()["error"] == "deadline_exceeded"
    assert waited < 5.0, waited  # answered at its deadline, not after the long batches
    assert metric(door, "image_classifier_expired_requests_total") == expired_before + 1
    # The same through the body (v2 parameters.timeout, microseconds).
    with futures.ThreadPoolExecutor(5) as pool:
        long = long_requests(door, pool)
        by_body = requests.post(url(door, "v2"), json=v2_body([b"not an image"], timeout=100_000), timeout=60)
        assert all(f.result().status_code == 200 for f in long)
    assert by_body.status_code == 504, by_body.text
    assert metric(door, "image_classifier_expired_requests_total") == expired_before + 2
    # A deadline not passed: the bad image is decoded, and is a 400.
    assert requests.post(url(door, "v2"), json=v2_body([b"not an image"]),
                         headers={"X-Request-Timeout-Ms": "30000"}, timeout=60).status_code == 400


@pytest.fixture(scope="module")
def slow_door(tmp_path_factory):
    """A door whose batches wait 1.5 s to fill: a lone request waits that long, an idle server's
    deterministic stand-in for a queue."""
    model = demo_model_dir(tmp_path_factory.mktemp("slow") / NAME, compile=False)
    instance = start_door(model, NAME, tmp_path_factory.mktemp("slow_door"), max_batch_delay_ms=1500)
    try:
        yield instance
    finally:
        instance.stop()


def test_the_grpc_deadline_is_the_requests_own_and_its_504_arrives_before_it(slow_door):
    client = triton_grpc.InferenceServerClient(slow_door.grpc_target)
    tensor = triton_grpc.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as late:
        client.infer(NAME, [tensor], client_timeout=1.0, timeout=5_000_000)  # tritonclient sends parameters.timeout
    waited = time.monotonic() - started
    # The door answers a quarter of the time early: the client reads the door's own error, and a
    # parameters.timeout beside the deadline is no conflict (the earliest applies).
    assert "DEADLINE_EXCEEDED" in str(late.value.status()), late.value
    assert "deadline_exceeded" in late.value.message(), late.value.message()
    assert 0.6 < waited < 1.0, waited
    # Without a deadline the same request waits for its batch, is decoded: INVALID_ARGUMENT.
    with pytest.raises(InferenceServerException) as decoded:
        client.infer(NAME, [tensor], client_timeout=30)
    assert "INVALID_ARGUMENT" in str(decoded.value.status()) and "invalid_image" in decoded.value.message()


def test_top_k_per_request_in_every_form_mixed_in_one_batch(door):
    photos = images(3, seed=20)
    full = requests.post(url(door, "v1"), json={"instances": [b64(p) for p in photos], "parameters": {"top_k": 3}},
                         timeout=60).json()["predictions"]
    forms = [(form, k) for k in (1, 2) for form in top_k_forms(photos, k, routes=("v1", "v2"))]
    # Headers on a v2 request too (tritonclient users set headers, not body fields).
    requests_ = [(form.route, form.kwargs, form.answers, k) for form, k in forms]
    requests_.append(("v2", {"json": v2_body(photos), "headers": {"X-Top-K": "1"}},
                      lambda doc: [json.loads(x) for x in doc["outputs"][0]["data"]], 1))
    barrier = threading.Barrier(len(requests_))

    def send(item):
        route, kwargs, _, _ = item
        barrier.wait(30)  # together: the door's batcher puts them in one batch, whatever their top_k
        return requests.post(url(door, route), timeout=60, **kwargs)

    batches_before = metric(door, "image_classifier_batch_requests_count")
    with futures.ThreadPoolExecutor(len(requests_)) as pool:
        responses = list(pool.map(send, requests_))
    for (route, _, answers, k), response in zip(requests_, responses):
        assert response.status_code == 200, response.text
        got = answers(response.json())
        assert [list(g) for g in got] == [list(first(w, k)) for w in full], (route, k, got)
    batches = metric(door, "image_classifier_batch_requests_count") - batches_before
    assert batches < len(requests_), "every request ran alone: nothing shows mixed top_k sharing a batch"
    # gRPC: request parameters.
    client = triton_grpc.InferenceServerClient(door.grpc_target)
    tensor = triton_grpc.InferInput("images", [len(photos)], "BYTES")
    tensor.set_data_from_numpy(np.array(photos, dtype=np.object_))
    result = client.infer(NAME, [tensor], parameters={"top_k": 2})
    assert [list(json.loads(x)) for x in result.as_numpy("predictions")] == [list(first(w, 2)) for w in full]


def test_bad_top_k_values_are_400s_that_name_it(door):
    image = images(1, seed=30)[0]
    cases = [("X-Top-K 0", "v2", {"json": v2_body([image]), "headers": {"X-Top-K": "0"}}),
             ("X-Top-K above the classes", "v2", {"json": v2_body([image]), "headers": {"X-Top-K": "4"}}),
             ("X-Top-K text", "v1", {"json": {"instances": [b64(image)]}, "headers": {"X-Top-K": "three"}}),
             ("v1 top_k a string", "v1", {"json": {"instances": [b64(image)], "parameters": {"top_k": "3"}}}),
             ("v2 top_k negative", "v2", {"json": v2_body([image], top_k=-1)})]
    for what, route, kwargs in cases:
        check_bad_top_k(requests.post(url(door, route), timeout=60, **kwargs), what)
    client = triton_grpc.InferenceServerClient(door.grpc_target)
    tensor = triton_grpc.InferInput("images", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(NAME, [tensor], parameters={"top_k": 9})
    assert "INVALID_ARGUMENT" in str(caught.value.status()) and "top_k" in caught.value.message()


def test_sigterm_under_steady_load_drains_and_exits_0(tmp_path):
    model = demo_model_dir(tmp_path / NAME, compile=False, max_images_per_request=64, drain_timeout_s=20.0)
    door = start_door(model, NAME, tmp_path, max_batch_delay_ms=20)
    batch = images(64, seed=40, side=320)
    outcomes: list[tuple[float, float, object]] = []  # (sent, answered, status or error)
    stop = threading.Event()

    def client():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = requests.post(url(door, "v2"), json=v2_body(batch), timeout=60)
                outcome = response.status_code if response.status_code != 503 else response.json()["error"]
            except requests.ConnectionError:
                outcome = "refused"
                time.sleep(0.05)
            outcomes.append((sent, time.monotonic(), outcome))

    try:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        signalled = time.monotonic()
        door.process.send_signal(signal.SIGTERM)
        door.process.wait(60)
        exited_s = time.monotonic() - signalled
        stop.set()
        for thread in threads:
            thread.join(90)
        assert not any(t.is_alive() for t in threads), "a client hangs"
    finally:
        door.stop()
    log = door.log.read_text(errors="replace")
    seen = {o for _, _, o in outcomes}
    in_flight = [o for sent, answered, o in outcomes if sent < signalled < answered]
    print(f"SIGTERM: exit {door.process.returncode} after {exited_s:.1f} s; in flight at the signal: {in_flight}; "
          f"outcomes: { {str(o): sum(x == o for _, _, x in outcomes) for o in seen} }")
    assert door.process.returncode == 0, log[-3000:]
    assert exited_s < 20.0 + 15.0, exited_s  # the drain timeout, and the servers' own stop
    # Admitted requests (sent well before the signal: a 64-image body takes a while to arrive
    # whole on a busy machine) all got their 200, those in flight included.
    assert [o for sent, _, o in outcomes if sent < signalled - 1.0] and \
        {o for sent, _, o in outcomes if sent < signalled - 1.0} == {200}, outcomes
    assert 200 in in_flight, in_flight
    # New ones were refused: 503 shutting_down while draining, then no listener.
    assert seen <= {200, "shutting_down", "refused"}, seen
    assert "shutting_down" in seen or "refused" in seen, seen
    assert "draining" in log and "drained (every admitted request answered)" in log, log[-3000:]
