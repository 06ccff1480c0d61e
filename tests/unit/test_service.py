import json
import os
import signal
import time

import pytest
import torch

from handler.model.architectures import ShapesNet
from handler.doors.torchserve_handler import ImageBatchHandler
from helpers import FakeContext, shape_image, write_model_dir

LABELS = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def handler_and_context(tmp_path_factory):
    torch.manual_seed(0)
    model_dir = write_model_dir(tmp_path_factory.mktemp("model"), ShapesNet(num_classes=3), LABELS)
    yaml_config = {"handler": {"arch": "shapes_cnn", "image_size": 64, "resize_mode": "letterbox",
                               "top_k": 2, "batch_size": 4, "num_workers": 2, "max_images_per_request": 6}}
    context = FakeContext(str(model_dir), yaml_config)
    handler = ImageBatchHandler()
    handler.initialize(context)
    yield handler, context
    handler.classifier.close()


def fresh_context(context: FakeContext) -> FakeContext:
    return FakeContext(context.model_dir, context.model_yaml_config)


def test_initialize_rejects_unknown_handler_settings(tmp_path):
    context = FakeContext(str(tmp_path), {"handler": {"arch": "shapes_cnn", "batch": 3}})
    with pytest.raises(ValueError, match="'batch'"):
        ImageBatchHandler().initialize(context)


def test_results_are_split_back_per_request_in_order(handler_and_context):
    handler, base = handler_and_context
    images = [shape_image(LABELS[i % 3], seed=i) for i in range(9)]
    # Reference: each image alone.
    alone = []
    for image in images:
        ctx = fresh_context(base)
        alone.append(json.loads(handler.handle([{"body": bytearray(image)}], ctx)[0]))
    ctx = fresh_context(base)
    rows = [
        {"a": bytearray(images[0]), "b": bytearray(images[1]), "c": bytearray(images[2])},
        {"body": bytearray(images[3])},
        {f"f{i}": bytearray(images[i]) for i in range(4, 9)},
    ]
    bodies = [json.loads(b) for b in handler.handle(rows, ctx)]
    assert ctx.statuses == {}
    assert set(ctx.content_types.values()) == {"application/json"}
    assert isinstance(bodies[1], dict) and len(bodies[1]) == 2  # one image -> object with top_k labels
    flat = bodies[0] + [bodies[1]] + bodies[2]
    assert len(flat) == 9
    for got, want in zip(flat, alone):
        assert list(got) == list(want)
        assert got == pytest.approx(want, abs=1e-4)


def test_bad_requests_fail_alone_with_their_own_status(handler_and_context):
    handler, base = handler_and_context
    good = bytearray(shape_image("circle", seed=1))
    ctx = fresh_context(base)
    rows = [
        {"body": good},
        {"a": good, "b": bytearray(b"not an image")},
        {"body": {"images": []}},
        {"body": {"images": ["AAAA"] * 7}},
        {"body": good},
    ]
    bodies = [json.loads(b) for b in handler.handle(rows, ctx)]
    assert {i: s[0] for i, s in ctx.statuses.items()} == {1: 400, 2: 400, 3: 413}
    assert bodies[1]["error"] == "invalid_image"
    assert bodies[1]["images"] == [{"index": 1, "field": "b", "reason": "not a recognised image format"}]
    assert bodies[2]["error"] == "no_images" and bodies[3]["error"] == "too_many_images"
    assert bodies[0] == bodies[4] and set(bodies[0]) <= set(LABELS)


def test_a_request_larger_than_the_loader_batch_is_chunked(handler_and_context):
    handler, base = handler_and_context
    images = [shape_image(LABELS[i % 3], seed=100 + i) for i in range(6)]  # batch_size is 4
    ctx = fresh_context(base)
    (body,) = handler.handle([{f"f{i}": bytearray(img) for i, img in enumerate(images)}], ctx)
    assert len(json.loads(body)) == 6


def test_stage_times_and_counts_are_published(handler_and_context):
    handler, base = handler_and_context
    ctx = fresh_context(base)
    good = bytearray(shape_image("square", seed=3))
    handler.handle([{"a": good, "b": good}, {"a": good, "b": bytearray(b"junk")}, {"body": {"images": []}}], ctx)
    values = ctx.metrics.values
    for stage in ("DecodeTransformMs", "HostToDeviceMs", "InferenceMs", "PostprocessMs"):
        assert len(values[stage]) == 1 and values[stage][0] > 0, (stage, values)
    assert values["ImagesPerBatch"] == [4] and values["RequestsPerBatch"] == [3]
    assert values["BadImages"] == [1] and values["RejectedRequests"] == [2]


def test_thread_budget_shares_cores_among_backend_workers():
    from handler.devices import thread_budget
    import os

    cores = os.cpu_count() or 1
    assert thread_budget(3, 8) == 3
    assert thread_budget(0, 1) == cores
    assert thread_budget(0, cores * 4) == 1
    assert thread_budget(0, None) == cores
    gpu = torch.device("cuda", 0)  # only its type is read: no GPU needed
    assert thread_budget(0, 1, gpu) == min(cores, 2)  # the model runs on the GPU
    assert thread_budget(3, 1, gpu) == 3


def test_bucket_padding_and_bf16_keep_the_results(handler_and_context, tmp_path):
    handler, base = handler_and_context
    images = [bytearray(shape_image(LABELS[i % 3], seed=300 + i)) for i in range(5)]
    plain = json.loads(handler.handle([{f"f{i}": img for i, img in enumerate(images)}], fresh_context(base))[0])
    settings = {**base.model_yaml_config["handler"], "batch_buckets": [2, 8]}
    padded_handler = ImageBatchHandler()
    padded_handler.initialize(FakeContext(base.model_dir, {"handler": settings}))
    try:
        padded = json.loads(padded_handler.handle([{f"f{i}": img for i, img in enumerate(images)}],
                                                  fresh_context(base))[0])
        assert len(padded) == 5
        for got, want in zip(padded, plain):
            assert list(got) == list(want) and got == pytest.approx(want, abs=1e-4)
        bf16_handler = ImageBatchHandler()
        bf16_handler.initialize(FakeContext(base.model_dir, {"handler": {**settings, "precision": "bf16"}}))
        low = json.loads(bf16_handler.handle([{f"f{i}": img for i, img in enumerate(images)}],
                                             fresh_context(base))[0])
        bf16_handler.classifier.close()
        assert [next(iter(r)) for r in low] == [next(iter(r)) for r in plain]
    finally:
        padded_handler.classifier.close()


def test_model_input_is_normalized_like_torchvision(handler_and_context):
    handler, _ = handler_and_context
    pixels = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor(handler.classifier.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(handler.classifier.config.std).view(1, 3, 1, 1)
    expected = (pixels.float() / 255 - mean) / std
    got = handler.classifier.pipeline.to_model_input(pixels)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_initialize_forks_the_loader_workers_before_any_request(handler_and_context):
    handler, _ = handler_and_context
    pids = handler.classifier.pipeline.loader.workers.worker_pids()
    assert len(pids) == 2 and all(pids)


def test_the_handler_module_defines_exactly_one_class():
    """TorchServe refuses a handler module with more than one class of its own."""
    import inspect

    import handler.doors.torchserve_handler as module

    own = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    assert own == [ImageBatchHandler]


def test_describe_answers_the_models_health(handler_and_context):
    """TorchServe's describe (GET /models/NAME?customized=true) reaches handle() marked with a
    describe header: it is answered with the health every door's probe reports, which replaces a
    dead loader worker first."""
    handler, base = handler_and_context
    ctx = fresh_context(base)
    ctx.request_headers = [{"describe": "True"}]
    assert [json.loads(b) for b in handler.handle([{"body": bytearray()}], ctx)] == [{"healthy": True}]
    workers = handler.classifier.pipeline.loader.workers
    victim = workers.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim not in workers.dead_workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim in workers.dead_workers()
    assert [json.loads(b) for b in handler.handle([{"body": bytearray()}], ctx)] == [{"healthy": True}]
    assert victim not in workers.worker_pids() and not workers.dead_workers()
    images = {f"f{i}": bytearray(shape_image("circle", seed=i)) for i in range(3)}
    served = handler.handle([images], fresh_context(base))
    assert [next(iter(answer)) for answer in json.loads(served[0])] == ["circle"] * 3
