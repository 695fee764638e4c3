"""``zo_grasp_oracle``: GraSP's ``-theta * Hg`` for a white-box model in front of a query-only oracle.

The bbzo setting: only the loss/oracle is a black box. Every derivative *of the oracle* comes from
queries (coordinate-wise central differences over the model's ``C`` output coordinates; per-sample
losses give all samples at once) and the model is differentiated by autograd:
``Hg = J^T H_o J g + sum_k r_k (d^2 out_k) g``. ``6C`` queries in all (60 for CIFAR-10; ``2C`` when
``Jg = 0``), float64. A parameter-space difference ``(g(theta + e g) - g(theta)) / e`` instead crosses ReLU
kinks: at ``e = 1e-6`` the early layers of ResNet-20 already decorrelate. It needs the model -> oracle
split and does *not* apply where the whole model is the black box (then use ``zo_grasp`` /
``zo_grasp_sketch``) or inside a rollout.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ...adapters.common import frozen_bn_stats, output_probe_losses, per_sample_losses, repeat_targets
from ...errors import ConfigError
from ...estimators import OracleCGE
from ...objective import as_objective
from .registry import ScoreContext, ScoreInfo, ScoreResult, cast_inputs, named_params, register_score, scoring_copy

__all__: list[str] = []


def _oracle_out_grad(objective: Any, out: torch.Tensor, inputs: Any, targets: Any, h: float,
                     ctx: ScoreContext) -> torch.Tensor:
    """``d mean_b loss_b / d out`` ``(B, ...)`` at the outputs ``out``: ``oracle_cge``'s central differences.

    The chain-rule estimator's own probes and cotangent (``2C`` queries, ``C`` = per-sample output size): each
    query moves coordinate ``j`` of every sample, and per-sample losses give every sample's partial.
    """
    b = out.shape[0]
    obj = as_objective(objective)
    est = OracleCGE(mu=h, difference="central", width=int(out[0].numel()))
    request, _ = est.ask({}, est.init({}))
    probes = request.probes

    def loss(moved: torch.Tensor, k: int) -> torch.Tensor:
        ctx.ledger.charge_queries(k)
        per = obj(moved.reshape(k * b, *out.shape[1:]), repeat_targets(inputs, k) if obj.needs_inputs else None,
                  repeat_targets(targets, k))
        return per_sample_losses(per, k, b)

    per = output_probe_losses(loss, out.detach(), probes)
    m = len(probes) // 2
    v = est.cotangent(est.differences(per, None, m), probes.slice(0, m))  # (B, C) float64
    return (v / b).to(out.dtype).reshape(out.shape)


@register_score(ScoreInfo(
    "zo_grasp_oracle",
    "-theta * Hg with the oracle's derivatives from queries and the white-box model by autograd (float64)",
    True, True, "6C (C = model output size per sample; 2C if Jg = 0)"))
def _zo_grasp_oracle(model: nn.Module, objective: Any, inputs: Any, targets: Any, *, names: Sequence[str], seed: int,
                     ctx: ScoreContext, h: float = 1e-4, tau: float = 1e-3) -> ScoreResult:
    """``Hg = J^T H_o J g + sum_k r_k (d^2 out_k) g`` (Gauss-Newton part + residual part).

    ``r = dl/d out`` and ``H_o u`` (the oracle's Hessian along ``u = J g``, central differences of
    ``r`` at ``out +- tau u/|u|``) come from ``6C`` loss queries (step ``h``); ``J``, ``J^T`` and the
    model's second derivatives come from autograd on the white-box model.
    """
    m = scoring_copy(model, names, torch.float64)
    x = cast_inputs(inputs, torch.float64)
    ps = list(named_params(m, names).values())
    with frozen_bn_stats(m):
        out = m(x)
    if not isinstance(out, torch.Tensor):
        raise ConfigError("zo_grasp_oracle needs a model with a single tensor output (the oracle's input).")
    r = _oracle_out_grad(objective, out, x, targets, h, ctx)
    g = torch.autograd.grad(out, ps, grad_outputs=r, create_graph=True)
    resid = torch.autograd.grad(g, ps, grad_outputs=[t.detach() for t in g], retain_graph=True, allow_unused=True)
    dummy = torch.zeros_like(out, requires_grad=True)
    jt = torch.autograd.grad(out, ps, grad_outputs=dummy, create_graph=True)
    ju = torch.autograd.grad(jt, dummy, grad_outputs=[t.detach() for t in g], retain_graph=True)[0].detach()  # J g
    unorm = ju.norm()
    if float(unorm) > 0:
        base = out.detach()
        hu = (_oracle_out_grad(objective, base + tau * ju / unorm, x, targets, h, ctx)
              - _oracle_out_grad(objective, base - tau * ju / unorm, x, targets, h, ctx)) * (unorm / (2 * tau))
        gn = torch.autograd.grad(out, ps, grad_outputs=hu, retain_graph=True)
    else:
        gn = tuple(torch.zeros_like(p) for p in ps)
    theta = named_params(model, names)
    scores = {}
    for n, a, b in zip(names, gn, resid):
        hg = a.detach() + (b.detach() if b is not None else 0.0)
        scores[n] = -theta[n].detach().double().cpu() * hg.double().cpu()
    return ScoreResult(scores, "largest_abs", info={"h": h, "tau": tau, "model": "white-box (autograd)"})
