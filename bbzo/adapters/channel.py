"""Channel-level feature reuse: a perturbed coordinate changes one channel until the next layer that mixes channels.

A Conv2d/Linear weight or bias coordinate (and a BatchNorm affine coordinate) changes exactly one output
channel of its layer. Per-channel layers keep the change inside that channel: BatchNorm (train mode with
each perturbation's own batch statistics, or eval mode), ReLU and other elementwise activations, pooling,
flattening, the residual add with an identity shortcut. So for ``K`` probes the evaluator carries only
the perturbed channel of each, ``(B, K, *spatial)``, instead of ``K`` whole activations
``(B, K, C, *spatial)``. At the next layer that mixes channels (Conv2d, Linear) linearity in the input
gives the change of its output from that one channel: ``out_k = out + layer_without_bias(x'_c - x_c)``,
one batched matmul (CPU) or grouped convolution for the ``K`` probes; from there on the ``K`` activations
are dense, as in stage reuse (:mod:`bbzo.adapters.staged`). Exact: the same losses as a full forward, to round-off.

Representations of the ``K`` perturbed copies of one activation:

* :class:`Channel` -- ``base (B, C, *S)`` shared, copy ``k`` differs in channel ``ch[k]``: ``values (B, K, *S)``;
  after a flatten, ``group`` consecutive features per channel;
* a dense tensor ``(B, K, ...)`` (today's stage-level path);
* :class:`Unperturbed` -- unperturbed (an element of a tuple activation the probes did not reach).

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
from .runners import ELEMENTWISE, stacked_empty
from .pooling import (batch_stats, conv_pool_blocks, pool_bn_act, pool_span, runs, runs_from_views,
                      tiled_max_pool)

__all__ = ["Channel", "Unperturbed", "densify", "channel_start", "channel_stage", "channel_advance", "channel_core",
           "is_dense", "ELEMENTWISE", "pooled_run"]

#: Pools act on each channel alone (elementwise modules: ELEMENTWISE, from bbzo.adapters.runners; dropout only in eval mode).
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
class Unperturbed:
    """An unperturbed tensor (shared by all ``K`` copies)."""

    t: torch.Tensor


def densify(rep: Any, k: int) -> Any:
    """Any representation -> dense ``(B, K, ...)`` tensors (tuples elementwise)."""
    if isinstance(rep, tuple):
        return tuple(densify(r, k) for r in rep)
    if isinstance(rep, Unperturbed):
        return rep.t.unsqueeze(1).expand(rep.t.shape[0], k, *rep.t.shape[1:])
    if isinstance(rep, Channel):
        b = rep.base
        wide = b.unsqueeze(1).expand(b.shape[0], k, *b.shape[1:])
        if rep.group is None and b.dim() == 4 and b.device.type == "cpu":
            out = stacked_empty(b.shape[0], k, *b.shape[1:], like=b).copy_(wide)
        else:
            out = wide.clone()
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
            rs = runs(ch, index % (c_per_g * kh * kw))
            if rs is not None and pool is not None:
                fused = conv_pool_blocks(base_out, unf, rs, ch, step, pool[0])
                if fused is not None:
                    return Channel(pool[1], ch, fused, consumed=len(pool[0]))
            if rs is not None:
                return Channel(base_out, ch, runs_from_views(base_out, unf, rs, step))
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


def pooled_run(mods: Any, rep: Channel, base_out: torch.Tensor) -> Optional[Channel]:
    """``[BN] [act] max-pool`` stages (:func:`pool_span`) on the perturbed channels, pooled first
    (:func:`bbzo.adapters.pooling.pool_bn_act`); ``None`` where the representation is not ``(B, K, H, W)``."""
    if rep.group is not None or rep.values.dim() != 4:
        return None
    return Channel(base_out, rep.ch, pool_bn_act(mods, rep.values, rep.ch))


# ---------------------------------------------------------------------------- per-channel stages
def _apply_per_channel(module: nn.Module, rep: Channel, base_out: torch.Tensor) -> Optional[Channel]:
    """A module that acts on each channel alone, applied to the perturbed channel of each copy."""
    if rep.group is not None:
        return None
    if isinstance(module, nn.MaxPool2d):
        fast = tiled_max_pool(module, rep.values)
        if fast is not None:
            return Channel(base_out, rep.ch, fast)
    return Channel(base_out, rep.ch, module(rep.values))


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
    """The next Conv2d, from the change of one input channel per copy -> dense ``(B, K, O, Ho, Wo)``.

    On CPU: the ``kh*kw`` shifted (strided, dilated) views of the zero-padded one-channel change, stacked
    as the last dim, times the ``K`` filter slices in one batched matmul, which lands in the stacked
    channels-last layout of :mod:`bbzo.adapters.runners`; then ``base_out`` is added in place (2-5x one
    grouped convolution with ``K`` groups of one input channel on ResNet-20's shapes). Otherwise (CUDA, or
    more taps than 4x the output channels) that grouped convolution.
    """
    if rep.group is not None or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    d = rep.delta()  # (B, K, H, W)
    k = rep.k
    b_, o_ch, ho, wo = base_out.shape
    w = conv.weight[:, rep.ch]  # (O, K, kh, kw): input channel ch[k] of every filter
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if d.device.type == "cpu" and kh * kw <= 4 * o_ch:
        dp = F.pad(d.transpose(0, 1), (pw, pw, ph, ph))  # (K, B, H + 2ph, W + 2pw)
        taps = [dp[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]
                for i in range(kh) for j in range(kw)]
        patches = torch.stack(taps, -1).view(k, b_ * ho * wo, kh * kw)
        delta = torch.bmm(patches, w.permute(1, 2, 3, 0).reshape(k, kh * kw, o_ch))  # (K, B*Ho*Wo, O)
        # memory (K, B, Ho, Wo, O): already the stacked layout of bbzo.adapters.runners
        return delta.view(k, b_, ho, wo, o_ch).permute(1, 0, 4, 2, 3).add_(base_out.unsqueeze(1))
    wk = w.transpose(0, 1).reshape(k * o_ch, 1, *w.shape[2:])
    delta = F.conv2d(d, wk, None, conv.stride, conv.padding, conv.dilation, groups=k)  # (B, K*O, Ho, Wo)
    return base_out.unsqueeze(1) + delta.view(b_, k, *base_out.shape[1:])


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
    if not (isinstance(h, Channel) and isinstance(skip, Unperturbed) and h.group is None and len(rep) == 2):
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
        if isinstance(first, Unperturbed):
            return (Unperturbed(base_out[0]), *rep[1:])
        if not isinstance(first, Channel):
            return None
        if not all(isinstance(r, (Unperturbed, Channel)) for r in rep[1:]):
            return None
        rule = _per_channel_rule(stage.module)
        out = rule(stage.module, first, base_out[0]) if rule is not None else None
        if out is None:
            return None
        # the other elements pass through (a skip that carries the same probes' change stays a Channel)
        return (out, *(r if isinstance(r, Channel) else Unperturbed(b) for r, b in zip(rep[1:], base_out[1:])))
    if isinstance(stage, Merge):
        return _merge(stage, rep, base_out, shortcut_base) if isinstance(rep, tuple) else None
    if not isinstance(rep, Channel):
        return None
    rule = _per_channel_rule(stage)
    return rule(stage, rep, base_out) if rule is not None else None


def channel_advance(stages: Any, j: int, rep: Any, acts: list[Any],
                    shortcut_base: Callable[[int], torch.Tensor]) -> Optional[tuple[Any, int]]:
    """One step of the channel path from stage ``j``: ``(representation, next stage)``, or ``None`` (not covered).

    A ``[BN] [act] max-pool`` run (:func:`bbzo.adapters.pooling.pool_span`) is one step, pooled first
    (:func:`pooled_run`); any other stage is one step by :func:`channel_stage`. ``acts[i]`` is the
    unperturbed input of stage ``i``, ``shortcut_base(i)`` the unperturbed shortcut of Merge stage ``i``.
    """
    span = pool_span(stages, j) if isinstance(rep, Channel) else 0
    fused = pooled_run(stages[j:j + span], rep, acts[j + span]) if span else None
    if fused is not None:
        return fused, j + span
    out = channel_stage(stages[j], rep, acts[j + 1], lambda: shortcut_base(j))
    return None if out is None else (out, j + 1)

