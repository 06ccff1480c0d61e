"""Accuracy gates in build_mar.py, and int8 from calibration to serving: a real archive built
with ``--calibrate``, read back and run compiled."""

import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from helpers import load_command

build_mar = load_command("scripts/build_mar.py")
from handler.classifier import ImageClassifier
from handler.model.files import read_model
from handler.model.precision import BF16_ENV
from handler.model.quantize import INT8_PROGRAM
from helpers import shape_image
from harness.ts_server import ROOT

DEMO = ROOT / "models" / "shapes"
LABELS = ["circle", "square", "triangle"]


def build(tmp_path: Path, weights: Path = DEMO / "shapes_cnn.pt", **options) -> Path:
    return build_mar.build("shapes_cnn", weights, DEMO / "index_to_name.json", "shapes", tmp_path / "store",
                           DEMO / "model-config.yaml", **options)


def shipped_precision(mar: Path) -> str:
    with zipfile.ZipFile(mar) as archive:
        return yaml.safe_load(archive.read("model-config.yaml"))["handler"].get("precision", "auto (default)")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """Shape images like those the demo model serves, JPEG and PNG."""
    directory = tmp_path_factory.mktemp("calibration")
    for i in range(48):
        fmt = "JPEG" if i % 4 else "PNG"
        (directory / f"{i:02d}.{fmt.lower()}").write_bytes(shape_image(LABELS[i % 3], seed=500 + i, fmt=fmt))
    (directory / "notes.txt").write_text("not an image: ignored by suffix")
    return directory


@pytest.fixture(scope="module")
def near_tie_weights(tmp_path_factory) -> Path:
    """The demo model with 1000 added to its last features (and taken off again by the head's
    bias): in fp32 the same function, in bf16 (a step of 8 at 1000) the features are lost."""
    state = torch.load(DEMO / "shapes_cnn.pt", weights_only=True)
    state["features.7.1.bias"] = state["features.7.1.bias"] + 1000.0  # after it: ReLU, pooling
    head = state["classifier.1.weight"]
    state["classifier.1.bias"] = state["classifier.1.bias"] - 1000.0 * head.sum(dim=1)
    path = tmp_path_factory.mktemp("near_tie") / "weights.pt"
    torch.save(state, path)
    return path


def test_auto_passes_its_bf16_gate_on_the_default_images_and_stays_auto(tmp_path, capsys):
    mar = build(tmp_path)
    assert shipped_precision(mar) == "auto (default)"
    assert "bf16: top-1 agreement with fp32 100.0% on 32 images from tests/data" in capsys.readouterr().err


def test_bf16_below_its_gate_is_refused_naming_the_figure(tmp_path, near_tie_weights, calibration):
    with pytest.raises(SystemExit, match=r"refused: bf16 agrees with fp32 on \d+\.\d% of top-1 answers "
                                         r"\(48 images.*the gate is 99%"):
        build(tmp_path, near_tie_weights, precision="bf16", calibrate=calibration)
    assert not (tmp_path / "store" / "shapes.mar").exists()


def test_auto_below_the_bf16_gate_builds_an_fp32_archive_and_says_why(tmp_path, near_tie_weights, capsys):
    mar = build(tmp_path, near_tie_weights)
    assert shipped_precision(mar) == "fp32"
    assert "the archive runs fp32" in capsys.readouterr().err


def test_no_gate_builds_below_the_gate_and_reports_the_figure(tmp_path, near_tie_weights, capsys):
    mar = build(tmp_path, near_tie_weights, precision="bf16", gate=False)
    assert shipped_precision(mar) == "bf16"
    assert "the gate is 99%: ignored (--no-gate)" in capsys.readouterr().err


def test_int8_is_refused_without_calibration_images(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="int8 needs calibration images: --calibrate DIR"):
        build(tmp_path, precision="int8")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="found 0 image file"):
        build(tmp_path, precision="int8", calibrate=empty)


@pytest.fixture(scope="module")
def int8_mar(tmp_path_factory, calibration) -> Path:
    return build(tmp_path_factory.mktemp("int8"), precision="int8", calibrate=calibration)


def test_an_int8_archive_holds_its_calibrated_program_and_serves_it_compiled(int8_mar, real_compiler, caplog):
    spec = read_model(int8_mar)
    assert spec.config.precision == "int8" and isinstance(spec.int8_program, bytes)
    with zipfile.ZipFile(int8_mar) as archive:
        assert INT8_PROGRAM in archive.namelist()
    images = [shape_image(LABELS[i % 3], seed=900 + i, fmt="JPEG") for i in range(16)]
    with ImageClassifier.load(int8_mar, device="cpu", overrides={"batch_size": 8, "batch_buckets": [8]}) as clf:
        assert clf.pipeline.precision == "int8" and clf.pipeline.runner.compiled_buckets == (8,)
        int8 = clf.classify(images)
    with ImageClassifier.load(int8_mar, device="cpu", overrides={"batch_size": 8, "precision": "fp32",
                                                                 "compile": False}) as clf:
        fp32 = clf.classify(images)
    assert [next(iter(r)) for r in int8] == [next(iter(r)) for r in fp32]  # type: ignore[call-overload]
    moved = max(abs(a[k] - b[k]) for a, b in zip(int8, fp32) for k in b)  # type: ignore[index, union-attr]
    assert 0 < moved < 0.1, moved  # the int8 program ran: its scores differ a little
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_int8_without_a_compiler_serves_fp32_and_says_why(int8_mar, caplog):
    with ImageClassifier.load(int8_mar, device="cpu", overrides={"batch_size": 4}) as clf:
        assert clf.pipeline.precision == "fp32"
        assert all(isinstance(r, dict) for r in clf.classify([shape_image("circle", seed=1)]))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("precision int8 does not work" in m and "int8 runs compiled only" in m for m in errors), errors


def test_a_broken_int8_program_serves_fp32_and_says_why(int8_mar, tmp_path, real_compiler, caplog):
    with zipfile.ZipFile(int8_mar) as archive:
        archive.extractall(tmp_path / "model")
    (tmp_path / "model" / INT8_PROGRAM).write_bytes(b"not a program")
    with ImageClassifier.load(tmp_path / "model", device="cpu", overrides={"batch_size": 4}) as clf:
        assert clf.pipeline.precision == "fp32"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("the int8 program does not load" in m for m in errors), errors


def test_bf16_forced_off_the_shipped_demo_runs_fp32(monkeypatch):
    monkeypatch.setenv(BF16_ENV, "0")
    with ImageClassifier.load(DEMO, device="cpu", overrides={"batch_size": 4}) as clf:
        assert clf.config.precision == "auto" and clf.pipeline.precision == "fp32"
