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
def test_the_handler_applies_it_as_configured(monkeypatch, tmp_path, enabled):
    from handler.architectures import ShapesNet
    from handler.service import ImageBatchHandler
    from helpers import FakeContext, write_model_dir

    calls = []
    monkeypatch.setattr("handler.service.keep_freed_memory", lambda: calls.append(1) or True)
    handler = ImageBatchHandler()
    settings = {"arch": "shapes_cnn", "image_size": 32, "resize_mode": "letterbox", "num_workers": 0,
                "keep_freed_memory": enabled}
    model_dir = write_model_dir(tmp_path, ShapesNet(num_classes=3), ["a", "b", "c"])
    handler.initialize(FakeContext(str(model_dir), {"handler": settings}))
    assert calls == ([1] if enabled else [])
