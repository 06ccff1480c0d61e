import sys
import types

import numpy as np
import torch
from PIL import Image

from harness.bench_images import stock_transform


def test_the_recreated_stock_transform_matches_torchserves(monkeypatch):
    try:
        import captum.attr  # noqa: F401  (the stock vision handler imports it; only --bench installs it)
    except ImportError:
        attr = types.ModuleType("captum.attr")
        attr.IntegratedGradients = object
        monkeypatch.setitem(sys.modules, "captum", types.ModuleType("captum"))
        monkeypatch.setitem(sys.modules, "captum.attr", attr)
    from ts.torch_handler.image_classifier import ImageClassifier

    real = ImageClassifier.image_processing
    monkeypatch.setitem(sys.modules, "ts.torch_handler.image_classifier", None)  # "not installed"
    recreated = stock_transform()
    assert recreated is not real
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))
    assert torch.equal(recreated(image), real(image))
