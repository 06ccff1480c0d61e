"""Model architectures by name: the demo ShapesNet, or any torchvision classification model."""

from __future__ import annotations

import torch
from torch import nn


class ShapesNet(nn.Module):
    """A small CNN for the procedurally drawn shapes demo (a few hundred KB of weights)."""

    def __init__(self, num_classes: int = 3, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            )

        w = width
        # Downsample early: most of the cost of a small CNN is in its full-resolution layers.
        self.features = nn.Sequential(
            block(3, w // 2, 2),
            block(w // 2, w, 2),
            block(w, w, 1),
            block(w, 2 * w, 2),
            block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2),
            block(4 * w, 4 * w, 1),
            # A last cheap downsampling widens the receptive field to large shapes.
            block(4 * w, 4 * w, 2),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(8 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Per-image, per-channel standardization: a shape is defined by contrast, not by its
        # colours, and removing them lets training find shape features much sooner.
        x = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + 0.1)
        x = self.features(x)
        # Average and max pooling: max keeps a small shape's evidence from being averaged away.
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.classifier(pooled)


LOCAL_ARCHITECTURES = {"shapes_cnn": ShapesNet}


def build_model(arch: str, num_classes: int) -> nn.Module:
    """An untrained model of ``arch`` with ``num_classes`` outputs."""
    if arch in ("torchscript", "torch_export"):
        raise ValueError(f"{arch!r} is a file format: load it with handler.model_loading.load_model")
    if arch in LOCAL_ARCHITECTURES:
        return LOCAL_ARCHITECTURES[arch](num_classes=num_classes)
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise ValueError(
            f"unknown architecture {arch!r}: use one of {sorted(LOCAL_ARCHITECTURES)} "
            "or a torchvision.models classification model such as resnet18"
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
