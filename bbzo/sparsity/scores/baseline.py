"""Data-free scores: ``magnitude``, ``random`` and the ``layer_noise`` control (a layer-size prior)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .registry import ScoreContext, ScoreInfo, ScoreResult, named_params, register_score

__all__: list[str] = []


@register_score(ScoreInfo("magnitude", "|theta| (magnitude pruning at init)", True, False, "0"))
def _magnitude(model: nn.Module, objective: Any, inputs: Any, targets: Any, *, names: Sequence[str], seed: int,
               ctx: ScoreContext) -> ScoreResult:
    p = named_params(model, names)
    return ScoreResult({n: p[n].detach().abs().double().cpu() for n in names}, "largest")


@register_score(ScoreInfo("random", "uniform random scores (ratios ~ uniform per layer)", True, False, "0"))
def _random(model: nn.Module, objective: Any, inputs: Any, targets: Any, *, names: Sequence[str], seed: int,
            ctx: ScoreContext) -> ScoreResult:
    g = torch.Generator().manual_seed(seed)
    p = named_params(model, names)
    return ScoreResult({n: torch.rand(p[n].shape, generator=g, dtype=torch.float64) for n in names}, "largest")


@register_score(ScoreInfo("layer_noise", "control: theta * z / sqrt(d_l), no Hessian information", True, False, "0"))
def _layer_noise(model: nn.Module, objective: Any, inputs: Any, targets: Any, *, names: Sequence[str], seed: int,
                 ctx: ScoreContext) -> ScoreResult:
    """``theta * z / sqrt(d_l)``, ``z ~ N(0, 1)``: reproduces the reference ZO-GraSP's ratios with no queries."""
    g = torch.Generator().manual_seed(seed)
    p = named_params(model, names)
    out = {}
    for n in names:
        t = p[n].detach().double().cpu()
        out[n] = t * torch.randn(t.shape, generator=g, dtype=torch.float64) / t.numel() ** 0.5
    return ScoreResult(out, "largest_abs")
