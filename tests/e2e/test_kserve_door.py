"""The KServe door (python -m handler.doors.kserve_door) as a real process on free ports, probed with
the clients KServe users have: tritonclient over HTTP (binary and JSON) and gRPC, curl-style v1."""

import base64
import concurrent.futures as futures
import json
import re
import shutil
import threading

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from harness.door_server import start_door
from helpers import answers_alone, assert_same_answers as same, shape_image
from harness.ts_server import ROOT

pytestmark = pytest.mark.e2e

MODEL = "efficientnet_lite0"
PHOTOS = [(ROOT / "tests" / "data" / name).read_bytes() for name in ("cat.jpg", "coffee.jpg", "camera.jpg", "rocket.jpg")]


@pytest.fixture(scope="module")
def door(model_store, tmp_path_factory):
    # As KServe's storage initializer mounts it: a directory holding the archive.
    mount = tmp_path_factory.mktemp("mnt_models")
    shutil.copy(model_store / f"{MODEL}.mar", mount / f"{MODEL}.mar")
    instance = start_door(mount, MODEL, tmp_path_factory.mktemp("door"), max_batch_delay_ms=50)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def reference(server):
    """What the TorchServe door answers for each photo alone: the same bytes must score the same."""
    return answers_alone(server, PHOTOS, MODEL)


def infer_http(client, images, *, binary: bool, binary_output: bool = False):
    elements = images if binary else [base64.b64encode(i) for i in images]
    tensor = triton_http.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    headers = None if binary else {"Content-Type": "application/json"}
    outputs = [triton_http.InferRequestedOutput("predictions", binary_data=binary_output)]
    result = client.infer(MODEL, [tensor], outputs=outputs, headers=headers)
    return [json.loads(x) for x in result.as_numpy("predictions")]


def infer_grpc(client, images):
    tensor = triton_grpc.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return [json.loads(x) for x in client.infer(MODEL, [tensor]).as_numpy("predictions")]


def test_health_readiness_and_metadata_over_http_and_grpc(door):
    http = triton_http.InferenceServerClient(door.http_url.removeprefix("http://"))
    grpc = triton_grpc.InferenceServerClient(door.grpc_target)
    for client in (http, grpc):
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    metadata = http.get_model_metadata(MODEL)
    assert metadata["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "predictions", "datatype": "BYTES", "shape": [-1]}]
    assert grpc.get_model_metadata(MODEL, as_json=True)["outputs"][0]["name"] == "predictions"
    # The handler's own start-up line reaches the door's log (KServe configures only its loggers).
    log = door.log.read_text()
    assert "runtime openvino (handler.runtime is auto and OpenVINO is installed)" in log
    # The archive carries its gate record and OpenVINO int8 model: precision auto serves the
    # fastest precision the record passed that this CPU runs fast.
    from handler.model.precision import bf16_is_fast, cpu_int8_feature

    want = "int8" if cpu_int8_feature() else "bf16" if bf16_is_fast() else "fp32"
    assert f"precision {want} (handler.precision is auto" in log


@pytest.mark.parametrize(("binary", "binary_output"), [(True, False), (True, True), (False, False)],
                         ids=["http-binary", "http-binary-out", "http-json"])
def test_tritonclient_http_gets_the_torchserve_door_s_scores(door, reference, binary, binary_output):
    client = triton_http.InferenceServerClient(door.http_url.removeprefix("http://"), network_timeout=120)
    got = infer_http(client, PHOTOS, binary=binary, binary_output=binary_output)
    same(got, reference)
    # cat.jpg is a near-tie (fp32: tiger cat 0.372, Egyptian cat 0.370); bf16 may say either.
    assert next(iter(got[0])) in {"tiger cat", "Egyptian cat"} and next(iter(got[1])) == "espresso"


def test_tritonclient_grpc_and_v1_get_the_torchserve_door_s_scores(door, reference):
    same(infer_grpc(triton_grpc.InferenceServerClient(door.grpc_target), PHOTOS), reference)
    v1 = requests.post(f"{door.http_url}/v1/models/{MODEL}:predict", timeout=120,
                       json={"instances": [{"b64": base64.b64encode(p).decode()} for p in PHOTOS]})
    assert v1.status_code == 200, v1.text
    same(v1.json()["predictions"], reference)
    raw = requests.post(f"{door.http_url}/v1/models/{MODEL}:predict", data=PHOTOS[1],
                        headers={"Content-Type": "image/jpeg"}, timeout=120)
    assert raw.status_code == 200 and raw.json() == pytest.approx(reference[1], abs=1e-4), raw.text


def test_eight_concurrent_clients_are_batched_and_each_gets_its_own_results_in_order(door):
    shapes = [shape_image(("circle", "square", "triangle")[i % 3], 9500 + i, fmt="JPEG") for i in range(12)]
    pool = PHOTOS + shapes
    requests_ = [[pool[(c * 5 + j) % len(pool)] for j in range(1 + c % 4)] for c in range(8)]
    client = triton_http.InferenceServerClient(door.http_url.removeprefix("http://"), concurrency=8,
                                               network_timeout=120)
    want = [[infer_http(client, [image], binary=True)[0] for image in r] for r in requests_]
    before = batch_stats(door)
    start = threading.Barrier(8)

    def one_client(c: int):
        start.wait()
        if c % 2:  # half the clients over gRPC
            return infer_grpc(triton_grpc.InferenceServerClient(door.grpc_target), requests_[c])
        return infer_http(triton_http.InferenceServerClient(door.http_url.removeprefix("http://")), requests_[c],
                          binary=True)

    with futures.ThreadPoolExecutor(8) as threads:
        answers = list(threads.map(one_client, range(8)))
    for got, expected in zip(answers, want):
        same(got, expected)
    after = batch_stats(door)
    batches, requests_seen = after[0] - before[0], after[1] - before[1]
    assert requests_seen == 8 and batches < 8, (batches, requests_seen)  # some requests shared a batch


def batch_stats(door) -> tuple[float, float]:
    """(batches, requests) so far, from the door's Prometheus metrics."""
    text = requests.get(f"{door.http_url}/metrics", timeout=30).text
    count = re.search(rf'^image_classifier_batch_requests_count{{model_name="{MODEL}"}} (\S+)$', text, re.M)
    total = re.search(rf'^image_classifier_batch_requests_sum{{model_name="{MODEL}"}} (\S+)$', text, re.M)
    assert count and total, text[-2000:]
    return float(count.group(1)), float(total.group(1))


def test_a_bad_image_fails_only_its_own_request(door, reference):
    def http():  # a client per thread: tritonclient's HTTP client is not thread-safe
        return triton_http.InferenceServerClient(door.http_url.removeprefix("http://"), network_timeout=120)

    with futures.ThreadPoolExecutor(3) as threads:
        bad = threads.submit(infer_http, http(), [PHOTOS[0], b"\xff\xd8 not a jpeg"], binary=True)
        good = threads.submit(infer_http, http(), PHOTOS[:2], binary=True)
        on_grpc = threads.submit(infer_grpc, triton_grpc.InferenceServerClient(door.grpc_target), [b"junk"])
        same(good.result(), reference[:2])
        with pytest.raises(InferenceServerException) as caught:
            bad.result()
        assert caught.value.status() == "400" and "invalid_image" in caught.value.message()
        with pytest.raises(InferenceServerException) as caught_grpc:
            on_grpc.result()
        assert "INVALID_ARGUMENT" in str(caught_grpc.value.status()) and "invalid_image" in caught_grpc.value.message()
    body = requests.post(f"{door.http_url}/v1/models/{MODEL}:predict", json={"instances": [{"b64": "AAAA"}]},
                         timeout=60)
    assert body.status_code == 400 and body.json()["error"] == "invalid_image", body.text
    assert body.json()["images"] == [{"index": 0, "field": "instances", "reason": "not a recognised image format"}]
    too_many = requests.post(f"{door.http_url}/v1/models/{MODEL}:predict", timeout=60,
                             json={"instances": [base64.b64encode(PHOTOS[0]).decode()] * 65})
    assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_images", too_many.text
    metrics = requests.get(f"{door.http_url}/metrics", timeout=30).text
    for name in ("image_classifier_stage_ms", "image_classifier_bad_images_total", "request_predict_seconds"):
        assert name in metrics


def test_readiness_replaces_a_dead_loader_worker(door, reference):
    """The readiness probe (HTTP and gRPC) asks the model's health, which replaces a dead loader
    worker: the model stays ready and serves the same answers with a new worker."""
    import os
    import signal
    import time

    import psutil

    parent = psutil.Process(door.process.pid)

    def loader_workers():
        # Forked: they run the door's own command line (inductor's compile workers and
        # multiprocessing's resource tracker run others).
        return {child.pid for child in parent.children() if child.cmdline() == parent.cmdline()}

    before = loader_workers()
    assert before
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.5)
    http = triton_http.InferenceServerClient(door.http_url.removeprefix("http://"))
    grpc = triton_grpc.InferenceServerClient(door.grpc_target)
    assert http.is_model_ready(MODEL) and grpc.is_model_ready(MODEL)
    after = loader_workers()
    assert victim not in after and len(after) == len(before), (before, after)
    same(infer_http(http, PHOTOS, binary=True), reference)
