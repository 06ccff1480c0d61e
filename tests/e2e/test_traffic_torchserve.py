"""Production traffic on the TorchServe door, a real server over HTTP: top_k per request in every
form (mixed in one batch), bad values 400, a deadline that passed while the request queued in
TorchServe's frontend (504, never decoded), and what TorchServe's own stop does to requests in
flight. (A full job queue: tests/e2e/test_faults.py.)"""

import concurrent.futures as futures
import os
import subprocess
import threading
import time

import pytest
import requests

from harness.archives import with_settings
from harness.ts_server import ROOT, TORCHSERVE, start_server
from helpers import shape_image
from traffic_forms import bad_top_k_requests, check_bad_top_k, first, top_k_forms

pytestmark = pytest.mark.e2e

MODEL = "efficientnet_lite0"
PHOTOS = [(ROOT / "tests" / "data" / name).read_bytes() for name in ("cat.jpg", "coffee.jpg", "rocket.jpg")]


def route(server, name: str) -> str:
    paths = {"predictions": f"/predictions/{MODEL}", "v1": f"/v1/models/{MODEL}:predict",
             "v2": f"/v2/models/{MODEL}/infer"}
    return server.inference_url + paths[name]


def post(server, where: str, **kwargs) -> requests.Response:
    headers = {**server.auth(), **kwargs.pop("headers", {})}
    return requests.post(route(server, where), headers=headers, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def reference(server):
    """Each photo's ten best classes, asked one by one."""
    answers = []
    for photo in PHOTOS:
        response = post(server, "predictions", data=photo, headers={"X-Top-K": "10", "Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def same_top(got: dict, want: dict) -> None:
    assert list(got) == list(want), (got, want)
    assert got == pytest.approx(want, abs=1e-3)


def test_top_k_per_request_in_every_form_mixed_in_one_batch(server, reference):
    forms = [(form, k) for k, form_list in ((1, top_k_forms(PHOTOS, 1)), (3, top_k_forms(PHOTOS, 3)),
                                             (7, top_k_forms(PHOTOS, 7))) for form in form_list]
    barrier = threading.Barrier(len(forms))

    def send(item):
        form, _ = item
        barrier.wait(30)  # all at once: TorchServe batches them (batchSize 8) whatever their top_k
        return post(server, form.route, **form.kwargs)

    with futures.ThreadPoolExecutor(len(forms)) as pool:
        responses = list(pool.map(send, forms))
    for (form, k), response in zip(forms, responses):
        assert response.status_code == 200, (form.name, response.text)
        answers = form.answers(response.json())
        assert answers and all(len(a) == k for a in answers), (form.name, k, answers)
        for got, want in zip(answers, reference):
            same_top(got, first(want, k))
    # Without any top_k the model's own setting (5) still applies.
    plain = post(server, "predictions", data=PHOTOS[0], headers={"Content-Type": "image/jpeg"})
    assert len(plain.json()) == 5


def test_bad_top_k_values_are_400s_that_name_it(server):
    for what, where, kwargs in bad_top_k_requests(PHOTOS[0], classes=1000):
        check_bad_top_k(post(server, where, **kwargs), what)
    assert post(server, "predictions", data=PHOTOS[0], headers={"Content-Type": "image/jpeg"}).status_code == 200


def expired_count(server, model: str) -> float:
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ExpiredRequests{") and f'ModelName="{model}"' in line)


@pytest.fixture(scope="module")
def slow_server(model_store, tmp_path_factory):
    """The demo model behind a frontend whose batches wait 1.5 s to fill: a lone request waits
    that long in TorchServe's queue, a deterministic stand-in for a queue behind long batches."""
    store = tmp_path_factory.mktemp("slow_store")
    with_settings(model_store / "shapes.mar", {"compile": False}, store, frontend={"maxBatchDelay": 1500})
    instance = start_server(tmp_path_factory.mktemp("slow"), store, ["shapes.mar"])
    try:
        yield instance
    finally:
        instance.stop()


def test_a_deadline_that_passes_in_torchserves_queue_is_a_504_and_the_images_are_never_decoded(slow_server):
    before = expired_count(slow_server, "shapes")
    # Not an image at all: decoding it would be a 400, so a 504 shows it was never decoded. Its
    # deadline passes while TorchServe's frontend holds it, out of the handler's sight.
    deadline_ms = int((time.time() + 0.3) * 1000)
    late = slow_server.predict(data=b"not an image, never decoded",
                               headers={"X-Request-Deadline-Ms": str(deadline_ms)})
    assert late.status_code == 504, late.text
    assert late.json()["error"] == "deadline_exceeded"
    deadline = time.time() + 60
    while expired_count(slow_server, "shapes") < before + 1:  # TorchServe publishes it asynchronously
        assert time.time() < deadline, "ExpiredRequests did not count the 504"
        time.sleep(1)
    # A timeout counts from when the handler gets the request: TorchServe's 1.5 s queue is not in
    # it, so this one is decoded (a 400); the docs say to send a deadline to count the queue.
    relative = slow_server.predict(data=b"not an image", headers={"X-Request-Timeout-Ms": "300"})
    assert relative.status_code == 400, relative.text
    soon = int((time.time() + 30) * 1000)
    assert slow_server.predict(data=b"not an image", headers={"X-Request-Deadline-Ms": str(soon)}).status_code == 400


def test_torchserves_stop_resets_the_requests_in_flight_and_exits(model_store, tmp_path):
    """What `torchserve --stop` does with requests in flight, as the README says: a SIGTERM to the
    frontend, which closes every connection at once; each client gets its answer (200, right)
    or a connection error, never a hang or a wrong answer; the server is gone within seconds."""
    server = start_server(tmp_path, model_store, ["shapes.mar"])
    files = [(f"f{i}", shape_image(("circle", "square", "triangle")[i % 3], seed=i)) for i in range(64)]
    try:
        want = server.predict(files=files)
        assert want.status_code == 200
        outcomes: list[object] = []

        def client():
            for _ in range(50):
                try:
                    response = server.predict(files=files)
                    outcomes.append(response.json() == want.json() if response.status_code == 200
                                    else response.status_code)
                except requests.RequestException as exc:
                    outcomes.append(type(exc).__name__)
                    return

        threads = [threading.Thread(target=client) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        stopped_at = time.monotonic()
        env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PATH": f"{TORCHSERVE.parent}:{os.environ['PATH']}"}
        stop = subprocess.run([str(TORCHSERVE), "--stop"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)
        assert "stopped" in stop.stdout.lower(), stop.stdout + stop.stderr
        for thread in threads:
            thread.join(120)
        assert not any(t.is_alive() for t in threads), "a client hangs after the stop"
        server.process.wait(60)  # raises if the server outlives the stop by a minute
        gone_s = time.monotonic() - stopped_at
    finally:
        server.stop()
    print(f"torchserve --stop: clients saw {sorted({str(o) for o in outcomes})}; the server was gone "
          f"{gone_s:.1f} s after the stop")
    assert True in outcomes, outcomes  # it served before the stop
    assert False not in outcomes, "a wrong answer"
    assert set(outcomes) <= {True, "ConnectionError", "ChunkedEncodingError"}, outcomes
    assert outcomes.count("ConnectionError") + outcomes.count("ChunkedEncodingError") == 6  # every client cut off
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.inference_url}/ping", timeout=5)
