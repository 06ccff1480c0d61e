import sys

import pytest

from handler import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_glibc_accepts_the_settings():
    # mallopt refuses an out-of-range threshold (e.g. an mmap threshold above 32 MB) with 0.
    assert memory.keep_freed_memory() is True


def test_without_mallopt_nothing_happens(monkeypatch):
    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(memory.ctypes, "CDLL", NoMallopt)
    assert memory.keep_freed_memory() is False


@pytest.mark.parametrize("enabled", [True, False])
def test_configure_process_applies_it_as_configured(monkeypatch, enabled):
    import torch
    from PIL import Image

    from handler.config import HandlerConfig
    from handler.process import configure_process

    calls = []
    monkeypatch.setattr("handler.process.keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    threads = torch.get_num_threads()
    try:
        config = HandlerConfig(keep_freed_memory=enabled, max_image_pixels=1234, intra_op_threads=1)
        assert configure_process(config, device=torch.device("cpu")) == 1
        assert calls == ([1] if enabled else [])
        assert Image.MAX_IMAGE_PIXELS == 1234 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_the_torchserve_handler_configures_its_process(monkeypatch, tmp_path):
    from handler.model.architectures import ShapesNet
    from handler.doors.torchserve_handler import ImageBatchHandler
    from helpers import FakeContext, write_model_dir

    calls = []
    monkeypatch.setattr("handler.classifier.configure_process", lambda config, **kw: calls.append(kw))
    handler = ImageBatchHandler()
    settings = {"arch": "shapes_cnn", "image_size": 32, "resize_mode": "letterbox", "num_workers": 0}
    model_dir = write_model_dir(tmp_path, ShapesNet(num_classes=3), ["a", "b", "c"])
    handler.initialize(FakeContext(str(model_dir), {"maxWorkers": 3, "handler": settings}))
    handler.classifier.close()
    assert calls == [{"device": handler.classifier.device, "backend_workers": 3}]
