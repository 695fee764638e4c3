"""Small models: DeepZero's Fig. 2 CNN and a plain MLP (both ``nn.Sequential``, hence staged)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .registry import register_model

__all__ = ["simple_cnn", "mlp"]


@register_model("simple_cnn", "DeepZero Fig. 2 CNN: conv3x3 -> BN -> ReLU -> maxpool -> GAP -> linear (730 params at width 18)")
def simple_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 18) -> nn.Sequential:
    """``AdjustableCNN(depth=1, channel_num=width)`` of the DeepZero code; 730 parameters at width 18."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


@register_model("mlp", "fully connected network with tanh activations")
def mlp(in_features: int = 3, out_features: int = 2, hidden: Sequence[int] = (16, 16)) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = in_features
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.Tanh()]
        prev = h
    layers.append(nn.Linear(prev, out_features))
    return nn.Sequential(*layers)
