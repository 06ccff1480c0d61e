"""Helpers shared by unit and end-to-end tests: images of known content, a fake TorchServe context."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from harness.commands import load_command  # noqa: F401  (tests load a command's functions)
from harness.shapes import shape_image  # noqa: F401  (the demo's shapes, which its scripts draw too)


def encode(image: Image.Image, fmt: str = "PNG", **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def answers_alone(server: Any, images: list[bytes], model: str = "shapes") -> list[dict[str, float]]:
    """Each image sent alone to TorchServe's REST API as a raw body: the reference answers that
    every other door and client must give for the same bytes."""
    out = []
    for data in images:
        response = server.predict(model, data=data, headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 200, response.text
        out.append(response.json())
    return out


def assert_same_answers(got: list[dict[str, float]], want: list[dict[str, float]], tolerance: float = 1e-4) -> None:
    """The same images in the same order: identical labels, scores equal up to ``tolerance``."""
    assert len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        assert list(g) == list(w), (i, g, w)
        assert all(abs(g[k] - w[k]) <= tolerance for k in w), (i, g, w)


def demo_model_dir(directory: Path, **handler: Any) -> Path:
    """A copy of the shipped demo model (models/shapes) in ``directory``, its ``handler:``
    settings updated with ``handler`` (e.g. compile=False: compiling only lengthens a test's start)."""
    import shutil

    import yaml

    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "shapes", directory)
    config = yaml.safe_load((directory / "model-config.yaml").read_text())
    config["handler"].update(handler)
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    return directory


def write_model_dir(directory: Path, model: Any, labels: list[str]) -> Path:
    """A model directory as TorchServe unpacks a .mar: ``weights.pt`` (the state_dict) and
    ``index_to_name.json``."""
    import torch

    torch.save(model.state_dict(), directory / "weights.pt")
    (directory / "index_to_name.json").write_text(json.dumps(dict(enumerate(labels))))
    return directory


class RecordingMetrics:
    """Records what the handler sends to TorchServe's metrics cache."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def _record(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def add_time(self, name, value, idx=None, unit="ms", dimensions=None, **_):
        assert unit == "ms"
        self._record(name, value)

    def add_metric(self, name, value, unit, idx=None, dimensions=None, **_):
        self._record(name, value)

    def add_counter(self, name, value, idx=None, dimensions=None):
        self._record(name, value)


@dataclass
class FakeContext:
    """The parts of ts.context.Context the handler uses; records statuses and content types."""

    model_dir: str
    model_yaml_config: dict[str, Any]
    serialized_file: str = "weights.pt"
    gpu_id: int | None = None
    statuses: dict[int, tuple[int, str]] = field(default_factory=dict)
    content_types: dict[int, str] = field(default_factory=dict)
    headers: dict[int, dict[str, str]] = field(default_factory=dict)
    request_headers: list[dict[str, str]] = field(default_factory=list)
    metrics: RecordingMetrics = field(default_factory=RecordingMetrics)

    @property
    def system_properties(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "gpu_id": self.gpu_id, "batch_size": 8}

    @property
    def manifest(self) -> dict[str, Any]:
        return {"model": {"serializedFile": self.serialized_file}}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.headers.setdefault(idx, {})[key] = value

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.request_headers[idx] if idx < len(self.request_headers) else {"Host": "localhost"}

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.get_all_request_header(idx).get(key)
