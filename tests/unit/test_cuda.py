"""The CUDA paths, against the same handler on the CPU; skipped where there is no GPU (CI).

Run on a GPU machine with ``python -m pytest tests/unit/test_cuda.py``. The demo model's trained
weights make top-1 answers clear-cut, so CPU and GPU must agree on every label.
"""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from handler.doors.torchserve_handler import ImageBatchHandler
from helpers import FakeContext, encode, shape_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LABELS = ["circle", "square", "triangle"]
DEMO_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes"

CONFIGS = {
    "fp32": {},
    "fp16-buckets-cudnn": {"precision": "fp16", "batch_buckets": [4, 8], "cudnn_benchmark": True},
    "bf16-nvjpeg": {"precision": "bf16", "decode_device": "cuda", "batch_buckets": [8]},
    "fp16-nvjpeg-cpu-share": {"precision": "fp16", "decode_device": "cuda", "batch_buckets": [8],
                              "cpu_decode_share": 0.5, "loader_batch_size": 2},
    "fp16-nvjpeg-compile": {"precision": "fp16", "decode_device": "cuda", "batch_buckets": [8], "compile": True},
}
# Of mixed_rows' 27 images, the JPEGs nvJPEG takes: all but the PNG and the truncated one.
WHOLE_JPEGS = 25


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo")
    shutil.copy(DEMO_DIR / "shapes_cnn.pt", directory / "weights.pt")
    shutil.copy(DEMO_DIR / "index_to_name.json", directory / "index_to_name.json")
    return directory


def settings(**overrides) -> dict:
    base = yaml.safe_load((DEMO_DIR / "model-config.yaml").read_text())["handler"]
    return {**base, "batch_size": 8, "num_workers": 3, **overrides}


def start(model_dir, gpu: bool, **overrides) -> ImageBatchHandler:
    handler = ImageBatchHandler()
    handler.initialize(FakeContext(str(model_dir), {"handler": settings(**overrides)}, gpu_id=0 if gpu else None))
    return handler


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    image = Image.open(io.BytesIO(shape_image("triangle", seed=77, fmt="JPEG")))
    return encode(image, "JPEG", exif=exif, quality=90)


def mixed_rows() -> list[dict]:
    """Three requests: JPEGs of many sizes (some large enough for DCT scaling), a PNG, a grey
    and a rotated JPEG, and a request with a truncated JPEG that must fail alone."""
    jpegs = [bytearray(shape_image(LABELS[i % 3], seed=i, fmt="JPEG", max_side=200 + 150 * (i % 5)))
             for i in range(23)]
    grey = bytearray(encode(Image.open(io.BytesIO(jpegs[0])).convert("L"), "JPEG"))
    return [
        {f"f{i}": img for i, img in enumerate(jpegs[:17])},
        {"png": bytearray(shape_image("square", seed=50)), "grey": grey, "rotated": bytearray(rotated_jpeg()),
         **{f"g{i}": img for i, img in enumerate(jpegs[17:22])}},
        {"a": jpegs[22], "b": bytearray(jpegs[3][:-300])},
    ]


def answer(handler: ImageBatchHandler, rows: list[dict]) -> tuple[list, dict, FakeContext]:
    context = FakeContext(".", {})
    bodies = [json.loads(body) for body in handler.handle(rows, context)]
    return bodies, context.statuses, context


@pytest.fixture(scope="module")
def cpu_answers(model_dir):
    handler = start(model_dir, gpu=False)
    try:
        bodies, statuses, _ = answer(handler, mixed_rows())
    finally:
        handler.classifier.close()
    return bodies, statuses


@pytest.mark.parametrize("name", CONFIGS)
def test_cuda_answers_like_the_cpu(model_dir, cpu_answers, name):
    want, want_statuses = cpu_answers
    handler = start(model_dir, gpu=True, **CONFIGS[name])
    try:
        pipeline = handler.classifier.pipeline
        assert handler.classifier.device.type == "cuda"
        compiled_runs: list[int] = []  # the batch size of each pass through the compiled model
        if CONFIGS[name].get("compile"):  # compiled, not the eager fallback
            assert pipeline.runner.compiled is not None and pipeline.runner.compiled_buckets == (8,), pipeline.runner.compiled_buckets
            compiled = pipeline.runner.compiled

            def counted_compiled(x):
                compiled_runs.append(x.shape[0])
                return compiled(x)

            pipeline.runner.compiled = counted_compiled
        offered: list[int] = []  # per run, how many JPEGs the decoder took from the items
        nvjpeg: list[int] = []  # the keys nvJPEG decoded
        if "decode_device" in CONFIGS[name]:
            decoder = pipeline.jpeg_decoder
            assert decoder is not None, "nvJPEG did not warm up"
            split, decode = decoder.split, decoder.decode

            def counted_split(items):
                jobs, rest = split(items)
                offered.append(len(jobs))
                return jobs, rest

            def counted_decode(jobs):
                batch = decode(jobs)
                nvjpeg.extend(batch.keys if batch is not None else [])
                return batch

            decoder.split, decoder.decode = counted_split, counted_decode
        for _ in range(2):  # the second round reuses ring slots, buffers and cuDNN plans
            got, statuses, context = answer(handler, mixed_rows())
            assert statuses == want_statuses and set(statuses) == {2}
            assert got[2] == want[2]  # the same per-image error body for the truncated JPEG
            for g_request, w_request in zip(got[:2], want[:2]):
                assert len(g_request) == len(w_request)
                for g, w in zip(g_request, w_request):
                    assert next(iter(g)) == next(iter(w))  # top-1 label
                    assert g == pytest.approx(w, abs=0.03)
        if CONFIGS[name].get("compile"):  # every batch (3 of 8, 1 of 3 padded to 8, per round) ran compiled
            assert compiled_runs == [8] * 8, compiled_runs
        if "decode_device" in CONFIGS[name]:  # the JPEGs went through nvJPEG, but for the CPU's share
            on_gpu = WHOLE_JPEGS - round(WHOLE_JPEGS * CONFIGS[name].get("cpu_decode_share", 0.0))
            assert offered == [WHOLE_JPEGS] * 2, offered
            # nvJPEG decoded each of them, once per round: it rejected no list (the workers would
            # have decoded a rejected list, with the same answers)
            assert len(nvjpeg) == 2 * on_gpu and len(set(nvjpeg)) == on_gpu, (on_gpu, nvjpeg)
        stages = context.metrics.values
        assert stages["InferenceMs"][-1] > 0 and stages["HostToDeviceMs"][-1] > 0
        assert stages["ImagesPerBatch"][-1] == 27
    finally:
        handler.classifier.close()


def test_pixel_ring_is_page_locked_and_every_slot_comes_back(model_dir):
    handler = start(model_dir, gpu=True)
    try:
        ring = handler.classifier.pipeline.loader.buffers.ring
        assert ring is not None and ring._pinned
        slots = ring.free_slots()
        answer(handler, mixed_rows())
        torch.cuda.synchronize()
        assert ring.free_slots() == slots
    finally:
        handler.classifier.close()


def test_back_to_back_requests_never_see_each_others_pixels(model_dir):
    """Ring slots are reused as soon as their copy to the GPU is done (an event, not a
    synchronization): a slot handed out too early would mix one request's pixels into another's."""
    handler = start(model_dir, gpu=True, batch_size=4, num_workers=2)
    try:
        first = [{f"f{i}": bytearray(shape_image(LABELS[i % 3], seed=100 + i, fmt="JPEG")) for i in range(30)}]
        second = [{f"f{i}": bytearray(shape_image(LABELS[(i + 1) % 3], seed=200 + i)) for i in range(30)}]
        want = {0: answer(handler, first)[0], 1: answer(handler, second)[0]}
        for round_ in range(6):
            which = round_ % 2
            got = answer(handler, (first, second)[which])[0][0]
            assert len(got) == 30
            for g, w in zip(got, want[which][0]):
                assert list(g) == list(w) and g == pytest.approx(w, abs=1e-4), round_
    finally:
        handler.classifier.close()
