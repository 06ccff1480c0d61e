"""Find a model's files: in a model directory, or in a .mar archive (a zip, read in place).

A model is three files:
    index_to_name.json   {"0": "label", ...}
    the weights          a state_dict for ``handler.arch``, a TorchScript file or a .pt2 program
    model-config.yaml    optional: TorchServe keys and the ``handler:`` section (HandlerConfig)
and, for ``handler.precision: int8``, the calibrated program (``handler.model.quantize.INT8_PROGRAM``);
and the gate record of the weights (``gate_record.json``, ``handler.model.records``), without which
``precision: auto`` runs fp32.
In a .mar (or the directory TorchServe or KServe unpacked one into) MAR-INF/MANIFEST.json names
the weights file; elsewhere it is the one file with a weights suffix.

Or a model folder from a zoo (``handler.model.zoo``): timm's or transformers' ``config.json`` with
``model.safetensors`` (or ``pytorch_model.bin``) and, for transformers,
``preprocessor_config.json``. Its preprocessing and labels come from those files; an
``index_to_name.json`` or a ``model-config.yaml`` beside them wins, as does ``overrides``.
An archive built from such a folder keeps those files and says ``handler.arch: timm`` (or
``transformers``).
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import yaml

from handler.config import HandlerConfig
from handler.model.loading import parse_labels
from handler.model.quantize import INT8_PROGRAM
from handler.model.ov_runtime import INT8_IR
from handler.model.records import GATE_RECORD, GateRecord, ModelArtifacts
from handler.model.zoo import (CONFIG as ZOO_CONFIG, PROCESSOR, WEIGHT_NAMES, ZOO_ARCHS, ZooFiles, ZooFolderError,
                         imagenet_labels, read_json, read_zoo, zoo_kind)

LABELS_FILE = "index_to_name.json"
CONFIG_FILE = "model-config.yaml"
MANIFEST = "MAR-INF/MANIFEST.json"
WEIGHT_SUFFIXES = (".pt", ".pth", ".pt2", ".bin", ".ckpt")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a classifier: validated settings, labels, the weights.

    Attributes:
        name: the model's name (the .mar's ``modelName``, else the file or directory name).
        config: the ``handler:`` settings, validated, with any overrides applied.
        labels: class names by index.
        weights: the weights file, or its bytes when it came out of a .mar; for a timm or
            transformers model, its ZooFiles.
        model_yaml: the whole model-config.yaml (server keys such as ``batchSize`` included).
        int8_program: the calibrated int8 program (its file, or bytes out of a .mar), if any.
        gate_record: what the accuracy gate measured for these weights (``gate_record.json``), if any.
        openvino_int8: OpenVINO's int8 model (``openvino_int8.xml`` and ``.bin``), if any.
    """

    name: str
    config: HandlerConfig
    labels: list[str]
    weights: Path | bytes | ZooFiles = field(repr=False)
    model_yaml: dict[str, Any] = field(default_factory=dict)
    int8_program: Path | bytes | None = field(default=None, repr=False)
    gate_record: GateRecord | None = field(default=None, repr=False)
    openvino_int8: tuple[Path | bytes, Path | bytes] | None = field(default=None, repr=False)

    @property
    def artifacts(self) -> ModelArtifacts:
        """The int8 models and the gate record, for the model runner."""
        return ModelArtifacts(self.int8_program, self.openvino_int8, self.gate_record)


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
    if path.is_dir() and not (path / LABELS_FILE).is_file() and not (path / ZOO_CONFIG).is_file():
        archives = sorted(path.glob("*.mar")) + sorted(path.glob("model-store/*.mar"))
        if len(archives) == 1:
            path = archives[0]  # a directory that only holds an archive (KServe's storage mount)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return _read(_ArchiveFiles(archive), str(path), path.stem, overrides, model_yaml, weights)
    if path.is_dir():
        return _read(_DirectoryFiles(path), str(path), path.name, overrides, model_yaml, weights)
    raise FileNotFoundError(f"{path} is neither a model directory nor a .mar archive (nor a timm or "
                            "transformers model folder)")


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


def _read(files: Any, where: str, default_name: str, overrides: Mapping[str, Any] | None,
          model_yaml: Mapping[str, Any] | None, weights: str | Path | None) -> ModelSpec:
    manifest = json.loads(files.read(MANIFEST)).get("model", {}) if files.has(MANIFEST) else {}
    if model_yaml is None:
        config_name = manifest.get("configFile", CONFIG_FILE)
        model_yaml = _parse_yaml(files.read(config_name), config_name) if files.has(config_name) else {}
    settings = dict(model_yaml.get("handler") or {})
    settings.update(overrides or {})
    zoo = _zoo_files(files, where, manifest, settings.get("arch"), weights)
    labels: list[str] | None = None
    if zoo is not None:
        found = read_zoo(zoo, use_test_size=settings.get("use_test_size") is True)
        settings = {**found.settings, **settings, "arch": zoo.kind}  # the user's keys win
        labels = _zoo_labels(files, zoo, found.labels, found.num_classes)
    elif settings.get("use_test_size"):
        raise ValueError("handler.use_test_size applies to timm model folders only")
    try:
        config = HandlerConfig.from_mapping(settings)
    except ValueError as exc:
        if zoo is None:
            raise
        raise ZooFolderError(f"{where}: {exc} (with the folder's preprocessing under your settings)") from None
    if labels is None:
        if not files.has(LABELS_FILE):
            hint = ("; an archive of a timm or transformers model says so in handler.arch" if files.has(MANIFEST)
                    else f", or give a timm or transformers model folder (its {ZOO_CONFIG} names the model)")
            raise FileNotFoundError(f"{LABELS_FILE} is missing from the model; add it (build_mar.py --labels){hint}")
        labels = parse_labels(files.read(LABELS_FILE).decode(), LABELS_FILE)
    if zoo is not None:
        model_weights: Path | bytes | ZooFiles = zoo
    else:
        model_weights = Path(weights) if weights is not None else files.weights(_weights_name(files, manifest))
    return ModelSpec(
        name=manifest.get("modelName") or default_name,
        config=config,
        labels=labels,
        weights=model_weights,
        model_yaml=dict(model_yaml),
        int8_program=files.weights(INT8_PROGRAM) if files.has(INT8_PROGRAM) else None,
        gate_record=(GateRecord.from_json(files.read(GATE_RECORD), f"{where}/{GATE_RECORD}")
                     if files.has(GATE_RECORD) else None),
        openvino_int8=((files.weights(INT8_IR[0]), files.weights(INT8_IR[1]))
                       if files.has(INT8_IR[0]) and files.has(INT8_IR[1]) else None),
    )


def _zoo_files(files: Any, where: str, manifest: Mapping[str, Any], arch: Any,
               weights: str | Path | None) -> ZooFiles | None:
    """The zoo files of a timm or transformers model (a folder, or an archive built from one,
    whose ``handler.arch`` says which), or None for any other model."""
    if arch in ZOO_ARCHS:
        kind = str(arch)
        if not files.has(ZOO_CONFIG):
            raise ZooFolderError(f"{where}: handler.arch is {kind} but {ZOO_CONFIG} is missing")
    elif files.has(ZOO_CONFIG) and not files.has(MANIFEST):
        # A model directory (index_to_name.json and its own weights) may hold an unrelated
        # config.json: a zoo folder has a zoo's weights file and a config.json a zoo reads.
        plain = files.has(LABELS_FILE) and not any(files.has(name) for name in WEIGHT_NAMES)
        if plain:
            return None
        try:
            found = zoo_kind(read_json(files.weights(ZOO_CONFIG), f"{where}/{ZOO_CONFIG}"))
        except ZooFolderError:
            if files.has(LABELS_FILE):
                return None
            raise
        if found is None:
            if files.has(LABELS_FILE):
                return None
            raise ZooFolderError(f"{where}/{ZOO_CONFIG} is neither a timm config ('architecture', "
                                 "'pretrained_cfg') nor a transformers one ('architectures', 'model_type')")
        if arch is not None and arch != found:
            raise ZooFolderError(f"{where} is a {found} model folder but handler.arch is {arch!r}")
        kind = found
    else:
        return None
    if files.has("model.safetensors.index.json"):
        raise ZooFolderError(f"{where}: sharded weights (model.safetensors.index.json) are not supported; "
                             "save the model as one model.safetensors")
    if weights is not None:
        weights_name, payload = Path(weights).name, Path(weights)
    else:
        weights_name = manifest.get("serializedFile") or next((n for n in WEIGHT_NAMES if files.has(n)), "")
        if not files.has(weights_name):
            raise FileNotFoundError(f"{where}: the model's weights are missing: expected "
                                    f"{' or '.join(WEIGHT_NAMES)} beside {ZOO_CONFIG}")
        payload = files.weights(weights_name)
    if weights_name not in WEIGHT_NAMES:
        raise ZooFolderError(f"{where}: weights file {weights_name!r} is not one of {', '.join(WEIGHT_NAMES)}")
    parts = {ZOO_CONFIG: files.weights(ZOO_CONFIG), weights_name: payload}
    if files.has(PROCESSOR):
        parts[PROCESSOR] = files.weights(PROCESSOR)
    return ZooFiles(kind, where, parts)


def _zoo_labels(files: Any, zoo: ZooFiles, named: list[str] | None, classes: int) -> list[str]:
    """An index_to_name.json beside the zoo files, else the folder's own labels, else (for a
    1,000-class model) ImageNet-1k's; their count must be the model's."""
    if files.has(LABELS_FILE):
        labels, source = parse_labels(files.read(LABELS_FILE).decode(), LABELS_FILE), f"{zoo.where}/{LABELS_FILE}"
    elif named is not None:
        labels, source = named, f"{zoo.where}/{ZOO_CONFIG}"
    elif classes == 1000:
        log.info("%s names no labels and has 1000 classes: using the ImageNet-1k labels", zoo.where)
        return imagenet_labels()
    else:
        raise ZooFolderError(f"{zoo.where}/{ZOO_CONFIG} names no labels for the model's {classes} classes: add them "
                             f"(timm: label_names; transformers: id2label) or put an {LABELS_FILE} beside it")
    if len(labels) != classes:
        raise ZooFolderError(f"{source} has {len(labels)} labels but the model has {classes} classes")
    return labels


def _parse_yaml(data: bytes, name: str) -> dict[str, Any]:
    loaded = yaml.safe_load(data) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{name}: expected a YAML mapping at the top level")
    return loaded


def _weights_name(files: Any, manifest: Mapping[str, Any]) -> str:
    if manifest.get("serializedFile"):
        return str(manifest["serializedFile"])
    made = {INT8_PROGRAM, *INT8_IR}  # int8 models made from the weights, not weights
    candidates = [n for n in files.names() if PurePosixPath(n).suffix in WEIGHT_SUFFIXES and n not in made]
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise FileNotFoundError(f"expected exactly one weights file ({', '.join(WEIGHT_SUFFIXES)}); found {found}")
    return candidates[0]
