"""Channel-level feature reuse: a perturbed coordinate changes one channel until the next layer that mixes channels.

A Conv2d/Linear weight or bias coordinate (and a BatchNorm affine coordinate) changes exactly one output
channel of its layer. Per-channel layers keep the change inside that channel: BatchNorm (train mode with
each perturbation's own batch statistics, or eval mode), ReLU and other elementwise activations, pooling,
flattening, the residual add with an identity shortcut. So for ``K`` probes the evaluator carries only
the perturbed channel of each, ``(B, K, *spatial)``, instead of ``K`` whole activations
``(B, K, C, *spatial)``. At the next layer that mixes channels (Conv2d, Linear) linearity in the input
gives the change of its output from that one channel: ``out_k = out + layer_without_bias(x'_c - x_c)``,
one grouped convolution for the ``K`` probes; from there on the ``K`` activations are dense, as in stage
reuse (:mod:`bbzo.adapters.staged`). Exact: the same losses as a full forward, to round-off.

Representations of the ``K`` perturbed copies of one activation:

* :class:`Channel` -- ``base (B, C, *S)`` shared, copy ``k`` differs in channel ``ch[k]``: ``values (B, K, *S)``;
  after a flatten, ``group`` consecutive features per channel;
* a dense tensor ``(B, K, ...)`` (today's stage-level path);
* :class:`Base` -- unperturbed (an element of a tuple activation the probes did not reach).

A stage the rules below do not cover makes the activation dense and the stage-level path takes over,
so every staged model works; models declare per-channel custom stages with ``bbzo_channelwise = True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..stages import Fork, Merge, OnFirst
from .linear_delta import conv_weight_delta

__all__ = ["Channel", "Base", "densify", "channel_start", "channel_stage", "channel_core", "is_dense", "ELEMENTWISE",
           "pool_span", "pooled_run", "conv_pool_blocks"]

#: Modules that act on each element (hence each channel) alone; dropout only in eval mode.
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
               nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


@dataclass
class Channel:
    """``K`` copies of ``base`` that differ in one channel each.

    Attributes:
        base: ``(B, C, *S)`` the unperturbed activation (or ``(B, C * group)`` after a flatten).
        ch: ``(K,)`` int64 channel of each copy.
        values: ``(B, K, *S)`` that channel's values in each copy (``(B, K, group)`` after a flatten).
        group: ``None``, or the number of consecutive features per channel of a flattened ``base``.
    """

    base: torch.Tensor
    ch: torch.Tensor
    values: torch.Tensor
    group: Optional[int] = None
    #: stages after the start already applied (a conv start fused with its ``[BN] [act] max-pool``)
    consumed: int = 0

    @property
    def k(self) -> int:
        return int(self.ch.numel())

    def base_channel(self) -> torch.Tensor:
        """The unperturbed values of each copy's channel: same shape as ``values``."""
        if self.group is None:
            return self.base.index_select(1, self.ch)
        idx = self.ch[:, None] * self.group + torch.arange(self.group, device=self.ch.device)  # (K, g)
        return self.base.index_select(1, idx.flatten()).view(self.base.shape[0], *idx.shape)

    def delta(self) -> torch.Tensor:
        return self.values - self.base_channel()


@dataclass
class Base:
    """An unperturbed tensor (shared by all ``K`` copies)."""

    t: torch.Tensor


def densify(rep: Any, k: int) -> Any:
    """Any representation -> dense ``(B, K, ...)`` tensors (tuples elementwise)."""
    if isinstance(rep, tuple):
        return tuple(densify(r, k) for r in rep)
    if isinstance(rep, Base):
        return rep.t.unsqueeze(1).expand(rep.t.shape[0], k, *rep.t.shape[1:])
    if isinstance(rep, Channel):
        b = rep.base
        out = b.unsqueeze(1).expand(b.shape[0], k, *b.shape[1:]).clone()
        ar = torch.arange(k, device=b.device)
        if rep.group is None:
            out[:, ar, rep.ch] = rep.values
        else:
            idx = rep.ch[:, None] * rep.group + torch.arange(rep.group, device=b.device)
            out[:, ar[:, None], idx] = rep.values
        return out
    return rep


# ---------------------------------------------------------------------------- where the path starts
def channel_core(stage: nn.Module) -> tuple[Optional[nn.Module], Optional[int]]:
    """``(layer, tuple position)`` if a coordinate of the stage changes one channel: Conv2d, Linear, BatchNorm."""
    pos = None
    if isinstance(stage, OnFirst):
        stage, pos = stage.module, 0
    if isinstance(stage, (nn.Conv2d, nn.Linear)) or (isinstance(stage, _BatchNorm) and stage.affine):
        return stage, pos
    return None, None


def is_dense(rep: Any) -> bool:
    """Whether every element is a plain ``(B, K, ...)`` tensor (the stage-level path can take over)."""
    if isinstance(rep, tuple):
        return all(is_dense(r) for r in rep)
    return isinstance(rep, torch.Tensor)



def channel_start(layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor, local: list[str],
                  index: torch.Tensor, step: torch.Tensor,
                  unfolded: Optional[Callable[[], Optional[torch.Tensor]]] = None,
                  pool: Optional[tuple[Any, torch.Tensor]] = None) -> Optional[Channel]:
    """The ``K`` perturbed outputs of a Conv2d / Linear / BatchNorm whose probes each move one coordinate.

    ``local[k]`` is the layer-local tensor name (``weight`` / ``bias``), ``index`` the flat index inside it,
    ``step`` the signed step. ``unfolded()`` may give the conv's input patches ``(B, C*kh*kw, Ho*Wo)``
    (``F.unfold``, cached by the caller), which makes a weight coordinate's patch one slice instead of a
    gather. ``pool = (stages, their output)``: the ``[BN] [act] max-pool`` stages after a conv
    (:func:`pool_span`), applied on the way in cache-sized batch blocks where the probes form runs
    (:func:`conv_pool_blocks`; the result says so in ``consumed``). ``None`` where a coordinate changes
    more than one channel (non-2D cases), so the caller uses the dense path.
    """
    dev, dt = base_out.device, base_out.dtype
    index, step = index.to(dev), step.to(device=dev, dtype=dt)
    k = index.numel()
    is_w = torch.tensor([n.rsplit(".", 1)[-1] == "weight" for n in local], device=dev)
    if isinstance(layer, nn.Conv2d):
        if base_out.dim() != 4:
            return None
        o_ch, c_per_g, kh, kw = layer.weight.shape
        ch = torch.where(is_w, index // (c_per_g * kh * kw), index)
        n_w = int(is_w.sum())
        unf = unfolded() if unfolded is not None and layer.groups == 1 and n_w == k else None
        if unf is not None:
            runs = _runs(ch, index % (c_per_g * kh * kw))
            if runs is not None and pool is not None:
                fused = conv_pool_blocks(base_out, unf, runs, ch, step, pool[0])
                if fused is not None:
                    return Channel(pool[1], ch, fused, consumed=len(pool[0]))
            if runs is not None:
                return Channel(base_out, ch, _runs_from_views(base_out, unf, runs, step))
        values = base_out.index_select(1, ch)  # (B, K, Ho, Wo), a new tensor
        if n_w:
            rows = is_w.nonzero().flatten()
            unf = unfolded() if unfolded is not None and layer.groups == 1 else None
            if unf is not None:  # (B, C*kh*kw, Ho*Wo): the patch of weight (o, c, i, j) is column c*kh*kw + i*kw + j
                patch = unf.index_select(1, index[rows] % (c_per_g * kh * kw)).view(values.shape[0], -1, *values.shape[2:])
            else:
                _, patch = conv_weight_delta(layer, x, index[rows])  # (Kw, B, Ho, Wo)
                patch = patch.transpose(0, 1)
            if n_w == k:  # the common case: every probe of the chunk moves a weight
                values.addcmul_(step.view(1, -1, 1, 1), patch)
            else:
                values[:, rows] += step[rows].view(1, -1, 1, 1) * patch
        if n_w < k:
            rows = (~is_w).nonzero().flatten()
            values[:, rows] += step[rows].view(1, -1, 1, 1)
        return Channel(base_out, ch, values)
    if isinstance(layer, nn.Linear):
        if base_out.dim() != 2:
            return None
        in_f = layer.weight.shape[1]
        ch = torch.where(is_w, index // in_f, index)
        values = base_out.index_select(1, ch)  # (B, K), a new tensor
        if bool(is_w.any()):
            rows = is_w.nonzero().flatten()
            values[:, rows] += step[rows] * x[:, index[rows] % in_f]
        if bool((~is_w).any()):
            rows = (~is_w).nonzero().flatten()
            values[:, rows] += step[rows]
        return Channel(base_out, ch, values)
    if isinstance(layer, _BatchNorm) and layer.affine:
        # y_c = xhat_c * w_c + b_c is linear in (w_c, b_c), and moving them does not change the statistics
        if base_out.dim() < 2 or not bool((layer.weight.detach()[index] != 0).all()):
            return None
        ch = index
        shape = (1, k, *([1] * (base_out.dim() - 2)))
        w = layer.weight.detach()[ch].view(shape)
        b = layer.bias.detach()[ch].view(shape)
        y = base_out.index_select(1, ch)
        xhat = (y - b) / w
        values = y + torch.where(is_w.view(shape), step.view(shape) * xhat, step.view(shape))
        return Channel(base_out, ch, values)
    return None


def _runs(ch: torch.Tensor, cols: torch.Tensor) -> Optional[list[tuple[int, int, int, int]]]:
    """Runs ``(first probe, end, channel, first column)`` of consecutive conv weight probes that move one output
    channel at consecutive patch columns (a full or block CGE sweep); ``None`` when the probes are too
    scattered for runs to pay (a sparse draw)."""
    chl, coll = ch.tolist(), cols.tolist()
    k = len(chl)
    starts = [0] + [b for b in range(1, k) if chl[b] != chl[b - 1] or coll[b] != coll[b - 1] + 1]
    if 4 * len(starts) > k:
        return None
    return [(a, e, chl[a], coll[a]) for a, e in zip(starts, starts[1:] + [k])]


def _fill_runs(out: torch.Tensor, base_out: torch.Tensor, unf4: torch.Tensor, runs: list[tuple[int, int, int, int]],
               step: torch.Tensor, rows: slice) -> None:
    """``out[:, a:e] = base_out[rows, c] + step[a:e] * unf4[rows, l:l + e - a]`` per run: views, not gathers."""
    for a, e, c, col in runs:
        torch.addcmul(base_out[rows, c:c + 1], step[a:e].view(1, -1, 1, 1), unf4[rows, col:col + e - a], out=out[:, a:e])


def _runs_from_views(base_out: torch.Tensor, unf: torch.Tensor, runs: list[tuple[int, int, int, int]],
                     step: torch.Tensor) -> torch.Tensor:
    """The ``(B, K, Ho, Wo)`` perturbed channels of conv weight probes in runs: ``base + step * patch``."""
    b_, _, ho, wo = base_out.shape
    values = base_out.new_empty(b_, len(step), ho, wo)
    _fill_runs(values, base_out, unf.view(b_, unf.shape[1], ho, wo), runs, step, slice(None))
    return values


def conv_pool_blocks(base_out: torch.Tensor, unf: torch.Tensor, runs: list[tuple[int, int, int, int]],
                     ch: torch.Tensor, step: torch.Tensor, mods: Any, block_bytes: int = 1 << 20) -> Optional[torch.Tensor]:
    """Conv weight probes in runs through ``[BN] [act] max-pool``, in batch blocks of about ``block_bytes``.

    The ``K`` perturbed conv channels ``(B, K, Ho, Wo)`` are never held whole: each block is formed from
    views (:func:`_fill_runs`), adds to BN's sums (train mode) and is max-pooled while it is in cache; BN
    and the activation then run on the pooled values (:func:`pooled_run` says why that is exact).
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
        _fill_runs(blk, base_out, unf4, runs, step, slice(b0, b1))
        if batch:
            flat = blk.view(b1 - b0, k, -1)
            s1 += flat.sum(-1).sum(0)
            rows = flat.reshape((b1 - b0) * k, 1, -1)
            s2 += torch.bmm(rows, rows.transpose(1, 2)).view(b1 - b0, k).sum(0)
        if sign is not None:
            blk.mul_(sign)
        p = _tiled_max_pool(pool, blk)
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


# ---------------------------------------------------------------------------- [BN] [activation] max-pool
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


def pooled_run(mods: Any, rep: Channel, base_out: torch.Tensor) -> Optional[Channel]:
    """``MaxPool(act(BN(v)))`` of the perturbed channels, computed as ``act(BN(MaxPool(v)))``.

    BN is a per-channel affine map once its statistics are known (train mode: each copy's own, from the
    unpooled ``v``, as before), and an affine map with a positive scale or a nondecreasing activation
    commutes with a maximum (a negative scale turns it into a minimum): so BN and the activation run on
    the pooled values, a quarter of them for a 2x2 pool. Same values as stage by stage, to round-off.
    """
    if rep.group is not None or rep.values.dim() != 4:
        return None
    *pre, pool = list(mods)
    bn = pre[0] if pre and isinstance(pre[0], _BatchNorm) else None
    act = pre[-1] if pre and not isinstance(pre[-1], _BatchNorm) else None
    v, ch = rep.values, rep.ch
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
    pooled = _tiled_max_pool(pool, src)
    if pooled is None:
        pooled = pool(src)
    if sign is not None:
        pooled.mul_(sign)
    if bn is not None:
        pooled = F.batch_norm(pooled, mean, var, w, b, False, 0.0, bn.eps)
    if act is not None:
        pooled = act(pooled)
    return Channel(base_out, ch, pooled)


# ---------------------------------------------------------------------------- per-channel stages
def _apply_per_channel(module: nn.Module, rep: Channel, base_out: torch.Tensor) -> Optional[Channel]:
    """A module that acts on each channel alone, applied to the perturbed channel of each copy."""
    if rep.group is not None:
        return None
    if isinstance(module, nn.MaxPool2d):
        fast = _tiled_max_pool(module, rep.values)
        if fast is not None:
            return Channel(base_out, rep.ch, fast)
    return Channel(base_out, rep.ch, module(rep.values))


def _tiled_max_pool(pool: nn.MaxPool2d, v: torch.Tensor) -> Optional[torch.Tensor]:
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


def _batch_norm(bn: _BatchNorm, rep: Channel, base_out: torch.Tensor) -> Optional[Channel]:
    """BatchNorm of the perturbed channels: train mode with each copy's own batch statistics, or eval mode."""
    if rep.group is not None:
        return None
    ch = rep.ch
    w = bn.weight[ch] if bn.affine else None
    b = bn.bias[ch] if bn.affine else None
    v = rep.values
    if (bn.training or bn.running_mean is None) and v.device.type == "cpu":
        mean, var = batch_stats(v)
        out = F.batch_norm(v, mean, var, w, b, False, 0.0, bn.eps)
    elif bn.training or bn.running_mean is None:
        out = F.batch_norm(v, None, None, w, b, True, 0.0, bn.eps)
    else:
        out = F.batch_norm(v, bn.running_mean[ch], bn.running_var[ch], w, b, False, 0.0, bn.eps)
    return Channel(base_out, ch, out)


def _flatten(module: nn.Flatten, rep: Channel, base_out: torch.Tensor) -> Optional[Channel]:
    if rep.group is not None or module.start_dim != 1 or module.end_dim != -1:
        return None
    group = int(torch.Size(rep.values.shape[2:]).numel())
    return Channel(base_out, rep.ch, rep.values.reshape(*rep.values.shape[:2], group), group if rep.values.dim() > 2 else None)


def _mix_linear(layer: nn.Linear, rep: Channel, base_out: torch.Tensor) -> Optional[torch.Tensor]:
    """The next Linear, from the change of one input channel (or feature group) per copy -> dense ``(B, K, O)``."""
    if base_out.dim() != 2:
        return None
    d = rep.delta()  # (B, K) or (B, K, g)
    w = layer.weight
    if rep.group is None:
        delta = d.unsqueeze(-1) * w[:, rep.ch].T.unsqueeze(0)  # (B, K, O)
    else:
        idx = rep.ch[:, None] * rep.group + torch.arange(rep.group, device=w.device)  # (K, g)
        delta = torch.einsum("bkg,okg->bko", d, w[:, idx])
    return base_out.unsqueeze(1) + delta


def _mix_conv(conv: nn.Conv2d, rep: Channel, base_out: torch.Tensor) -> Optional[torch.Tensor]:
    """The next Conv2d, from the change of one input channel per copy: one grouped convolution -> dense."""
    if rep.group is not None or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    d = rep.delta()  # (B, K, H, W)
    k = rep.k
    w = conv.weight[:, rep.ch]  # (O, K, kh, kw): input channel ch[k] of every filter
    wk = w.transpose(0, 1).reshape(k * w.shape[0], 1, *w.shape[2:])
    delta = F.conv2d(d, wk, None, conv.stride, conv.padding, conv.dilation, groups=k)  # (B, K*O, Ho, Wo)
    return base_out.unsqueeze(1) + delta.view(d.shape[0], k, *base_out.shape[1:])


def _per_channel_rule(module: nn.Module) -> Optional[Callable[[nn.Module, Channel, torch.Tensor], Any]]:
    if isinstance(module, _BatchNorm):
        return _batch_norm
    if isinstance(module, ELEMENTWISE) or isinstance(module, POOLS) or getattr(module, "bbzo_channelwise", False):
        return _apply_per_channel
    if isinstance(module, nn.Dropout) and (not module.training or module.p == 0):
        return _apply_per_channel
    if isinstance(module, nn.Flatten):
        return _flatten
    if isinstance(module, nn.Linear):
        return _mix_linear
    if isinstance(module, nn.Conv2d):
        return _mix_conv
    return None


def _merge(m: Merge, rep: tuple, base_out: torch.Tensor, shortcut_base: Callable[[], torch.Tensor]) -> Optional[Any]:
    """``post(h + shortcut(skip))`` (or ``shortcut(skip) - h``) when only the branch carries the change."""
    h, skip = rep[0], rep[1]
    if not (isinstance(h, Channel) and isinstance(skip, Base) and h.group is None and len(rep) == 2):
        return None
    post = m.post
    if not (isinstance(post, ELEMENTWISE) or getattr(post, "bbzo_channelwise", False)):
        return None
    sc = shortcut_base().index_select(1, h.ch)
    summed = sc - h.values if m.subtract else h.values + sc
    return Channel(base_out, h.ch, post(summed))


def channel_stage(stage: nn.Module, rep: Any, base_out: Any, shortcut_base: Callable[[], torch.Tensor]) -> Any:
    """Stage output in the channel representation, a dense ``(B, K, ...)`` tensor, or ``None`` (not covered).

    ``base_out`` is the stage's unperturbed output; ``shortcut_base()`` the unperturbed shortcut of a Merge.
    """
    if isinstance(stage, Fork):
        return (rep, rep) if isinstance(rep, Channel) else None
    if isinstance(stage, OnFirst):
        if not isinstance(rep, tuple):
            return None
        first = rep[0]
        if isinstance(first, Base):
            return (Base(base_out[0]), *rep[1:])
        if not isinstance(first, Channel):
            return None
        if not all(isinstance(r, Base) for r in rep[1:]):
            return None
        rule = _per_channel_rule(stage.module)
        out = rule(stage.module, first, base_out[0]) if rule is not None else None
        if out is None:
            return None
        return (out, *(Base(b) for b in base_out[1:]))
    if isinstance(stage, Merge):
        return _merge(stage, rep, base_out, shortcut_base) if isinstance(rep, tuple) else None
    if not isinstance(rep, Channel):
        return None
    rule = _per_channel_rule(stage)
    return rule(stage, rep, base_out) if rule is not None else None
