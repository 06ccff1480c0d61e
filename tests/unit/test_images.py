import io

import numpy as np
import pytest
import torch
from PIL import Image

from handler.config import HandlerConfig
from handler.decode.images import ImageDecodeError, ImageTransform
from helpers import encode

CROP = HandlerConfig(image_size=32, resize_size=40)
LETTERBOX = HandlerConfig(image_size=32, resize_mode="letterbox", pad_value=7)


def solid(mode: str, size=(50, 30), colour=None) -> Image.Image:
    return Image.new(mode, size, colour if colour is not None else 128)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encode(solid("RGB", colour=(200, 10, 10)), "JPEG"), id="jpeg"),
        pytest.param(encode(solid("RGB", colour=(200, 10, 10)), "JPEG", progressive=True), id="progressive-jpeg"),
        pytest.param(encode(solid("CMYK", colour=(0, 0, 0, 0)), "JPEG"), id="cmyk-jpeg"),
        pytest.param(encode(solid("L")), id="grayscale"),
        pytest.param(encode(solid("LA", colour=(10, 255))), id="grayscale-alpha"),
        pytest.param(encode(solid("RGB").convert("P")), id="palette"),
        pytest.param(encode(solid("RGBA", colour=(1, 2, 3, 255))), id="rgba"),
        pytest.param(encode(solid("1", colour=1)), id="1-bit"),
        pytest.param(encode(solid("RGB"), "WEBP"), id="webp"),
        pytest.param(encode(solid("RGB"), "BMP"), id="bmp"),
        pytest.param(encode(solid("RGB"), "TIFF"), id="tiff"),
        pytest.param(encode(solid("RGB"), "GIF"), id="gif"),
        pytest.param(encode(solid("RGB", (1, 1))), id="1x1"),
        pytest.param(encode(solid("RGB", (8000, 16))), id="8000x16"),
    ],
)
@pytest.mark.parametrize("config", [CROP, LETTERBOX], ids=["center_crop", "letterbox"])
def test_every_supported_image_becomes_a_uint8_rgb_square(data, config):
    pixels = ImageTransform(config)(data)
    assert pixels.dtype == torch.uint8
    assert tuple(pixels.shape) == (3, config.image_size, config.image_size)


def test_16_bit_png_is_scaled_not_clipped():
    values = np.full((20, 20), 32896, dtype=np.uint16)  # mid-grey in 16 bits
    pixels = ImageTransform(CROP)(encode(Image.fromarray(values)))
    assert int(pixels.float().mean().round()) == 128, pixels.float().mean()


def test_transparent_pixels_show_white():
    pixels = ImageTransform(CROP)(encode(solid("RGBA", colour=(0, 0, 0, 0))))
    assert int(pixels.min()) == 255


@pytest.mark.parametrize(
    ("side", "fmt"),
    [
        pytest.param(40, "JPEG", id="jpeg-libjpeg-turbo"),
        pytest.param(400, "JPEG", id="jpeg-pil-draft"),  # >= 2x the resize side: DCT-scaled by PIL
        pytest.param(40, "PNG", id="png-pil"),
    ],
)
def test_exif_orientation_is_applied_before_the_crop(side, fmt):
    # Left half red, right half blue, stored with "rotate 90" in EXIF: upright, red is on top.
    image = Image.new("RGB", (side * 3 // 2, side), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, side * 3 // 4, side))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = encode(image, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    pixels = ImageTransform(HandlerConfig(image_size=40, resize_size=40)).__call__(data).float()
    top, bottom = pixels[:, :10, :], pixels[:, -10:, :]
    assert top[0].mean() > 200 and top[2].mean() < 60, top.mean(dim=(1, 2))
    assert bottom[2].mean() > 200 and bottom[0].mean() < 60, bottom.mean(dim=(1, 2))


def test_letterbox_keeps_the_whole_image_and_pads():
    pixels = ImageTransform(LETTERBOX)(encode(solid("RGB", (64, 16), (255, 255, 255))))
    assert int(pixels[:, 16, :].min()) == 255  # the image row through the middle
    assert int(pixels[:, 0, :].max()) == 7  # padding above


def test_animated_gif_uses_first_frame():
    frames = [solid("RGB", colour=(255, 0, 0)), solid("RGB", colour=(0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    pixels = ImageTransform(CROP)(buffer.getvalue()).float()
    assert pixels[0].mean() > 200 and pixels[2].mean() < 60


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(b"\x00\x01 random bytes" * 10, 400, id="random-bytes"),
        pytest.param(b"just some text, not an image", 400, id="text"),
        pytest.param(encode(solid("RGB", (300, 300)), "JPEG")[:300], 400, id="truncated-jpeg"),
        pytest.param(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 400, id="svg"),
        pytest.param(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 400, id="pdf"),
        pytest.param(encode(solid("L", (3000, 2000))), 413, id="too-many-pixels"),
    ],
)
def test_undecodable_or_oversized_images_raise_with_status(data, status):
    config = HandlerConfig(image_size=32, resize_size=40, max_image_pixels=5_000_000)
    with pytest.raises(ImageDecodeError) as caught:
        ImageTransform(config)(data)
    assert caught.value.status == status, caught.value.reason
    assert caught.value.reason


def test_fast_jpeg_decode_matches_pillow():
    from handler.decode.images import open_image, resize_to_input, to_rgb_tensor
    import harness.shapes as shapes
    import random

    spec = shapes.random_spec(random.Random(5), "circle", min_side=300, max_side=400)
    data = encode(shapes.draw(spec), "JPEG", quality=90)
    fast = ImageTransform(CROP)(data).float()
    pil = resize_to_input(to_rgb_tensor(open_image(data, 10**9)), CROP).float()
    assert (fast - pil).abs().mean() < 1.5, (fast - pil).abs().mean()


def test_truncated_jpeg_is_not_silently_padded():
    data = encode(solid("RGB", (300, 300), (10, 200, 30)), "JPEG")
    with pytest.raises(ImageDecodeError):
        ImageTransform(CROP)(data[: len(data) // 2])


@pytest.mark.parametrize("size", [(640, 480), (333, 500), (256, 256), (1000, 300)])
def test_center_crop_matches_torchvision_resize_then_crop(size):
    from torchvision.transforms import v2

    from handler.decode.images import resize_to_input

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, size[1], size[0]), dtype=torch.uint8, generator=generator)
    reference = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])(pixels)
    ours = resize_to_input(pixels.permute(1, 2, 0).contiguous().permute(2, 0, 1), HandlerConfig())
    assert ours.shape == reference.shape
    assert (ours.int() - reference.int()).abs().max() <= 1


@pytest.mark.parametrize(
    ("settings", "source", "decoded"),
    [
        pytest.param({}, (4032, 3024), (1008, 756), id="margin-1.5-stops-at-1/4"),
        pytest.param({"jpeg_draft_margin": 1.0}, (4032, 3024), (504, 378), id="margin-1-goes-to-1/8"),
        pytest.param({}, (1280, 960), (640, 480), id="1280-halved"),
        pytest.param({}, (640, 480), (640, 480), id="640-not-scaled"),
    ],
)
def test_dct_scaling_keeps_the_margin_for_the_antialiased_resize(settings, source, decoded):
    from handler.decode.images import draft_target

    target = draft_target(HandlerConfig(**settings))
    image = Image.open(io.BytesIO(encode(Image.new("RGB", source), "JPEG")))
    image.draft("RGB", (target, target))
    assert image.size == decoded


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_each_interpolation_stays_close_to_the_stock_pil_pipeline_on_a_real_photo(interpolation):
    """The uint8 fast path against torchvision's PIL Resize + CenterCrop with the same filter."""
    from torchvision.transforms import InterpolationMode, v2

    from harness.ts_server import ROOT

    data = (ROOT / "tests" / "data" / "coffee.jpg").read_bytes()
    config = HandlerConfig(interpolation=interpolation)
    stock = v2.Compose([v2.Resize(256, interpolation=InterpolationMode(interpolation)), v2.CenterCrop(224),
                        v2.PILToTensor()])(Image.open(io.BytesIO(data)).convert("RGB"))
    ours = ImageTransform(config)(data)
    other = ImageTransform(HandlerConfig(interpolation={"bilinear": "bicubic", "bicubic": "bilinear"}[interpolation]))(data)
    diff = (ours.float() - stock.float()).abs()
    assert diff.mean() < 0.05 and diff.max() <= 2, (diff.mean(), diff.max())
    # The filter is really applied: the other one is measurably further from this stock pipeline.
    assert (other.float() - stock.float()).abs().mean() > 0.3


# ---- DCT-scaled decodes by simplejpeg (handler.decode.images.decode_jpeg_scaled) ----------------------


def _photo_jpeg(size=(1600, 1200), mode="RGB", **save_args) -> bytes:
    """tests/data/coffee.jpg enlarged to ``size`` (a real photo, not a flat colour), re-encoded."""
    from harness.ts_server import ROOT

    image = Image.open(ROOT / "tests" / "data" / "coffee.jpg").convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return encode(image.convert(mode), "JPEG", quality=90, **save_args)


@pytest.fixture
def decodes(monkeypatch):
    """Spies: the (H, W) of every image that reaches the resize, and the simplejpeg decodes made."""
    import handler.decode.images as images

    seen = {"resize": [], "simplejpeg": 0}
    resize = images.resize_to_input

    def spy_resize(pixels, config):
        seen["resize"].append(tuple(pixels.shape[-2:]))
        return resize(pixels, config)

    monkeypatch.setattr(images, "resize_to_input", spy_resize)
    if images.simplejpeg is not None:
        decode = images.simplejpeg.decode_jpeg

        def spy_decode(*args, **kwargs):
            seen["simplejpeg"] += 1
            return decode(*args, **kwargs)

        monkeypatch.setattr(images.simplejpeg, "decode_jpeg", spy_decode)
    return seen


@pytest.mark.parametrize(
    ("settings", "source", "decoded"),
    [
        pytest.param({}, (4032, 3024), (756, 1008), id="margin-1.5-quarter"),
        pytest.param({"jpeg_draft_margin": 1.0}, (4032, 3024), (378, 504), id="margin-1-eighth"),
        pytest.param({}, (1600, 1200), (600, 800), id="half-not-3/8"),  # 3/8 (450) would also fit 384
        pytest.param({}, (1080, 1920), (960, 540), id="portrait-half-not-3/8"),
    ],
)
def test_large_jpeg_is_dct_scaled_by_simplejpeg_at_the_drafts_factor(decodes, settings, source, decoded):
    pytest.importorskip("simplejpeg")
    ImageTransform(HandlerConfig(**settings))(_photo_jpeg(source))
    assert decodes["resize"] == [decoded]
    assert decodes["simplejpeg"] == 1


def test_small_jpeg_and_disabled_draft_decode_full_size_without_simplejpeg(decodes):
    pytest.importorskip("simplejpeg")
    ImageTransform(HandlerConfig())(_photo_jpeg((640, 480)))  # short side < 2 x 384
    ImageTransform(HandlerConfig(jpeg_draft=False))(_photo_jpeg((1600, 1200)))
    assert decodes["resize"] == [(480, 640), (1200, 1600)]
    assert decodes["simplejpeg"] == 0


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_scaled_decode_matches_pillows_draft(monkeypatch, decodes, interpolation):
    """The same factor as Pillow's draft, so (libjpeg-turbo on both sides) the same input."""
    pytest.importorskip("simplejpeg")
    import handler.decode.images as images

    data, config = _photo_jpeg((1600, 1200)), HandlerConfig(interpolation=interpolation)
    fast = ImageTransform(config)(data).float()
    monkeypatch.setattr(images, "simplejpeg", None)  # as if not installed: Pillow's draft
    draft = ImageTransform(config)(data).float()
    assert decodes["simplejpeg"] == 1 and decodes["resize"] == [(600, 800), (600, 800)]
    diff = (fast - draft).abs()
    assert diff.mean() < 0.05 and diff.max() <= 2, (diff.mean(), diff.max())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_large_jpeg_is_still_rotated(decodes, orientation):
    # Top half red, bottom half blue as displayed; stored as the inverse of the EXIF rotation.
    upright = Image.new("RGB", (1200, 1600), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 1200, 800))
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = ImageTransform(HandlerConfig())(encode(stored, "JPEG", quality=95, exif=exif)).float()
    top, bottom = pixels[:, :50, :], pixels[:, -50:, :]
    assert top[0].mean() > 200 and top[2].mean() < 60, top.mean(dim=(1, 2))
    assert bottom[2].mean() > 200 and bottom[0].mean() < 60, bottom.mean(dim=(1, 2))
    assert decodes["simplejpeg"] == 0  # simplejpeg ignores EXIF: Pillow decoded it


def test_exif_without_rotation_still_takes_simplejpeg(decodes):
    pytest.importorskip("simplejpeg")
    exif = Image.Exif()
    exif[0x0112] = 1
    ImageTransform(HandlerConfig())(_photo_jpeg((1600, 1200), exif=exif))
    assert decodes["simplejpeg"] == 1


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_large_jpeg_fails_as_invalid_image(cut):
    data = _photo_jpeg((1600, 1200))
    with pytest.raises(ImageDecodeError) as caught:
        ImageTransform(HandlerConfig())(data[: int(len(data) * cut)])
    assert caught.value.code == "invalid_image", caught.value.reason


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        pytest.param("L", 90, (90, 90, 90), id="grayscale"),
        pytest.param("CMYK", (0, 255, 255, 0), (255, 0, 0), id="cmyk-red"),
        pytest.param("CMYK", (255, 0, 255, 0), (0, 255, 0), id="cmyk-green"),
    ],
)
@pytest.mark.parametrize("installed", [True, False], ids=["simplejpeg", "no-simplejpeg"])
def test_large_grayscale_and_cmyk_jpegs_decode(monkeypatch, decodes, mode, colour, expected, installed):
    import handler.decode.images as images

    if not installed:
        monkeypatch.setattr(images, "simplejpeg", None)
    pixels = ImageTransform(HandlerConfig())(encode(Image.new(mode, (1600, 1200), colour), "JPEG", quality=95))
    assert decodes["resize"] == [(600, 800)]
    mean = pixels.float().mean(dim=(1, 2))
    assert (mean - torch.tensor(expected, dtype=torch.float)).abs().max() < 4, mean
    assert decodes["simplejpeg"] == (1 if mode == "L" and installed and images.simplejpeg is not None else 0)
