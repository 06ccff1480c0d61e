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
from handler.model.zoo.files import CONFIG, ZooFiles, ZooFolderError

log = logging.getLogger(__name__)


def timm_config(files: ZooFiles) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(pretrained_cfg, architecture, model_args) as timm itself parses the folder's config.json
    (``create_model("local-dir:...")`` reads it the same way)."""
    from timm.models._hub import load_model_config_from_path

    files.config()  # a clear error for a config.json that is not a JSON object
    where = f"{files.where}/{CONFIG}"
    with files.directory(weights=False) as directory:
        try:
            pretrained_cfg, architecture, model_args = load_model_config_from_path(directory)
        except Exception as exc:  # timm indexes and updates what it finds: any type may be wrong
            raise ZooFolderError(f"{where} is not a timm model config ({type(exc).__name__}: {exc}); expected "
                                 "'architecture' and a 'pretrained_cfg' object") from None
    if not isinstance(model_args, dict):
        raise ZooFolderError(f"{where}: model_args must be an object, got {model_args!r}")
    # timm drops the classifier's weights (and loads the rest non-strictly) when the model is
    # built for another class count than its pretrained config's: a random head, served.
    declared = pretrained_cfg.get("num_classes")
    if model_args.get("num_classes") is not None and declared is not None and model_args["num_classes"] != declared:
        raise ZooFolderError(f"{where}: model_args.num_classes {model_args['num_classes']} differs from num_classes "
                             f"{declared}: timm would load the weights without their classifier")
    return pretrained_cfg, architecture, model_args


def timm_settings(pretrained_cfg: Mapping[str, Any], use_test_size: bool, where: str) -> dict[str, Any]:
    """The handler settings that reproduce timm's evaluation transform for ``pretrained_cfg``."""
    from timm.data import resolve_data_config

    try:
        data = resolve_data_config(pretrained_cfg=dict(pretrained_cfg), use_test_size=use_test_size)
    except Exception as exc:  # a field of the wrong type
        raise ZooFolderError(f"{where}: pretrained_cfg does not resolve to a data config ({type(exc).__name__}: "
                             f"{exc})") from None
    return settings_from_data_config(data, where)


def settings_from_data_config(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Handler settings for a resolved timm data config (``input_size``, ``interpolation``,
    ``mean``, ``std``, ``crop_pct``, ``crop_mode``), as ``transforms_imagenet_eval`` applies it;
    ZooFolderError for what the pipeline cannot reproduce."""
    size = data["input_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) for v in size)):
        raise ZooFolderError(f"{where}: input_size must be [channels, height, width], got {size!r}")
    channels, height, width = size
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
    mean, std = _rgb(data["mean"], "mean", where), _rgb(data["std"], "std", where)
    if not all(0.0 <= m <= 1.0 for m in mean) or not all(s > 0 for s in std):
        raise ZooFolderError(f"{where}: mean {list(mean)} must be within 0..1 and std {list(std)} above 0 "
                             "(pixels scaled to [0, 1])")
    crop_pct = data["crop_pct"]
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not crop_pct > 0:
        raise ZooFolderError(f"{where}: crop_pct must be a number above 0, got {crop_pct!r}")
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


def _rgb(values: Any, what: str, where: str) -> tuple[float, float, float]:
    if not (isinstance(values, (list, tuple)) and len(values) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ZooFolderError(f"{where}: {what} must be 3 numbers (RGB), got {values!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


def timm_labels(pretrained_cfg: Mapping[str, Any], where: str) -> tuple[list[str] | None, int]:
    """The folder's class names (``label_descriptions`` in ``label_names`` order where both are
    given, else ``label_names``), or None; and the model's number of classes (timm builds the
    model for the pretrained config's, 1000 where it names none)."""
    classes = int(pretrained_cfg.get("num_classes") or 1000)
    names = pretrained_cfg.get("label_names")
    descriptions = pretrained_cfg.get("label_descriptions")
    if isinstance(names, dict):  # {class index: name}, timm's form for indices with gaps
        try:
            indices = sorted(int(key) for key in names)
        except ValueError:
            raise ZooFolderError(f"{where}: label_names keys must be class indices") from None
        if indices != list(range(len(indices))):
            raise ZooFolderError(f"{where}: label_names must name classes 0..{len(indices) - 1} without gaps, "
                                 f"got indices {indices[:10]}...")
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
