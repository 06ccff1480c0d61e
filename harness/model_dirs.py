"""Model directories for benchmarks and tests: a torchvision architecture with random weights,
optionally calibrated on real photos so that its answers vary from photo to photo."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def random_model_dir(directory: Path, arch: str, num_classes: int = 1000, seed: int = 0,
                     calibration: torch.Tensor | None = None) -> Path:
    """A model directory with random weights for ``arch`` and labels class_0..class_{n-1}.

    With ``calibration`` (a normalized image batch) the random model is made image-sensitive,
    so that comparing two pipelines' top-1 answers means something: a freshly initialized
    network answers the same class for every image.
    """
    from handler.model.architectures import build_model

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(arch, num_classes)
    if calibration is not None:
        calibrate(model, calibration)
    torch.save(model.state_dict(), directory / "weights.pt")
    (directory / "index_to_name.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(num_classes)}))
    return directory


@torch.no_grad()
def calibrate(model: torch.nn.Module, images: torch.Tensor, logit_std: float = 3.0) -> None:
    """BatchNorm statistics measured on ``images`` (instead of the identity a fresh layer has),
    and the last linear layer scaled so the logits spread by ``logit_std``: top-1 then varies
    from image to image and its probability is well above uniform."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration pass
    model.train()
    model(images)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if linears:
        scale = logit_std / max(float(model(images).std(dim=1).mean()), 1e-12)
        linears[-1].weight.mul_(scale)
        if linears[-1].bias is not None:
            linears[-1].bias.mul_(scale)
