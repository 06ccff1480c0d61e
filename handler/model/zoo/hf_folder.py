"""Hugging Face transformers model folders: what ``save_pretrained`` and ``huggingface-cli
download`` write (``config.json`` naming an image classification architecture, the weights,
``preprocessor_config.json``).

The image processor's type decides the algorithm; its PIL backend is the reference (the
torchvision "fast" backend differs slightly, by Hugging Face's own account). The processor is
instantiated by transformers itself, so its defaults fill what the file leaves out; the types
whose algorithm the pipeline reproduces are listed in ``PROCESSOR_TYPES``; any other is an error.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from handler.model.zoo.files import CONFIG, PROCESSOR, ZooFiles, ZooFolderError, read_json

log = logging.getLogger(__name__)

# Processor types (PIL backend, transformers 5) whose image path is the base one: resize (by
# ``size``), optional centre crop, rescale, normalize; ConvNeXt's has its own resize (below).
BASE_PROCESSORS = ("ViTImageProcessor", "DeiTImageProcessor", "BitImageProcessor", "CLIPImageProcessor",
                   "MobileNetV1ImageProcessor", "PvtImageProcessor", "SiglipImageProcessor", "BeitImageProcessor")
PROCESSOR_TYPES = BASE_PROCESSORS + ("ConvNextImageProcessor",)
# PIL's resampling filters by number, as processors store them.
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Types whose PIL backend never pads (their own _preprocess has no padding step).
NEVER_PAD = ("ConvNextImageProcessor", "BeitImageProcessor")
# ConvNeXt's processor warps to a square without a crop at this size and above.
CONVNEXT_WARP_SIZE = 384
# Labels transformers makes up when a config names none.
PLACEHOLDER_LABEL = re.compile(r"LABEL_\d+")


def hf_model_config(files: ZooFiles) -> Any:
    """The folder's model config as transformers reads it (AutoConfig); a ZooFolderError unless
    it names an image classification model."""
    from transformers import AutoConfig

    files.config()  # a clear error for a config.json that is not a JSON object
    with files.directory(weights=False) as directory:
        try:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except (ValueError, KeyError, OSError) as exc:
            raise ZooFolderError(f"{files.where}/{CONFIG} does not load as a transformers config: "
                                 f"{str(exc)[:300]}") from None
    classification_architecture(config, files.where)
    return config


def classification_architecture(config: Any, where: str) -> str:
    """The image classification class the config names; ZooFolderError if it names none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as MAPPING

    known: set[str] = set()
    for value in MAPPING.values():
        known.update(value if isinstance(value, tuple) else (value,))
    named = list(getattr(config, "architectures", None) or [])
    for name in named:
        if name in known:
            return name
    if not named and config.model_type in MAPPING:
        default = MAPPING[config.model_type]
        return str(default[0] if isinstance(default, tuple) else default)
    raise ZooFolderError(f"{where}/{CONFIG}: architectures {named or '(none)'} (model_type {config.model_type!r}) "
                         "is not a transformers image classification model (…ForImageClassification)")


def hf_labels(config: Any, where: str) -> tuple[list[str] | None, int]:
    """The model config's ``id2label`` in class order (None if they are transformers' LABEL_i
    placeholders), and the number of classes."""
    if getattr(config, "problem_type", None) == "multi_label_classification":
        raise ZooFolderError(f"{where}: problem_type multi_label_classification is not served: "
                             "the pipeline scores classes with a softmax (one label per image)")
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    classes = len(id2label) or int(config.num_labels)
    if sorted(id2label) != list(range(len(id2label))):
        raise ZooFolderError(f"{where}: id2label keys must be 0..{len(id2label) - 1}, got {sorted(id2label)[:10]}")
    labels = [id2label[i] for i in range(len(id2label))]
    if all(PLACEHOLDER_LABEL.fullmatch(label) for label in labels):
        return None, classes
    return labels, classes


def hf_settings(files: ZooFiles) -> dict[str, Any]:
    """The handler settings that reproduce the folder's image processor (its PIL backend)."""
    processor = _processor(files)
    where = f"{files.where}/{PROCESSOR}"
    kind = type(processor).__name__.removesuffix("Pil")
    if kind not in PROCESSOR_TYPES:
        raise ZooFolderError(f"{where}: image processor {kind} is not one the pipeline reproduces "
                             f"({', '.join(PROCESSOR_TYPES)})")
    if getattr(processor, "do_pad", None) and kind not in NEVER_PAD:
        raise ZooFolderError(f"{where}: do_pad is not reproduced by the pipeline")
    if not processor.do_resize:
        raise ZooFolderError(f"{where}: do_resize is false: images of every size would reach the model "
                             "unresized; the pipeline batches one input size")
    settings = _geometry(processor, kind, where)
    resample = processor.resample
    resample = 2 if resample is None else int(resample)  # the PIL backend's default: bilinear
    if RESAMPLE.get(resample) not in ("bilinear", "bicubic"):
        raise ZooFolderError(f"{where}: resample {resample} ({RESAMPLE.get(resample, 'unknown')}) cannot be "
                             "reproduced (the pipeline resizes with bilinear or bicubic)")
    settings["interpolation"] = RESAMPLE[resample]
    settings.update(_normalization(processor, where))
    return settings


def _processor(files: ZooFiles) -> Any:
    from transformers import AutoImageProcessor

    if PROCESSOR not in files.files:
        raise ZooFolderError(f"{files.where}: {PROCESSOR} is missing: a transformers image classifier folder "
                             "holds its image processor (processor.save_pretrained(DIR) writes it)")
    read_json(files.files[PROCESSOR], f"{files.where}/{PROCESSOR}")
    with files.directory(weights=False) as directory:
        try:
            return AutoImageProcessor.from_pretrained(directory, backend="pil", local_files_only=True)
        except (ValueError, KeyError, OSError, TypeError) as exc:
            raise ZooFolderError(f"{files.where}/{PROCESSOR} does not load as an image processor: "
                                 f"{str(exc)[:300]}") from None


def _square(size: Any, what: str, where: str) -> int:
    if not (size and size.height and size.width):
        raise ZooFolderError(f"{where}: {what} {dict(size or {})} has no height and width")
    if size.height != size.width:
        raise ZooFolderError(f"{where}: {what} {size.height}x{size.width} is not square; the pipeline serves "
                             "square inputs only")
    return int(size.height)


def _geometry(processor: Any, kind: str, where: str) -> dict[str, Any]:
    """Resize mode and sizes: Hugging Face's crops take the floor of half the margin."""
    size = processor.size
    crop = _square(processor.crop_size, "crop_size", where) if processor.do_center_crop else None
    if kind == "ConvNextImageProcessor":
        if not size.shortest_edge:
            raise ZooFolderError(f"{where}: ConvNeXt's processor needs size.shortest_edge, got {dict(size)}")
        edge = int(size.shortest_edge)
        crop_pct = processor.crop_pct
        if edge < CONVNEXT_WARP_SIZE and not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
            raise ZooFolderError(f"{where}: crop_pct must be a number in (0, 1], got {crop_pct!r} (above 1 "
                                 "would pad the image; the pipeline does not reproduce that)")
        if edge < CONVNEXT_WARP_SIZE:
            # Shortest edge to int(edge / crop_pct), then the centre edge x edge.
            if crop is not None and crop != edge:
                raise ZooFolderError(f"{where}: do_center_crop with crop_size {crop} after ConvNeXt's own "
                                     f"{edge} crop is not reproduced")
            return {"resize_mode": "center_crop", "resize_size": int(edge / crop_pct),
                    "image_size": edge, "crop_offset": "floor"}
        return _squashed(edge, crop, where)
    if size.shortest_edge and not size.longest_edge:
        if crop is None:
            raise ZooFolderError(f"{where}: size shortest_edge {size.shortest_edge} without a centre crop gives "
                                 "each image its own shape; the pipeline batches one input size")
        if crop > size.shortest_edge:
            raise ZooFolderError(f"{where}: crop_size {crop} above shortest_edge {size.shortest_edge} pads the "
                                 "image; the pipeline does not reproduce that")
        return {"resize_mode": "center_crop", "resize_size": int(size.shortest_edge), "image_size": crop,
                "crop_offset": "floor"}
    if size.height and size.width:
        return _squashed(_square(size, "size", where), crop, where)
    raise ZooFolderError(f"{where}: size {({k: v for k, v in dict(size).items() if v})} is not reproduced "
                         "(height and width, or shortest_edge with a centre crop)")


def _squashed(side: int, crop: int | None, where: str) -> dict[str, Any]:
    if crop is None or crop == side:
        return {"resize_mode": "squash", "image_size": side, "resize_size": side, "crop_offset": "floor"}
    if crop > side:
        raise ZooFolderError(f"{where}: crop_size {crop} above size {side} pads the image; the pipeline does "
                             "not reproduce that")
    return {"resize_mode": "squash_center_crop", "resize_size": side, "image_size": crop, "crop_offset": "floor"}


def _normalization(processor: Any, where: str) -> dict[str, Any]:
    """mean and std for pixels scaled to [0, 1] equal to the processor's
    ``(pixel * rescale_factor - image_mean) / image_std`` (each step only where it is on)."""
    factor = processor.rescale_factor if processor.do_rescale else 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ZooFolderError(f"{where}: rescale_factor must be a number above 0, got {factor!r}")
    factor = float(factor)
    if processor.do_normalize:
        mean, std = _three(processor.image_mean, "image_mean", where), _three(processor.image_std, "image_std", where)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # (x * f - m) / s == (x / 255 - m / (255 f)) / (s / (255 f))
    return {"mean": [m / (255.0 * factor) for m in mean], "std": [s / (255.0 * factor) for s in std]}


def _three(values: Any, what: str, where: str) -> tuple[float, float, float]:
    """One number for every channel, or three (RGB)."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * 3
    if not (isinstance(values, (list, tuple)) and len(values) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ZooFolderError(f"{where}: {what} must be a number or 3 numbers (RGB), got {values!r}")
    if what == "image_std" and not all(v > 0 for v in values):
        raise ZooFolderError(f"{where}: image_std must be above 0, got {list(values)}")
    return (float(values[0]), float(values[1]), float(values[2]))


class LogitsOnly(nn.Module):
    """A transformers classifier as the pipeline calls models: pixels in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(getattr(model, "config").num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def load_hf(files: ZooFiles) -> nn.Module:
    """The model, built by transformers from the folder (``from_pretrained``, fp32), in eval
    mode. Weights that leave any of the model's tensors unloaded or mis-shaped are an error
    (transformers itself would only warn and initialise them randomly)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar per load in the server's log otherwise
    config = hf_model_config(files)
    architecture = classification_architecture(config, files.where)
    model_class = getattr(transformers, architecture)
    name = f"{files.where}/{files.weights_name}"
    with files.directory() as directory:
        try:
            model, info = model_class.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                                      output_loading_info=True)
        except Exception as exc:  # an unreadable or corrupt file, or shapes that do not fit
            raise ZooFolderError(f"{name} cannot be loaded into {architecture}: {type(exc).__name__}: "
                                 f"{str(exc)[:400]}") from None
    problems = {key: info.get(key) for key in ("missing_keys", "mismatched_keys", "error_msgs") if info.get(key)}
    if problems:
        described = "; ".join(f"{key.replace('_', ' ')}: {sorted(map(str, value))[:5]}"
                              for key, value in problems.items())
        raise ZooFolderError(f"weights in {name} do not fit {architecture}: {described}")
    if info.get("unexpected_keys"):
        log.warning("%s: tensors the model does not use: %s", name, sorted(info["unexpected_keys"])[:10])
    return LogitsOnly(model.eval())
