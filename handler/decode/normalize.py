"""uint8 pixels -> normalized float model input, in one pass on the model's device."""

from __future__ import annotations

import torch


class Normalizer:
    """``x / 255`` then ``(x - mean) / std`` per channel, as one fused multiply-add.

    The per-channel constants are expanded to whole channels_last planes (cached per image
    size): with a (1, 3, 1, 1) constant against channels_last pixels the innermost loop cycles
    over three channels and does not vectorize; a full plane streams beside the pixels with
    stride 1.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        self.device = device
        inv_std255 = 1.0 / (torch.tensor(std, dtype=torch.float64) * 255.0)
        bias = -torch.tensor(mean, dtype=torch.float64) * 255.0 * inv_std255
        self._scale = inv_std255.float().view(1, 3, 1, 1).to(device)
        self._bias = bias.float().view(1, 3, 1, 1).to(device)
        self._planes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8, any device and layout -> float32 on the device, channels_last."""
        x = pixels.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        scale, bias = self._plane(x.shape[-2], x.shape[-1])
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device, memory_format=torch.channels_last)
        return torch.addcmul(bias, x, scale, out=out)

    def _plane(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        planes = self._planes.get((height, width))
        if planes is None:
            shape = (1, 3, height, width)
            planes = (self._scale.expand(shape).contiguous(memory_format=torch.channels_last),
                      self._bias.expand(shape).contiguous(memory_format=torch.channels_last))
            self._planes[(height, width)] = planes
        return planes
