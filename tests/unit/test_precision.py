"""handler.model.precision: bf16 detection and its override, what each setting resolves to, the
accuracy measure and the gate's figures; and the pipeline serving the resolved precision (or fp32 when that
precision fails)."""

from pathlib import Path

import pytest
import torch

from handler.classifier import ImageClassifier
from handler.model.precision import (
    BF16_CPU_FEATURES, BF16_ENV, Bf16Model, agreement, cpu_bf16_feature, resolve_precision,
)
from handler.model.records import Candidate, GateRecord, compare
from helpers import shape_image
from harness.ts_server import ROOT

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
DEMO = ROOT / "models" / "shapes"
LABELS = ["circle", "square", "triangle"]
IMAGES = [shape_image(LABELS[i % 3], seed=40 + i, fmt="JPEG") for i in range(12)]


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def test_bf16_detection_reads_the_cpu_and_the_override_forces_it(monkeypatch):
    monkeypatch.delenv(BF16_ENV, raising=False)
    flags = cpuinfo_flags()
    expected = next((f for f in BF16_CPU_FEATURES if f in flags), None)
    assert cpu_bf16_feature() == expected
    monkeypatch.setenv(BF16_ENV, "0")
    assert cpu_bf16_feature() is None
    monkeypatch.setenv(BF16_ENV, "1")
    assert cpu_bf16_feature() == "forced"


HASH, OTHER = "a" * 64, "b" * 64


def record(*passed: str, weights: str = HASH) -> GateRecord:
    """A gate record of ``weights`` in which the ``runtime/precision`` candidates named passed and
    bf16 on every other runtime failed."""
    runs = [("torch", "bf16"), ("openvino", "bf16"), ("torch", "int8"), ("openvino", "int8")]
    return GateRecord(weights, 1000, "test", 0.8, tuple(
        Candidate(precision, runtime, 0.8 if f"{runtime}/{precision}" in passed else 0.7, 0, 0, 0,
                  0.0 if f"{runtime}/{precision}" in passed else 10.0, 1.0, f"{runtime}/{precision}" in passed)
        for runtime, precision in runs))


@pytest.mark.parametrize(("setting", "device", "bf16_cpu", "program", "gate", "runtime", "want", "why"), [
    ("auto", CPU, "1", False, record("torch/bf16"), "torch", "bf16", "the gate passed (torch bf16: top-1 80.0%"),
    ("auto", CPU, "1", False, record("torch/bf16"), "openvino", "fp32", "the gate record refuses bf16 (openvino"),
    ("auto", CPU, "1", False, None, "torch", "fp32", "no gate record is there for these weights"),
    ("auto", CPU, "1", False, record("torch/bf16", weights=OTHER), "torch", "fp32", "measured on other weights"),
    ("auto", CPU, "0", False, record("torch/bf16"), "torch", "fp32", "not faster than fp32 on this CPU"),
    ("auto", CUDA, "1", False, record("torch/bf16"), "torch", "fp32", "the model is on cuda"),
    ("fp32", CPU, "1", False, None, "torch", "fp32", "is fp32"),
    ("bf16", CPU, "1", False, None, "openvino", "bf16", "is bf16"),
    ("bf16", CPU, "1", False, record("torch/bf16", weights=OTHER), "torch", "fp32", "measured on other weights"),
    ("bf16", CPU, "0", False, None, "torch", "bf16", "not faster than fp32 on this CPU: no AMX"),
    ("fp16", CPU, "1", False, None, "torch", "fp32", "fp16 needs CUDA"),
    ("fp16", CUDA, "1", False, None, "torch", "fp16", "is fp16"),
    ("int8", CPU, "1", True, record("torch/int8"), "torch", "int8", "is int8"),
    ("int8", CPU, "1", True, None, "torch", "fp32", "no gate record of these weights vouches"),
    ("int8", CPU, "1", True, record("torch/int8", weights=OTHER), "torch", "fp32", "measured on other weights"),
    ("int8", CPU, "1", False, record("torch/int8"), "torch", "fp32", "--calibrate"),
    ("int8", CUDA, "1", True, record("torch/int8"), "torch", "fp32", "CPU only"),
])
def test_each_setting_resolves_to_what_can_run_here(monkeypatch, setting, device, bf16_cpu, program, gate, runtime,
                                                    want, why):
    monkeypatch.setenv(BF16_ENV, bf16_cpu)
    precision, reason = resolve_precision(setting, device, has_int8_program=program, runtime=runtime, record=gate,
                                          weights_hash=HASH)
    assert precision == want and why in reason, (precision, reason)


@pytest.mark.parametrize(("flags", "runtime", "program", "gate", "want", "why"), [
    ({"avx512_vnni"}, "openvino", True, record("openvino/int8"), "int8", "this CPU has avx512_vnni"),
    ({"amx_int8", "amx_bf16"}, "openvino", True, record("openvino/int8", "openvino/bf16"), "int8", "has amx_int8"),
    (set(), "openvino", True, record("openvino/int8"), "fp32", "bf16 is not faster"),  # no int8 dot products
    ({"avx512_vnni"}, "openvino", False, record("openvino/int8"), "fp32", "bf16 is not faster"),  # no int8 model
    ({"avx512_vnni"}, "openvino", True, record("openvino/bf16"), "fp32", "bf16 is not faster"),  # int8 failed
    ({"avx512_vnni"}, "torch", True, record("torch/int8"), "fp32", "bf16 is not faster"),  # PT2E: never auto
    ({"avx512_vnni", "amx_bf16"}, "openvino", True, record("openvino/bf16"), "bf16", "the gate passed"),
    ({"avx512_vnni"}, "openvino", True, record("openvino/int8", weights=OTHER), "fp32", "measured on other weights"),
])
def test_auto_runs_openvinos_int8_only_with_int8_units_its_model_and_a_passed_record(monkeypatch, flags, runtime,
                                                                                     program, gate, want, why):
    import handler.model.precision as precision

    monkeypatch.delenv(BF16_ENV, raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))
    got, reason = resolve_precision("auto", CPU, has_int8_program=program, runtime=runtime, record=gate,
                                    weights_hash=HASH)
    assert got == want and why in reason, (got, reason)


def test_bf16_counts_as_fast_only_with_amx(monkeypatch):
    """With AVX512-BF16 alone bf16 ran no faster than fp32 on either runtime (docs/precision.md)."""
    import handler.model.precision as precision

    monkeypatch.delenv(BF16_ENV, raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert precision.cpu_bf16_feature() == "avx512_bf16" and precision.bf16_is_fast() is None
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    assert precision.bf16_is_fast() == "amx_bf16"
    monkeypatch.setenv(BF16_ENV, "1")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset())
    assert precision.bf16_is_fast() == "forced"


def test_compare_counts_lost_and_gained_answers_and_bounds_the_drop():
    truth = [0] * 100
    reference = [(0, 0.9)] * 98 + [(1, 0.3), (1, 0.6)]  # fp32: 98 right
    candidate = [0] * 95 + [2, 2, 2] + [0, 2]  # loses 3, gains 1, moves fp32's confident wrong answer
    result = compare("bf16", "torch", truth, reference, candidate)
    assert (result.worse, result.better, result.top1) == (3, 1, 0.96)
    assert result.drop_points == 2.0 and not result.passed
    assert result.confident_flips == 3 + 1  # the three lost (0.9) and the wrong one at 0.6; not the 0.3 one
    assert result.drop_bound_points > result.drop_points
    same = compare("bf16", "torch", truth, reference, [r for r, _ in reference])
    assert same.passed and same.drop_points == 0.0 and same.drop_bound_points == 0.0
    with pytest.raises(ValueError, match="one reference and one candidate answer"):
        compare("bf16", "torch", truth, reference[:5], candidate)


def test_an_explicit_bf16_the_record_failed_is_refused_and_an_unmeasured_int8_model_is_not_trusted(monkeypatch):
    monkeypatch.setenv(BF16_ENV, "1")
    got, why = resolve_precision("bf16", CPU, has_int8_program=False, runtime="openvino", record=record("torch/bf16"),
                                 weights_hash=HASH)
    assert got == "fp32" and "the gate record refuses it (openvino bf16: top-1 70.0%" in why, why
    got, _ = resolve_precision("bf16", CPU, has_int8_program=False, runtime="torch", record=record("torch/bf16"),
                               weights_hash=HASH)
    assert got == "bf16"
    measured = GateRecord(HASH, 100, "test", 0.8, (Candidate("int8", "openvino", 0.8, 0, 0, 0, 0.0, 0.1, True, "c" * 64),))
    for setting in ("int8", "auto"):
        got, why = resolve_precision(setting, CPU, has_int8_program=True, runtime="openvino", record=measured,
                                     weights_hash=HASH, int8_sha256="d" * 64)
        assert got != "int8", why
    got, _ = resolve_precision("int8", CPU, has_int8_program=True, runtime="openvino", record=measured,
                               weights_hash=HASH, int8_sha256="c" * 64)
    assert got == "int8"


def test_a_gate_record_reads_back_what_it_wrote_and_refuses_other_json():
    written = record("torch/bf16")
    assert GateRecord.from_json(written.to_json()) == written
    assert written.passed("bf16", "torch") is not None and written.passed("bf16", "openvino") is None
    with pytest.raises(ValueError, match="gate_record.json is not a gate record"):
        GateRecord.from_json('{"weights_sha256": "x"}')
    tampered = written.to_json().replace('"passed": false', '"passed": "false"')
    with pytest.raises(ValueError, match="'passed' must be true or false"):
        GateRecord.from_json(tampered)


def test_agreement_counts_top1_matches_and_the_largest_probability_difference():
    reference = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    same = agreement(reference, reference.clone())
    assert (same.images, same.top1_agreement, same.max_prob_diff) == (4, 1.0, 0.0)
    moved = reference.clone()
    moved[3] = torch.tensor([0.0, 1.0, 0.0])  # one answer flips
    result = agreement(reference, moved)
    want = float((reference[3].softmax(0) - moved[3].softmax(0)).abs().max())
    assert result.top1_agreement == 0.75 and result.max_prob_diff == pytest.approx(want)
    with pytest.raises(ValueError, match="one shape"):
        agreement(reference, reference[:2])


def scores(classifier: ImageClassifier) -> list[dict[str, float]]:
    results = classifier.classify(IMAGES)
    assert all(isinstance(r, dict) for r in results), results
    return results  # type: ignore[return-value]


@pytest.fixture
def gated_demo(tmp_path) -> Path:
    """The demo model folder with a gate record of its weights in which torch's bf16 passed."""
    import shutil

    from handler.model.records import GATE_RECORD, weights_sha256

    folder = tmp_path / "shapes"
    shutil.copytree(DEMO, folder)
    (folder / GATE_RECORD).write_text(record("torch/bf16", weights=weights_sha256(DEMO / "shapes_cnn.pt")).to_json())
    return folder


def test_auto_serves_bf16_on_a_bf16_cpu_with_a_passed_record_and_fp32_with_detection_forced_off(monkeypatch,
                                                                                                gated_demo):
    overrides = {"batch_size": 4, "compile": False, "runtime": "torch"}
    monkeypatch.setenv(BF16_ENV, "0")
    with ImageClassifier.load(gated_demo, device="cpu", overrides=overrides) as clf:
        assert clf.pipeline.precision == "fp32" and clf.pipeline.runner.autocast_dtype is None
        fp32 = scores(clf)
    monkeypatch.setenv(BF16_ENV, "1")
    with ImageClassifier.load(gated_demo, device="cpu", overrides=overrides) as clf:
        assert clf.pipeline.precision == "bf16" and isinstance(clf.pipeline.model, Bf16Model)
        dtypes = {name: p.dtype for name, p in clf.pipeline.model.named_parameters()}
        assert {d for n, d in dtypes.items() if "classifier" not in n} == {torch.bfloat16}
        assert {d for n, d in dtypes.items() if "classifier" in n} == {torch.float32}  # the head
        bf16 = scores(clf)
    assert [next(iter(r)) for r in bf16] == [next(iter(r)) for r in fp32]
    # The model really ran in bf16: its scores moved a little (bf16 keeps 8 bits of mantissa).
    moved = max(abs(b[k] - f[k]) for b, f in zip(bf16, fp32) for k in f)
    assert 0 < moved < 0.05, moved


class BreaksInBf16(torch.nn.Module):
    """A model with an operation that has no bf16 path (it raises on bf16 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            raise RuntimeError("no bf16 kernel for this operation")
        return self.head(x.mean(dim=(2, 3)))


def test_bf16_models_keep_their_classifier_head_in_fp32():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(), torch.nn.Linear(16, 8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 5)).eval()
    converted = Bf16Model(model)
    assert converted.model[0].weight.dtype == torch.bfloat16 and converted.model[2].weight.dtype == torch.bfloat16
    assert converted.model[4].linear.weight.dtype == torch.float32  # the last Linear: the head
    assert model[0].weight.dtype == torch.float32  # the original is left as it was
    x = torch.randn(2, 3, 2, 2)
    out = converted(x)
    assert out.dtype == torch.float32 and torch.allclose(out, model(x), atol=0.05)


def test_a_model_that_fails_in_bf16_serves_fp32_with_an_error(monkeypatch, caplog):
    monkeypatch.setenv(BF16_ENV, "1")
    monkeypatch.setattr("handler.model.optimize.load_model", lambda *args: BreaksInBf16().eval())
    with ImageClassifier.load(DEMO, device="cpu", overrides={"batch_size": 4, "compile": False, "precision": "bf16",
                                                             "runtime": "torch", "fuse_batchnorm": False}) as clf:
        assert clf.pipeline.precision == "fp32"
        assert all(isinstance(r, dict) for r in clf.classify(IMAGES[:3]))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("precision bf16 does not work" in m and "no bf16 kernel" in m for m in errors), errors


def test_int8_without_a_calibrated_program_runs_fp32_and_says_so(caplog):
    with ImageClassifier.load(DEMO, device="cpu", overrides={"batch_size": 4, "precision": "int8"}) as clf:
        assert clf.pipeline.precision == "fp32" and clf.spec.int8_program is None
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("no calibrated int8 program" in m and "--calibrate" in m for m in errors), errors


def test_compiled_bf16_freezes_and_answers_like_fp32(monkeypatch, real_compiler, caplog):
    from handler.model.optimize import _Frozen

    caplog.set_level("INFO", logger="handler.model.runner")
    monkeypatch.setenv(BF16_ENV, "1")
    overrides = {"batch_size": 4, "batch_buckets": [4], "runtime": "torch"}
    with ImageClassifier.load(DEMO, device="cpu", overrides={**overrides, "precision": "bf16"}) as clf:
        assert clf.pipeline.precision == "bf16" and isinstance(clf.pipeline.runner.compiled, _Frozen)
        assert clf.pipeline.runner.compiled_buckets == (4,)
        bf16 = scores(clf)
    with ImageClassifier.load(DEMO, device="cpu", overrides={**overrides, "precision": "fp32", "compile": False}) as clf:
        fp32 = scores(clf)
    assert [next(iter(r)) for r in bf16] == [next(iter(r)) for r in fp32]
    assert 0 < max(abs(b[k] - f[k]) for b, f in zip(bf16, fp32) for k in f) < 0.05
    assert any("with freezing" in r.getMessage() for r in caplog.records)


def test_a_model_without_a_linear_head_runs_all_in_bf16_and_says_so(caplog):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    converted = Bf16Model(model)
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    out = converted(torch.randn(2, 3, 4, 4))
    assert out.dtype == torch.float32 and torch.equal(out, out.to(torch.bfloat16).float())  # bf16 logits
    assert any("no nn.Linear classifier head" in r.getMessage() for r in caplog.records)
