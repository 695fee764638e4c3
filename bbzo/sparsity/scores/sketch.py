"""``zo_grasp_sketch``: a query-only estimate of ``Hg`` that carries signal (the model is a black box too).

A step direction ``v`` from ``q`` isotropic central-difference RGE directions (``E[v] = g``; a noisy ``v``
costs little because ``H`` damps its noise: ``Hv`` keeps most of ``Hg``'s ranking), then mixed second
differences ``w^T H v = [l(t+ev+dw) - l(t+ev) - l(t+dw) + l(t)] / (e d)`` read ``Hv`` through structured
directions ``w``: ``readout="cp"`` fits, per layer, a rank-1 tensor ``a (x) b (x) c`` over (out channel,
in channel, kernel tap) by one round of alternating contractions (``O + C + k + 1`` read-outs per layer,
each ``w`` confined to one layer so feature reuse applies); ``readout="coords"`` reads every coordinate
(``2d`` queries, exact ``Hv``).

Limitation (measured, ResNet-20): in a ReLU network a mixed second difference crosses activation kinks
for any step that float64 can resolve (1e-5: kinks dominate; 1e-7: rounding dominates), so on conv
layers the read-outs are noise; on layers with no ReLU downstream (the classifier) and on smooth
models they are exact. ``zo_grasp_oracle`` avoids this by differentiating the white-box model.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ...adapters import FunctionalAdapter, make_adapter
from ...errors import ConfigError
from ...probes import BlockProbes, CoordinateProbes
from .registry import ScoreContext, ScoreInfo, ScoreResult, cast_inputs, named_params, register_score, scoring_copy
from .zo_grasp import rge_estimate

__all__: list[str] = []


def _cp_dirs(shape: torch.Size, mode: int, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Unit read-out directions for one mode of a (O, C, S) tensor view: ``(n_mode, O*C*S)``.

    mode 0: ``e_o (x) b (x) c`` for every o; mode 1: ``a (x) e_c (x) c``; mode 2: ``a (x) b (x) e_s``;
    mode 3: the single direction ``a (x) b (x) c``.
    """
    o, ci, s = shape
    if mode == 0:
        w = torch.einsum("oO,c,s->Oocs", torch.eye(o, dtype=torch.float64), b, c)
    elif mode == 1:
        w = torch.einsum("o,cC,s->Cocs", a, torch.eye(ci, dtype=torch.float64), c)
    elif mode == 2:
        w = torch.einsum("o,c,sS->Socs", a, b, torch.eye(s, dtype=torch.float64))
    else:
        w = torch.einsum("o,c,s->ocs", a, b, c).unsqueeze(0)
    w = w.reshape(w.shape[0], -1)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _view3(shape: torch.Size) -> torch.Size:
    if len(shape) == 1:
        return torch.Size((shape[0], 1, 1))
    if len(shape) == 2:
        return torch.Size((shape[0], shape[1], 1))
    return torch.Size((shape[0], shape[1], int(torch.Size(shape[2:]).numel())))


@register_score(ScoreInfo(
    "zo_grasp_sketch",
    "bbzo: query-only -theta * Hv, v = isotropic RGE (q), Hv read by float64 mixed differences (rank-1 per layer)",
    True, True, "2q + 2 + 2 * sum_l (O_l + C_l + k_l + 1)  [readout=cp] | 2q + 2 + 2d [readout=coords]"))
def _zo_grasp_sketch(model: nn.Module, objective: Any, inputs: Any, targets: Any, *, names: Sequence[str], seed: int,
                     ctx: ScoreContext, q: int = 256, mu: float = 1e-5, eps: float = 1e-6, delta: float = 1e-6,
                     readout: str = "cp", dtype: torch.dtype = torch.float64) -> ScoreResult:
    """Query-only ``S = -theta * Hv`` (see the module docstring).

    Args:
        q: Isotropic Gaussian directions for the step ``v`` (central differences: ``2q`` queries).
        mu: Their finite-difference step (float64 makes 1e-5 exact to ~1e-9 relative).
        eps: Step along the unit ``v``; ``delta``: step along each unit read-out direction.
        readout: ``"cp"`` (rank-1 per layer, cheap) or ``"coords"`` (every coordinate, exact ``Hv``).
        dtype: Query precision (float64).
    """
    if readout not in ("cp", "coords"):
        raise ConfigError(f"zo_grasp_sketch: readout must be 'cp' or 'coords', got {readout!r}.")
    x = cast_inputs(inputs, dtype)
    ma = scoring_copy(model, names, dtype)
    pa = named_params(ma, names)
    shapes = [p.shape for p in pa.values()]
    v = rge_estimate(FunctionalAdapter(ma), objective, x, targets, pa, ctx, seed=seed, q=q, mu=mu,
                     distribution="gaussian", difference="central")
    vnorm = torch.sqrt(sum((t ** 2).sum() for t in v))
    if not float(vnorm) > 0:
        raise ConfigError("zo_grasp_sketch: the loss did not change along any direction (v = 0); raise mu.")
    mb = scoring_copy(ma, names)
    with torch.no_grad():
        for p, t in zip(named_params(mb, names).values(), v):
            p.add_((t / vnorm).to(p.dtype), alpha=eps)
    ev_a = make_adapter(ma).bind(objective, x, targets, ledger=ctx.ledger)
    ev_b = make_adapter(mb).bind(objective, x, targets, ledger=ctx.ledger)
    base_a, base_b = ev_a.base_losses().mean(), ev_b.base_losses().mean()
    all_names = tuple(ev_a.params)
    gen = torch.Generator().manual_seed(seed + 7919)

    def read(probes: Any) -> torch.Tensor:
        return ((ev_b.probe_losses(probes).mean(1) - base_b) - (ev_a.probe_losses(probes).mean(1) - base_a)) / (eps * delta)

    hv: dict[str, torch.Tensor] = {}
    for n, shape in zip(names, shapes):
        pidx = all_names.index(n)
        numel = int(torch.Size(shape).numel())
        if readout == "coords":
            probes = CoordinateProbes(all_names, torch.full((numel,), pidx, dtype=torch.int64), torch.arange(numel),
                                      torch.full((numel,), delta, dtype=torch.float64))
            hv[n] = read(probes).view(shape)
            continue
        v3 = _view3(shape)
        a = torch.randn(v3[0], generator=gen, dtype=torch.float64)
        b = torch.randn(v3[1], generator=gen, dtype=torch.float64)
        c = torch.randn(v3[2], generator=gen, dtype=torch.float64)
        for mode in (0, 1, 2):
            if v3[mode] == 1:
                continue
            dirs = _cp_dirs(v3, mode, a, b, c)
            r = read(BlockProbes(all_names, pidx, dirs, torch.full((dirs.shape[0],), delta, dtype=torch.float64)))
            if mode == 0:
                a = r / r.norm().clamp_min(1e-300)
            elif mode == 1:
                b = r / r.norm().clamp_min(1e-300)
            else:
                c = r / r.norm().clamp_min(1e-300)
        lam = read(BlockProbes(all_names, pidx, _cp_dirs(v3, 3, a, b, c), torch.full((1,), delta, dtype=torch.float64)))
        hv[n] = (float(lam) * torch.einsum("o,c,s->ocs", a, b, c)).reshape(shape)
    theta = named_params(model, names)
    scores = {n: -theta[n].detach().double().cpu() * hv[n] for n in names}
    return ScoreResult(scores, "largest_abs",
                       info={"q": q, "mu": mu, "eps": eps, "delta": delta, "readout": readout, "dtype": str(dtype)})
