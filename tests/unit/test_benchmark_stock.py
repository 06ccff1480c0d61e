"""benchmark.py gives the stock handler a real model's own preprocessing: the same PIL steps
the agreement script calls the stock pipeline, in a handler module TorchServe can load."""

import io
import types

import pytest
import torch
import yaml
from PIL import Image

from helpers import load_command

stock_pipeline = load_command("benchmarks/agreement.py").stock_pipeline
stock_handler_file = load_command("benchmarks/benchmark.py").stock_handler_file
from handler.config import HandlerConfig
from helpers import shape_image
from harness.ts_server import ROOT

pytest.importorskip("ts")

LITE0 = yaml.safe_load((ROOT / "models" / "efficientnet_lite0" / "model-config.yaml").read_text())["handler"]


def load_module(source: str) -> types.ModuleType:
    module = types.ModuleType("stock_handler")
    exec(compile(source, "stock_handler.py", "exec"), module.__dict__)
    return module


def test_the_stock_subclass_preprocesses_as_the_model_does():
    from ts.torch_handler.image_classifier import ImageClassifier as Stock
    from ts.utils.util import list_classes_from_module

    module = load_module(stock_handler_file(LITE0))
    classes = list_classes_from_module(module)  # what TorchServe's model loader looks for
    assert len(classes) == 1 and issubclass(classes[0], Stock)
    photo = shape_image("circle", seed=1, fmt="JPEG", min_side=300, max_side=500)
    got = classes[0].image_processing(Image.open(io.BytesIO(photo)).convert("RGB"))
    want = stock_pipeline(HandlerConfig.from_mapping(LITE0))([photo])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    imagenet = Stock.image_processing(Image.open(io.BytesIO(photo)).convert("RGB"))
    assert (got - imagenet).abs().max() > 0.1  # the model's normalization, not ImageNet's
