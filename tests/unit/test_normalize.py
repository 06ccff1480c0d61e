import pytest
import torch

from handler.config import IMAGENET_MEAN, IMAGENET_STD
from handler.decode.normalize import Normalizer


def reference(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (2, 3, 7, 11), (1, 3, 1, 1)])
def test_matches_the_per_channel_formula_for_any_layout_and_size(channels_last, shape):
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    normalize = Normalizer(mean, std, torch.device("cpu"))
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    got = normalize(pixels)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, reference(pixels, mean, std), atol=1e-5)


def test_planes_are_cached_per_image_size_and_keep_their_channel_order():
    normalize = Normalizer(IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))
    for size in (8, 5, 8):
        white = torch.full((1, 3, size, size), 255, dtype=torch.uint8)
        got = normalize(white)
        want = reference(white, IMAGENET_MEAN, IMAGENET_STD)
        assert torch.allclose(got, want, atol=1e-5)
        assert len({round(v, 4) for v in got[0, :, 0, 0].tolist()}) == 3  # three distinct channels
    assert sorted(normalize._planes) == [(5, 5), (8, 8)]
