"""handler.model.ov_runtime: the runtime choice, OpenVINO serving the model (same answers as
torch in fp32), its cache keyed by the weights, and the fall-back to torch when it cannot."""

from pathlib import Path

import pytest
import torch

from handler.classifier import ImageClassifier
from handler.model.ov_runtime import CACHE_ENV, OpenVinoModel, resolve_runtime
from helpers import shape_image
from harness.ts_server import ROOT

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
DEMO = ROOT / "models" / "shapes"
LABELS = ["circle", "square", "triangle"]
IMAGES = [shape_image(LABELS[i % 3], seed=60 + i, fmt="JPEG") for i in range(10)]
FP32 = {"batch_size": 4, "precision": "fp32", "compile": False}


@pytest.mark.parametrize(("setting", "device", "precision", "want", "why"), [
    ("auto", CPU, "auto", "openvino", "OpenVINO is installed"),
    ("openvino", CPU, "bf16", "openvino", "OpenVINO is installed"),
    ("torch", CPU, "auto", "torch", "handler.runtime is torch"),
    ("auto", CUDA, "auto", "torch", "the model is on cuda"),
    ("openvino", CPU, "int8", "torch", "the model's int8 is not there (no OpenVINO int8 model)"),
])
def test_the_runtime_resolves_to_what_can_run_here(setting, device, precision, want, why):
    runtime, reason = resolve_runtime(setting, device, precision)
    assert runtime == want and why in reason, (runtime, reason)


@pytest.mark.parametrize(("setting", "openvino_int8", "torch_int8", "want", "why"), [
    ("auto", True, True, "openvino", "OpenVINO is installed"),
    ("openvino", True, False, "openvino", "OpenVINO is installed"),
    ("auto", False, True, "torch", "the model's int8 is a torch (PT2E) program"),
    ("torch", True, True, "torch", "handler.runtime is torch"),
])
def test_int8_runs_where_its_model_is(setting, openvino_int8, torch_int8, want, why):
    runtime, reason = resolve_runtime(setting, CPU, "int8", openvino_int8=openvino_int8, torch_int8=torch_int8)
    assert runtime == want and why in reason, (runtime, reason)


def test_without_openvino_auto_runs_torch_and_says_why(monkeypatch):
    monkeypatch.setattr("handler.model.ov_runtime.openvino_problem", lambda: "OpenVINO does not import (gone)")
    runtime, reason = resolve_runtime("auto", CPU, "auto")
    assert runtime == "torch" and "OpenVINO does not import" in reason


def answers(clf: ImageClassifier) -> list[dict[str, float]]:
    results = clf.classify(IMAGES)
    assert all(isinstance(r, dict) for r in results), results
    return results  # type: ignore[return-value]


def test_openvino_fp32_answers_as_torch_fp32_does_and_is_cached_by_the_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    caplog.set_level("INFO", logger="handler.model.runner")
    with ImageClassifier.load(DEMO, device="cpu", overrides={**FP32, "runtime": "torch"}) as clf:
        want = answers(clf)
    with ImageClassifier.load(DEMO, device="cpu", overrides={**FP32, "runtime": "openvino"}) as clf:
        assert clf.pipeline.runner.runtime == "openvino" and isinstance(clf.pipeline.model, OpenVinoModel)
        got = answers(clf)
    assert [list(g) for g in got] == [list(w) for w in want]
    assert max(abs(g[k] - w[k]) for g, w in zip(got, want) for k in w) < 1e-4
    cached = list((tmp_path / "cache" / "openvino").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.xml").is_file() and (cached[0] / "model.bin").is_file()
    assert any("OpenVINO model converted now" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with ImageClassifier.load(DEMO, device="cpu", overrides={**FP32, "runtime": "openvino"}) as clf:
        again = answers(clf)
    # The model read back runs the same graph; OpenVINO may order its float sums differently.
    assert [list(a) for a in again] == [list(g) for g in got]
    assert max(abs(a[k] - g[k]) for a, g in zip(again, got) for k in g) < 1e-5
    assert any(f"OpenVINO model read from {cached[0]}" in r.getMessage() for r in caplog.records)


def test_other_weights_get_their_own_converted_model(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "shapes"
    shutil.copytree(DEMO, folder)
    state = torch.load(folder / "shapes_cnn.pt", weights_only=True)
    head = next(k for k in state if k.endswith("bias") and state[k].shape == (3,))
    state[head] = state[head] + torch.tensor([5.0, 0.0, 0.0])  # every answer leans to "circle"
    torch.save(state, folder / "shapes_cnn.pt")
    with ImageClassifier.load(DEMO, device="cpu", overrides={**FP32, "runtime": "openvino"}) as clf:
        before = answers(clf)
    with ImageClassifier.load(folder, device="cpu", overrides={**FP32, "runtime": "openvino"}) as clf:
        after = answers(clf)
    assert len(list((tmp_path / "cache" / "openvino").iterdir())) == 2
    assert [next(iter(a)) for a in after] != [next(iter(b)) for b in before]


def test_an_unwritable_cache_only_costs_a_conversion(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    with ImageClassifier.load(DEMO, device="cpu", overrides={**FP32, "runtime": "openvino"}) as clf:
        assert clf.pipeline.runner.runtime == "openvino"
        answers(clf)
    assert any("the converted model is not cached" in r.getMessage() for r in caplog.records)


def test_a_model_openvino_cannot_convert_runs_on_torch_with_one_log_line(tmp_path, monkeypatch, caplog):
    import openvino

    def refuse(*args, **kwargs):
        raise RuntimeError("Cannot convert operation aten::frobnicate")

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(openvino, "convert_model", refuse)
    with ImageClassifier.load(DEMO, device="cpu", overrides=FP32) as clf:
        assert clf.pipeline.runner.runtime == "torch" and clf.pipeline.precision == "fp32"
        answers(clf)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["OpenVINO cannot run this model (RuntimeError: Cannot convert operation aten::frobnicate); "
                      "running it on torch"], errors


def test_the_runtime_setting_is_validated():
    from handler.config import HandlerConfig

    with pytest.raises(ValueError, match="handler.runtime must be one of auto, torch, openvino; got 'onnx'"):
        HandlerConfig.from_mapping({"runtime": "onnx"})


def test_the_default_is_openvino_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with ImageClassifier.load(DEMO, device="cpu", overrides={"batch_size": 4}) as clf:
        assert clf.config.runtime == "auto" and clf.pipeline.runner.runtime == "openvino"
        assert clf.pipeline.runner.compiled is None  # no torch.compile: OpenVINO compiled it
        answers(clf)


def test_a_reduced_precision_openvino_cannot_run_serves_its_fp32(tmp_path, monkeypatch, caplog):
    """Explicit bf16 that OpenVINO refuses here (as on a CPU without bf16): OpenVINO fp32, pinned."""
    import handler.model.ov_runtime as ov_runtime

    real = ov_runtime.OpenVinoModel.__init__

    def no_bf16(self, model, precision, threads):
        if precision == "bf16":
            raise RuntimeError("OpenVINO runs this model in f32 on this CPU, not bf16")
        real(self, model, precision, threads)

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(ov_runtime.OpenVinoModel, "__init__", no_bf16)
    with ImageClassifier.load(DEMO, device="cpu", overrides={"batch_size": 4, "precision": "bf16"}) as clf:
        assert (clf.pipeline.runner.runtime, clf.pipeline.precision) == ("openvino", "fp32")
        answers(clf)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("precision bf16 does not work" in m and "not bf16" in m for m in errors), errors


def test_openvino_failing_at_warm_up_even_in_fp32_runs_on_torch(tmp_path, monkeypatch, caplog):
    import handler.model.ov_runtime as ov_runtime

    def broken(self, x):
        raise RuntimeError("CPU plugin: out of the blue")

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(ov_runtime.OpenVinoModel, "forward", broken)
    with ImageClassifier.load(DEMO, device="cpu", overrides=FP32) as clf:
        assert (clf.pipeline.runner.runtime, clf.pipeline.precision) == ("torch", "fp32")
        answers(clf)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("OpenVINO cannot run this model (RuntimeError: CPU plugin: out of the blue); running it on torch" in m
               for m in errors), errors
