"""The batched (nvJPEG) decode path, run with a CPU device: same code, libjpeg-turbo underneath."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from handler.decode import gpu as gpu_decode
from handler.config import HandlerConfig
from handler.decode.dataset import LoaderItem
from handler.decode.gpu import BatchedJpegDecoder, apply_orientation, jpeg_job
from handler.doors.torchserve_handler import ImageBatchHandler
from helpers import FakeContext, encode, shape_image, write_model_dir

LABELS = ["circle", "square", "triangle"]


def asymmetric() -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(values.numpy())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillows_exif_transpose(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.open(io.BytesIO(encode(asymmetric(), "PNG", exif=exif)))
    want = torch.from_numpy(np.array(ImageOps.exif_transpose(stored))).permute(2, 0, 1)
    got = apply_orientation(torch.from_numpy(np.array(asymmetric())).permute(2, 0, 1), orientation)
    assert torch.equal(got, want)


def jpeg(mode: str = "RGB", size=(40, 30), **save_args) -> bytes:
    return encode(Image.new(mode, size, 200 if mode == "L" else None), "JPEG", **save_args)


def test_only_jpegs_nvjpeg_handles_are_routed_to_it():
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {
        "rgb": (jpeg(), 1),
        "grey": (jpeg("L"), 1),
        "rotated": (jpeg(exif=exif), 6),
        "png": (encode(Image.new("RGB", (4, 4))), None),
        "cmyk": (jpeg("CMYK"), None),
        "truncated": (jpeg()[:-40], None),
        "huge": (jpeg(size=(400, 300)), None),  # over the pixel limit below
    }
    for name, (data, orientation) in cases.items():
        job = jpeg_job(LoaderItem(0, data), max_pixels=100_000)
        assert (job.orientation if job else None) == orientation, name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from handler.model.architectures import ShapesNet

    torch.manual_seed(0)
    return write_model_dir(tmp_path_factory.mktemp("model"), ShapesNet(num_classes=3), LABELS)


@pytest.fixture(scope="module")
def handler(model_dir):
    settings = {"arch": "shapes_cnn", "image_size": 64, "resize_size": 72, "top_k": 2, "batch_size": 4,
                "num_workers": 2}
    instance = ImageBatchHandler()
    instance.initialize(FakeContext(str(model_dir), {"handler": settings}))
    yield instance
    instance.classifier.close()


def mixed_rows() -> list[dict]:
    jpegs = [bytearray(shape_image(LABELS[i % 3], seed=i, fmt="JPEG", max_side=140)) for i in range(9)]
    png = bytearray(shape_image("square", seed=50))
    return [
        {f"f{i}": img for i, img in enumerate(jpegs[:6])},
        {"a": jpegs[6], "b": png, "c": jpegs[7]},
        {"a": jpegs[8], "b": bytearray(jpeg()[:-40])},  # a truncated JPEG fails this request only
    ]


def answer(handler, rows):
    ctx = FakeContext(".", {})
    return [json.loads(b) for b in handler.handle(rows, ctx)], ctx.statuses


class CountingDecoder(BatchedJpegDecoder):
    decoded = 0

    def decode(self, jobs):
        batch = super().decode(jobs)
        self.decoded += len(batch.keys) if batch is not None else 0
        return batch


@pytest.mark.parametrize("ahead", [True, False])
def test_batched_decode_answers_like_the_cpu_loader(handler, monkeypatch, ahead):
    rows = mixed_rows()
    want, want_status = answer(handler, rows)
    pipeline = handler.classifier.pipeline
    monkeypatch.setattr(pipeline.decoding, "config", dataclasses.replace(pipeline.config, decode_ahead=ahead))
    decoder = CountingDecoder(pipeline.decoding.config, torch.device("cpu"))
    monkeypatch.setattr(pipeline.decoding, "jpeg_decoder", decoder)
    got, got_status = answer(handler, rows)
    assert decoder.decoded == 9  # every whole JPEG; the PNG and the truncated one took the CPU path
    assert got_status == want_status and set(got_status) == {2}
    assert got[2] == want[2]  # the same per-image error body
    for g_request, w_request in zip(got[:2], want[:2]):
        assert len(g_request) == len(w_request)
        for g, w in zip(g_request, w_request):
            assert list(g) == list(w) and g == pytest.approx(w, abs=0.02)


def test_a_list_nvjpeg_rejects_falls_back_to_the_cpu(handler, monkeypatch):
    rows = mixed_rows()
    want, want_status = answer(handler, rows)

    def rejects(*args, **kwargs):
        raise RuntimeError("nvjpegDecodeBatched failed")

    monkeypatch.setattr(gpu_decode, "decode_jpeg", rejects)
    monkeypatch.setattr(handler.classifier.pipeline.decoding, "jpeg_decoder", BatchedJpegDecoder(handler.classifier.config, torch.device("cpu")))
    got, got_status = answer(handler, rows)
    assert (got, got_status) == (want, want_status)


def test_decode_device_is_validated():
    with pytest.raises(ValueError, match="decode_device must be one of"):
        HandlerConfig.from_mapping({"decode_device": "gpu"})


def test_warm_up_tells_whether_the_decoder_works(monkeypatch):
    decoder = BatchedJpegDecoder(HandlerConfig(image_size=32, resize_size=32), torch.device("cpu"))
    assert decoder.warm_up()

    def rejects(*args, **kwargs):
        raise RuntimeError("nvjpeg unavailable")

    monkeypatch.setattr(gpu_decode, "decode_jpeg", rejects)
    assert not decoder.warm_up()


@pytest.mark.parametrize("mode", ["center_crop", "letterbox", "squash", "squash_center_crop", "border"])
def test_same_sized_images_resized_together_equal_one_by_one(mode):
    from torchvision.io import decode_jpeg

    from handler.decode.images import resize_to_input

    config = HandlerConfig(image_size=48, resize_size=55, resize_mode=mode, pad_value=(9, 8, 7), crop_offset="floor")
    rng = np.random.default_rng(1)
    sizes = [(120, 90), (120, 90), (90, 120), (120, 90), (64, 200)]
    data = [encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "JPEG") for w, h in sizes]
    jobs = [jpeg_job(LoaderItem(i, d), max_pixels=10**7) for i, d in enumerate(data)]
    batch = BatchedJpegDecoder(config, torch.device("cpu")).decode(jobs)
    assert batch.keys == [0, 1, 2, 3, 4]
    for row, d in zip(batch.pixels, data):
        one = resize_to_input(decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8)), config)
        assert torch.equal(row, one)


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_a_cpu_share_of_the_jpegs_goes_to_the_workers_with_the_same_answers(model_dir, share, monkeypatch):
    settings = {"arch": "shapes_cnn", "image_size": 64, "resize_size": 72, "top_k": 2, "batch_size": 4,
                "num_workers": 2, "cpu_decode_share": share}
    handler = ImageBatchHandler()
    handler.initialize(FakeContext(str(model_dir), {"handler": settings}))
    try:
        rows = mixed_rows()
        want, want_status = answer(handler, rows)
        decoder = CountingDecoder(handler.classifier.config, torch.device("cpu"))
        monkeypatch.setattr(handler.classifier.pipeline.decoding, "jpeg_decoder", decoder)
        got, got_status = answer(handler, rows)
        assert decoder.decoded == 9 - round(9 * share)  # the rest took the CPU workers
        assert got_status == want_status and got[2] == want[2]
        for g_request, w_request in zip(got[:2], want[:2]):
            for g, w in zip(g_request, w_request):
                assert list(g) == list(w) and g == pytest.approx(w, abs=0.02)
    finally:
        handler.classifier.close()
