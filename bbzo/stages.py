"""Staged models: the building blocks a model uses to declare its stages (for feature reuse).

A *staged model* is an ordered list of stages whose composition is the model's forward:
``forward(x) == s[n-1](...s[1](s[0](x)))``. Activations between stages may be tensors or tuples of
tensors (a residual block forks into ``(h, skip)`` and merges back). A model declares its stages with
a ``bbzo_stages() -> list[nn.Module]`` method; an ``nn.Sequential`` is staged by its (flattened)
children. :mod:`bbzo.adapters.staged` evaluates perturbations of a staged model with feature reuse.

A custom stage that couples the samples of a batch (as a train-mode BatchNorm does) must set
``bbzo_batch_coupled = True`` so that every perturbed parameter set keeps its own batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["Fork", "OnFirst", "Merge", "model_stages"]


class Fork(nn.Module):
    """``x -> (x, x)``: start a residual branch (element 0 is the branch, element 1 the skip)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x, x)


class OnFirst(nn.Module):
    """Apply ``module`` to element 0 of a tuple activation, pass the rest through."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, act: tuple) -> tuple:
        return (self.module(act[0]), *act[1:])


class Merge(nn.Module):
    """``(h, skip) -> post(h + shortcut(skip))``: close a residual branch.

    ``subtract=True`` gives ``post(shortcut(skip) - h)`` (a branch that predicts what to remove, as DnCNN's noise).
    """

    def __init__(self, shortcut: Optional[nn.Module] = None, post: Optional[nn.Module] = None,
                 subtract: bool = False) -> None:
        super().__init__()
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.post = post if post is not None else nn.Identity()
        self.subtract = subtract

    def forward(self, act: tuple) -> torch.Tensor:
        if self.subtract:
            return self.post(self.shortcut(act[1]) - act[0])
        return self.post(act[0] + self.shortcut(act[1]))


def _flatten_sequential(mods: Sequence[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in mods:
        if isinstance(m, nn.Sequential):
            out.extend(_flatten_sequential(list(m)))
        elif hasattr(m, "bbzo_stages"):
            out.extend(m.bbzo_stages())
        else:
            out.append(m)
    return out


def model_stages(model: nn.Module) -> Optional[list[nn.Module]]:
    """The model's stages, or None if it declares none (then only the generic adapter applies)."""
    if hasattr(model, "bbzo_stages"):
        return list(model.bbzo_stages())
    if isinstance(model, nn.Sequential):
        return _flatten_sequential(list(model))
    return None
