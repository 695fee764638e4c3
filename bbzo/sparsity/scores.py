"""Pruning-at-initialization scores for layer-wise ratios (DeepZero §4, Eq. (3)), in a registry.

``compute_score("zo_grasp", model, loss_fn, inputs, targets)`` returns a :class:`ScoreResult` with one
score tensor per scored parameter (by default the weights of every Conv/Linear layer, as DeepZero),
the oracle queries it used and how the score is meant to be ranked (:data:`~bbzo.sparsity.lpr.KEEP_RULES`).
Scores never change the model: they work on a private copy, and queries never touch BN statistics.

Query-only scores (the model is treated as a black box, only loss values are used):

* ``zo_grasp`` -- DeepZero's reference exactly: ``S = -theta * Hg`` with
  ``Hg = (g1 - g0) / mu`` from two RGE estimates (q=192 per-tensor-normalised Gaussian directions,
  mu=5e-3, forward differences, *independent* directions for g0 and g1), ``g1`` at
  ``theta + mu * g0``; ranked by ``|S|``. (The reference's parameter-aliasing bug is not reproduced:
  every query perturbs a copy.) ``mu * g0`` is ~1e-6, so this "Hg" is two independent noisy gradients;
  see ``benchmarks/pruning_agreement.py`` and the README for what its ratios do and do not carry.
* ``zo_grasp_sketch`` -- bbzo's query-only estimate of ``Hg`` that carries signal (float64 queries):
  a step direction ``v`` from ``q`` isotropic central-difference RGE directions (``E[v] = g``; a noisy
  ``v`` costs little because ``H`` damps its noise: ``Hv`` keeps most of ``Hg``'s ranking), then
  mixed second differences ``w^T H v = [l(t+ev+dw) - l(t+ev) - l(t+dw) + l(t)] / (e d)`` read ``Hv``
  through structured directions ``w``: ``readout="cp"`` fits, per layer, a rank-1 tensor
  ``a (x) b (x) c`` over (out channel, in channel, kernel tap) by one round of alternating
  contractions (``O + C + k + 1`` read-outs per layer, each ``w`` confined to one layer so feature
  reuse applies); ``readout="coords"`` reads every coordinate (``2d`` queries, exact ``Hv``).
* ``layer_noise`` -- the control: ``theta * z / sqrt(d_l)``, ``z ~ N(0, 1)``, no Hessian information at
  all (reproduces the reference ZO-GraSP's ratios; a layer-size prior).
* ``random`` -- uniform random scores (ratios close to uniform), ``magnitude`` -- ``|theta|``.

Oracle-only score (the bbzo setting: the *model* is white-box, only the loss/oracle is a black box):

* ``zo_grasp_oracle`` -- ``-theta * Hg`` where every derivative *of the oracle* comes from queries
  (coordinate-wise central differences over the model's ``C`` output coordinates; per-sample
  losses give all samples at once) and the model is differentiated by autograd:
  ``Hg = J^T H_o J g + sum_k r_k (d^2 out_k) g``. ``6C`` queries in all (60 for CIFAR-10), float64.
  (A parameter-space difference ``(g(theta + e g) - g(theta)) / e`` instead crosses ReLU kinks: at
  ``e = 1e-6`` the early layers of ResNet-20 already decorrelate.) It needs a differentiable model and does *not* apply where the whole model
  is the black box (then use ``zo_grasp`` / ``zo_grasp_sketch``).

White-box scores (autograd through the model and the loss; references, labelled as such):

* ``fo_grasp`` -- ``S = -theta * Hg`` by a Hessian-vector product (GraSP, Wang et al. 2020), optional
  temperature ``T`` on the outputs (the reference's FO branch uses T=200), ranked ``|S|`` or signed.
* ``snip`` -- ``|theta * g|`` (Lee et al. 2019).
"""

from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..adapters.common import LossFn, frozen_bn_stats
from ..adapters.functional import FunctionalAdapter
from ..adapters.staged import make_adapter
from ..errors import ConfigError
from ..probes import BlockProbes, CoordinateProbes, DirectionProbes, make_direction

__all__ = [
    "ScoreResult", "ScoreInfo", "register_score", "list_scores", "compute_score", "prunable_params",
]


@dataclass
class ScoreResult:
    """Scores of one model at initialization.

    Attributes:
        scores: ``{param name: score tensor}`` shaped like the parameter (float64, CPU).
        keep: How to rank them (``largest_abs`` | ``largest`` | ``smallest``).
        queries: Loss queries (parameter-set evaluations on the scoring batch) used; 0 for white-box.
        seconds: Wall time.
        info: The options used.
    """

    scores: dict[str, torch.Tensor]
    keep: str
    queries: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreInfo:
    name: str
    description: str
    query_only: bool  # uses loss values only (no autograd)
    needs_data: bool
    cost: str


_SCORES: dict[str, tuple[Callable[..., ScoreResult], ScoreInfo]] = {}


def register_score(info: ScoreInfo) -> Callable[[Callable[..., ScoreResult]], Callable[..., ScoreResult]]:
    def deco(fn: Callable[..., ScoreResult]) -> Callable[..., ScoreResult]:
        if info.name in _SCORES:
            raise ConfigError(f"a score named {info.name!r} is already registered.")
        _SCORES[info.name] = (fn, info)
        return fn
    return deco


def list_scores(with_info: bool = False) -> list[Any]:
    names = sorted(_SCORES)
    return [_SCORES[n][1] for n in names] if with_info else names


def prunable_params(model: nn.Module, include: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the scored tensors: Conv/Linear weights by default (DeepZero), or glob ``include`` patterns."""
    if include:
        names = [n for n, p in model.named_parameters() if any(fnmatch.fnmatch(n, pat) for pat in include)]
    else:
        names = []
        for mname, m in model.named_modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and m.weight.requires_grad:
                names.append(f"{mname}.weight" if mname else "weight")
    if not names:
        raise ConfigError("no parameters to score: the model has no Conv/Linear weights; pass include=[glob, ...].")
    return names


def compute_score(name: str, model: nn.Module, loss_fn: Optional[LossFn] = None, inputs: Any = None,
                  targets: Any = None, *, include: Optional[Sequence[str]] = None, seed: int = 0,
                  **kwargs: Any) -> ScoreResult:
    """Score ``model``'s prunable tensors with the registered score ``name``.

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> (N,)`` per-sample losses (the oracle); scores that need
            data use the mean over the batch ``inputs`` ``(B, ...)``.
        include: Glob patterns of tensors to score (default: Conv/Linear weights).
        seed: Seeds every random draw of the score.
        **kwargs: Options of the score (see its docstring), e.g. ``q=192``, ``mu=5e-3``.
    """
    if name not in _SCORES:
        raise ConfigError(f"unknown score {name!r}; registered: {', '.join(sorted(_SCORES))}.")
    fn, info = _SCORES[name]
    if info.needs_data and (loss_fn is None or inputs is None):
        raise ConfigError(f"score {name!r} needs data: pass loss_fn, inputs and targets (CLI: --data).")
    names = prunable_params(model, include)
    t0 = time.perf_counter()
    res = fn(model, loss_fn, inputs, targets, names=names, seed=seed, **kwargs)
    res.seconds = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------- helpers
def _scoring_copy(model: nn.Module, names: Sequence[str], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A private copy whose only trainable tensors are the scored ones (same train/eval mode)."""
    m = copy.deepcopy(model)
    if dtype is not None:
        m = m.to(dtype)
    keep = set(names)
    for n, p in m.named_parameters():
        p.requires_grad_(n in keep)
    return m


def _params(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {n: named[n] for n in names}


def _cast_inputs(inputs: Any, dtype: torch.dtype) -> Any:
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        return inputs.to(dtype)
    return inputs


def _rge(adapter: Any, loss_fn: LossFn, inputs: Any, targets: Any, names: Sequence[str], shapes: Sequence[torch.Size],
         seed: int, q: int, mu: float, distribution: str, central: bool) -> tuple[list[torch.Tensor], int]:
    """``(1/q) sum_k u_k * directional difference_k`` over the adapter's trainable tensors; returns (grad, queries)."""
    ev = adapter.bind(loss_fn, inputs, targets)
    dirs = torch.arange(q, dtype=torch.int64)
    if central:
        probes = DirectionProbes(tuple(names), tuple(shapes), seed, dirs.repeat(2),
                                 torch.cat([torch.full((q,), mu), torch.full((q,), -mu)]).double(), distribution)
        losses = ev.evaluate(probes)
        diffs = (losses[:q] - losses[q:]) / (2 * mu)
    else:
        probes = DirectionProbes(tuple(names), tuple(shapes), seed, dirs, torch.full((q,), mu, dtype=torch.float64),
                                 distribution)
        base = ev.base_loss()
        diffs = (ev.evaluate(probes) - base) / mu
    grad = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for k in range(q):
        for gt, u in zip(grad, make_direction(seed, k, shapes, distribution)):
            gt.add_(u, alpha=float(diffs[k]) / q)
    return grad, ev.queries


# ---------------------------------------------------------------------------- data-free scores
@register_score(ScoreInfo("magnitude", "|theta| (magnitude pruning at init)", True, False, "0"))
def _magnitude(model, loss_fn, inputs, targets, *, names, seed, **kw) -> ScoreResult:
    p = _params(model, names)
    return ScoreResult({n: p[n].detach().abs().double().cpu() for n in names}, "largest", 0, 0.0, {})


@register_score(ScoreInfo("random", "uniform random scores (ratios ~ uniform per layer)", True, False, "0"))
def _random(model, loss_fn, inputs, targets, *, names, seed, **kw) -> ScoreResult:
    g = torch.Generator().manual_seed(seed)
    p = _params(model, names)
    return ScoreResult({n: torch.rand(p[n].shape, generator=g, dtype=torch.float64) for n in names}, "largest", 0, 0.0, {})


@register_score(ScoreInfo("layer_noise", "control: theta * z / sqrt(d_l), no Hessian information", True, False, "0"))
def _layer_noise(model, loss_fn, inputs, targets, *, names, seed, **kw) -> ScoreResult:
    g = torch.Generator().manual_seed(seed)
    p = _params(model, names)
    out = {}
    for n in names:
        t = p[n].detach().double().cpu()
        out[n] = t * torch.randn(t.shape, generator=g, dtype=torch.float64) / t.numel() ** 0.5
    return ScoreResult(out, "largest_abs", 0, 0.0, {})


# ---------------------------------------------------------------------------- white-box references
def _fo_grad_and_hg(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, names: Sequence[str],
                    temperature: float, need_hg: bool) -> tuple[list[torch.Tensor], Optional[list[torch.Tensor]]]:
    m = _scoring_copy(model, names)
    ps = list(_params(m, names).values())
    with frozen_bn_stats(m):
        out = m(inputs)
        loss = loss_fn(out / temperature if temperature != 1.0 else out, targets).mean()
        g = torch.autograd.grad(loss, ps, create_graph=need_hg)
        if not need_hg:
            return [t.detach() for t in g], None
        hg = torch.autograd.grad(g, ps, grad_outputs=[t.detach() for t in g])
    return [t.detach() for t in g], [t.detach() for t in hg]


@register_score(ScoreInfo("fo_grasp", "white-box GraSP: -theta * Hg by autograd (reference, not query-only)",
                          False, True, "0 (one backward + one Hessian-vector product)"))
def _fo_grasp(model, loss_fn, inputs, targets, *, names, seed, temperature: float = 1.0, signed: bool = False,
              **kw) -> ScoreResult:
    _, hg = _fo_grad_and_hg(model, loss_fn, inputs, targets, names, float(temperature), True)
    p = _params(model, names)
    scores = {n: (-p[n].detach() * h).double().cpu() for n, h in zip(names, hg)}
    return ScoreResult(scores, "smallest" if signed else "largest_abs", 0, 0.0,
                       {"temperature": temperature, "signed": signed})


@register_score(ScoreInfo("snip", "white-box SNIP: |theta * g| by autograd (reference, not query-only)",
                          False, True, "0 (one backward)"))
def _snip(model, loss_fn, inputs, targets, *, names, seed, **kw) -> ScoreResult:
    g, _ = _fo_grad_and_hg(model, loss_fn, inputs, targets, names, 1.0, False)
    p = _params(model, names)
    return ScoreResult({n: (p[n].detach() * t).abs().double().cpu() for n, t in zip(names, g)}, "largest", 0, 0.0, {})


# ---------------------------------------------------------------------------- query-only: DeepZero reference
@register_score(ScoreInfo("zo_grasp", "DeepZero ZO-GraSP as the reference: RGE Hg, q=192, mu=5e-3, |S| ranking",
                          True, True, "2 (q + 1)"))
def _zo_grasp(model, loss_fn, inputs, targets, *, names, seed, q: int = 192, mu: float = 5e-3,
              adapter_factory: Optional[Callable[[nn.Module], Any]] = None, **kw) -> ScoreResult:
    """Eq. (3) as ``importance_scores.py``: per-tensor unit-norm Gaussian directions (no ``d/q``
    scaling), forward differences against one base per estimate, independent directions for ``g0``
    (seed) and ``g1`` (seed + 1), ``theta' = theta + mu * g0``, ``Hg = (g1 - g0) / mu``.

    ``adapter_factory(model) -> Adapter`` evaluates the queries another way (e.g. a
    :class:`~bbzo.adapters.LoopAdapter`, whose ``loss_fn`` is a rollout); default: functional."""
    m = _scoring_copy(model, names)
    ps = _params(m, names)
    shapes = [p.shape for p in ps.values()]
    adapter = (adapter_factory or FunctionalAdapter)(m)
    g0, n0 = _rge(adapter, loss_fn, inputs, targets, names, shapes, 2 * seed, q, mu, "tensor_sphere", False)
    with torch.no_grad():
        for p, g in zip(ps.values(), g0):
            p.add_(g.to(p.dtype), alpha=mu)
    g1, n1 = _rge(adapter, loss_fn, inputs, targets, names, shapes, 2 * seed + 1, q, mu, "tensor_sphere", False)
    theta = _params(model, names)
    scores = {n: -theta[n].detach().double().cpu() * (b - a) / mu for n, a, b in zip(names, g0, g1)}
    return ScoreResult(scores, "largest_abs", n0 + n1, 0.0, {"q": q, "mu": mu, "directions": "tensor_sphere"})


# ---------------------------------------------------------------------------- oracle-only hybrid
def _oracle_out_grad(loss_fn: LossFn, out: torch.Tensor, targets: Any, h: float) -> torch.Tensor:
    """``d mean_b loss_b / d out`` ``(B, ...)`` by central differences of the black-box loss.

    One query per perturbed output coordinate and sign (``2C``, ``C`` = per-sample output size): each
    query moves coordinate ``j`` of every sample, and per-sample losses give every sample's partial.
    """
    from ..adapters.common import repeat_targets

    b = out.shape[0]
    flat = out.detach().reshape(b, -1)
    c = flat.shape[1]
    eye = torch.eye(c, dtype=flat.dtype, device=flat.device) * h
    pert = torch.cat([flat.unsqueeze(0) + eye[:, None, :], flat.unsqueeze(0) - eye[:, None, :]])  # (2C, B, C)
    with torch.no_grad():
        per = loss_fn(pert.reshape(2 * c * b, *out.shape[1:]), repeat_targets(targets, 2 * c))
    if not isinstance(per, torch.Tensor) or per.numel() != 2 * c * b:
        raise ConfigError(f"loss_fn must return one loss per row ({2 * c * b}), got {getattr(per, 'shape', per)}.")
    per = per.detach().to(flat.dtype).view(2, c, b)
    return ((per[0] - per[1]) / (2 * h)).T.reshape(out.shape) / b


@register_score(ScoreInfo(
    "zo_grasp_oracle",
    "-theta * Hg with the oracle's derivatives from queries and the white-box model by autograd (float64)",
    True, True, "6C (C = model output size per sample)"))
def _zo_grasp_oracle(model, loss_fn, inputs, targets, *, names, seed, h: float = 1e-4, tau: float = 1e-3,
                     **kw) -> ScoreResult:
    """``Hg = J^T H_o J g + sum_k r_k (d^2 out_k) g`` (Gauss-Newton part + residual part).

    ``r = dl/d out`` and ``H_o u`` (the oracle's Hessian along ``u = J g``, central differences of
    ``r`` at ``out +- tau u/|u|``) come from ``6C`` loss queries; ``J``, ``J^T`` and the model's
    second derivatives come from autograd on the white-box model. No parameter-space finite
    difference, so ReLU kinks do not matter.
    """
    m = _scoring_copy(model, names, torch.float64)
    x = _cast_inputs(inputs, torch.float64)
    ps = list(_params(m, names).values())
    with frozen_bn_stats(m):
        out = m(x)
    if not isinstance(out, torch.Tensor):
        raise ConfigError("zo_grasp_oracle needs a model with a single tensor output.")
    c = out[0].numel()
    r = _oracle_out_grad(loss_fn, out, targets, h)
    g = torch.autograd.grad(out, ps, grad_outputs=r, create_graph=True)
    resid = torch.autograd.grad(g, ps, grad_outputs=[t.detach() for t in g], retain_graph=True, allow_unused=True)
    dummy = torch.zeros_like(out, requires_grad=True)
    jt = torch.autograd.grad(out, ps, grad_outputs=dummy, create_graph=True)
    ju = torch.autograd.grad(jt, dummy, grad_outputs=[t.detach() for t in g], retain_graph=True)[0].detach()  # J g
    unorm = ju.norm()
    if float(unorm) > 0:
        base = out.detach()
        hu = (_oracle_out_grad(loss_fn, base + tau * ju / unorm, targets, h)
              - _oracle_out_grad(loss_fn, base - tau * ju / unorm, targets, h)) * (unorm / (2 * tau))
        gn = torch.autograd.grad(out, ps, grad_outputs=hu, retain_graph=True)
    else:
        gn = [torch.zeros_like(p) for p in ps]
    theta = _params(model, names)
    scores = {}
    for n, a, b in zip(names, gn, resid):
        hg = a.detach() + (b.detach() if b is not None else 0.0)
        scores[n] = -theta[n].detach().double().cpu() * hg.double().cpu()
    return ScoreResult(scores, "largest_abs", 6 * c, 0.0, {"h": h, "tau": tau, "model": "white-box (autograd)"})


# ---------------------------------------------------------------------------- query-only: Hv sketch
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
def _zo_grasp_sketch(model, loss_fn, inputs, targets, *, names, seed, q: int = 256, mu: float = 1e-5,
                     eps: float = 1e-6, delta: float = 1e-6, readout: str = "cp",
                     dtype: torch.dtype = torch.float64, **kw) -> ScoreResult:
    """Query-only ``S = -theta * Hv`` (see the module docstring).

    Args:
        q: Isotropic Gaussian directions for the step ``v`` (central differences: ``2q`` queries).
        mu: Their finite-difference step (float64 makes 1e-5 exact to ~1e-9 relative).
        eps: Step along the unit ``v``; ``delta``: step along each unit read-out direction.
        readout: ``"cp"`` (rank-1 per layer, cheap) or ``"coords"`` (every coordinate, exact ``Hv``).
        dtype: Query precision (float64).

    Limitation (measured, ResNet-20): in a ReLU network a mixed second difference crosses activation
    kinks for any step that float64 can resolve (1e-5: kinks dominate; 1e-7: rounding dominates), so
    on conv layers the read-outs are noise; on layers with no ReLU downstream (the classifier) and on
    smooth models they are exact. ``zo_grasp_oracle`` avoids this by differentiating the white-box
    model with autograd and querying only the oracle.
    """
    if readout not in ("cp", "coords"):
        raise ConfigError(f"zo_grasp_sketch: readout must be 'cp' or 'coords', got {readout!r}.")
    x = _cast_inputs(inputs, dtype)
    ma = _scoring_copy(model, names, dtype)
    pa = _params(ma, names)
    shapes = [p.shape for p in pa.values()]
    v, nq = _rge(FunctionalAdapter(ma), loss_fn, x, targets, names, shapes, seed, q, mu, "gaussian", True)
    vnorm = torch.sqrt(sum((t ** 2).sum() for t in v))
    if not float(vnorm) > 0:
        raise ConfigError("zo_grasp_sketch: the loss did not change along any direction (v = 0); raise mu.")
    mb = _scoring_copy(ma, names)
    with torch.no_grad():
        for p, t in zip(_params(mb, names).values(), v):
            p.add_((t / vnorm).to(p.dtype), alpha=eps)
    ev_a = make_adapter(ma).bind(loss_fn, x, targets)
    ev_b = make_adapter(mb).bind(loss_fn, x, targets)
    base_a, base_b = ev_a.base_loss(), ev_b.base_loss()
    all_names = tuple(ev_a.params)
    gen = torch.Generator().manual_seed(seed + 7919)

    def read(probes: Any) -> torch.Tensor:
        return ((ev_b.evaluate(probes) - base_b) - (ev_a.evaluate(probes) - base_a)) / (eps * delta)

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
    theta = _params(model, names)
    scores = {n: -theta[n].detach().double().cpu() * hv[n] for n in names}
    queries = nq + ev_a.queries + ev_b.queries
    return ScoreResult(scores, "largest_abs", queries, 0.0,
                       {"q": q, "mu": mu, "eps": eps, "delta": delta, "readout": readout, "dtype": str(dtype)})
