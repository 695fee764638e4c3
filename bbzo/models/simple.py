"""Small models: DeepZero's simple-CNN family (Fig. 2 / Fig. A1) and a plain MLP (``nn.Sequential``, hence staged)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .registry import register_model

__all__ = ["simple_cnn", "mlp", "SIMPLE_CNN_SIZES"]

#: Fig. 2's model sizes -> depth of ``AdjustableCNN(depth, channel_num=18)``: each block adds 2,970 parameters
SIMPLE_CNN_SIZES = {730: 1, 3700: 2, 6670: 3, 9640: 4, 12610: 5}


@register_model("simple_cnn", "DeepZero Fig. 2 CNN: depth x (conv3x3 -> BN -> ReLU -> maxpool) -> GAP -> linear "
                "(730 params at depth 1, width 18)")
def simple_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 18, depth: int = 1) -> nn.Sequential:
    """``AdjustableCNN(depth, channel_num=width)`` of the DeepZero code: 730 / 3,700 / 6,670 / 9,640 / 12,610
    parameters at width 18 and depth 1..5 (the conv bias before BN has a zero gradient, as in the reference)."""
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def _sized(params: int) -> None:
    depth = SIMPLE_CNN_SIZES[params]

    @register_model(f"simple_cnn_{params}", f"DeepZero Fig. 2 CNN with {params:,} parameters (depth {depth}, width 18)")
    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
        return simple_cnn(num_classes, in_channels, 18, depth)


for _p in SIMPLE_CNN_SIZES:
    _sized(_p)


@register_model("mlp", "fully connected network with tanh activations")
def mlp(in_features: int = 3, out_features: int = 2, hidden: Sequence[int] = (16, 16)) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = in_features
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.Tanh()]
        prev = h
    layers.append(nn.Linear(prev, out_features))
    return nn.Sequential(*layers)
