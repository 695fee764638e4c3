"""DnCNN (Zhang et al. 2017) as Salman et al.'s denoised smoothing uses it: ``D(x) = x - net(x)``.

Depth 17, width 64, 3x3 convolutions with padding 1: conv(3->64, bias) + ReLU, then 15 x (conv 64->64 without
bias, BatchNorm(eps 1e-4, momentum 0.95), ReLU), then conv(64->3) without bias. The net predicts the noise.
Orthogonal conv init, BN weight 1 / bias 0, and the **last conv starts at zero**, so an untrained denoiser is
the identity. The state-dict layout is Salman's (``dncnn.0.weight``, ``dncnn.0.bias``, ``dncnn.2.weight``,
``dncnn.3.weight`` ...), so their checkpoints load. 558,400 parameters, 1,728 in the last layer.

Declared stages: ``Fork``, every layer on the branch, ``Merge(subtract=True)``: a perturbed coordinate in
layer ``i`` recomputes nothing before it (and only its channel until the next convolution).
"""

from __future__ import annotations

import torch
from torch import nn

from ..stages import Fork, Merge, OnFirst
from .registry import register_model

__all__ = ["DnCNN", "dncnn"]


class DnCNN(nn.Module):
    def __init__(self, depth: int = 17, width: int = 64, channels: int = 3) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"DnCNN depth must be >= 2, got {depth}")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1, bias=True), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, eps=1e-4, momentum=0.95),
                       nn.ReLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1, bias=False))
        self.dncnn = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            layers[-1].weight.zero_()

    @property
    def last(self) -> nn.Conv2d:
        """The last convolution (the layer DeepZero fine-tunes)."""
        return self.dncnn[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.dncnn(x)

    def bbzo_stages(self) -> list[nn.Module]:
        return [Fork(), *(OnFirst(m) for m in self.dncnn), Merge(subtract=True)]


@register_model("dncnn", "DnCNN denoiser D(x) = x - net(x) (Salman et al. layout): depth 17, width 64 -> 558,400 params")
def dncnn(depth: int = 17, width: int = 64, channels: int = 3) -> DnCNN:
    return DnCNN(depth, width, channels)
