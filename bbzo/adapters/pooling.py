"""Kernels of the channel path's ``[BN] [activation] max-pool`` runs: pool first, normalise the pooled values.

BN is a per-channel affine map once its statistics are known, and an affine map with a positive scale
or a nondecreasing activation commutes with a maximum (a negative scale turns it into a minimum): so
after a conv whose probes each change one channel, ``MaxPool(act(BN(v)))`` is ``act(BN(MaxPool(v)))``
with BN's statistics from the unpooled ``v``, and BN and the activation touch a quarter of the values
for a 2x2 pool. A full sweep's probes of one conv form runs of consecutive patch columns, so their
channels are built from views of the unfolded input, in cache-sized batch blocks that are pooled while
they are in cache (:func:`conv_pool_blocks`). Exact to round-off (tested against full forwards).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Run", "runs", "runs_from_views", "conv_pool_blocks", "batch_stats", "pool_span", "pool_bn_act",
           "tiled_max_pool", "MONOTONE"]

#: ``(first probe, end, output channel, first patch column)``
Run = tuple[int, int, int, int]


def runs(ch: torch.Tensor, cols: torch.Tensor) -> Optional[list[Run]]:
    """Runs ``(first probe, end, channel, first column)`` of consecutive conv weight probes that move one output
    channel at consecutive patch columns (a full or block CGE sweep); ``None`` when the probes are too
    scattered for runs to pay (a sparse draw)."""
    chl, coll = ch.tolist(), cols.tolist()
    k = len(chl)
    starts = [0] + [b for b in range(1, k) if chl[b] != chl[b - 1] or coll[b] != coll[b - 1] + 1]
    if 4 * len(starts) > k:
        return None
    return [(a, e, chl[a], coll[a]) for a, e in zip(starts, starts[1:] + [k])]


def _fill_runs(out: torch.Tensor, base_out: torch.Tensor, unf4: torch.Tensor, rs: list[Run],
               step: torch.Tensor, rows: slice) -> None:
    """``out[:, a:e] = base_out[rows, c] + step[a:e] * unf4[rows, l:l + e - a]`` per run: views, not gathers."""
    for a, e, c, col in rs:
        torch.addcmul(base_out[rows, c:c + 1], step[a:e].view(1, -1, 1, 1), unf4[rows, col:col + e - a], out=out[:, a:e])


def runs_from_views(base_out: torch.Tensor, unf: torch.Tensor, rs: list[Run],
                     step: torch.Tensor) -> torch.Tensor:
    """The ``(B, K, Ho, Wo)`` perturbed channels of conv weight probes in runs: ``base + step * patch``."""
    b_, _, ho, wo = base_out.shape
    values = base_out.new_empty(b_, len(step), ho, wo)
    _fill_runs(values, base_out, unf.view(b_, unf.shape[1], ho, wo), rs, step, slice(None))
    return values


def conv_pool_blocks(base_out: torch.Tensor, unf: torch.Tensor, rs: list[Run],
                     ch: torch.Tensor, step: torch.Tensor, mods: Any, block_bytes: int = 1 << 20) -> Optional[torch.Tensor]:
    """Conv weight probes in runs through ``[BN] [act] max-pool``, in batch blocks of about ``block_bytes``.

    The ``K`` perturbed conv channels ``(B, K, Ho, Wo)`` are never held whole: each block is formed from
    views (:func:`_fill_runs`), adds to BN's sums (train mode) and is max-pooled while it is in cache; BN
    and the activation then run on the pooled values (:func:`pool_bn_act` says why that is exact).
    ``None`` (the caller goes stage by stage) where the statistics would cancel (mean dwarfing spread).
    Returns the pooled ``(B, K, Hp, Wp)``.
    """
    *pre, pool = list(mods)
    bn = pre[0] if pre and isinstance(pre[0], _BatchNorm) else None
    act = pre[-1] if pre and not isinstance(pre[-1], _BatchNorm) else None
    b_, _, ho, wo = base_out.shape
    k = len(step)
    unf4 = unf.view(b_, unf.shape[1], ho, wo)
    batch = bn is not None and (bn.training or bn.running_mean is None)
    w = b = sign = None
    if bn is not None and bn.affine:
        w, b = bn.weight[ch], bn.bias[ch]
        if bool((w < 0).any()):
            sign = torch.where(w < 0, -1.0, 1.0).to(base_out.dtype).view(1, -1, 1, 1)
    bb = max(1, min(b_, block_bytes // max(1, k * ho * wo * base_out.element_size())))
    buf = base_out.new_empty(bb, k, ho, wo)
    s1 = base_out.new_zeros(k)
    s2 = base_out.new_zeros(k)
    pooled: Optional[torch.Tensor] = None
    for b0 in range(0, b_, bb):
        b1 = min(b_, b0 + bb)
        blk = buf[: b1 - b0]
        _fill_runs(blk, base_out, unf4, rs, step, slice(b0, b1))
        if batch:
            flat = blk.view(b1 - b0, k, -1)
            s1 += flat.sum(-1).sum(0)
            rows = flat.reshape((b1 - b0) * k, 1, -1)
            s2 += torch.bmm(rows, rows.transpose(1, 2)).view(b1 - b0, k).sum(0)
        if sign is not None:
            blk.mul_(sign)
        p = tiled_max_pool(pool, blk)
        p = pool(blk) if p is None else p
        if pooled is None:
            pooled = p.new_empty(b_, k, *p.shape[2:])
        pooled[b0:b1] = p
    assert pooled is not None
    if sign is not None:
        pooled.mul_(sign)
    if bn is not None:
        if batch:
            n = b_ * ho * wo
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0)
            if bool((mean * mean > 64 * var).any()):
                return None
        else:
            mean, var = bn.running_mean[ch], bn.running_var[ch]
        pooled = F.batch_norm(pooled, mean, var, w, b, False, 0.0, bn.eps)
    return act(pooled) if act is not None else pooled


#: Nondecreasing piecewise-linear maps: ``f(max(a, b)) == max(f(a), f(b))`` exactly in floating point.
MONOTONE = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity)


def _monotone(m: nn.Module) -> bool:
    if isinstance(m, nn.LeakyReLU):
        return m.negative_slope >= 0
    return isinstance(m, MONOTONE) and (not isinstance(m, nn.Hardtanh) or m.min_val <= m.max_val)


def batch_stats(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance ``(K,)`` of ``v (B, K, *S)`` over all but dim 1: train-mode BN's statistics.

    From sums and sums of squares (contiguous reductions and one batched dot: many times faster than
    ``torch.var_mean`` over strided dims on CPU); where the mean dwarfs the spread, so that the difference
    would cancel, the two-pass ``torch.var_mean`` instead.
    """
    b, k = v.shape[:2]
    w = v.reshape(b, k, -1)
    n = b * w.shape[2]
    mean = w.sum(-1).sum(0) / n
    rows = w.reshape(b * k, 1, -1)
    var = (torch.bmm(rows, rows.transpose(1, 2)).view(b, k).sum(0) / n - mean * mean).clamp_min(0)
    if bool((mean * mean > 64 * var).any()):
        var, mean = torch.var_mean(v, dim=[0, *range(2, v.dim())], correction=0)
    return mean, var


def pool_span(stages: Any, j: int) -> int:
    """Length of a ``[BatchNorm2d] [nondecreasing activation] MaxPool2d`` run of at least two stages from ``j``, else 0."""
    n, t = len(stages), j
    if t < n and isinstance(stages[t], nn.BatchNorm2d):
        t += 1
    if t < n and _monotone(stages[t]):
        t += 1
    if t > j and t < n and isinstance(stages[t], nn.MaxPool2d) and not stages[t].return_indices:
        return t - j + 1
    return 0


def pool_bn_act(mods: Any, v: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """``MaxPool(act(BN(v)))`` of the perturbed channels ``v (B, K, H, W)`` (BN channels ``ch``), computed as
    ``act(BN(MaxPool(v)))``.

    BN is a per-channel affine map once its statistics are known (train mode: each copy's own, from the
    unpooled ``v``, as before), and an affine map with a positive scale or a nondecreasing activation
    commutes with a maximum (a negative scale turns it into a minimum): so BN and the activation run on
    the pooled values, a quarter of them for a 2x2 pool. Same values as stage by stage, to round-off.
    """
    *pre, pool = list(mods)
    bn = pre[0] if pre and isinstance(pre[0], _BatchNorm) else None
    act = pre[-1] if pre and not isinstance(pre[-1], _BatchNorm) else None
    sign = w = b = mean = var = None
    if bn is not None:
        if bn.training or bn.running_mean is None:
            mean, var = batch_stats(v)
        else:
            mean, var = bn.running_mean[ch], bn.running_var[ch]
        if bn.affine:
            w, b = bn.weight[ch], bn.bias[ch]
            if bool((w < 0).any()):
                sign = torch.where(w < 0, -1.0, 1.0).to(v.dtype).view(1, -1, 1, 1)
    src = v if sign is None else v * sign  # max of -v is minus the min of v: exact
    pooled = tiled_max_pool(pool, src)
    if pooled is None:
        pooled = pool(src)
    if sign is not None:
        pooled.mul_(sign)
    if bn is not None:
        pooled = F.batch_norm(pooled, mean, var, w, b, False, 0.0, bn.eps)
    if act is not None:
        pooled = act(pooled)
    return pooled


def tiled_max_pool(pool: nn.MaxPool2d, v: torch.Tensor) -> Optional[torch.Tensor]:
    """Max pooling over non-overlapping tiles (kernel = stride, no padding) as the elementwise maximum of
    strided slices: the same values, several times faster than torch's CPU kernel on ``(B, K, H, W)``."""
    k = _pair(pool.kernel_size)
    s = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    if (k != s or _pair(pool.padding) != (0, 0) or _pair(pool.dilation) != (1, 1) or pool.ceil_mode
            or pool.return_indices or v.dim() != 4 or v.shape[-2] < k[0] or v.shape[-1] < k[1]):
        return None
    ho, wo = v.shape[-2] // k[0], v.shape[-1] // k[1]
    v = v[..., : ho * k[0], : wo * k[1]]
    out = None
    for i in range(k[0]):
        for j in range(k[1]):
            tile = v[..., i:: k[0], j:: k[1]]
            out = tile.clone() if out is None else torch.maximum(out, tile, out=out)
    return out


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]
