"""Perturbed Conv2d/Linear outputs from linearity in the weights (the staged adapter's fast path).

A Conv2d or Linear layer is linear in its weight and bias, so the output of the layer at perturbed
parameters is ``base_out + step * d(out)/d(theta)``. For one weight coordinate that derivative is one
strided patch of one input channel written into one output channel: the perturbed layer costs a
gather, not a convolution. For a dense direction of one tensor it is the layer applied to the
direction without the bias.

Stacked activations use the layout ``(B, K, ...)``: sample-major, so that ``(B*K, ...)`` is a free view
for per-sample stages and ``(B, K*C, ...)`` a free view for BatchNorm with per-k statistics.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..stages import OnFirst

__all__ = ["linear_core", "conv_weight_delta", "coordinate_outputs", "block_outputs"]


def linear_core(stage: nn.Module) -> tuple[Optional[nn.Module], Optional[int]]:
    """``(layer, tuple position)`` if the stage is a plain Conv2d/Linear (optionally in :class:`OnFirst`)."""
    pos = None
    if isinstance(stage, OnFirst):
        stage, pos = stage.module, 0
    if isinstance(stage, nn.Linear):
        return stage, pos
    if (isinstance(stage, nn.Conv2d) and stage.padding_mode == "zeros"
            and not isinstance(stage.padding, str)):
        return stage, pos
    return None, None


def conv_weight_delta(conv: nn.Conv2d, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For K weight coordinates of ``conv``: output channel ``(K,)`` and d(out)/d(w) ``(K, B, Ho, Wo)``.

    ``out[b, o, h, w] = sum_{c,i,j} W[o, c, i, j] * xpad[b, c_in, h*s + i*dil, w*s + j*dil]``, so the
    derivative w.r.t. one weight is one strided patch of one input channel.
    """
    o_ch, c_per_g, kh, kw = conv.weight.shape
    c = (index // (kh * kw)) % c_per_g
    o = index // (c_per_g * kh * kw)
    i = (index // kw) % kh
    j = index % kw
    cin = (o // (o_ch // conv.groups)) * c_per_g + c
    ph, pw = conv.padding
    sh, sw = conv.stride
    dh, dw = conv.dilation
    xpad = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = (i * dh).unsqueeze(1) + sh * torch.arange(ho, device=x.device)  # (K, Ho)
    cols = (j * dw).unsqueeze(1) + sw * torch.arange(wo, device=x.device)  # (K, Wo)
    patch = xpad[:, cin[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, K, Ho, Wo)
    return o, patch.transpose(0, 1)


def coordinate_outputs(layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor, local: Sequence[str],
                       index: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Outputs ``(B, K, ...)`` of a Conv2d/Linear whose K probes each move one weight or bias entry.

    ``local[k]`` is the layer-local name (``weight``/``bias``) of probe k's tensor; ``index`` ``(K,)``
    flat indices; ``step`` ``(K,)`` signed steps. Exact: ``out_k = base_out + step_k * d(out)/d(theta_k)``.
    """
    k = index.numel()
    dev = base_out.device
    out = base_out.unsqueeze(1).expand(base_out.shape[0], k, *base_out.shape[1:]).clone()
    ok = out.movedim(1, 0)  # (K, B, ...) view: writes land in ``out``
    step = step.to(device=dev, dtype=base_out.dtype)
    ar = torch.arange(k, device=dev)
    is_w = torch.tensor([n.rsplit(".", 1)[-1] == "weight" for n in local], device=dev)
    index = index.to(dev)
    conv = isinstance(layer, nn.Conv2d)
    if bool(is_w.any()):
        w_rows = is_w.nonzero().flatten()
        idx = index[w_rows]
        if conv:
            o, delta = conv_weight_delta(layer, x, idx)  # (Kw, B, Ho, Wo)
            ok[ar[w_rows], :, o] += step[w_rows].view(-1, 1, 1, 1) * delta
        else:
            in_f = layer.weight.shape[1]
            o, i = idx // in_f, idx % in_f
            delta = x[..., i].movedim(-1, 0)  # (Kw, B, ...)
            ok[ar[w_rows], ..., o] += step[w_rows].view(-1, *([1] * (delta.dim() - 1))) * delta
    if bool((~is_w).any()):
        b_rows = (~is_w).nonzero().flatten()
        if conv:
            ok[ar[b_rows], :, index[b_rows]] += step[b_rows].view(-1, 1, 1, 1)
        else:
            ok[ar[b_rows], ..., index[b_rows]] += step[b_rows].view(-1, *([1] * (ok.dim() - 2)))
    return out


def block_outputs(layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor, local: str,
                  dirs: torch.Tensor, step: torch.Tensor) -> Optional[torch.Tensor]:
    """Outputs ``(B, K, ...)`` of a Conv2d/Linear whose weight (or bias) moves along K dense directions.

    Exact by linearity: ``out_k = base_out + step_k * layer_without_bias(x; dir_k)``. Returns None
    where no fast path exists (grouped convolutions), so the caller falls back to ``vmap``.
    """
    k = dirs.shape[0]
    dev, dt = base_out.device, base_out.dtype
    d = dirs.to(device=dev, dtype=dt) * step.to(device=dev, dtype=dt)[:, None]
    conv = isinstance(layer, nn.Conv2d)
    if local.rsplit(".", 1)[-1] == "bias":
        if conv:
            return base_out.unsqueeze(1) + d.view(1, k, -1, 1, 1)
        return base_out.unsqueeze(1) + d.view(1, k, *([1] * (base_out.dim() - 2)), -1)
    w_shape = layer.weight.shape
    if conv:
        if layer.groups != 1:
            return None
        delta = F.conv2d(x, d.view(k * w_shape[0], *w_shape[1:]), None, layer.stride, layer.padding,
                         layer.dilation)
        return base_out.unsqueeze(1) + delta.view(x.shape[0], k, *base_out.shape[1:])
    delta = torch.einsum("b...i,koi->bk...o", x, d.view(k, *w_shape))
    return base_out.unsqueeze(1) + delta
