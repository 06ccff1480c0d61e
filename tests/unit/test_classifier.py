"""The core API (handler.classifier) on the committed demo model, with no TorchServe involved."""

import io
import json
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from handler.classifier import ClassifierClosed, ImageClassifier, ImageError, ImageInput, RequestError, read_model
from handler.model.precision import BF16_ENV
from helpers import encode, shape_image
from harness.ts_server import ROOT

DEMO = ROOT / "models" / "shapes"
LABELS = ["circle", "square", "triangle"]


@pytest.fixture(scope="module", autouse=True)
def fp32():
    """These tests compare classifiers made at different times in one process and in others:
    in fp32 they agree to 1e-5. In bf16 (precision auto on a bf16 CPU) the rounding follows the
    torch thread count other tests set (test_precision.py covers bf16)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BF16_ENV, "0")
        yield


@pytest.fixture(scope="module")
def classifier():
    with ImageClassifier.load(DEMO, device="cpu", overrides={"batch_size": 4, "max_image_pixels": 1_000_000}) as clf:
        yield clf


def same(got: dict, want: dict) -> None:
    assert list(got) == list(want) and got == pytest.approx(want, abs=1e-5), (got, want)


def test_every_kind_of_input_gives_the_same_answer_in_order(classifier, tmp_path):
    png = shape_image("triangle", seed=3)
    pil = Image.open(io.BytesIO(png))
    pixels = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)  # uint8 CHW, contiguous
    path = tmp_path / "t.png"
    path.write_bytes(png)
    (want,) = classifier.classify([png])
    assert next(iter(want)) == "triangle" and len(want) == 3  # the demo's top_k
    got = classifier.classify([bytearray(png), str(path), path, pil, pixels, pixels[:1], ImageInput(png, "x")])
    assert len(got) == 7
    for result in got[:5] + got[6:]:
        same(result, want)
    assert set(got[5]) == set(LABELS)  # one grey channel is accepted too


def test_bad_items_are_returned_as_image_errors_and_the_others_are_unaffected(classifier, tmp_path):
    good = [shape_image(LABELS[i], seed=10 + i, fmt="JPEG") for i in range(3)]
    alone = [classifier.classify([g])[0] for g in good]
    items = [good[0], b"not an image", tmp_path / "missing.png", good[1], torch.zeros(2, 2),
             encode(Image.new("L", (1200, 1000))), good[2], 42]
    got = classifier.classify(items)
    errors = {i: r for i, r in enumerate(got) if isinstance(r, ImageError)}
    assert {i: (e.code, e.status) for i, e in errors.items()} == {
        1: ("invalid_image", 400), 2: ("unreadable_file", 400), 4: ("invalid_tensor", 400),
        5: ("image_too_large", 413), 7: ("unsupported_input", 400)}
    assert all(e.index == i and e.reason for i, e in errors.items())
    assert "missing.png" in errors[2].reason
    for result, want in zip([got[0], got[3], got[6]], alone):
        same(result, want)


def test_requests_are_answered_each_with_its_results_or_one_error(classifier):
    images = [shape_image(LABELS[i % 3], seed=20 + i) for i in range(9)]
    alone = classifier.classify(images)
    batch = classifier.classify_requests([
        images[:3],
        [ImageInput(images[3], "a"), ImageInput(b"junk", "b")],
        images[4:9],  # more than batch_size: runs in several forward passes
        [encode(Image.new("RGB", (1100, 1000))), b"junk"],
    ])
    first, second, third, fourth = batch.results
    for got, want in zip(first + third, alone[:3] + alone[4:]):
        same(got, want)
    assert isinstance(second, RequestError) and second.status == 400 and second.code == "invalid_image"
    assert second.as_json()["images"] == [{"index": 1, "field": "b", "reason": "not a recognised image format"}]
    assert isinstance(fourth, RequestError) and fourth.status == 413 and len(fourth.images) == 2
    assert (batch.images, batch.bad_images) == (12, 3)
    assert set(batch.timings) == {"DecodeTransformMs", "HostToDeviceMs", "InferenceMs", "PostprocessMs"}
    assert batch.timings["InferenceMs"] > 0


def test_calls_from_several_threads_are_serialized_and_each_gets_its_own_answers(classifier):
    images = [shape_image(LABELS[i % 3], seed=40 + i) for i in range(12)]
    want = classifier.classify(images)
    answers: dict[int, list] = {}

    def run(n: int) -> None:
        mine = images[n:] + images[:n]  # a different order per thread
        answers[n] = classifier.classify(mine)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(answers) == list(range(6))
    for n, got in answers.items():
        for g, w in zip(got, want[n:] + want[:n]):
            same(g, w)


def test_close_stops_the_workers_is_idempotent_and_later_use_is_a_clear_error():
    clf = ImageClassifier.load(DEMO, device="cpu")
    pids = clf.pipeline.loader.workers.worker_pids()
    assert len(pids) == 2 and all(pids)
    with clf:
        clf.classify([shape_image("circle", seed=1)])
        assert clf.healthy()
    assert clf.closed and not clf.healthy()
    clf.close()  # again: nothing happens
    with pytest.raises(ClassifierClosed, match="closed"):
        clf.classify([shape_image("circle", seed=1)])
    with pytest.raises(ClassifierClosed):
        clf.classify_requests([[b"x"]])


def test_a_mar_and_a_directory_holding_one_are_read_as_the_model(tmp_path, classifier):
    mar = write_demo_mar(tmp_path / "demo.mar")
    image = shape_image("square", seed=5)
    for path in (mar, tmp_path):  # KServe's storage initializer mounts a directory with the .mar in it
        spec = read_model(path, {"batch_size": 4, "max_image_pixels": 1_000_000})
        assert spec.name == "demo" and spec.labels == LABELS and spec.config.image_size == 128
        with ImageClassifier(spec, device="cpu") as clf:
            same(clf.classify([image])[0], classifier.classify([image])[0])


def test_model_files_and_overrides_are_validated(tmp_path):
    with pytest.raises(ValueError, match="'batch'"):
        read_model(DEMO, {"batch": 3})
    with pytest.raises(ValueError, match="top_k must be > 0"):
        read_model(DEMO, {"top_k": 0})
    for name in ("index_to_name.json", "model-config.yaml", "shapes_cnn.pt"):
        (tmp_path / name).write_bytes((DEMO / name).read_bytes())
    (tmp_path / "other.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="exactly one weights file"):
        read_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a model directory nor a .mar"):
        read_model(tmp_path / "nothing-here")
    spec = read_model(tmp_path, weights=tmp_path / "shapes_cnn.pt", model_yaml={"handler": {"arch": "shapes_cnn"}})
    assert spec.config.image_size == 224  # the given model_yaml, not the file's


def test_asking_for_cuda_without_it_is_an_error_not_a_silent_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        ImageClassifier.load(DEMO, device="cuda")


def write_demo_mar(path):
    """The demo model as a .mar (a zip with TorchServe's manifest), as build_mar.py would ship it."""
    manifest = {"model": {"modelName": "demo", "serializedFile": "shapes_cnn.pt", "configFile": "model-config.yaml"}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        for name in ("shapes_cnn.pt", "index_to_name.json", "model-config.yaml"):
            archive.write(DEMO / name, name)
    return path


def test_the_core_works_with_torchserve_unimportable(tmp_path, classifier):
    mar = write_demo_mar(tmp_path / "demo.mar")
    image = shape_image("triangle", seed=3)  # PNG bytes
    (tmp_path / "photo.png").write_bytes(image)
    script = f"""
import io, json, sys
sys.modules["ts"] = None  # any import of TorchServe now fails
from PIL import Image
from handler.classifier import ImageClassifier, ImageError
from handler import protocols, process
png = open({str(tmp_path / "photo.png")!r}, "rb").read()
for model in ({str(DEMO)!r}, {str(mar)!r}):
    with ImageClassifier.load(model, device="cpu", overrides={{"num_workers": 1}}) as clf:
        out = clf.classify([png, {str(tmp_path / "photo.png")!r}, Image.open(io.BytesIO(png)), b"not an image"])
        bad = out[3]
        print(json.dumps([out[:3], [type(bad).__name__, bad.code, bad.status]]))
print(sorted(m for m, mod in sys.modules.items() if (m == "ts" or m.startswith("ts.")) and mod is not None))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    *answers, imported = run.stdout.strip().splitlines()
    want = classifier.classify([image])[0]
    assert len(answers) == 2, run.stdout
    for line in answers:
        good, bad = json.loads(line)
        for got in good:
            same(got, want)
        assert bad == ["ImageError", "invalid_image", 400]
    assert imported == "[]"


def test_for_serving_reads_the_model_chooses_the_device_and_configures_the_process(monkeypatch, classifier):
    calls = []
    monkeypatch.setattr("handler.classifier.configure_process",
                        lambda config, **kw: calls.append((config.batch_size, kw)))
    overrides = {"batch_size": 4, "max_image_pixels": 1_000_000}
    with ImageClassifier.for_serving(DEMO, device="cpu", backend_workers=3, overrides=overrides) as clf:
        assert clf.device == torch.device("cpu") and clf.config.batch_size == 4
        assert calls == [(4, {"device": torch.device("cpu"), "backend_workers": 3})]  # before the workers fork
        image = shape_image("triangle", seed=9)
        same(clf.classify([image])[0], classifier.classify([image])[0])
    spec = read_model(DEMO, overrides)
    with ImageClassifier.for_serving(spec, device="cpu") as clf:  # a spec already read: not read again
        assert clf.spec is spec
    with pytest.raises(ValueError, match="not to a ModelSpec"):
        ImageClassifier.for_serving(spec, overrides={"top_k": 1})
