"""timm and transformers model folders built offline, as the zoos' own save helpers write them, and
the zoos' own evaluation pipelines to compare the handler against (tests, benchmarks/zoo_parity.py).

No hub is reachable here: timm models are created with ``pretrained=False`` and saved with
``timm.models.save_for_hf``; transformers models are built from small configs with random weights
and saved with ``save_pretrained`` beside their image processor (its PIL backend). Random weights
answer the same class for every image, so ``sensitize`` makes them image-sensitive (BatchNorm
statistics measured on real photos, the head scaled): comparing two pipelines' top-1 answers then
means something.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
LABELS = [f"class_{i}" for i in range(10)]


def photos() -> list[tuple[str, bytes]]:
    """Real photos (tests/data) at several sizes and aspect ratios, with odd and even crop margins:
    as shot, a portrait crop, enlarged (2.5x: above every crop, a large decode), reduced (1/3: the
    resize enlarges), a 5:1 strip, and one as PNG. (name, encoded bytes) pairs."""
    out = []
    for path in sorted(DATA.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        width, height = image.size
        views = {
            "": image,
            "portrait": image.crop((0, 0, int(height * 0.62) | 1, height)),
            "enlarged": image.resize((int(width * 2.5), int(height * 2.5)), Image.BICUBIC),
            "reduced": image.resize((width // 3, height // 3 + 1), Image.BICUBIC),
            "strip": image.crop((0, height // 3, width, height // 3 + width // 5)),
        }
        out.append((path.name, path.read_bytes()))  # as shipped (camera.jpg is grayscale)
        for view, picture in views.items():
            if view:
                out.append((f"{path.stem}-{view}.jpg", encode(picture, "JPEG", quality=92)))
    out.append(("coffee.png", encode(Image.open(DATA / "coffee.jpg").convert("RGB"), "PNG")))
    return out


def encode(image: Image.Image, fmt: str, **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    """How the zoos' own pipelines open an image file: PIL, converted to RGB."""
    return Image.open(io.BytesIO(data)).convert("RGB")


@torch.no_grad()
def sensitize(model: torch.nn.Module, inputs: torch.Tensor, logit_std: float = 4.0) -> None:
    """Normalization statistics measured on ``inputs`` (real photos, the zoo's own transform),
    and the last linear layer scaled so the logits spread by ``logit_std``."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the pass
    model.train()
    model(inputs)
    model.eval()
    for norm in norms:
        norm.momentum = 0.1
    logits = _logits(model(inputs))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    scale = logit_std / max(float(logits.std(dim=1).mean()), 1e-12)
    linears[-1].weight.mul_(scale)
    if linears[-1].bias is not None:
        linears[-1].bias.mul_(scale)


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


# ---- timm ------------------------------------------------------------------------------------

def timm_folder(directory: Path, model_name: str, *, data_config: dict[str, Any] | None = None,
                num_classes: int = 10, labels: Sequence[str] | None = tuple(LABELS), seed: int = 0,
                sensitive: bool = True, safetensors: bool = True) -> Path:
    """A timm hub folder for ``model_name`` (a timm name with its pretrained tag, whose
    pretrained config sets the preprocessing; ``data_config`` changes it as timm's own export
    option does) with random, image-sensitive weights."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes).eval()
    if sensitive:
        transform = timm_transform(model, data_config)
        sensitize(model, torch.stack([transform(decoded(data)) for _, data in photos()[:12]]))
    model_config: dict[str, Any] = {"label_names": list(labels)} if labels is not None else {}
    timm.models.save_for_hf(model, directory, model_config=model_config, data_config=data_config,
                            safe_serialization=True if safetensors else False)
    return directory


def timm_transform(model: torch.nn.Module, data_config: dict[str, Any] | None = None,
                   use_test_size: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """timm's own evaluation transform for ``model``: create_transform of its resolved data config."""
    from timm.data import create_transform, resolve_model_data_config

    config = resolve_model_data_config(model, args=data_config, use_test_size=use_test_size)
    return create_transform(**config, is_training=False)


def timm_reference(folder: Path, use_test_size: bool = False) -> tuple[torch.nn.Module, Callable]:
    """The folder as timm itself loads it (``local-dir:``), fp32, and its evaluation transform."""
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    return model, timm_transform(model, use_test_size=use_test_size)


# ---- transformers ----------------------------------------------------------------------------

def hf_folder(directory: Path, kind: str, *, processor: dict[str, Any] | None = None, num_labels: int = 10,
              labels: Sequence[str] | None = tuple(LABELS), seed: int = 0, sensitive: bool = True) -> Path:
    """A transformers folder: a small ``kind`` (``vit`` or ``convnext``) image classifier with
    random, image-sensitive weights, saved beside its image processor (PIL backend, ``processor``
    keyword arguments)."""
    import transformers as hf

    hf.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    id2label = {i: (labels[i] if labels is not None else f"LABEL_{i}") for i in range(num_labels)}
    common = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if kind == "vit":
        config = hf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                              image_size=224, patch_size=16, **common)
        model = hf.ViTForImageClassification(config)
        image_processor = hf.ViTImageProcessorPil(**(processor or {}))
    elif kind == "convnext":
        config = hf.ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 64, 128], **common)
        model = hf.ConvNextForImageClassification(config)
        image_processor = hf.ConvNextImageProcessorPil(**{"size": {"shortest_edge": 224}, "crop_pct": 0.875,
                                                          **(processor or {})})
    else:
        raise ValueError(kind)
    model.eval()
    if sensitive:
        batch = torch.stack([hf_transform(image_processor)(decoded(data)) for _, data in photos()[:12]])
        sensitize(model, batch)
    model.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    return directory


def hf_transform(processor: Any) -> Callable[[Image.Image], torch.Tensor]:
    """An image processor as a transform: one PIL image -> its pixel_values."""
    return lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]


def hf_reference(folder: Path) -> tuple[torch.nn.Module, Callable]:
    """The folder as transformers loads it (fp32) with its image processor's PIL backend, the
    model returning logits."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")

    class Logits(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=x).logits

    return Logits().eval(), hf_transform(processor)


@torch.no_grad()
def reference_answers(model: torch.nn.Module, transform: Callable, images: Sequence[bytes]) -> torch.Tensor:
    """The zoo's own pipeline in fp32: class probabilities per image."""
    inputs = torch.stack([transform(decoded(data)) for data in images])
    return torch.softmax(_logits(model(inputs)).float(), dim=1)


# Every answer's probabilities within this of the zoo's own fp32 pipeline's. What limits it: the
# pixels (docs/serving-your-own-model.md): a level or two apart, a few values up to 9, which moves
# these image-sensitive random models' probabilities by up to 7e-3 (benchmarks/zoo_parity.py).
PROB_TOLERANCE = 0.02


def assert_answers_match(got: Sequence[dict[str, float]], probabilities: torch.Tensor, labels: Sequence[str]) -> None:
    """Our top-k answers against the zoo's probabilities: the same top-1, every score close."""
    assert len(got) == len(probabilities)
    for i, (answer, row) in enumerate(zip(got, probabilities)):
        assert next(iter(answer)) == labels[int(row.argmax())], (i, answer, row)
        for label, score in answer.items():
            assert abs(score - float(row[list(labels).index(label)])) <= PROB_TOLERANCE, (i, label, score, row)


@dataclass(frozen=True)
class ParityCase:
    """A zoo folder the parity tests serve: which zoo, which model (and preprocessing)."""

    name: str
    zoo: str
    model: str
    data_config: dict[str, Any] | None = None

    def build(self, directory: Path) -> Path:
        if self.zoo == "timm":
            return timm_folder(directory, self.model, data_config=self.data_config)
        return hf_folder(directory, self.model)

    def reference(self, folder: Path, images: Sequence[bytes]) -> torch.Tensor:
        """The zoo's own pipeline's probabilities, fp32."""
        model, transform = timm_reference(folder) if self.zoo == "timm" else hf_reference(folder)
        return reference_answers(model, transform, images)


# Covering crop modes center and squash, bicubic and bilinear, crop_pct 0.875 / 0.95 / 1.0 (and 0.9),
# ImageNet and 0.5 mean/std, and a ConvNeXt-type and a ViT-type transformers processor. The models
# are ones that random weights leave well-conditioned (depthwise nets with squeeze-and-excitation
# amplify a quarter-level of noise into 0.1 of probability, far from what trained weights do).
PARITY_CASES = [
    ParityCase("timm_resnet18_a1", "timm", "resnet18.a1_in1k"),  # center, bicubic, 0.95, ImageNet
    ParityCase("timm_resnet18_tv", "timm", "resnet18.tv_in1k"),  # center, bilinear, 0.875, ImageNet
    ParityCase("timm_vit_tiny", "timm", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"),  # bicubic, 0.9, 0.5
    ParityCase("timm_convnext_squash", "timm", "convnext_atto.d2_in1k",
               {"crop_mode": "squash", "crop_pct": 1.0, "interpolation": "bilinear"}),
    ParityCase("hf_vit", "transformers", "vit"),  # 224 x 224 squash, bilinear, 0.5
    ParityCase("hf_convnext", "transformers", "convnext"),  # shortest edge 256, crop 224, bicubic
]
