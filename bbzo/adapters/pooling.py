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

__all__ = ["ChannelRun", "runs", "runs_from_views", "conv_pool_blocks", "batch_stats", "pool_span", "pool_bn_act",
           "tiled_max_pool", "MONOTONE"]

#: ``(first probe, end, output channel, first patch column)``
ChannelRun = tuple[int, int, int, int]


def runs(ch: torch.Tensor, cols: torch.Tensor) -> Optional[list[ChannelRun]]:
    """Runs ``(first probe, end, channel, first column)`` of consecutive conv weight probes that move one output
    channel at consecutive patch columns (a full or block CGE sweep); ``None`` when the probes are too
    scattered for runs to pay (a sparse draw)."""
    chl, coll = ch.tolist(), cols.tolist()
    k = len(chl)
    starts = [0] + [b for b in range(1, k) if chl[b] != chl[b - 1] or coll[b] != coll[b - 1] + 1]
    if 4 * len(starts) > k:
        return None
    return [(a, e, chl[a], coll[a]) for a, e in zip(starts, starts[1:] + [k])]


def _fill_runs(out: torch.Tensor, base_out: torch.Tensor, unf4: torch.Tensor, rs: list[ChannelRun],
               step: torch.Tensor, rows: slice) -> None:
    """``out[:, a:e] = base_out[rows, c] + step[a:e] * unf4[rows, l:l + e - a]`` per run: views, not gathers."""
    for a, e, c, col in rs:
        torch.addcmul(base_out[rows, c:c + 1], step[a:e].view(1, -1, 1, 1), unf4[rows, col:col + e - a], out=out[:, a:e])


def runs_from_views(base_out: torch.Tensor, unf: torch.Tensor, rs: list[ChannelRun],
                     step: torch.Tensor) -> torch.Tensor:
    """The ``(B, K, Ho, Wo)`` perturbed channels of conv weight probes in runs: ``base + step * patch``."""
    b_, _, ho, wo = base_out.shape
    values = base_out.new_empty(b_, len(step), ho, wo)
    _fill_runs(values, base_out, unf.view(b_, unf.shape[1], ho, wo), rs, step, slice(None))
    return values


def conv_pool_blocks(base_out: torch.Tensor, unf: torch.Tensor, rs: list[ChannelRun],
                     ch: torch.Tensor, step: torch.Tensor, mods: Any, block_bytes: int = 1 << 20) -> Optional[torch.Tensor]:
    """Conv weight probes in runs through ``[BN] [act] max-pool``, in batch blocks of about ``block_bytes``.

    The ``K`` perturbed conv channels ``(B, K, Ho, Wo)`` are never held whole: each block is formed from
    views (:func:`_fill_runs`), adds to BN's sums (train mode) and is max-pooled while it is in cache; BN
    and the activation then run on the pooled values (:func:`pool_bn_act` says why that is exact).
    ``None`` (the caller goes stage by stage) where the statistics would cancel (mean dwarfing spread).
    Returns the pooled ``(B, K, Hp, Wp)``.
    """
    run = _PoolRun(mods)
    b_, _, ho, wo = base_out.shape
    k = len(step)
    unf4 = unf.view(b_, unf.shape[1], ho, wo)
    w, b, sign = run.affine(ch, base_out.dtype)
    bb = max(1, min(b_, block_bytes // max(1, k * ho * wo * base_out.element_size())))
    buf = base_out.new_empty(bb, k, ho, wo)
    s1 = base_out.new_zeros(k)
    s2 = base_out.new_zeros(k)
    pooled: Optional[torch.Tensor] = None
    for b0 in range(0, b_, bb):
        b1 = min(b_, b0 + bb)
        blk = buf[: b1 - b0]
        _fill_runs(blk, base_out, unf4, rs, step, slice(b0, b1))
        if run.batch_stats:
            m1, m2 = _sums(blk)
            s1 += m1
            s2 += m2
        p = run.max_pool(blk, sign, in_place=True)
        if pooled is None:
            pooled = p.new_empty(b_, k, *p.shape[2:])
        pooled[b0:b1] = p
    assert pooled is not None
    mean, var = _mean_var(s1, s2, b_ * ho * wo) if run.batch_stats else run.running_stats(ch)
    if run.batch_stats and _cancels(mean, var):
        return None
    return run.finish(pooled, mean, var, w, b)


class _PoolRun:
    """The ``[BN] [act] max-pool`` stages of :func:`pool_span`, with what both fused paths do with them."""

    def __init__(self, mods: Any) -> None:
        *pre, self.pool = list(mods)
        self.bn: Optional[_BatchNorm] = pre[0] if pre and isinstance(pre[0], _BatchNorm) else None
        self.act: Optional[nn.Module] = pre[-1] if pre and not isinstance(pre[-1], _BatchNorm) else None
        #: whether BN normalises with each copy's own batch statistics
        self.batch_stats = self.bn is not None and (self.bn.training or self.bn.running_mean is None)

    def affine(self, ch: torch.Tensor, dtype: torch.dtype) -> tuple[Any, Any, Optional[torch.Tensor]]:
        """BN's weight and bias for channels ``ch`` and ``(1, K, 1, 1)`` signs where a weight is negative."""
        if self.bn is None or not self.bn.affine:
            return None, None, None
        w, b = self.bn.weight[ch], self.bn.bias[ch]
        sign = torch.where(w < 0, -1.0, 1.0).to(dtype).view(1, -1, 1, 1) if bool((w < 0).any()) else None
        return w, b, sign

    def max_pool(self, v: torch.Tensor, sign: Optional[torch.Tensor], in_place: bool = False) -> torch.Tensor:
        """``sign * MaxPool(sign * v)``: the max-pool, or the min-pool where BN's scale is negative (the max
        of -v is minus the min of v: exact). ``in_place`` may scale ``v`` itself."""
        if sign is not None:
            v = v.mul_(sign) if in_place else v * sign
        out = tiled_max_pool(self.pool, v)
        out = self.pool(v) if out is None else out
        return out if sign is None else out.mul_(sign)

    def running_stats(self, ch: torch.Tensor) -> tuple[Any, Any]:
        """Eval-mode BN's running mean and variance for channels ``ch`` (``None`` without BN)."""
        if self.bn is None or self.bn.running_mean is None:
            return None, None
        return self.bn.running_mean[ch], self.bn.running_var[ch]

    def finish(self, pooled: torch.Tensor, mean: Any, var: Any, w: Any, b: Any) -> torch.Tensor:
        """BN with the given statistics and the activation, on the pooled values."""
        if self.bn is not None:
            pooled = F.batch_norm(pooled, mean, var, w, b, False, 0.0, self.bn.eps)
        return self.act(pooled) if self.act is not None else pooled


#: Nondecreasing piecewise-linear maps: ``f(max(a, b)) == max(f(a), f(b))`` exactly in floating point.
MONOTONE = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity)


def _monotone(m: nn.Module) -> bool:
    if isinstance(m, nn.LeakyReLU):
        return m.negative_slope >= 0
    return isinstance(m, MONOTONE) and (not isinstance(m, nn.Hardtanh) or m.min_val <= m.max_val)


def _sums(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and sums of squares ``(K,)`` of ``v (B, K, *S)`` over all but dim 1 (contiguous reductions, one batched dot)."""
    b, k = v.shape[:2]
    w = v.reshape(b, k, -1)
    rows = w.reshape(b * k, 1, -1)
    return w.sum(-1).sum(0), torch.bmm(rows, rows.transpose(1, 2)).view(b, k).sum(0)


def _mean_var(s1: torch.Tensor, s2: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = s1 / n
    return mean, (s2 / n - mean * mean).clamp_min(0)


def _cancels(mean: torch.Tensor, var: torch.Tensor) -> bool:
    """Whether the mean dwarfs the spread, so that ``E[x^2] - mean^2`` would lose the variance to round-off."""
    return bool((mean * mean > 64 * var).any())


def batch_stats(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance ``(K,)`` of ``v (B, K, *S)`` over all but dim 1: train-mode BN's statistics.

    From sums and sums of squares (many times faster than ``torch.var_mean`` over strided dims on CPU);
    where they would cancel, the two-pass ``torch.var_mean`` instead.
    """
    s1, s2 = _sums(v)
    mean, var = _mean_var(s1, s2, v.numel() // v.shape[1])
    if _cancels(mean, var):
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
    run = _PoolRun(mods)
    w, b, sign = run.affine(ch, v.dtype)
    mean, var = batch_stats(v) if run.batch_stats else run.running_stats(ch)
    return run.finish(run.max_pool(v, sign), mean, var, w, b)


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
