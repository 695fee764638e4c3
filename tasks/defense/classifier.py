"""Train a classifier to serve as the black box (the *owner's* training, first-order; nothing ZO happens here).

Users bring their own classifier; the CPU-scale benchmark (``benchmarks/defense_small.py``) makes one with
this: SGD with momentum, cosine decay, random crop (``pad`` px) and horizontal flip, on clean images,
inputs normalized with ``mean``/``std`` as the :class:`~bbzo.oracles.classifier.ClassifierOracle` will.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bbzo.errors import ConfigError

__all__ = ["train_classifier", "clean_accuracy"]


def _augment(x: torch.Tensor, g: torch.Generator, pad: int) -> torch.Tensor:
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    if pad <= 0:
        return x
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h))  # (B, H)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w))  # (B, W)
    idx_b = torch.arange(b).view(b, 1, 1)
    return xp.permute(0, 2, 3, 1)[idx_b, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2).contiguous()


def train_classifier(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch: int = 128,
                     lr: float = 0.1, weight_decay: float = 5e-4, mean: Sequence[float], std: Sequence[float],
                     seed: int = 0, pad: int = 4, device: Any = "cpu",
                     progress: Optional[Callable[[int, float], None]] = None) -> nn.Module:
    """Train ``net`` on ``images (N, 3, H, W)`` in [0, 1]; returns it in eval mode."""
    n = images.shape[0]
    if not 1 <= batch <= n or epochs < 1:
        raise ConfigError(f"need 1 <= batch <= {n} and epochs >= 1.")
    net.to(device).train()
    m = torch.tensor(mean).view(1, -1, 1, 1).to(device)
    s = torch.tensor(std).view(1, -1, 1, 1).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps = epochs * (n // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(n // batch):
            idx = perm[i * batch:(i + 1) * batch]
            x = _augment(images[idx], g, pad).to(device)
            loss = F.cross_entropy(net((x - m) / s), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        if progress is not None:
            progress(epoch, total / max(1, n // batch))
    return net.eval()


@torch.no_grad()
def clean_accuracy(classify: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                   batch: int = 500) -> float:
    """Top-1 accuracy (%) of ``classify`` (images in [0, 1] -> logits) on clean images."""
    hit = sum(int((classify(images[i:i + batch]).argmax(1).cpu() == labels[i:i + batch]).sum())
              for i in range(0, images.shape[0], batch))
    return round(100.0 * hit / max(1, images.shape[0]), 3)
