"""Accuracy gates in build_mar.py (labelled images, records tied to the weights) and what
``precision: auto`` makes of them when serving; int8 from calibration to serving: a real archive
built with ``--calibrate`` and ``--eval``, read back and run compiled, refused when its weights
changed."""

import zipfile
from dataclasses import replace
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
from handler.model.records import GATE_RECORD, GateRecord, artifact_sha256, weights_sha256
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


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Held-out labelled shape images (a folder per label), apart from the calibration images."""
    directory = tmp_path_factory.mktemp("labelled")
    for label in LABELS:
        (directory / label).mkdir()
    for i in range(60):
        label = LABELS[i % 3]
        (directory / label / f"{i:02d}.jpg").write_bytes(shape_image(label, seed=700 + i, fmt="JPEG"))
    return directory


def record_of(mar: Path) -> GateRecord | None:
    with zipfile.ZipFile(mar) as archive:
        if GATE_RECORD not in archive.namelist():
            return None
        return GateRecord.from_json(archive.read(GATE_RECORD))


def test_auto_measured_on_labelled_images_carries_its_record_and_serves_bf16(tmp_path, labelled, monkeypatch, capsys):
    mar = build(tmp_path, eval_images=labelled)
    record = record_of(mar)
    assert record is not None and record.images == 60 and record.weights_sha256 == weights_sha256(DEMO / "shapes_cnn.pt")
    assert {(c.precision, c.runtime) for c in record.candidates} == {("bf16", "torch"), ("bf16", "openvino")}
    assert all(c.passed for c in record.candidates), record
    assert "torch bf16: top-1" in capsys.readouterr().err
    monkeypatch.setenv(BF16_ENV, "1")
    for runtime in ("torch", "openvino"):
        with ImageClassifier.load(mar, device="cpu", overrides={"batch_size": 4, "runtime": runtime,
                                                                "compile": False}) as clf:
            assert (clf.pipeline.runner.runtime, clf.pipeline.precision) == (runtime, "bf16")


def test_auto_without_a_record_serves_fp32_and_says_how_to_gate(tmp_path, monkeypatch, caplog, capsys):
    mar = build(tmp_path)
    assert record_of(mar) is None and "precision auto will serve fp32" in capsys.readouterr().err
    monkeypatch.setenv(BF16_ENV, "1")
    caplog.set_level("INFO", logger="handler.model.runner")
    with ImageClassifier.load(mar, device="cpu", overrides={"batch_size": 4, "compile": False}) as clf:
        assert clf.config.precision == "auto" and clf.pipeline.precision == "fp32"
    assert any("no gate record is there for these weights" in r.getMessage() and "--eval" in r.getMessage()
               for r in caplog.records)


def test_bf16_that_loses_accuracy_is_refused_naming_the_figure(tmp_path, near_tie_weights, labelled):
    with pytest.raises(SystemExit, match=r"refused: torch bf16: top-1 \d+\.\d% against fp32's \d+\.\d% on 60 "
                                         r"labelled images: a drop of \+\d+\.\d+ points \(95 % upper bound"):
        build(tmp_path, near_tie_weights, precision="bf16", eval_images=labelled)
    assert not (tmp_path / "store" / "shapes.mar").exists()


def test_auto_whose_bf16_fails_is_built_and_serves_fp32(tmp_path, near_tie_weights, labelled, monkeypatch, caplog):
    mar = build(tmp_path, near_tie_weights, eval_images=labelled)
    record = record_of(mar)
    assert record is not None and not any(c.passed for c in record.candidates)
    monkeypatch.setenv(BF16_ENV, "1")
    caplog.set_level("INFO", logger="handler.model.runner")
    with ImageClassifier.load(mar, device="cpu", overrides={"batch_size": 4, "runtime": "torch",
                                                            "compile": False}) as clf:
        assert clf.pipeline.precision == "fp32"
    assert any("the gate record refuses bf16" in r.getMessage() and "a drop of" in r.getMessage()
               for r in caplog.records)


def test_an_explicit_reduced_precision_needs_labelled_images(tmp_path, near_tie_weights, capsys):
    with pytest.raises(SystemExit, match="precision bf16 needs its accuracy measured on labelled held-out images"):
        build(tmp_path, precision="bf16")
    mar = build(tmp_path, near_tie_weights, precision="bf16", gate=False)
    assert shipped_precision(mar) == "bf16" and record_of(mar) is None
    assert "is not measured: ignored (--no-gate)" in capsys.readouterr().err


def test_labelled_images_that_do_not_fit_the_model_are_refused(tmp_path, labelled):
    wrong = tmp_path / "wrong"
    (wrong / "hexagon").mkdir(parents=True)
    (wrong / "hexagon" / "a.jpg").write_bytes(shape_image("circle", seed=1))
    with pytest.raises(SystemExit, match="label 'hexagon' .* is not one of the model's 3 labels"):
        build(tmp_path, eval_images=wrong)
    few = tmp_path / "few.csv"
    few.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(labelled.rglob("*.jpg"))[:10]))
    with pytest.raises(SystemExit, match="10 labelled images; the gate needs at least 50"):
        build(tmp_path, eval_images=few)


def test_int8_is_refused_without_calibration_images(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="int8 needs calibration images: --calibrate DIR"):
        build(tmp_path, precision="int8")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="found 0 image file"):
        build(tmp_path, precision="int8", calibrate=empty)


def test_int8_is_scored_on_images_apart_from_its_calibration_images(tmp_path, calibration):
    with pytest.raises(SystemExit, match="are also --calibrate images"):
        build(tmp_path, precision="int8", calibrate=calibration, eval_images=_as_labelled(calibration, tmp_path))


def _as_labelled(calibration: Path, tmp_path: Path) -> Path:
    rows = [f"{p},{LABELS[int(p.stem) % 3]}" for p in sorted(calibration.iterdir()) if p.suffix != ".txt"]
    (tmp_path / "calibration.csv").write_text("\n".join(rows * 2) + "\n")
    return tmp_path / "calibration.csv"


@pytest.fixture(scope="module")
def int8_mar(tmp_path_factory, calibration, labelled) -> Path:
    return build(tmp_path_factory.mktemp("int8"), precision="int8", calibrate=calibration,
                 eval_images=labelled)


def test_an_int8_archive_holds_its_calibrated_program_and_serves_it_compiled(int8_mar, real_compiler, caplog):
    spec = read_model(int8_mar)
    assert spec.config.precision == "int8" and isinstance(spec.int8_program, bytes)
    with zipfile.ZipFile(int8_mar) as archive:
        assert INT8_PROGRAM in archive.namelist()
    images = [shape_image(LABELS[i % 3], seed=900 + i, fmt="JPEG") for i in range(16)]
    torch_int8 = {"batch_size": 8, "batch_buckets": [8], "runtime": "torch"}
    with ImageClassifier.load(int8_mar, device="cpu", overrides=torch_int8) as clf:
        assert clf.pipeline.precision == "int8" and clf.pipeline.runner.compiled_buckets == (8,)
        int8 = clf.classify(images)
    with ImageClassifier.load(int8_mar, device="cpu", overrides={"batch_size": 8}) as clf:  # runtime auto
        assert (clf.pipeline.runner.runtime, clf.pipeline.precision) == ("openvino", "int8")
        openvino_int8 = clf.classify(images)
    with ImageClassifier.load(int8_mar, device="cpu", overrides={"batch_size": 8, "precision": "fp32",
                                                                 "compile": False}) as clf:
        fp32 = clf.classify(images)
    for quantized in (int8, openvino_int8):
        assert [next(iter(r)) for r in quantized] == [next(iter(r)) for r in fp32]  # type: ignore[call-overload]
        moved = max(abs(a[k] - b[k]) for a, b in zip(quantized, fp32) for k in b)  # type: ignore[index, union-attr]
        assert 0 < moved < 0.1, moved  # the int8 model ran: its scores differ a little
    record = record_of(int8_mar)
    assert record is not None and {(c.precision, c.runtime) for c in record.candidates} == {("int8", "torch"),
                                                                                           ("int8", "openvino")}
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_torch_int8_without_a_compiler_serves_fp32_and_says_why(int8_mar, caplog):
    with ImageClassifier.load(int8_mar, device="cpu", overrides={"batch_size": 4, "runtime": "torch"}) as clf:
        assert clf.pipeline.precision == "fp32"
        assert all(isinstance(r, dict) for r in clf.classify([shape_image("circle", seed=1)]))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("precision int8 does not work" in m and "int8 runs compiled only" in m for m in errors), errors


def test_a_broken_int8_program_serves_fp32_and_says_why(int8_mar, tmp_path, real_compiler, caplog):
    with zipfile.ZipFile(int8_mar) as archive:
        archive.extractall(tmp_path / "model")
    program = tmp_path / "model" / INT8_PROGRAM
    program.write_bytes(b"not a program")
    overrides = {"batch_size": 4, "runtime": "torch"}
    with ImageClassifier.load(tmp_path / "model", device="cpu", overrides=overrides) as clf:
        assert clf.pipeline.precision == "fp32"  # not the program the record measured
    assert any("no gate record of these weights vouches for this int8 program" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")
    # A record that did measure these bytes: the program is tried, does not load, and fp32 serves.
    record = GateRecord.from_json((tmp_path / "model" / GATE_RECORD).read_text())
    vouching = replace(record, candidates=tuple(replace(c, artifact_sha256=artifact_sha256(program))
                                                for c in record.candidates))
    (tmp_path / "model" / GATE_RECORD).write_text(vouching.to_json())
    caplog.clear()
    with ImageClassifier.load(tmp_path / "model", device="cpu", overrides=overrides) as clf:
        assert clf.pipeline.precision == "fp32"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("the int8 program does not load" in m for m in errors), errors


def test_an_int8_program_whose_weights_changed_is_refused_and_fp32_served(int8_mar, near_tie_weights, tmp_path,
                                                                          real_compiler, caplog):
    with zipfile.ZipFile(int8_mar) as archive:
        archive.extractall(tmp_path / "model")
    (tmp_path / "model" / "shapes_cnn.pt").write_bytes(near_tie_weights.read_bytes())  # weights updated
    with ImageClassifier.load(tmp_path / "model", device="cpu", overrides={"batch_size": 4}) as clf:
        assert clf.pipeline.precision == "fp32"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("precision is int8 but its gate_record.json was measured on other weights" in m for m in errors), errors
    (tmp_path / "model" / "shapes_cnn.pt").write_bytes((DEMO / "shapes_cnn.pt").read_bytes())
    (tmp_path / "model" / GATE_RECORD).unlink()  # a program with no record of its weights
    caplog.clear()
    with ImageClassifier.load(tmp_path / "model", device="cpu", overrides={"batch_size": 4}) as clf:
        assert clf.pipeline.precision == "fp32"
    assert any("no gate record of these weights vouches for this int8 program" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")


def test_bf16_forced_off_the_shipped_demo_runs_fp32(monkeypatch):
    monkeypatch.setenv(BF16_ENV, "0")
    with ImageClassifier.load(DEMO, device="cpu", overrides={"batch_size": 4}) as clf:
        assert clf.config.precision == "auto" and clf.pipeline.precision == "fp32"


def test_gate_py_writes_the_record_and_openvinos_int8_into_a_model_folder(tmp_path, labelled, calibration,
                                                                          monkeypatch):
    """scripts/gate.py --calibrate --write: the folder then holds its int8 model and a record of
    its weights, reads back as before (the int8 model is no weights file), and precision auto
    serves int8 on a CPU with int8 dot products."""
    import shutil
    import subprocess
    import sys

    from handler.model.precision import bf16_is_fast, cpu_int8_feature

    monkeypatch.delenv(BF16_ENV, raising=False)
    folder = tmp_path / "shapes"
    shutil.copytree(DEMO, folder)
    calibrate = shutil.copytree(calibration, tmp_path / "calibrate")
    (calibrate / "broken.jpg").write_bytes(b"\xff\xd8 not a whole JPEG")  # skipped, and said
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gate.py"), "--model", str(folder), "--eval",
                           str(labelled), "--calibrate", str(calibrate), "--candidates", "openvino/bf16",
                           "--write"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gate: skipping an unreadable calibration image" in done.stderr
    assert "calibrated on 48 images" in done.stderr
    assert "openvino int8: top-1" in done.stderr and "on 60 labelled images" in done.stderr
    spec = read_model(folder)
    assert spec.openvino_int8 is not None and spec.gate_record is not None
    assert spec.gate_record.passed("int8", "openvino") and spec.gate_record.passed("bf16", "openvino")
    with ImageClassifier.load(folder, device="cpu", overrides={"batch_size": 4}) as clf:
        want = "int8" if cpu_int8_feature() else "bf16" if bf16_is_fast() else "fp32"
        assert (clf.pipeline.runner.runtime, clf.pipeline.precision) == ("openvino", want)
        assert all(isinstance(r, dict) for r in clf.classify([shape_image("circle", seed=3)]))
    # A new int8 model beside the record (made later from the same weights) is not the one it measured.
    (folder / "openvino_int8.xml").write_text((folder / "openvino_int8.xml").read_text() + "\n")
    with ImageClassifier.load(folder, device="cpu", overrides={"batch_size": 4, "precision": "int8"}) as clf:
        assert clf.pipeline.precision == "fp32"
    overlap = subprocess.run([sys.executable, str(ROOT / "scripts" / "gate.py"), "--model", str(folder), "--eval",
                              str(_as_labelled(calibration, tmp_path)), "--calibrate", str(calibration)],
                             capture_output=True, text=True, timeout=600)
    assert overlap.returncode != 0 and "none of them an --eval image" in overlap.stderr
