"""Optimizers and schedules used with ZO estimates (plain ``torch.optim``; the estimate is in ``.grad``)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .errors import ConfigError

__all__ = ["make_optimizer", "cosine_with_warmup"]


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str = "sgd", lr: float = 0.1,
                   momentum: float = 0.9, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                   nesterov: bool = False) -> torch.optim.Optimizer:
    """``sgd`` (momentum, weight decay; DeepZero: lr 0.1, momentum 0.9, wd 5e-4) or ``adam``/``adamw``."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose sgd, adam or adamw.")


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                       min_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_factor * lr`` at ``total_steps``.

    Stepped once per optimizer step (DeepZero: per-iteration warm-up for 3 epochs, then cosine).
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got {warmup_steps}, {total_steps}.")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
