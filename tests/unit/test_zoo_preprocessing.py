"""A zoo folder's evaluation preprocessing, as the pipeline builds the model input, against the zoo's
own transform on real photos: timm's ``create_transform`` of its resolved data config, and the
transformers image processor's PIL backend.

What may differ, and the bounds asserted here (in 0-255 pixel levels;
docs/serving-your-own-model.md): the pipeline decodes as Pillow does (the same libjpeg-turbo pixels) and takes the zoo's
sizes, crop offsets, padding and normalization exactly; only the resampling is torch's antialiased
uint8 resize instead of Pillow's. Both implement Pillow's filters and round between their two
passes; they land at most 1-2 levels apart, except where a bicubic overshoot is clipped between the
passes (a strong edge resized by close to 1x in one direction): up to 9 levels there, on fewer
than 0.1 % of the values.
"""

from __future__ import annotations

import math

import pytest
import torch

from handler.config import HandlerConfig
from handler.decode.images import ImageTransform, center_crop, resize_to_input
from handler.model.files import read_model
from handler.decode.normalize import Normalizer
from harness.zoo_folders import decoded, hf_folder, hf_reference, photos, timm_folder, timm_reference

PHOTOS = photos()

# (timm model with its pretrained tag, data_config as timm's export takes it)
TIMM_CASES = [
    pytest.param("resnet18.a1_in1k", None, id="center-bicubic-0.95-imagenet"),
    pytest.param("resnet18.tv_in1k", None, id="center-bilinear-0.875-imagenet"),
    pytest.param("vit_tiny_patch16_224.augreg_in21k_ft_in1k", None, id="center-bicubic-0.9-mean-std-0.5"),
    pytest.param("convnext_atto.d2_in1k", {"crop_mode": "squash", "crop_pct": 1.0, "interpolation": "bilinear"},
                 id="squash-bilinear-1.0"),
    pytest.param("resnet18.a1_in1k", {"crop_mode": "squash", "crop_pct": 0.9}, id="squash-bicubic-0.9"),
    pytest.param("resnet18.a1_in1k", {"crop_mode": "border", "crop_pct": 1.0}, id="border-bicubic-1.0"),
    pytest.param("resnet18.a1_in1k", {"crop_mode": "border", "crop_pct": 0.9, "interpolation": "bilinear"},
                 id="border-bilinear-0.9"),
]

# (processor class, its keyword arguments): the types the pipeline reproduces.
HF_CASES = [
    pytest.param("ViTImageProcessorPil", {}, id="vit-squash-224"),
    pytest.param("ConvNextImageProcessorPil", {"size": {"shortest_edge": 224}, "crop_pct": 0.875},
                 id="convnext-crop-224"),
    pytest.param("ConvNextImageProcessorPil", {"size": {"shortest_edge": 384}}, id="convnext-warp-384"),
    pytest.param("DeiTImageProcessorPil", {}, id="deit-256-crop-224"),
    pytest.param("BitImageProcessorPil", {}, id="bit-shortest-edge-crop"),
    pytest.param("CLIPImageProcessorPil", {}, id="clip"),
    pytest.param("BeitImageProcessorPil", {}, id="beit"),
    pytest.param("MobileNetV1ImageProcessorPil", {}, id="mobilenet-v1"),
    pytest.param("SiglipImageProcessorPil", {}, id="siglip"),
    pytest.param("PvtImageProcessorPil", {}, id="pvt"),
    pytest.param("ViTImageProcessorPil", {"do_rescale": False, "image_mean": [127.5, 120.0, 110.0],
                                          "image_std": [60.0, 61.0, 62.0]}, id="vit-no-rescale"),
    pytest.param("ViTImageProcessorPil", {"do_normalize": False}, id="vit-no-normalize"),
]


def pipeline_inputs(folder, overrides=None) -> tuple[torch.Tensor, HandlerConfig]:
    """The normalized model input the pipeline builds for each photo (decode and resize as the
    loader workers run them, normalization as on the device)."""
    config = read_model(folder, overrides).config
    transform, normalize = ImageTransform(config), Normalizer(config.mean, config.std, torch.device("cpu"))
    return torch.cat([normalize(transform(data)[None]) for _, data in PHOTOS]), config


def assert_close_to_reference(ours: torch.Tensor, reference: torch.Tensor, std: torch.Tensor) -> None:
    """The bounds of the module docstring, per photo, in pixel levels."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    levels = (ours - reference).abs() * std.view(1, 3, 1, 1) * 255
    for (name, _), diff in zip(PHOTOS, levels):
        assert float(diff.max()) <= 9.01, (name, float(diff.max()))
        assert float((diff > 2.01).float().mean()) < 1e-3, (name, float((diff > 2.01).float().mean()))
        assert float(diff.mean()) < 0.25, (name, float(diff.mean()))


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.mark.parametrize(("model_name", "data_config"), TIMM_CASES)
def test_timm_model_input_matches_create_transform(zoo_dir, model_name, data_config):
    folder = timm_folder(zoo_dir / f"{model_name}-{len(list(zoo_dir.iterdir()))}", model_name,
                         data_config=data_config, sensitive=False)
    model, transform = timm_reference(folder)
    from timm.data import resolve_model_data_config

    resolved = resolve_model_data_config(model)
    ours, config = pipeline_inputs(folder)
    # The settings are timm's own, not torchvision's 256 -> 224 bilinear.
    assert config.image_size == resolved["input_size"][1]
    assert config.interpolation == resolved["interpolation"]
    assert config.mean == pytest.approx(resolved["mean"]) and config.std == pytest.approx(resolved["std"])
    if resolved["crop_pct"] != 1.0 or resolved["crop_mode"] != "squash":
        assert config.resize_size == math.floor(config.image_size / resolved["crop_pct"])
    reference = torch.stack([transform(decoded(data)) for _, data in PHOTOS])
    assert_close_to_reference(ours, reference, torch.tensor(resolved["std"]))


def test_timm_test_size_is_an_opt_in(zoo_dir):
    folder = timm_folder(zoo_dir / "test-size", "resnet18.a1_in1k", sensitive=False)
    model, transform = timm_reference(folder, use_test_size=True)
    assert read_model(folder).config.image_size == 224  # input_size unless asked
    ours, config = pipeline_inputs(folder, {"use_test_size": True})
    assert (config.image_size, config.resize_size) == (288, 288)  # test_input_size 288 at test_crop_pct 1.0
    reference = torch.stack([transform(decoded(data)) for _, data in PHOTOS])
    assert_close_to_reference(ours, reference, torch.tensor(config.std))


@pytest.mark.parametrize(("processor_class", "kwargs"), HF_CASES)
def test_transformers_model_input_matches_the_processors_pil_backend(zoo_dir, processor_class, kwargs):
    import transformers

    folder = hf_folder(zoo_dir / f"{processor_class}-{len(list(zoo_dir.iterdir()))}", "vit", sensitive=False)
    processor = getattr(transformers, processor_class)(**kwargs)
    processor.save_pretrained(folder)  # replaces the ViT processor hf_folder saved
    _, transform = hf_reference(folder)
    ours, config = pipeline_inputs(folder)
    assert config.crop_offset == "floor"
    reference = torch.stack([transform(decoded(data)) for _, data in PHOTOS])
    # The processor's own scale: its std (after rescaling), in levels.
    factor = processor.rescale_factor if processor.do_rescale else 1.0
    std = torch.tensor(processor.image_std if processor.do_normalize else [1.0] * 3) / (255 * factor)
    assert_close_to_reference(ours, reference, std)


@pytest.mark.parametrize("size", [(300, 451), (301, 450), (257, 256), (259, 259), (300, 225)])
def test_centre_crop_offsets_are_each_librarys(size):
    from torchvision.transforms.v2 import functional as TF
    from transformers.image_transforms import center_crop as hf_center_crop

    pixels = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(center_crop(pixels, 224, "round"), TF.center_crop(pixels, [224, 224]))
    expected = torch.from_numpy(hf_center_crop(pixels.numpy(), (224, 224), input_data_format="channels_first"))
    assert torch.equal(center_crop(pixels, 224, "floor"), expected)


@pytest.mark.parametrize("size", [(300, 451), (451, 300), (100, 67), (224, 224), (1000, 90)])
@pytest.mark.parametrize("crop_pct", [1.0, 0.9, 0.95])  # 224, 248, 235: even and odd margins
def test_border_is_timms_resize_keep_ratio_then_centre_crop_or_pad(size, crop_pct):
    from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio

    scale = math.floor(224 / crop_pct)
    fill = (124, 116, 104)
    config = HandlerConfig(image_size=224, resize_size=scale, resize_mode="border", pad_value=fill,
                           interpolation="bilinear")

    def timm_border(pixels: torch.Tensor) -> torch.Tensor:
        # timm's own transforms on tensors (torchvision's v1 resize kernel; its padding takes one
        # fill value on tensors: one channel at a time).
        resized = ResizeKeepRatio(scale, longest=1.0, interpolation="bilinear")(pixels)
        return torch.cat([CenterCropOrPad(224, fill=value)(resized[c : c + 1]) for c, value in enumerate(fill)])

    # A flat colour resizes to itself under any kernel: sizes, offsets and padding compare exactly.
    flat = torch.full((3, *size), 200, dtype=torch.uint8)
    assert torch.equal(resize_to_input(flat, config), timm_border(flat))
    noise = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert int((resize_to_input(noise, config).int() - timm_border(noise).int()).abs().max()) <= 1


@pytest.mark.parametrize("size", [(300, 451), (451, 300), (100, 67)])
@pytest.mark.parametrize("scale", [248, 235])  # even and odd margins
def test_squash_center_crop_is_resize_to_a_square_then_centre_crop(size, scale):
    from torchvision.transforms import v2
    from transformers.image_transforms import center_crop as hf_center_crop

    pixels = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    squashed = v2.Resize((scale, scale), antialias=True)(pixels)
    config = HandlerConfig(image_size=224, resize_size=scale, resize_mode="squash_center_crop")
    assert torch.equal(resize_to_input(pixels, config), v2.CenterCrop(224)(squashed))  # timm's, round
    floor = HandlerConfig(image_size=224, resize_size=scale, resize_mode="squash_center_crop", crop_offset="floor")
    expected = torch.from_numpy(hf_center_crop(squashed.numpy(), (224, 224), input_data_format="channels_first"))
    assert torch.equal(resize_to_input(pixels, floor), expected)  # Hugging Face's (DeiT), floor
