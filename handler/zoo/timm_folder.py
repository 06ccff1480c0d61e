"""timm model folders: the hub layout ``timm.models.save_for_hf`` and ``huggingface-cli
download timm/...`` write (``config.json`` with ``architecture`` and ``pretrained_cfg``, and
``model.safetensors`` or ``pytorch_model.bin``).

The evaluation preprocessing is timm's own: ``timm.data.resolve_data_config`` on the folder's
pretrained config (timm's defaults where a field is missing), mapped onto the handler's resize
modes with the sizes and crop offsets ``timm.data.create_transform`` uses.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from handler.config import INTERPOLATIONS
from handler.zoo.files import CONFIG, ZooFiles, ZooFolderError

log = logging.getLogger(__name__)


def timm_config(files: ZooFiles) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(pretrained_cfg, architecture, model_args) as timm itself parses the folder's config.json
    (``create_model("local-dir:...")`` reads it the same way)."""
    from timm.models._hub import load_model_config_from_path

    files.config()  # a clear error for a config.json that is not a JSON object
    with files.directory(weights=False) as directory:
        try:
            return load_model_config_from_path(directory)
        except (KeyError, TypeError, ValueError) as exc:
            raise ZooFolderError(f"{files.where}/{CONFIG} is not a timm model config ({type(exc).__name__}: "
                                 f"{exc}); expected 'architecture' and 'pretrained_cfg'") from None


def timm_settings(files: ZooFiles, use_test_size: bool) -> dict[str, Any]:
    """The handler settings that reproduce the folder's timm evaluation transform."""
    from timm.data import resolve_data_config

    pretrained_cfg, _, _ = timm_config(files)
    data = resolve_data_config(pretrained_cfg=pretrained_cfg, use_test_size=use_test_size)
    return settings_from_data_config(data, f"{files.where}/{CONFIG}")


def settings_from_data_config(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Handler settings for a resolved timm data config (``input_size``, ``interpolation``,
    ``mean``, ``std``, ``crop_pct``, ``crop_mode``), as ``transforms_imagenet_eval`` applies it;
    ZooFolderError for what the pipeline cannot reproduce."""
    channels, height, width = (int(v) for v in data["input_size"])
    if channels != 3:
        raise ZooFolderError(f"{where}: input_size {list(data['input_size'])} has {channels} channels; "
                             "the pipeline feeds RGB (3 channels)")
    if height != width:
        raise ZooFolderError(f"{where}: input_size {height}x{width} is not square; the pipeline serves square "
                             "inputs only")
    interpolation = data["interpolation"]
    if interpolation not in INTERPOLATIONS:
        raise ZooFolderError(f"{where}: interpolation {interpolation!r} cannot be reproduced (the pipeline "
                             f"resizes with {' or '.join(INTERPOLATIONS)})")
    mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
    if len(mean) != 3 or len(std) != 3:
        raise ZooFolderError(f"{where}: mean {list(mean)} and std {list(std)} must have 3 values (RGB)")
    crop_pct = float(data["crop_pct"])
    crop_mode = data["crop_mode"]
    # timm: scale_size = floor(img_size / crop_pct), the size resized to before the crop.
    scale = math.floor(height / crop_pct)
    settings: dict[str, Any] = {"image_size": height, "interpolation": interpolation, "mean": mean, "std": std,
                                "crop_offset": "round"}
    if crop_mode == "center":
        if scale < height:
            raise ZooFolderError(f"{where}: crop_pct {crop_pct} above 1 in crop_mode center would pad the image; "
                                 "the pipeline does not reproduce that")
        settings.update(resize_mode="center_crop", resize_size=scale)
    elif crop_mode == "squash":
        if scale < height:
            raise ZooFolderError(f"{where}: crop_pct {crop_pct} above 1 in crop_mode squash would pad the image; "
                                 "the pipeline does not reproduce that")
        settings.update(resize_mode="squash" if scale == height else "squash_center_crop", resize_size=scale)
    elif crop_mode == "border":
        # timm pads with the mean colour, rounded to 8 bits.
        settings.update(resize_mode="border", resize_size=scale, pad_value=[round(255 * v) for v in mean])
    else:
        raise ZooFolderError(f"{where}: crop_mode {crop_mode!r} is not one timm's evaluation transform knows "
                             "(center, squash, border)")
    return settings


def timm_labels(files: ZooFiles) -> tuple[list[str] | None, int]:
    """The folder's class names (``label_descriptions`` in ``label_names`` order where both are
    given, else ``label_names``), or None; and the model's number of classes."""
    pretrained_cfg, _, model_args = timm_config(files)
    classes = int(model_args.get("num_classes") or pretrained_cfg.get("num_classes") or 1000)
    names = pretrained_cfg.get("label_names")
    descriptions = pretrained_cfg.get("label_descriptions")
    if isinstance(names, dict):  # {class index: name}, timm's form for indices with gaps
        names = [names[key] for key in sorted(names, key=int)]
    if isinstance(names, list) and names:
        if isinstance(descriptions, dict):
            return [str(descriptions.get(n, n)) for n in names], classes
        return [str(n) for n in names], classes
    if isinstance(descriptions, list) and descriptions:
        return [str(d) for d in descriptions], classes
    return None, classes


def load_timm(files: ZooFiles) -> nn.Module:
    """The model, built by timm from the folder's config.json with its weights loaded strictly
    (timm's own loader: ``create_model("local-dir:...", pretrained=True)``), in eval mode."""
    import timm

    _, architecture, _ = timm_config(files)
    if not timm.is_model(architecture):
        raise ZooFolderError(f"{files.where}/{CONFIG}: architecture {architecture!r} is not a model timm "
                             f"{timm.__version__} knows")
    with files.directory() as directory:
        try:
            model = timm.create_model(f"local-dir:{Path(directory)}", pretrained=True)
        except RuntimeError as exc:  # load_state_dict: missing, unexpected or mis-shaped tensors
            raise ZooFolderError(f"weights in {files.where}/{files.weights_name} do not fit timm architecture "
                                 f"{architecture!r}: {str(exc)[:500]}") from None
        except Exception as exc:  # an unreadable or corrupt weights file
            raise ZooFolderError(f"{files.where}/{files.weights_name} cannot be loaded: {type(exc).__name__}: "
                                 f"{str(exc)[:300]}") from None
    return model.eval()
