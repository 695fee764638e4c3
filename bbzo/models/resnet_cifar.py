"""CIFAR ResNets of He et al. 2016 (§4.2): ResNet-20/32/44/56 with option-A shortcuts.

Option A: the identity shortcut subsamples with stride 2 and zero-pads the new channels, so it has
no parameters. ResNet-20 has 269,722 parameters (DeepZero's model, "0.27M"). Kaiming-normal init for
convs and the linear layer, as in the common CIFAR reference implementation.

Each model declares its stages for feature reuse: ``conv1, bn1, relu``, then per block
``Fork, conv1, bn1, relu, conv2, bn2, Merge(shortcut, relu)``, then ``pool+flatten, fc``. A perturbed
weight in a block's ``conv2`` therefore recomputes nothing of the block before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..stages import Fork, Merge, OnFirst
from .registry import register_model

__all__ = ["CifarResNet", "BasicBlock", "resnet20", "resnet32", "resnet44", "resnet56"]


class ShortcutA(nn.Module):
    """Parameter-free option-A shortcut: stride-2 subsampling and zero-padded channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            p = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, p, self.pad - p))
        return x


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = (
            ShortcutA(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.relu(h + self.shortcut(x))

    def bbzo_stages(self) -> list[nn.Module]:
        return [Fork(), OnFirst(self.conv1), OnFirst(self.bn1), OnFirst(self.relu), OnFirst(self.conv2),
                OnFirst(self.bn2), Merge(self.shortcut, self.relu)]


class PoolFlatten(nn.Module):
    """Global average pool + flatten: per channel, so a one-channel change stays one feature (channel reuse)."""

    bbzo_channelwise = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, three stages of ``n`` blocks."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes, layers = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(planes, width, stride if b == 0 else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = PoolFlatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))

    def bbzo_stages(self) -> list[nn.Module]:
        stages: list[nn.Module] = [self.conv1, self.bn1, self.relu]
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                stages.extend(block.bbzo_stages())
        return stages + [self.pool, self.fc]


@register_model("resnet20", "CIFAR ResNet-20, option-A shortcuts (He et al. 2016), 0.27M params")
def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


@register_model("resnet32", "CIFAR ResNet-32, option-A shortcuts, 0.46M params")
def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, num_classes, in_channels)


@register_model("resnet44", "CIFAR ResNet-44, option-A shortcuts, 0.66M params")
def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(44, num_classes, in_channels)


@register_model("resnet56", "CIFAR ResNet-56, option-A shortcuts, 0.85M params")
def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)
