"""handler.weights: a torchvision preset's preprocessing, and an archive built with it."""

import subprocess
import sys

import pytest
import torch
import torchvision
import yaml
from PIL import Image

from handler.classifier import ImageClassifier
from handler.config import HandlerConfig
from handler.decode.dataset import LoaderItem
from harness.ts_server import ROOT

PHOTO = ROOT / "tests" / "data" / "coffee.jpg"


def test_a_preset_fills_the_preprocessing_keys_and_explicit_keys_win():
    config = HandlerConfig.from_mapping({"arch": "resnet50", "weights": "ResNet50_Weights.IMAGENET1K_V2"})
    assert (config.image_size, config.resize_size, config.interpolation) == (224, 232, "bilinear")
    assert config.mean == (0.485, 0.456, 0.406) and config.std == (0.229, 0.224, 0.225)
    b1 = HandlerConfig.from_mapping({"arch": "efficientnet_b1", "weights": "EfficientNet_B1_Weights.IMAGENET1K_V1"})
    assert (b1.image_size, b1.resize_size, b1.interpolation) == (240, 256, "bicubic")
    mine = HandlerConfig.from_mapping({"arch": "resnet50", "weights": "ResNet50_Weights.IMAGENET1K_V2",
                                       "resize_size": 256})
    assert mine.resize_size == 256 and mine.image_size == 224


@pytest.mark.parametrize(("settings", "message"), [
    ({"arch": "resnet50", "weights": "ResNet50_Weights.NOPE"}, "not a torchvision weights name"),
    ({"arch": "resnet50", "weights": "Nope_Weights.X"}, "not a torchvision weights name"),
    ({"arch": "resnet50", "weights": "ResNet18_Weights.IMAGENET1K_V1"}, "another architecture"),
    ({"arch": "resnet50", "weights": 5}, "must be a non-empty string"),
    ({"interpolation": "nearest"}, "interpolation must be one of"),
])
def test_bad_presets_and_interpolations_are_errors_that_say_so(settings, message):
    with pytest.raises(ValueError, match=message):
        HandlerConfig.from_mapping(settings)


def test_an_archive_built_with_a_preset_feeds_the_model_what_torchvision_s_transforms_give(tmp_path):
    """build_mar.py --arch resnet18 --config C (weights: ResNet18_Weights.IMAGENET1K_V1): the model
    input matches ResNet18_Weights.IMAGENET1K_V1.transforms() on the same photo."""
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "w.pth")
    (tmp_path / "labels.json").write_text('{"0": "a", "1": "b", "2": "c"}')
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"handler": {"weights": "ResNet18_Weights.IMAGENET1K_V1", "num_workers": 0}}))
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--arch", "resnet18", "--weights", str(tmp_path / "w.pth"),
         "--labels", str(tmp_path / "labels.json"), "--name", "preset", "--config", str(tmp_path / "config.yaml"),
         "--export-path", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    want = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()(Image.open(PHOTO).convert("RGB"))
    with ImageClassifier.load(tmp_path / "preset.mar", device="cpu") as clf:
        assert clf.config.weights == "ResNet18_Weights.IMAGENET1K_V1"
        (batch,) = clf.pipeline.decode([LoaderItem(0, PHOTO.read_bytes())])
        got = clf.pipeline.to_model_input(batch.pixels)[0]
    assert got.shape == want.shape == (3, 224, 224)
    diff = (got - want).abs()
    # Normalized units: 0.02 is about a 1/255 step of one pixel.
    assert diff.mean() < 0.002 and diff.max() < 0.1, (diff.mean(), diff.max())
