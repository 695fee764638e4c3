"""White-box references (autograd through the model and the objective; not query-only): GraSP and SNIP."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ...adapters.common import frozen_bn_stats
from ...objective import as_objective
from .registry import ScoreContext, ScoreInfo, ScoreResult, named_params, register_score, scoring_copy

__all__: list[str] = []


def _fo_grad_and_hg(model: nn.Module, objective: Any, inputs: Any, targets: Any, names: Sequence[str],
                    temperature: float, need_hg: bool) -> tuple[list[torch.Tensor], Optional[list[torch.Tensor]]]:
    m = scoring_copy(model, names)
    ps = list(named_params(m, names).values())
    obj = as_objective(objective)
    with frozen_bn_stats(m):
        out = m(inputs)
        out = out / temperature if temperature != 1.0 else out
        loss = obj(out, inputs if obj.needs_inputs else None, targets).mean()
        g = torch.autograd.grad(loss, ps, create_graph=need_hg)
        if not need_hg:
            return [t.detach() for t in g], None
        hg = torch.autograd.grad(g, ps, grad_outputs=[t.detach() for t in g])
    return [t.detach() for t in g], [t.detach() for t in hg]


@register_score(ScoreInfo("fo_grasp", "white-box GraSP: -theta * Hg by autograd (reference, not query-only)",
                          False, True, "0 (one backward + one Hessian-vector product)"))
def _fo_grasp(model: nn.Module, objective: Any, inputs: Any, targets: Any, *, names: Sequence[str], seed: int,
              ctx: ScoreContext, temperature: float = 1.0, signed: bool = False) -> ScoreResult:
    """``S = -theta * Hg`` by a Hessian-vector product (GraSP, Wang et al. 2020).

    ``temperature`` divides the outputs (the reference's FO branch uses 200); ``signed`` ranks the
    smallest ``S`` (original GraSP) instead of the largest ``|S|`` (DeepZero's reference).
    """
    _, hg = _fo_grad_and_hg(model, objective, inputs, targets, names, float(temperature), True)
    p = named_params(model, names)
    scores = {n: (-p[n].detach() * h).double().cpu() for n, h in zip(names, hg or [])}
    return ScoreResult(scores, "smallest" if signed else "largest_abs", info={"temperature": temperature, "signed": signed})


@register_score(ScoreInfo("snip", "white-box SNIP: |theta * g| by autograd (reference, not query-only)",
                          False, True, "0 (one backward)"))
def _snip(model: nn.Module, objective: Any, inputs: Any, targets: Any, *, names: Sequence[str], seed: int,
          ctx: ScoreContext) -> ScoreResult:
    """``|theta * g|`` (Lee et al. 2019)."""
    g, _ = _fo_grad_and_hg(model, objective, inputs, targets, names, 1.0, False)
    p = named_params(model, names)
    return ScoreResult({n: (p[n].detach() * t).abs().double().cpu() for n, t in zip(names, g)}, "largest")
