"""Clients users already have, against the TorchServe door: TorchServe's own gRPC API (stubs from
its inference.proto) and tritonclient's Open Inference Protocol over HTTP (binary and JSON)."""

import base64
import json

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from helpers import answers_alone as alone, assert_same_answers as same, shape_image
from ts_grpc import build_stubs
from harness.ts_server import ROOT

pytestmark = pytest.mark.e2e

LABELS = ("circle", "square", "triangle")
PHOTOS = [(ROOT / "tests" / "data" / name).read_bytes() for name in ("cat.jpg", "coffee.jpg", "camera.jpg", "rocket.jpg")]


@pytest.fixture(scope="module")
def grpc_client(server, tmp_path_factory):
    pb2, pb2_grpc = build_stubs(tmp_path_factory.mktemp("stubs"))
    channel = grpc.insecure_channel(server.grpc_target)
    metadata = (("authorization", server.auth()["Authorization"]),)
    yield pb2, pb2_grpc.InferenceAPIsServiceStub(channel), metadata
    channel.close()


@pytest.mark.parametrize("names", [
    pytest.param([f"img{i}" for i in range(12)], id="img0-img11"),
    pytest.param([str(i) for i in range(11)], id="0-10"),
])
def test_grpc_images_come_back_in_the_natural_order_of_their_names(server, grpc_client, names):
    pb2, stub, metadata = grpc_client
    images = [shape_image(LABELS[i % 3], 9100 + i, size_range=(0.35, 0.9)) for i in range(len(names))]
    # The client's map has no order on the wire: send it shuffled as well.
    order = np.random.default_rng(len(names)).permutation(len(names))
    request = pb2.PredictionsRequest(model_name="shapes", input={names[i]: images[i] for i in order})
    response = stub.Predictions(request, metadata=metadata, timeout=120)
    same(json.loads(response.prediction), alone(server, images))


def test_grpc_a_bad_image_is_answered_with_status_ok_and_an_error_body(server, grpc_client):
    pb2, stub, metadata = grpc_client
    good = shape_image("circle", 9200)
    request = pb2.PredictionsRequest(model_name="shapes", input={"img0": good, "img1": b"not an image"})
    body = json.loads(stub.Predictions(request, metadata=metadata, timeout=120).prediction)
    assert body["error"] == "invalid_image"
    assert body["images"] == [{"index": 1, "field": "img1", "reason": "not a recognised image format"}]
    one = stub.Predictions(pb2.PredictionsRequest(model_name="shapes", input={"data": good}), metadata=metadata)
    assert json.loads(one.prediction) == pytest.approx(alone(server, [good])[0], abs=1e-4)


@pytest.fixture(scope="module")
def triton(server):
    client = triton_http.InferenceServerClient(server.inference_url.removeprefix("http://"), network_timeout=120)
    yield client, server.auth()
    client.close()


def triton_infer(client, auth, images, *, binary: bool, binary_output: bool = False, model: str = "efficientnet_lite0",
                 json_content_type: bool = True):
    elements = images if binary else [base64.b64encode(i) for i in images]
    tensor = triton_http.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    outputs = [triton_http.InferRequestedOutput("predictions", binary_data=binary_output)]
    headers = dict(auth)
    if not binary and json_content_type:
        headers["Content-Type"] = "application/json"
    result = client.infer(model, [tensor], outputs=outputs, headers=headers)
    return [json.loads(x) for x in result.as_numpy("predictions")]


@pytest.mark.parametrize(("binary", "binary_output", "json_content_type"), [
    pytest.param(True, False, True, id="binary-in-json-out"),
    pytest.param(True, True, True, id="binary-in-binary-out"),
    pytest.param(False, False, True, id="json"),
    pytest.param(False, True, False, id="json-without-content-type-binary-out"),
])
def test_tritonclient_http_gets_the_same_answers_as_rest(server, triton, binary, binary_output, json_content_type):
    client, auth = triton
    want = alone(server, PHOTOS, "efficientnet_lite0")
    got = triton_infer(client, auth, PHOTOS, binary=binary, binary_output=binary_output,
                       json_content_type=json_content_type)
    same(got, want)
    # cat.jpg is a near-tie (fp32: tiger cat 0.372, Egyptian cat 0.370); bf16 may say either.
    assert next(iter(got[0])) in {"tiger cat", "Egyptian cat"} and next(iter(got[1])) == "espresso"


def test_tritonclient_http_a_bad_image_is_a_400_for_that_request_only(server, triton):
    client, auth = triton
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(client, auth, [PHOTOS[0], b"\xff\xd8 broken"], binary=True)
    assert caught.value.status() == "400" and "invalid_image" in caught.value.message()
    same(triton_infer(client, auth, PHOTOS[:1], binary=True), alone(server, PHOTOS[:1], "efficientnet_lite0"))
