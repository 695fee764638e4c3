"""DeepZero's ZO-GraSP as its reference implements it (Eq. (3)), on the registered RGE estimator.

``S = -theta * Hg`` with ``Hg = (g1 - g0) / mu`` from two RGE estimates (q = 192 per-tensor-normalised
Gaussian directions, mu = 5e-3, forward differences, *independent* directions for ``g0`` and ``g1``),
``g1`` at ``theta + mu * g0``; ranked by ``|S|``. (The reference's parameter-aliasing bug is not
reproduced: every query perturbs a copy.) ``mu * g0`` is about 1e-6, so this "Hg" is two independent
noisy gradients; ``benchmarks/pruning_agreement.py`` and the README say what its ratios do and do not carry.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ...estimators import create_estimator
from ...step import estimate
from .registry import ScoreContext, ScoreInfo, ScoreResult, named_params, register_score, scoring_copy

__all__ = ["rge_estimate"]


def rge_estimate(adapter: Any, objective: Any, inputs: Any, targets: Any, params: Mapping[str, torch.Tensor],
                 ctx: ScoreContext, *, seed: int, q: int, mu: float, distribution: str,
                 difference: str = "forward") -> list[torch.Tensor]:
    """One estimate of the registered ``rge`` along directions seeded by ``seed``; float64 CPU tensors in ``params`` order.

    ``params`` must be the adapter's trainable tensors (the scored ones of a scoring copy).
    """
    est = create_estimator("rge", q=q, mu=mu, distribution=distribution, seed=seed, seeding="given",
                           difference=difference)
    p64 = {n: p.detach().double().cpu() for n, p in params.items()}  # the gradient in float64
    res = estimate(adapter, est, objective, inputs, targets, ledger=ctx.ledger, params=p64)
    return [res.grads[n] for n in params]


@register_score(ScoreInfo("zo_grasp", "DeepZero ZO-GraSP as the reference: RGE Hg, q=192, mu=5e-3, |S| ranking",
                          True, True, "2 (q + 1)"))
def _zo_grasp(model: nn.Module, objective: Any, inputs: Any, targets: Any, *, names: Sequence[str], seed: int,
              ctx: ScoreContext, q: int = 192, mu: float = 5e-3) -> ScoreResult:
    """Eq. (3) as ``importance_scores.py``: per-tensor unit-norm Gaussian directions (no ``d/q``
    scaling), forward differences against one base per estimate, independent directions for ``g0``
    (seed ``2s``) and ``g1`` (seed ``2s + 1``), ``theta' = theta + mu * g0``, ``Hg = (g1 - g0) / mu``."""
    m = scoring_copy(model, names)
    ps = named_params(m, names)
    adapter = ctx.adapter(m)
    g0 = rge_estimate(adapter, objective, inputs, targets, ps, ctx, seed=2 * seed, q=q, mu=mu,
                      distribution="tensor_sphere")
    with torch.no_grad():
        for p, g in zip(ps.values(), g0):
            p.add_(g.to(p.dtype), alpha=mu)
    g1 = rge_estimate(adapter, objective, inputs, targets, ps, ctx, seed=2 * seed + 1, q=q, mu=mu,
                      distribution="tensor_sphere")
    theta = named_params(model, names)
    scores = {n: -theta[n].detach().double().cpu() * (b - a) / mu for n, a, b in zip(names, g0, g1)}
    return ScoreResult(scores, "largest_abs", info={"q": q, "mu": mu, "directions": "tensor_sphere"})
