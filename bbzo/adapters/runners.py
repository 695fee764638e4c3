"""How an unperturbed stage runs on ``K`` stacked activations ``(B, K, ...)``, keeping the ``K`` sets apart.

Two memory layouts of a stacked image activation ``(B, K, C, H, W)`` are in use:

* *standard* (contiguous): ``(B*K, C, H, W)`` is a free view, so a per-sample stage runs on one big batch;
* *grouped* (CPU): memory in the order ``(B, H, W, K, C)``, so that ``(B, K*C, H, W)`` is a free
  **channels-last** view. There a Conv2d runs as one grouped convolution (``K`` groups, the weight
  repeated), train-mode BatchNorm as torch's channels-last kernel with ``K*C`` channels (each set its own
  statistics), elementwise layers and pools as they are. On 2 CPU cores oneDNN's channels-last kernels are
  about 2x its NCHW ones on these shapes (ResNet-20's 32/64-channel convs at ``B*K`` = 768..1536; see
  ``benchmarks/cge_throughput.py``), and the grouped view lets BatchNorm stay in the same layout.

A conv converts its input to the grouped layout (one copy) when it is not already; every other stage keeps
the layout it is given, and a stage with no rule here runs on the standard layout (``reshape`` copies
where needed), so every staged model works. The layout changes rounding only (tested against full
forwards in float64). On CUDA the standard layout is kept.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map

from ..stages import Fork, Merge, OnFirst
from .pooling import batch_stats, tiled_max_pool

__all__ = ["stage_runner", "grouped_batch_norm", "grouped_empty", "flat", "unflat", "is_coupled", "first_only", "ELEMENTWISE"]

Runner = Callable[[Any, int], Any]

#: Modules that act on each element alone (layout-free).
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
               nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity)
#: 2D pools that act on each channel alone (run on the ``(B, K*C, H, W)`` view).
_POOLS2D = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def is_coupled(stage: nn.Module) -> bool:
    """Whether the stage couples the samples of a batch (train-mode BatchNorm or ``bbzo_batch_coupled``)."""
    if getattr(stage, "bbzo_batch_coupled", False):
        return True
    return any((isinstance(m, _BatchNorm) and m.training) or getattr(m, "bbzo_batch_coupled", False)
               for m in stage.modules())


def flat(tree: Any) -> Any:
    """``(B, K, ...)`` -> ``(B*K, ...)`` (a copy for the grouped layout)."""
    return tree_map(lambda t: t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]), tree)


def unflat(tree: Any, k: int) -> Any:
    return tree_map(lambda t: t.view(t.shape[0] // k, k, *t.shape[1:]), tree)


def grouped_empty(b: int, k: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``(B, K, C, H, W)`` tensor in the grouped layout (memory ``(B, H, W, K, C)``)."""
    return like.new_empty(b, h, w, k, c).permute(0, 3, 4, 1, 2)


def _groups_view(x: torch.Tensor) -> torch.Tensor:
    """``(B, K, C, *S)`` -> ``(B, K*C, *S)``: free for the standard and the grouped layout."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _from_groups(y: torch.Tensor, k: int) -> torch.Tensor:
    return y.view(y.shape[0], k, y.shape[1] // k, *y.shape[2:])


def _grouped_conv_ok(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _conv_runner(conv: nn.Conv2d) -> Runner:
    """Conv2d on ``(B, K, C, H, W)``: on CPU one channels-last grouped convolution, output grouped."""
    def run(x: torch.Tensor, k: int) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 5:
            return unflat(conv(flat(x)), k)
        v = _groups_view(x).contiguous(memory_format=torch.channels_last)
        w = conv.weight.repeat(k, 1, 1, 1)
        b = conv.bias.repeat(k) if conv.bias is not None else None
        y = F.conv2d(v, w, b, conv.stride, conv.padding, conv.dilation, groups=k * conv.groups)
        return _from_groups(y, k)
    return run


def grouped_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Train-mode BN of ``(B, K, C, ...)`` with separate batch statistics per k (no stat updates).

    Equal to ``vmap(bn, in_dims=1)(x)`` to round-off, on the free view ``(B, K*C, ...)``. Grouped
    (channels-last) layout: torch's train-mode kernel, fast in that layout. Standard layout on CPU: the
    statistics from sums and one batched dot (:func:`bbzo.adapters.pooling.batch_stats`), then the
    eval-mode kernel (together ~4x torch's NCHW train-mode kernel, which is ~2x faster than vmap's rule).
    """
    k = x.shape[1]
    v = _groups_view(x)
    w = bn.weight.repeat(k) if bn.affine else None
    bias = bn.bias.repeat(k) if bn.affine else None
    cl = v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
    if v.dim() > 2 and v.device.type == "cpu" and not cl:
        v = v.contiguous()
        mean, var = batch_stats(v)
        y = F.batch_norm(v, mean, var, w, bias, False, 0.0, bn.eps)
    else:
        y = F.batch_norm(v, None, None, w, bias, True, 0.0, bn.eps)
    return _from_groups(y, k)


def _eval_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    k = x.shape[1]
    w = bn.weight.repeat(k) if bn.affine else None
    b = bn.bias.repeat(k) if bn.affine else None
    y = F.batch_norm(_groups_view(x), bn.running_mean.repeat(k), bn.running_var.repeat(k), w, b, False, 0.0, bn.eps)
    return _from_groups(y, k)


def _pool_runner(pool: nn.Module) -> Runner:
    def run(x: torch.Tensor, k: int) -> torch.Tensor:
        if x.dim() != 5:
            return unflat(pool(flat(x)), k)
        v = _groups_view(x)
        out = tiled_max_pool(pool, v) if isinstance(pool, nn.MaxPool2d) and v.device.type == "cpu" else None
        return _from_groups(pool(v) if out is None else out, k)
    return run


def _merge_runner(m: Merge) -> Runner:
    """``post(h + shortcut(skip))`` keeping ``h``'s layout; the shortcut runs on the standard layout."""
    def run(act: tuple, k: int) -> torch.Tensor:
        h, skip = act[0], act[1]
        sc = skip if isinstance(m.shortcut, nn.Identity) else unflat(m.shortcut(flat(skip)), k)
        if sc.shape != h.shape:  # broadcasting: let torch decide the shape
            return m.post(sc - h if m.subtract else h + sc)
        out = torch.empty_like(h)
        torch.sub(sc, h, out=out) if m.subtract else torch.add(h, sc, out=out)
        return out.relu_() if type(m.post) is nn.ReLU else m.post(out)
    return run


def _inner_runner(inner: nn.Module) -> Runner | None:
    """A layout-aware runner for a module acting on one ``(B, K, ...)`` tensor, or None (generic)."""
    if isinstance(inner, _BatchNorm) and not getattr(inner, "bbzo_batch_coupled", False):
        if inner.training or inner.running_mean is None:
            return lambda x, k: grouped_batch_norm(inner, x)
        return lambda x, k: _eval_batch_norm(inner, x) if x.dim() > 2 else unflat(inner(flat(x)), k)
    if _grouped_conv_ok(inner):
        return _conv_runner(inner)
    if isinstance(inner, ELEMENTWISE):
        return lambda x, k: inner(x)
    if isinstance(inner, _POOLS2D) and not getattr(inner, "return_indices", False):
        return _pool_runner(inner)
    return None


def first_only(stage: nn.Module) -> bool:
    """Whether the stage's runner reads element 0 of a tuple only and passes the others through untouched."""
    return isinstance(stage, OnFirst) and _inner_runner(stage.module) is not None


def stage_runner(stage: nn.Module) -> Runner:
    """How to run an unperturbed stage on K stacked batches ``(B, K, ...)``, keeping the K sets apart.

    Decided once per bound minibatch (it depends on the train/eval mode), not once per chunk.
    """
    if isinstance(stage, Fork):
        return lambda x, k: (x, x)
    if isinstance(stage, OnFirst):
        inner = _inner_runner(stage.module)
        if inner is not None:
            return lambda act, k: (inner(act[0], k), *act[1:])
    elif isinstance(stage, Merge):
        if isinstance(stage.post, ELEMENTWISE) and not is_coupled(stage):
            return _merge_runner(stage)
    else:
        inner = _inner_runner(stage)
        if inner is not None:
            return inner
    if is_coupled(stage):
        batched = vmap(stage, in_dims=1, out_dims=1, randomness="same")
        return lambda act_k, k: batched(act_k)
    return lambda act_k, k: unflat(stage(flat(act_k)), k)
