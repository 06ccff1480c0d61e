"""KServe's TorchServe runtime layout, started the way the runtime starts it, called on the KServe routes."""

import base64
import concurrent.futures as futures
import json

import pytest
import requests

from harness.ts_server import start_server
from helpers import load_command, shape_image

package = load_command("scripts/kserve_package.py").package

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kserve_server(model_store, tmp_path_factory):
    layout = package(tmp_path_factory.mktemp("kserve") / "models", [model_store / "shapes.mar"],
                     max_workers=1, batch_size=8, delay_ms=20)
    config = (layout / "config" / "config.properties").read_text()
    assert "model_snapshot=" in config and "disable_token_authorization=true" in config
    workdir = tmp_path_factory.mktemp("kserve_run")
    # As the runtime: torchserve --ts-config <layout>/config/config.properties --model-store <layout>/model-store,
    # models from model_snapshot (here on loopback, free ports).
    instance = start_server(workdir, layout / "model-store", ["shapes"],
                            base_config=layout / "config" / "config.properties", snapshot=True)
    try:
        yield instance
    finally:
        instance.stop()


def test_v1_and_v2_with_concurrent_multi_image_requests(kserve_server):
    base = kserve_server.inference_url
    groups = [[shape_image(["circle", "square", "triangle"][(i + j) % 3], 4000 + 10 * i + j) for j in range(2 + i % 3)]
              for i in range(8)]
    references = [[requests.post(f"{base}/predictions/shapes", data=img, timeout=60).json() for img in g]
                  for g in groups]

    def v1(images):
        payload = {"instances": [{"b64": base64.b64encode(d).decode()} for d in images]}
        return requests.post(f"{base}/v1/models/shapes:predict", json=payload, timeout=120)

    def v2(images):
        payload = {"inputs": [{"name": "images", "shape": [len(images)], "datatype": "BYTES",
                               "data": [base64.b64encode(d).decode() for d in images]}]}
        return requests.post(f"{base}/v2/models/shapes/infer", json=payload, timeout=120)

    with futures.ThreadPoolExecutor(16) as pool:
        v1_responses = list(pool.map(v1, groups))
        v2_responses = list(pool.map(v2, groups))
    for reference, r1, r2 in zip(references, v1_responses, v2_responses):
        assert r1.status_code == 200, r1.text
        assert r2.status_code == 200, r2.text
        v2_results = [json.loads(d) for d in r2.json()["outputs"][0]["data"]]
        for results in (r1.json()["predictions"], v2_results):
            assert len(results) == len(reference)
            for got, want in zip(results, reference):
                assert list(got) == list(want) and got == pytest.approx(want, abs=1e-3)
