import sys

import numpy as np
import torch
from PIL import Image

from bench_images import stock_transform


def test_the_recreated_stock_transform_matches_torchserves(monkeypatch):
    from ts.torch_handler.image_classifier import ImageClassifier

    real = ImageClassifier.image_processing
    monkeypatch.setitem(sys.modules, "ts.torch_handler.image_classifier", None)  # "not installed"
    recreated = stock_transform()
    assert recreated is not real
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))
    assert torch.equal(recreated(image), real(image))
