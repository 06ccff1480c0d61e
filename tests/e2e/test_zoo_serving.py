"""timm and transformers model folders served through every door: archives built with
``build_mar.py --from`` in a real TorchServe, ``classify.py --model DIR``, the KServe door and a Ray
Serve application given the folder itself; each answer compared with the zoo's own pipeline in fp32.

The archives pin ``precision: fp32`` (the zoo reference is fp32) and eager models (compiling six
models would only lengthen the suite; compile and bf16 on zoo models are tested in the unit tests).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import tritonclient.http as triton_http
import yaml

from harness.door_server import start_door
from harness.ts_server import ROOT, start_server
from harness.zoo_folders import LABELS, PARITY_CASES, assert_answers_match, photos

pytestmark = pytest.mark.e2e

PHOTOS = photos()
IMAGES = [data for _, data in PHOTOS]
# What the tests' archives and folders serve with (TorchServe keys and handler settings).
SERVE_CONFIG = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 20, "responseTimeout": 120,
                "startupTimeout": 600,
                "handler": {"precision": "fp32", "compile": False, "num_workers": 1, "batch_size": 16}}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The parity cases' folders, each with the zoo's own fp32 probabilities for every photo."""
    root = tmp_path_factory.mktemp("zoo_folders")
    out = {}
    for case in PARITY_CASES:
        folder = case.build(root / case.name)
        out[case.name] = (folder, case.reference(folder, IMAGES))
    return out


@pytest.fixture(scope="module")
def zoo_store(zoo, tmp_path_factory):
    store = tmp_path_factory.mktemp("zoo_store")
    config = tmp_path_factory.mktemp("zoo_config") / "serve.yaml"
    config.write_text(yaml.safe_dump(SERVE_CONFIG))
    for name, (folder, _) in zoo.items():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--from", str(folder),
                        "--export-path", str(store), "--config", str(config)], check=True)
        assert (store / f"{name}.mar").is_file()  # named after the folder
    return store


@pytest.fixture(scope="module")
def zoo_server(zoo_store, tmp_path_factory):
    instance = start_server(tmp_path_factory.mktemp("zoo_torchserve"), zoo_store,
                            [f"{case.name}.mar" for case in PARITY_CASES])
    try:
        yield instance
    finally:
        instance.stop()


@pytest.mark.parametrize("case", PARITY_CASES, ids=[case.name for case in PARITY_CASES])
def test_torchserve_answers_equal_the_zoos_own_pipeline(zoo_server, zoo, case):
    _, want = zoo[case.name]
    files = [(f"img{i}", (name, data, "application/octet-stream")) for i, (name, data) in enumerate(PHOTOS)]
    response = zoo_server.predict(case.name, files=files)
    assert response.status_code == 200, response.text
    assert_answers_match(response.json(), want, LABELS)
    # One image alone, as a raw body: the same answer.
    alone = zoo_server.predict(case.name, data=IMAGES[0], headers={"Content-Type": "application/octet-stream"})
    assert alone.status_code == 200, alone.text
    assert_answers_match([alone.json()], want[:1], LABELS)


def test_a_bad_image_fails_only_its_own_request(zoo_server, zoo):
    import concurrent.futures as futures

    name = PARITY_CASES[0].name
    _, want = zoo[name]

    def send_good(i):
        return zoo_server.predict(name, files=[("a", IMAGES[i]), ("b", IMAGES[i + 1])])

    with futures.ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(send_good, i) for i in range(5)]
        bad = pool.submit(zoo_server.predict, name, files=[("ok", IMAGES[0]), ("broken", b"\xff\xd8\xff junk")])
        bad_response, good_responses = bad.result(), [f.result() for f in goods]
    assert bad_response.status_code == 400, bad_response.text
    assert bad_response.json()["images"][0]["field"] == "broken"
    for i, response in enumerate(good_responses):
        assert response.status_code == 200, response.text
        assert_answers_match(response.json(), want[i : i + 2], LABELS)


def test_build_mar_from_a_folder_with_the_default_precision_says_it_serves_fp32_until_gated(zoo, tmp_path):
    """No --config, no --eval: the default frontend settings and precision auto, which serves fp32
    until labelled images gate a reduced precision (the build says so); the archive reads back as
    the folder's model, with no gate record."""
    from handler.model.files import read_model

    folder, _ = zoo[PARITY_CASES[0].name]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--from", str(folder),
                           "--name", "gated", "--export-path", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "no --eval: precision auto will serve fp32" in done.stderr, done.stderr
    spec = read_model(tmp_path / "gated.mar")
    assert spec.name == "gated" and spec.config.arch == "timm" and spec.labels == LABELS
    assert spec.config.precision == "auto" and spec.gate_record is None
    assert spec.config.resize_size == 235 and spec.config.interpolation == "bicubic"


def test_build_mar_from_a_folder_that_cannot_be_served_names_the_file(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "pretrained_cfg": {}}))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--from", str(folder),
                           "--export-path", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0
    assert "weights are missing: expected model.safetensors or pytorch_model.bin" in done.stderr, done.stderr
    assert not list(tmp_path.glob("*.mar"))


def serving_folder(folder, tmp_path):
    """A copy of ``folder`` with the tests' serving settings in its own model-config.yaml."""
    import shutil

    copy = shutil.copytree(folder, tmp_path / folder.name)
    (copy / "model-config.yaml").write_text(yaml.safe_dump(SERVE_CONFIG))
    return copy


def test_classify_script_takes_the_folder(zoo, tmp_path):
    folder, want = zoo["timm_vit_tiny"]
    images = tmp_path / "images"
    images.mkdir()
    for i, (name, data) in enumerate(PHOTOS):
        (images / f"{i:02d}-{name}").write_bytes(data)
    out = tmp_path / "results.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "classify.py"), str(images), "--model",
                           str(serving_folder(folder, tmp_path)), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["path"].rsplit("/", 1)[1] for row in rows] == sorted(p.name for p in images.iterdir())
    assert_answers_match([row["scores"] for row in rows], want, LABELS)


def test_the_kserve_door_takes_the_folder(zoo, tmp_path):
    folder, want = zoo["hf_convnext"]
    door = start_door(serving_folder(folder, tmp_path), "hf_convnext", tmp_path)
    try:
        client = triton_http.InferenceServerClient(door.http_url.removeprefix("http://"))
        tensor = triton_http.InferInput("images", [len(IMAGES)], "BYTES")
        tensor.set_data_from_numpy(np.array(IMAGES, dtype=np.object_), binary_data=True)
        try:
            result = client.infer("hf_convnext", [tensor])
        finally:
            client.close()
        assert_answers_match([json.loads(x) for x in result.as_numpy("predictions")], want, LABELS)
        v1 = requests.post(f"{door.http_url}/v1/models/hf_convnext:predict",
                           json={"instances": [{"b64": base64.b64encode(IMAGES[3]).decode()}]}, timeout=60)
        assert v1.status_code == 200, v1.text
        assert_answers_match(v1.json()["predictions"], want[3:4], LABELS)
    finally:
        door.stop()


def test_ray_serve_takes_the_folder(zoo, tmp_path):
    from harness.ray_cluster import HEAD_IP, RayCluster, free_port

    folder, want = zoo["hf_vit"]
    served = serving_folder(folder, tmp_path)
    with RayCluster(nodes=1) as cluster:
        port = free_port()
        cluster.run(["serve", "start", f"--http-host={HEAD_IP}", f"--http-port={port}", "--proxy-location=HeadOnly"])
        cluster.run(["serve", "run", "--non-blocking", "handler.doors.ray_serve:app", f"model={served}", "num_cpus=1"],
                    timeout_s=300)
        url = f"http://{HEAD_IP}:{port}/predictions/hf_vit"
        deadline = time.monotonic() + 300
        while True:
            try:
                response = requests.post(url, json={"images": [base64.b64encode(d).decode() for d in IMAGES]},
                                         timeout=60)
                if response.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the Ray Serve application did not answer"
            time.sleep(2)
        assert_answers_match(response.json(), want, LABELS)
