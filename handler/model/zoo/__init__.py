"""Models users bring from the two model zoos, timm and Hugging Face transformers, as the
folders those libraries write: served with their own evaluation preprocessing.

    files         -- ZooFiles (a folder's or archive's config.json, weights, processor config)
    timm_folder   -- timm: its data config -> handler settings; the model through timm's loader
    hf_folder     -- transformers: the image processor -> handler settings; the model through
                     from_pretrained

``read_zoo`` gives what ``handler.model.files.read_model`` needs: the handler settings the
folder implies (keys the user sets in model-config.yaml win over them), the labels and the
number of classes. ``load_zoo_model`` builds the model. Neither library is imported until a
zoo model is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from handler.model.zoo.files import (CONFIG, PROCESSOR, WEIGHT_NAMES, ZOO_ARCHS, ZooFiles, ZooFolderError, read_json,
                               zoo_kind)

log = logging.getLogger(__name__)

__all__ = ["CONFIG", "PROCESSOR", "WEIGHT_NAMES", "ZOO_ARCHS", "ZooFiles", "ZooFolderError", "ZooModel",
           "imagenet_labels", "load_zoo_model", "read_json", "read_zoo", "zoo_kind"]

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ZooModel:
    """What a zoo folder says about serving its model.

    Attributes:
        settings: handler settings reproducing its evaluation preprocessing.
        labels: class names by index, or None when the folder names none.
        num_classes: the model's number of classes.
    """

    settings: dict[str, Any]
    labels: list[str] | None
    num_classes: int


def read_zoo(files: ZooFiles, *, use_test_size: bool = False) -> ZooModel:
    """The preprocessing, labels and class count of a timm or transformers model's files."""
    where = f"{files.where}/{CONFIG}"
    if files.kind == "timm":
        from handler.model.zoo.timm_folder import timm_config, timm_labels, timm_settings

        pretrained_cfg, _, _ = timm_config(files)
        labels, classes = timm_labels(pretrained_cfg, where)
        settings = timm_settings(pretrained_cfg, use_test_size, where)
    else:
        from handler.model.zoo.hf_folder import hf_labels, hf_model_config, hf_settings

        if use_test_size:
            raise ZooFolderError(f"{files.where}: handler.use_test_size applies to timm folders only")
        labels, classes = hf_labels(hf_model_config(files), where)
        settings = hf_settings(files)
    # The zoos decode JPEGs in full before resizing: DCT-scaled decoding would change the pixels.
    settings["jpeg_draft"] = False
    return ZooModel(settings, labels, classes)


def load_zoo_model(files: ZooFiles, num_classes: int) -> nn.Module:
    """The model of ``files`` in eval mode, fp32, returning logits; ``num_classes`` is checked."""
    if files.kind == "timm":
        from handler.model.zoo.timm_folder import load_timm

        model = load_timm(files)
    else:
        from handler.model.zoo.hf_folder import load_hf

        model = load_hf(files)
    outputs = int(getattr(model, "num_classes", num_classes))
    if outputs != num_classes:
        raise ZooFolderError(f"{files.where}: the model has {outputs} classes but {num_classes} labels")
    return model


def imagenet_labels() -> list[str]:
    """The ImageNet-1k class names, as torchvision's weights metadata lists them (the shipped
    efficientnet_lite0's index_to_name.json holds the same)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
