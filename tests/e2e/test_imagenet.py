"""The default model, efficientnet_lite0, through a real TorchServe: real photos, sensible labels."""

import base64

import pytest
from urllib3 import encode_multipart_formdata

from harness.ts_server import ROOT

pytestmark = pytest.mark.e2e

DATA = ROOT / "tests" / "data"
# What a person would accept as the answer for each shipped photo (tests/data/README.md).
SENSIBLE = {
    "cat.jpg": {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"},
    "coffee.jpg": {"espresso", "cup", "coffee mug"},
    "camera.jpg": {"tripod", "reflex camera", "Polaroid camera"},
    "rocket.jpg": {"missile", "projectile", "space shuttle"},
}


def top1(scores: dict) -> str:
    return next(iter(scores))


def test_each_photo_alone_gets_a_sensible_imagenet_label(server):
    for name, labels in SENSIBLE.items():
        response = server.predict("efficientnet_lite0", data=(DATA / name).read_bytes())
        assert response.status_code == 200, response.text
        scores = response.json()
        assert len(scores) == 5 and list(scores.values()) == sorted(scores.values(), reverse=True)
        assert top1(scores) in labels, (name, scores)


def test_the_shipped_archive_is_served_by_openvino_in_its_gated_precision_by_default(server):
    """OpenVINO runs the model on a CPU, in the fastest precision its gate record passed that this
    CPU runs fast: int8 with VNNI or AMX (the archive carries OpenVINO's int8 model), else bf16
    with AMX, else fp32."""
    from handler.model.precision import bf16_is_fast, cpu_int8_feature

    log = (server.workdir / "logs" / "model_log.log").read_text().splitlines()
    log = [line for line in log if "efficientnet_lite0" in line]
    runtime = [line for line in log if "MODEL_LOG - runtime " in line]
    assert len(runtime) == 1 and "runtime openvino (handler.runtime is auto and OpenVINO is installed)" in runtime[0]
    (precision,) = [line for line in log if "MODEL_LOG - precision " in line]
    if cpu_int8_feature():
        assert "precision int8 (" in precision and "the gate passed" in precision, precision
    elif bf16_is_fast():
        assert "precision bf16 (" in precision and "the gate passed" in precision, precision
    else:
        assert "precision fp32 (" in precision, precision
    warmed = [line for line in log if "OpenVINO runs the model): batch sizes [1, 2, 4, 8, 16, 32] warmed" in line]
    assert len(warmed) == 1, warmed


def test_the_photos_in_one_request_get_the_same_answers_as_alone(server):
    names = list(SENSIBLE)
    alone = [server.predict("efficientnet_lite0", data=(DATA / n).read_bytes()).json() for n in names]
    parts = [(n, (n, (DATA / n).read_bytes(), "image/jpeg")) for n in names]
    body, content_type = encode_multipart_formdata(parts)
    mixed = server.predict("efficientnet_lite0", data=body,
                           headers={"Content-Type": content_type.replace("form-data", "mixed")})
    as_json = server.predict("efficientnet_lite0", json={
        "images": [base64.b64encode((DATA / n).read_bytes()).decode() for n in names]})
    for response in (mixed, as_json):
        assert response.status_code == 200, response.text
        batch = response.json()
        assert len(batch) == len(names)
        for name, got, want in zip(names, batch, alone):
            assert top1(got) in SENSIBLE[name], (name, got)
            assert list(got) == list(want) and got == pytest.approx(want, abs=1e-4), name
