"""Load labels and weights from the model directory TorchServe unpacked the .mar into."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from handler.model.architectures import build_model
from handler.model.zoo import ZOO_ARCHS, ZooFiles, load_zoo_model


def load_labels(path: Path) -> list[str]:
    """``index_to_name.json`` ({"0": "circle", ...}) -> labels ordered by class index."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing from the model archive; add it with --labels")
    return parse_labels(path.read_text(), path.name)


def parse_labels(text: str, name: str = "index_to_name.json") -> list[str]:
    """The labels of an ``index_to_name.json`` text, ordered by class index."""
    mapping = json.loads(text)
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{name} must be a non-empty JSON object {{\"0\": \"label\", ...}}")
    indices = sorted(int(k) for k in mapping)
    if indices != list(range(len(indices))):
        raise ValueError(f"{name} keys must be 0..{len(indices) - 1}, got {indices}")
    return [str(mapping[str(i)]) for i in indices]


# ``arch`` values that name a serialized format instead of an architecture.
SERIALIZED_FORMATS = ("torchscript", "torch_export")


def load_model(arch: str, weights: Path | bytes | ZooFiles, num_classes: int) -> nn.Module:
    """The model in eval mode: a TorchScript file, a ``torch.export`` program (.pt2), a timm or
    transformers model (``weights`` its ZooFiles: built by its own library), or ``arch`` built
    and given a state_dict (weights only, never arbitrary pickles). ``weights`` is a file, or
    its bytes (read from an archive)."""
    if isinstance(weights, ZooFiles) or arch in ZOO_ARCHS:
        if not isinstance(weights, ZooFiles) or weights.kind != arch:
            given = f"a {weights.kind} model folder" if isinstance(weights, ZooFiles) else "a weights file"
            raise ValueError(f"arch {arch!r} does not load from {given}")
        return load_zoo_model(weights, num_classes)
    source = io.BytesIO(weights) if isinstance(weights, bytes) else str(weights)
    name = "the archive's weights" if isinstance(weights, bytes) else weights.name
    if arch == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript
            return torch.jit.load(source, map_location="cpu").eval()
    if arch == "torch_export":
        # An exported program is already specialised to inference; its module() refuses .eval().
        # Export it with a dynamic batch dimension: requests are split into batches of any size.
        return torch.export.load(source).module()
    model = build_model(arch, num_classes)
    state = torch.load(source, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"weights in {name} do not fit architecture {arch!r} with {num_classes} classes: "
            f"{str(exc)[:500]}"
        ) from None
    return model.eval()
