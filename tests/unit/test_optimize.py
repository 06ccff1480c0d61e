import pytest
import torch
import torchvision
from torch import nn

from handler.model.architectures import ShapesNet
from handler.model.optimize import fold_batchnorm
from handler.classifier import ImageClassifier, read_model
from helpers import assert_same_answers, shape_image, write_model_dir

EXAMPLE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def with_trained_statistics(model: nn.Module) -> nn.Module:
    """Fresh BatchNorm layers are identities; give them statistics so folding has work to do."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator))
    return model.eval()


@pytest.mark.parametrize("build", [lambda: ShapesNet(num_classes=3), lambda: torchvision.models.resnet18(num_classes=7)],
                         ids=["shapes_cnn", "resnet18"])
def test_folding_removes_every_batchnorm_and_keeps_the_outputs(build):
    torch.manual_seed(0)
    model = with_trained_statistics(build())
    folded = fold_batchnorm(model, EXAMPLE)
    assert batchnorms(model) > 0 and batchnorms(folded) == 0
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want, got = model(x), folded(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


class DataDependent(nn.Module):
    """Branches on the values of its input: symbolic tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if x.sum() > 0 else -y


def test_a_model_that_cannot_be_traced_is_served_unchanged():
    model = DataDependent().eval()
    assert fold_batchnorm(model, EXAMPLE) is model


def test_a_fold_that_changes_the_outputs_is_not_used(monkeypatch):
    model = with_trained_statistics(ShapesNet(num_classes=3))

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return model(x) + 1.0

    monkeypatch.setattr("torch.fx.experimental.optimization.fuse", lambda m: Broken())
    assert fold_batchnorm(model, EXAMPLE) is model


def test_a_model_without_batchnorm_is_returned_as_is():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    assert fold_batchnorm(model, EXAMPLE) is model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = with_trained_statistics(ShapesNet(num_classes=3))
    return write_model_dir(tmp_path_factory.mktemp("model"), model, ["circle", "square", "triangle"])


def answers(model_dir, settings: dict, compiled: tuple[int, ...] | None = None) -> list[dict]:
    """Six shapes classified with these settings; ``compiled``: the batch sizes that must have
    been compiled (None: not checked)."""
    # fp32: compiled and eager answers agree to 1e-4 there (in bf16 they differ by rounding).
    base = {"arch": "shapes_cnn", "image_size": 64, "resize_mode": "letterbox", "top_k": 3, "batch_size": 4,
            "num_workers": 0, "precision": "fp32", "runtime": "torch"}
    images = [shape_image(("circle", "square", "triangle")[i % 3], seed=i) for i in range(6)]
    with ImageClassifier(read_model(model_dir, {**base, **settings}), device="cpu") as classifier:
        if compiled is not None:
            assert classifier.pipeline.runner.compiled_buckets == compiled
        results = classifier.classify(images)
    assert len(results) == 6
    return results


def test_folded_and_compiled_handlers_answer_like_the_plain_one(model_dir, real_compiler):
    plain = answers(model_dir, {"fuse_batchnorm": False, "compile": False})
    assert_same_answers(answers(model_dir, {"compile": False}, compiled=()), plain)  # folding is on by default
    # 6 images in batches of 4: a full batch of 4 and one of 2 padded up to the bucket of 4.
    assert_same_answers(answers(model_dir, {"compile": True, "batch_buckets": [4]}, compiled=(4,)), plain)


def test_auto_compiles_where_a_compiler_works_within_the_budget_and_the_rest_runs_eager(model_dir, real_compiler,
                                                                                        caplog):
    plain = answers(model_dir, {"compile": False})
    caplog.set_level("INFO", logger="handler.model.runner")
    # The default is auto; a budget this small lets only the first (largest) bucket start.
    got = answers(model_dir, {"batch_buckets": [2, 4], "compile_budget_s": 1e-6}, compiled=(4,))
    assert_same_answers(got, plain)
    (line,) = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert "auto and a C++ compiler works" in line and "batch sizes [2] run eager" in line, line


def test_without_a_compiler_auto_serves_eager_with_one_log_line(model_dir, caplog):
    caplog.set_level("INFO", logger="handler.model.runner")
    assert_same_answers(answers(model_dir, {}, compiled=()), answers(model_dir, {"compile": False}))
    lines = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(lines) == 2 and "torch.compile off (handler.compile is auto but no working C++ compiler" in lines[0]
    assert "serving the eager model" in lines[0] and "handler.compile is false" in lines[1]


def test_a_failed_compile_falls_back_to_eager(model_dir, monkeypatch, caplog):
    class FailsToCompile(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self._orig_mod = model  # what torch.compile's wrapper calls the eager model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("inductor: no C++ compiler found")

    monkeypatch.setattr("handler.model.runner.compile_model", lambda model, mode, freeze: FailsToCompile(model))
    plain = answers(model_dir, {"compile": False})
    assert_same_answers(answers(model_dir, {"compile": True, "batch_buckets": [4]}, compiled=()), plain)
    assert "torch.compile failed" in caplog.text
