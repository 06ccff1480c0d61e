"""Find a model's files: in a model directory, or in a .mar archive (a zip, read in place).

A model is three files:
    index_to_name.json   {"0": "label", ...}
    the weights          a state_dict for ``handler.arch``, a TorchScript file or a .pt2 program
    model-config.yaml    optional: TorchServe keys and the ``handler:`` section (HandlerConfig)
and, for ``handler.precision: int8``, the calibrated program (``handler.quantize.INT8_PROGRAM``).
In a .mar (or the directory TorchServe or KServe unpacked one into) MAR-INF/MANIFEST.json names
the weights file; elsewhere it is the one file with a weights suffix.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import yaml

from handler.config import HandlerConfig
from handler.model_loading import parse_labels
from handler.quantize import INT8_PROGRAM

LABELS_FILE = "index_to_name.json"
CONFIG_FILE = "model-config.yaml"
MANIFEST = "MAR-INF/MANIFEST.json"
WEIGHT_SUFFIXES = (".pt", ".pth", ".pt2", ".bin", ".ckpt")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a classifier: validated settings, labels, the weights.

    Attributes:
        name: the model's name (the .mar's ``modelName``, else the file or directory name).
        config: the ``handler:`` settings, validated, with any overrides applied.
        labels: class names by index.
        weights: the weights file, or its bytes when it came out of a .mar.
        model_yaml: the whole model-config.yaml (server keys such as ``batchSize`` included).
        int8_program: the calibrated int8 program (its file, or bytes out of a .mar), if any.
    """

    name: str
    config: HandlerConfig
    labels: list[str]
    weights: Path | bytes = field(repr=False)
    model_yaml: dict[str, Any] = field(default_factory=dict)
    int8_program: Path | bytes | None = field(default=None, repr=False)


def read_model(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    model_yaml: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
) -> ModelSpec:
    """The ModelSpec of a model directory or .mar file.

    ``overrides`` replace keys of the ``handler:`` section (validated like the file's own keys).
    ``model_yaml`` and ``weights`` take the place of what the files say (a server that already
    parsed the config, or read the manifest itself).
    """
    path = Path(path)
    if path.is_dir() and not (path / LABELS_FILE).is_file():
        archives = sorted(path.glob("*.mar")) + sorted(path.glob("model-store/*.mar"))
        if len(archives) == 1:
            path = archives[0]  # a directory that only holds an archive (KServe's storage mount)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return _read(_ArchiveFiles(archive), path.stem, overrides, model_yaml, weights)
    if path.is_dir():
        return _read(_DirectoryFiles(path), path.name, overrides, model_yaml, weights)
    raise FileNotFoundError(f"{path} is neither a model directory nor a .mar archive")


class _DirectoryFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file())

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def weights(self, name: str) -> Path | bytes:
        return self.root / name


class _ArchiveFiles:
    def __init__(self, archive: zipfile.ZipFile) -> None:
        self.archive = archive
        self._names = set(archive.namelist())

    def names(self) -> list[str]:
        return sorted(n for n in self._names if "/" not in n)

    def has(self, name: str) -> bool:
        return name in self._names

    def read(self, name: str) -> bytes:
        return self.archive.read(name)

    def weights(self, name: str) -> Path | bytes:
        return self.read(name)


def _read(files: Any, default_name: str, overrides: Mapping[str, Any] | None,
          model_yaml: Mapping[str, Any] | None, weights: str | Path | None) -> ModelSpec:
    manifest = json.loads(files.read(MANIFEST)).get("model", {}) if files.has(MANIFEST) else {}
    if model_yaml is None:
        config_name = manifest.get("configFile", CONFIG_FILE)
        model_yaml = _parse_yaml(files.read(config_name), config_name) if files.has(config_name) else {}
    settings = dict(model_yaml.get("handler") or {})
    settings.update(overrides or {})
    config = HandlerConfig.from_mapping(settings)
    if not files.has(LABELS_FILE):
        raise FileNotFoundError(f"{LABELS_FILE} is missing from the model; add it (build_mar.py --labels)")
    return ModelSpec(
        name=manifest.get("modelName") or default_name,
        config=config,
        labels=parse_labels(files.read(LABELS_FILE).decode(), LABELS_FILE),
        weights=Path(weights) if weights is not None else files.weights(_weights_name(files, manifest)),
        model_yaml=dict(model_yaml),
        int8_program=files.weights(INT8_PROGRAM) if files.has(INT8_PROGRAM) else None,
    )


def _parse_yaml(data: bytes, name: str) -> dict[str, Any]:
    loaded = yaml.safe_load(data) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{name}: expected a YAML mapping at the top level")
    return loaded


def _weights_name(files: Any, manifest: Mapping[str, Any]) -> str:
    if manifest.get("serializedFile"):
        return str(manifest["serializedFile"])
    candidates = [n for n in files.names() if PurePosixPath(n).suffix in WEIGHT_SUFFIXES and n != INT8_PROGRAM]
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise FileNotFoundError(f"expected exactly one weights file ({', '.join(WEIGHT_SUFFIXES)}); found {found}")
    return candidates[0]
