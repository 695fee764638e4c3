"""Whole perturbed parameter sets, ``K`` at once, through a staged model: how RGE's directions are evaluated.

A direction moves every tensor of the model, so no stage can be reused (:mod:`bbzo.adapters.staged`); what is
left to share is the *input*: every set sees the same minibatch. :class:`StackedPlan` runs a staged model
(:mod:`bbzo.stages`) for ``K`` parameter sets side by side:

* activations are **shared** (``Shared(t)``, ``t`` of shape ``(B, ...)``, the same for every set: the input and
  the outputs of the parameter-free stages before the first one with parameters) or **stacked** ``(K, B, ...)``
  (set ``k``'s activation at ``[k]``), or tuples of them inside residual blocks (``Fork`` / ``OnFirst`` /
  ``Merge``);
* parameters come as ``{local name: (K, *shape)}`` per stage.

**The head**: a ``Conv2d`` on a shared input (the first layer) with the stages that follow it --
``[BatchNorm] [nondecreasing activation] [max-pool in tiles] [global average pool]`` -- runs as GEMMs of the
input's patches (unfolded once per minibatch) against all ``K x C_out`` filters of a block of sets:

* train-mode BN statistics come exactly from the patches' moments: the conv output ``y = P w + b`` has mean
  ``mean(P) . w + b`` and variance ``w^T Cov(P) w`` (float64, from the patches' centred covariance), so each set
  still normalises with *its own* batch statistics (:mod:`bbzo.adapters.common`) without the output being formed;
* BN is then an affine map per channel, folded into the filters and a bias;
* a nondecreasing activation commutes with a maximum, so a 2x2 max-pool is the maximum of four GEMMs (one per
  tile position) and the activation runs on the pooled values;
* a global average pool right after is summed block by block, so the ``K`` full-resolution outputs are never
  held: a block (a few samples x a few sets) stays in the cache from the GEMM to the pooled features.

**Everything after the head** runs stacked: ``Linear`` as one batched matrix product over the sets, BatchNorm with
per-set statistics (train mode) or per-set affine maps (eval mode), parameter-free stages on the flat ``(K*B, ...)``
batch (they act per sample), and a ``Conv2d`` on a stacked input as one ordinary convolution per set (its
per-set work is a full convolution: batching the sets into one grouped call brings nothing on CPU).

Exact to round-off against one forward per set (tested in float64, train- and eval-mode BN). Stages of other
kinds (a custom module with parameters, a stage that couples samples other than BatchNorm) make
:func:`stacked_plan` return ``None``: the caller uses the generic ``torch.func`` adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..stages import Fork, Merge, OnFirst
from .pooling import MONOTONE, tiled_max_pool

__all__ = ["Shared", "StackedPlan", "stacked_plan", "stacked_channels_last", "HEAD_BLOCK_BYTES", "HEAD_BLOCK_COLUMNS"]

#: Bytes of one GEMM block of the head (a few samples x a few sets x the tile positions): kept near the L2 cache.
HEAD_BLOCK_BYTES = 4 * 2**20
#: Filters (sets x output channels) per GEMM block of the head.
HEAD_BLOCK_COLUMNS = 512
#: Patches of a head's input are unfolded once per minibatch when they take at most this many bytes (else the
#: conv runs once per set).
HEAD_PATCH_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Shared:
    """An activation ``t (B, ...)`` that is the same for every parameter set."""

    t: torch.Tensor


def _is_param_free(m: nn.Module) -> bool:
    return next(m.parameters(), None) is None


def _coupled(m: nn.Module) -> bool:
    return bool(getattr(m, "bbzo_batch_coupled", False)) or any(
        getattr(c, "bbzo_batch_coupled", False) for c in m.modules())


def _op_kind(m: nn.Module) -> Optional[str]:
    """How a module runs on stacked activations: conv / linear / bn / free (parameter-free, per sample), or None."""
    if _coupled(m):
        return None
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return "conv"
    if type(m) is nn.Linear:
        return "linear"
    if isinstance(m, _BatchNorm) and type(m).forward is _BatchNorm.forward:
        return "bn"
    if _is_param_free(m) and not any(isinstance(c, _BatchNorm) for c in m.modules()):
        return "free"
    if isinstance(m, nn.Sequential) and all(_op_kind(c) is not None for c in m):
        return "sequential"
    return None


def _stage_kind(st: nn.Module) -> Optional[str]:
    if isinstance(st, Fork):
        return "fork"
    if isinstance(st, OnFirst):
        return "on_first" if _op_kind(st.module) is not None else None
    if isinstance(st, Merge):
        ok = _op_kind(st.shortcut) is not None and _is_param_free(st.post) and not _coupled(st.post)
        return "merge" if ok else None
    return "op" if _op_kind(st) is not None else None


def _monotone(m: nn.Module) -> bool:
    """A nondecreasing activation (commutes with a maximum, exactly in floating point)."""
    if type(m) is nn.LeakyReLU:
        return m.negative_slope >= 0
    if type(m) is nn.Hardtanh:
        return m.min_val <= m.max_val
    return type(m) in MONOTONE


def _tile_pool(m: nn.Module) -> Optional[tuple[int, int]]:
    """The tile of a max-pool over non-overlapping tiles (kernel = stride, no padding), else None."""
    if type(m) is not nn.MaxPool2d or m.return_indices or m.ceil_mode:
        return None
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    k, s = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size)
    if k != s or pair(m.padding) != (0, 0) or pair(m.dilation) != (1, 1):
        return None
    return k  # type: ignore[return-value]


def _global_avg(m: nn.Module) -> bool:
    return type(m) is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1), [1, 1])


@dataclass(frozen=True)
class _Head:
    """A conv stage and the stages it absorbs: ``[bn] [act] [pool tile] [global average]``; ``end`` = next stage."""

    bn: Optional[_BatchNorm]
    act: Optional[nn.Module]
    tile: Optional[tuple[int, int]]
    gap: bool
    end: int


def _head_at(stages: Sequence[nn.Module], i: int) -> Optional[_Head]:
    conv = stages[i]
    if type(conv) is not nn.Conv2d or _op_kind(conv) != "conv":
        return None
    j, n = i + 1, len(stages)
    bn = act = None
    tile = None
    gap = False
    if j < n and isinstance(stages[j], nn.BatchNorm2d) and _op_kind(stages[j]) == "bn":
        bn, j = stages[j], j + 1
    if j < n and _monotone(stages[j]):
        act, j = stages[j], j + 1
    if j < n and _tile_pool(stages[j]) is not None:
        tile, j = _tile_pool(stages[j]), j + 1
    if j < n and _global_avg(stages[j]):
        gap, j = True, j + 1
    return _Head(bn, act, tile, gap, j)


def stacked_plan(stages: Sequence[nn.Module]) -> Optional["StackedPlan"]:
    """A :class:`StackedPlan` for these stages, or None when a stage has no stacked rule (use ``torch.func``)."""
    kinds = [_stage_kind(st) for st in stages]
    if any(k is None for k in kinds):
        return None
    return StackedPlan(list(stages), kinds)  # type: ignore[arg-type]


def _pget(params: dict[str, torch.Tensor], prefix: str, name: str) -> Optional[torch.Tensor]:
    return params.get(prefix + name)


class StackedPlan:
    """Runs a staged model for ``K`` parameter sets side by side (see the module docstring).

    Args:
        stages: The model's stages.
        kinds: Each stage's kind (from :func:`stacked_plan`).
    """

    def __init__(self, stages: list[nn.Module], kinds: list[str]) -> None:
        self.stages = stages
        self.kinds = kinds
        #: stage index -> the head that starts there (when its input is shared)
        self.heads = {i: h for i in range(len(stages)) if (h := _head_at(stages, i)) is not None}
        first = next((i for i, st in enumerate(stages) if not _is_param_free(st)), len(stages))
        #: the first stage with parameters: every stage before it sees a shared activation
        self.first_param = first

    # ------------------------------------------------------------------ sizes
    def prepare(self, x: Any, cache: dict) -> bool:
        """Unfold the head's input once for this minibatch (into ``cache``); whether the head runs as GEMMs."""
        head = self.heads.get(self.first_param)
        if head is None or not isinstance(x, torch.Tensor):
            return False
        key = ("head", self.first_param)
        if key not in cache:
            t = x
            with torch.no_grad():
                for st in self.stages[:self.first_param]:
                    t = st(t)
            cache[key] = _patches(self.stages[self.first_param], t, head) if isinstance(t, torch.Tensor) else None
        return cache[key] is not None

    def sets_per_block(self) -> int:
        """Parameter sets per GEMM block of the head (chunks of a multiple of it are blocked alike)."""
        conv = self.stages[self.first_param] if self.first_param < len(self.stages) else None
        if not isinstance(conv, nn.Conv2d):
            return 1
        return max(1, HEAD_BLOCK_COLUMNS // conv.out_channels)

    def materialized(self, head: bool) -> list[int]:
        """Indices ``i`` of the stages whose outputs (``acts[i + 1]``) are held stacked per set: a conv block (the head,
        when ``head``, and every later plain conv with the stages it absorbs) holds only its last output."""
        out, i, n = [], self.first_param, len(self.stages)
        while i < n:
            h = self.heads.get(i)
            if h is not None and (i > self.first_param or head):
                out.append(h.end - 1)
                i = h.end
            else:
                out.append(i)
                i += 1
        return out

    # ------------------------------------------------------------------ run
    def run(self, x: Any, params: list[dict[str, torch.Tensor]], k: int, cache: dict) -> Any:
        """The model's output ``(K, B, ...)`` for ``K`` parameter sets.

        Args:
            x: The minibatch input ``(B, ...)`` (a tensor or a tuple of them).
            params: Per stage, ``{local name: (K, *shape)}`` for every parameter of the stage.
            k: ``K``.
            cache: Per-minibatch values shared by every chunk (the head's patches and their moments).
        """
        act: Any = _share(x)
        i, n = 0, len(self.stages)
        while i < n:
            st, kind = self.stages[i], self.kinds[i]
            head = self.heads.get(i)
            if head is not None and isinstance(act, Shared):
                out = self._head(i, head, act.t, params, k, cache)
                if out is not None:
                    act, i = out, head.end
                    continue
            if head is not None and isinstance(act, torch.Tensor) and act.dim() == 5:
                bn_params = params[i + 1] if head.bn is not None else {}
                act = _conv_block(st, head, params[i], bn_params, act, k)
                i = head.end
                continue
            if kind == "fork":
                act = (act, act)
            elif kind == "on_first":
                act = (_run_op(st.module, "module.", params[i], act[0], k), *act[1:])
            elif kind == "merge":
                act = _merge(st, params[i], act, k)
            else:
                act = _run_op(st, "", params[i], act, k)
            i += 1
        return _unshare(act, k)

    def _head(self, i: int, head: _Head, x: torch.Tensor, params: list[dict[str, torch.Tensor]], k: int,
              cache: dict) -> Optional[torch.Tensor]:
        conv = self.stages[i]
        if conv.groups != 1:
            return None
        key = ("head", i)
        if key not in cache:
            cache[key] = _patches(conv, x, head)
        pat = cache[key]
        if pat is None:
            return None
        w = params[i]["weight"]
        b = params[i].get("bias")
        bn = head.bn
        gamma = beta = None
        if bn is not None:
            j = i + 1
            gamma, beta = params[j].get("weight"), params[j].get("bias")
        return _head_gemm(conv, w, b, bn, gamma, beta, head, pat, k)


def _share(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_share(t) for t in x)
    return Shared(x)


def _unshare(act: Any, k: int) -> Any:
    if isinstance(act, tuple):
        return tuple(_unshare(a, k) for a in act)
    if isinstance(act, Shared):
        t = act.t
        return t.unsqueeze(0).expand(k, *t.shape)
    return act


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(K, B, ...)`` -> ``(K*B, ...)`` (a view when it can be one)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _per_sample(m: nn.Module, x: Any, k: int) -> Any:
    """A parameter-free, per-sample module on a shared (once) or stacked (on the flat ``K*B`` batch) activation."""
    if isinstance(x, Shared):
        return Shared(m(x.t))
    y = m(_flat(x))
    return y.view(k, y.shape[0] // k, *y.shape[1:])


def _run_op(m: nn.Module, prefix: str, params: dict[str, torch.Tensor], x: Any, k: int) -> Any:
    kind = _op_kind(m)
    if kind == "free":
        return _per_sample(m, x, k)
    if kind == "sequential":
        for j, c in enumerate(m):
            x = _run_op(c, f"{prefix}{j}.", params, x, k)
        return x
    w, b = _pget(params, prefix, "weight"), _pget(params, prefix, "bias")
    if kind == "linear":
        return _linear(w, b, x, k)
    if kind == "conv":
        return _conv(m, w, b, x, k)
    return _batch_norm(m, w, b, x, k)  # type: ignore[arg-type]


def _linear(w: torch.Tensor, b: Optional[torch.Tensor], x: Any, k: int) -> torch.Tensor:
    """``Linear`` with weights ``(K, O, F)``: one GEMM on a shared input, one batched GEMM on a stacked one."""
    o, f = w.shape[1], w.shape[2]
    if isinstance(x, Shared):
        t = x.t
        y = F.linear(t, w.reshape(k * o, f), None if b is None else b.reshape(k * o))  # (B, ..., K*O)
        return y.view(*t.shape[:-1], k, o).movedim(-2, 0)
    lead = x.shape[1:-1]
    xf = x.reshape(k, -1, f)
    y = torch.bmm(xf, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), xf, w.transpose(1, 2))
    return y.view(k, *lead, o)


def stacked_channels_last(k: int, b: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``(K, B, C, H, W)`` tensor whose memory is ``(K, B, H, W, C)``: each set's ``(B, C, H, W)``
    is a channels-last tensor (oneDNN's fast convolutions on CPU) and ``(K*B, C, H, W)`` a free view."""
    return like.new_empty(k, b, h, w, c).permute(0, 1, 4, 2, 3)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous(memory_format=torch.channels_last)


def _conv_one(conv: nn.Conv2d, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return F.conv2d(_channels_last(x), w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv(conv: nn.Conv2d, w: torch.Tensor, b: Optional[torch.Tensor], x: Any, k: int) -> torch.Tensor:
    """``Conv2d`` with weights ``(K, O, C/g, kh, kw)``: one channels-last convolution per set (the input shared or set
    ``k``'s), written into the per-set channels-last layout (:func:`stacked_channels_last`)."""
    shared = isinstance(x, Shared)
    out = None
    for j in range(k):
        y = _conv_one(conv, x.t if shared else x[j], w[j], None if b is None else b[j])
        if out is None:
            out = stacked_channels_last(k, *y.shape, like=y)
        out[j].copy_(y)
    assert out is not None
    return out


def _conv_block(conv: nn.Conv2d, head: _Head, params: dict[str, torch.Tensor], bn_params: dict[str, torch.Tensor],
                x: torch.Tensor, k: int) -> torch.Tensor:
    """A conv on a stacked input ``(K, B, C, H, W)`` with the stages it absorbs (``[BN] [act] [tile pool] [global
    average]``), set by set: each set's conv output is normalised with its own statistics and pooled while it is in
    the cache. Where BN's scale is positive the pool runs first (BN and the activation then touch a quarter of the
    values; a nondecreasing map commutes with a maximum)."""
    w, b = params["weight"], params.get("bias")
    bn = head.bn
    gamma, beta = bn_params.get("weight"), bn_params.get("bias")
    out = None
    for j in range(k):
        y = _conv_one(conv, x[j], w[j], None if b is None else b[j])  # (B, O, H, W), channels-last
        if bn is not None:
            if bn.training or bn.running_mean is None:
                mean, var = _channel_stats(y)
            else:
                mean, var = bn.running_mean, bn.running_var
            scale = torch.rsqrt(var + bn.eps)
            if gamma is not None:
                scale = scale * gamma[j]
            shift = -mean * scale if beta is None else beta[j] - mean * scale
            scale4, shift4 = scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
        pool_first = head.tile is not None and (bn is None or bool((scale > 0).all()))
        if pool_first:
            y = _tile_max(y, head.tile)  # a positive scale and a nondecreasing activation commute with the maximum
        if bn is not None:
            y = torch.addcmul(shift4, y, scale4)
        if head.act is not None:
            y = y.clamp_min_(0) if type(head.act) is nn.ReLU else head.act(y)  # y is fresh: in place is safe
        if head.tile is not None and not pool_first:
            y = _tile_max(y, head.tile)
        if head.gap:
            y = y.mean((2, 3), keepdim=True)
        if out is None:
            out = stacked_channels_last(k, *y.shape, like=y)
        out[j].copy_(y)
    assert out is not None
    return out


def _channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-mode BN's mean and biased variance ``(C,)`` of a channels-last ``y (B, C, H, W)``: from the column sums
    and the Gram matrix's diagonal of its ``(B*H*W, C)`` memory (two GEMM-speed passes); torch's two-pass kernel
    where the mean would cancel the variance."""
    c = y.shape[1]
    if not y.is_contiguous(memory_format=torch.channels_last):
        return torch.batch_norm_update_stats(y, None, None, 0.0)
    mem = y.permute(0, 2, 3, 1).reshape(-1, c)
    n = mem.shape[0]
    s1 = torch.mv(mem.T, mem.new_ones(n))
    s2 = torch.mm(mem.T, mem).diagonal()
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0)
    if bool((mean * mean > 64 * var).any()):  # E[y^2] - mean^2 would lose the variance to round-off
        return torch.batch_norm_update_stats(y, None, None, 0.0)
    return mean, var


def _tile_max(y: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Max-pool of ``y (B, C, H, W)`` over non-overlapping ``tile``s (floor), the maximum of strided slices."""
    ph, pw = tile
    hp, wp = y.shape[2] // ph, y.shape[3] // pw
    out = None
    for a in range(ph):
        for c in range(pw):
            t = y[:, :, a: hp * ph: ph, c: wp * pw: pw]
            out = t.clone(memory_format=torch.channels_last) if out is None else torch.maximum(out, t, out=out)
    assert out is not None
    return out


def _bn_stats(bn: _BatchNorm, x: Any, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(mean, var, per_set)``: the statistics BN normalises with -- the batch's (train mode; per set on a stacked
    input, ``(K, C)``) or the running ones ``(C,)``."""
    if bn.training or bn.running_mean is None:
        if isinstance(x, Shared):
            m, v = torch.batch_norm_update_stats(x.t, None, None, 0.0)
            return m, v, False
        stats = [torch.batch_norm_update_stats(x[j], None, None, 0.0) for j in range(k)]
        return torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats]), True
    return bn.running_mean, bn.running_var, False


def _batch_norm(bn: _BatchNorm, w: Optional[torch.Tensor], b: Optional[torch.Tensor], x: Any, k: int) -> torch.Tensor:
    """BatchNorm of every set with its own statistics (train mode) and its own ``weight`` / ``bias`` ``(K, C)``."""
    mean, var, _ = _bn_stats(bn, x, k)  # (C,) or (K, C)
    t = x.t.unsqueeze(0) if isinstance(x, Shared) else x  # (K or 1, B, C, *S)
    c = t.shape[2]
    scale = torch.rsqrt(var.to(t.dtype) + bn.eps).expand(k, c)
    mean = mean.to(t.dtype).expand(k, c)
    if w is not None:
        scale = scale * w
    shift = -mean * scale if b is None else b - mean * scale
    view = (k, 1, c) + (1,) * (t.dim() - 3)
    return torch.addcmul(shift.view(view), t, scale.view(view))


def _merge(st: Merge, params: dict[str, torch.Tensor], act: tuple, k: int) -> Any:
    h, skip = act[0], act[1]
    sc = _run_op(st.shortcut, "shortcut.", params, skip, k)
    h_t = h.t.unsqueeze(0) if isinstance(h, Shared) else h
    sc_t = sc.t.unsqueeze(0) if isinstance(sc, Shared) else sc
    y = sc_t - h_t if st.subtract else h_t + sc_t
    if isinstance(h, Shared) and isinstance(sc, Shared):
        return _per_sample(st.post, Shared(y[0]), k)
    if y.shape[0] != k:
        y = y.expand(k, *y.shape[1:])
    return _per_sample(st.post, y, k)


# ---------------------------------------------------------------------------- the head
def _patches(conv: nn.Conv2d, x: torch.Tensor, head: _Head) -> Optional[dict[str, Any]]:
    """The conv input's patches arranged for the head's GEMMs and their moments (once per minibatch).

    ``P``: ``(B, Q, L, Cp)`` -- per sample, per tile position ``q`` of the pool (``Q = 1`` without one), per
    pooled output position ``L``, the ``Cp = C kh kw`` patch values. ``mean``/``cov``: float64 moments of the
    patches over all ``B x Ho x Wo`` output positions (train-mode BN statistics come from them).
    """
    if x.dim() != 4:
        return None
    b_ = x.shape[0]
    kh, kw = conv.kernel_size
    ho = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
    wo = (x.shape[3] + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
    cp = x.shape[1] * kh * kw
    if b_ * ho * wo * cp * x.element_size() > HEAD_PATCH_BYTES:
        return None
    with torch.no_grad():
        unf = F.unfold(x, (kh, kw), dilation=conv.dilation, padding=conv.padding, stride=conv.stride)  # (B, Cp, Ho*Wo)
        out: dict[str, Any] = {"ho": ho, "wo": wo}
        if head.bn is not None and (head.bn.training or head.bn.running_mean is None):
            p64 = unf.transpose(1, 2).reshape(-1, cp).to(torch.float64)
            mean = p64.mean(0)
            p64 -= mean
            out["mean"], out["cov"] = mean, (p64.T @ p64) / p64.shape[0]
        ph, pw = head.tile or (1, 1)
        hp, wp = ho // ph, wo // pw
        v = unf.view(b_, cp, ho, wo)[:, :, : hp * ph, : wp * pw].reshape(b_, cp, hp, ph, wp, pw)
        out["P"] = v.permute(0, 3, 5, 2, 4, 1).reshape(b_, ph * pw, hp * wp, cp).contiguous()
        out["hp"], out["wp"] = hp, wp
    return out


def _head_gemm(conv: nn.Conv2d, w: torch.Tensor, b: Optional[torch.Tensor], bn: Optional[_BatchNorm],
               gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], head: _Head, pat: dict[str, Any],
               k: int) -> torch.Tensor:
    """The head's output for ``K`` sets: ``(K, B, O, Hp, Wp)``, or ``(K, B, O, 1, 1)`` after a global average pool."""
    P = pat["P"]
    b_, q, lp, cp = P.shape
    o = w.shape[1]
    dt = P.dtype
    wf, bf = _fold(w.reshape(k, o, cp), b, bn, gamma, beta, pat, dt)  # (K, O, Cp), (K, O)
    hp, wp = pat["hp"], pat["wp"]
    out = P.new_empty(k, b_, o) if head.gap else stacked_channels_last(k, b_, o, hp, wp, like=P)
    kc = max(1, min(k, HEAD_BLOCK_COLUMNS // o))  # = StackedPlan.sets_per_block()
    bs = max(1, min(b_, HEAD_BLOCK_BYTES // max(1, q * lp * kc * o * P.element_size())))
    flat = P.view(b_ * q * lp, cp)
    act = head.act
    relu = act is not None and type(act) is nn.ReLU
    zbuf = P.new_empty(bs * q * lp * kc * o)
    mbuf = P.new_empty(bs * lp * kc * o) if q > 1 else None
    for k0 in range(0, k, kc):
        k1 = min(k, k0 + kc)
        n = (k1 - k0) * o
        wt = wf[k0:k1].reshape(n, cp).T.contiguous()  # (Cp, n)
        bias = bf[k0:k1].reshape(n)
        for b0 in range(0, b_, bs):
            b1 = min(b_, b0 + bs)
            m_ = b1 - b0
            z = zbuf[: m_ * q * lp * n].view(m_ * q * lp, n)
            torch.mm(flat[b0 * q * lp: b1 * q * lp], wt, out=z)
            if q > 1:
                mx = mbuf[: m_ * lp * n].view(m_, lp, n)  # type: ignore[index]
                torch.amax(z.view(m_, q, lp, n), 1, out=mx)
            else:
                mx = z.view(m_, lp, n)
            mx += bias
            if relu:
                mx.clamp_min_(0)
            elif act is not None:
                mx = act(mx)
            if head.gap:
                out[k0:k1, b0:b1] = mx.mean(1).view(m_, k1 - k0, o).transpose(0, 1)
            else:
                out[k0:k1, b0:b1] = mx.view(m_, hp, wp, k1 - k0, o).permute(3, 0, 4, 1, 2)  # memory order kept
    return out.view(k, b_, o, 1, 1) if head.gap else out


def _fold(w: torch.Tensor, b: Optional[torch.Tensor], bn: Optional[_BatchNorm], gamma: Optional[torch.Tensor],
          beta: Optional[torch.Tensor], pat: dict[str, Any], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Filters ``(K, O, Cp)`` and biases ``(K, O)`` of ``BN(conv(.))`` as one affine map per set (in float64, then
    ``dtype``): train-mode statistics from the patch moments, else the running ones; no BN: the conv itself."""
    k, o, _ = w.shape
    w64 = w.to(torch.float64)
    b64 = b.to(torch.float64) if b is not None else w64.new_zeros(k, o)
    if bn is None:
        return w64.to(dtype), b64.to(dtype)
    if "cov" in pat:
        mean_p, cov = pat["mean"], pat["cov"]
        mean = w64 @ mean_p + b64  # (K, O)
        var = ((w64 @ cov) * w64).sum(-1)
    else:
        mean = bn.running_mean.to(torch.float64).expand(k, o)
        var = bn.running_var.to(torch.float64).expand(k, o)
    scale = torch.rsqrt(var + bn.eps)
    if gamma is not None:
        scale = scale * gamma.to(torch.float64)
    shift = (b64 - mean) * scale
    if beta is not None:
        shift = shift + beta.to(torch.float64)
    return (w64 * scale.unsqueeze(-1)).to(dtype), shift.to(dtype)
