"""How an unperturbed stage runs on ``K`` stacked activations ``(B, K, ...)``, keeping the ``K`` sets apart.

Two memory layouts of a stacked image activation ``(B, K, C, H, W)`` are in use:

* *standard* (contiguous): ``(B*K, C, H, W)`` is a free view, so a per-sample stage runs on one big batch;
* *stacked* (CPU): memory in the order ``(K, B, H, W, C)``, so that ``(K*B, C, H, W)`` is a free
  **channels-last** view. There a Conv2d runs as one ordinary convolution over the ``K*B`` batch (the
  samples' order does not matter to a per-sample layer), train-mode BatchNorm as torch's channels-last kernel
  on each set's ``(B, C, H, W)`` slice (each set its own statistics), eval-mode BatchNorm, elementwise layers
  and pools on the ``K*B`` view. On 2 CPU cores oneDNN's channels-last kernels are 1.1-1.5x its grouped
  convolution (the previous layout, ``K`` groups with the weight repeated) and about 1.5x its NCHW ones on
  ResNet-20's 16/32/64-channel convs at ``K*B`` = 1024..8192 (see ``benchmarks/cge_throughput.py``).

A conv converts its input to the stacked layout (one copy) when it is not already; every other stage keeps
the layout it is given, and a stage with no rule here runs on whichever of ``(B*K, ...)`` or ``(K*B, ...)``
is a free view (``reshape`` copies where neither is), so every staged model works. The layout changes
rounding only (tested against full forwards in float64). On CUDA the standard layout is kept.
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

__all__ = ["stage_runner", "fused_runner", "stacked_batch_norm", "stacked_empty", "is_stacked", "add_relu", "flat", "unflat",
           "is_coupled", "first_only", "ELEMENTWISE"]

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
    """``(B, K, ...)`` -> ``(B*K, ...)`` (a copy for the stacked layout)."""
    return tree_map(lambda t: t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]), tree)


def unflat(tree: Any, k: int) -> Any:
    return tree_map(lambda t: t.view(t.shape[0] // k, k, *t.shape[1:]), tree)


def stacked_empty(b: int, k: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``(B, K, C, H, W)`` tensor in the stacked layout (memory ``(K, B, H, W, C)``)."""
    return like.new_empty(k, b, h, w, c).permute(1, 0, 4, 2, 3)


def is_stacked(x: Any) -> bool:
    """Whether ``x (B, K, C, H, W)`` is in the stacked layout (``(K*B, C, H, W)`` a free channels-last view)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return False
    b, k, c, h, w = x.shape
    want = (h * w * c, b * h * w * c, 1, w * c, c)
    return all(st == wt for st, wt, n in zip(x.stride(), want, x.shape) if n > 1)


def _sets_into_batch(x: torch.Tensor) -> torch.Tensor:
    """Stacked ``(B, K, C, H, W)`` -> the free ``(K*B, C, H, W)`` channels-last view."""
    return x.transpose(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _batch_into_sets(y: torch.Tensor, k: int) -> torch.Tensor:
    """``(K*B, ...)`` -> ``(B, K, ...)`` (a view)."""
    return y.view(k, y.shape[0] // k, *y.shape[1:]).transpose(0, 1)


def _per_sample(fn: Callable[[Any], Any], x: Any, k: int) -> Any:
    """A per-sample map on ``(B, K, ...)`` (or a tuple of them) through whichever flat batch is a free view
    (``K*B`` when stacked)."""
    if is_stacked(x):
        return _batch_into_sets(fn(_sets_into_batch(x)), k)
    return unflat(fn(flat(x)), k)


def _conv_ok(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _conv_runner(conv: nn.Conv2d) -> Runner:
    """Conv2d on ``(B, K, C, H, W)``: on CPU one channels-last convolution over ``K*B``, output stacked."""
    def run(x: torch.Tensor, k: int) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 5:
            return unflat(conv(flat(x)), k)
        if not is_stacked(x):
            x = stacked_empty(x.shape[0], k, *x.shape[2:], like=x).copy_(x)
        return _batch_into_sets(conv(_sets_into_batch(x)), k)
    return run


def _groups_view(x: torch.Tensor) -> torch.Tensor:
    """``(B, K, C, *S)`` -> ``(B, K*C, *S)`` (free for the standard layout)."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _from_groups(y: torch.Tensor, k: int) -> torch.Tensor:
    return y.view(y.shape[0], k, y.shape[1] // k, *y.shape[2:])


def stacked_batch_norm(bn: _BatchNorm, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """Train-mode BN of ``(B, K, C, ...)`` with separate batch statistics per k (no stat updates).

    Equal to ``vmap(bn, in_dims=1)(x)`` to round-off (then ``relu`` in place, if asked). Stacked layout:
    torch's channels-last statistics kernel on each set's ``(B, C, H, W)`` slice, then one multiply-add over
    the stacked memory. Standard layout on CPU, on the free view ``(B, K*C, ...)``: the statistics from sums
    and one batched dot (:func:`bbzo.adapters.pooling.batch_stats`), then the eval-mode kernel (together ~4x
    torch's NCHW train-mode kernel, which is ~2x faster than vmap's rule).
    """
    k = x.shape[1]
    if is_stacked(x):
        stats = [torch.batch_norm_update_stats(x[:, i], None, None, 0.0) for i in range(k)]
        mean = torch.stack([m for m, _ in stats])  # (K, C)
        scale = torch.rsqrt(torch.stack([v for _, v in stats]) + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
        shift = -mean * scale if not bn.affine else bn.bias - mean * scale
        mem = x.permute(1, 0, 3, 4, 2)  # (K, B, H, W, C), contiguous
        out = torch.addcmul(shift[:, None, None, None], mem, scale[:, None, None, None])
        if relu:
            out.clamp_min_(0)
        return out.permute(1, 0, 4, 2, 3)
    v = _groups_view(x)
    w = bn.weight.repeat(k) if bn.affine else None
    bias = bn.bias.repeat(k) if bn.affine else None
    if v.dim() > 2 and v.device.type == "cpu":
        v = v.contiguous()
        mean, var = batch_stats(v)
        y = F.batch_norm(v, mean, var, w, bias, False, 0.0, bn.eps)
    else:
        y = F.batch_norm(v, None, None, w, bias, True, 0.0, bn.eps)
    y = _from_groups(y, k)
    return y.relu_() if relu else y


def _eval_batch_norm(bn: _BatchNorm, x: torch.Tensor, k: int, relu: bool = False) -> torch.Tensor:
    y = _per_sample(lambda v: F.batch_norm(v, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                                           bn.eps), x, k)
    return y.relu_() if relu else y


def _pool_runner(pool: nn.Module) -> Runner:
    def one(v: torch.Tensor) -> torch.Tensor:
        out = tiled_max_pool(pool, v) if isinstance(pool, nn.MaxPool2d) and v.device.type == "cpu" else None
        return pool(v) if out is None else out

    return lambda x, k: _per_sample(one, x, k)


def _merge_runner(m: Merge) -> Runner:
    """``post(h + shortcut(skip))`` keeping ``h``'s layout; the shortcut runs on a flat batch of ``skip``."""
    def run(act: tuple, k: int) -> torch.Tensor:
        h, skip = act[0], act[1]
        sc = skip if isinstance(m.shortcut, nn.Identity) else _per_sample(m.shortcut, skip, k)
        if sc.shape != h.shape:  # broadcasting: let torch decide the shape
            return m.post(sc - h if m.subtract else h + sc)
        out = torch.empty_like(h)
        if type(m.post) is nn.ReLU and not m.subtract:
            return add_relu(h, sc, out)
        torch.sub(sc, h, out=out) if m.subtract else torch.add(h, sc, out=out)
        return out.relu_() if type(m.post) is nn.ReLU else m.post(out)
    return run


_ADD_RELU = getattr(torch.ops.aten, "_add_relu", None)


def add_relu(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``relu(a + b)`` into ``out`` in one pass (aten's fused kernel where this torch has it)."""
    if _ADD_RELU is not None and out.device.type == "cpu":
        return _ADD_RELU.out(a, b, out=out)
    return torch.add(a, b, out=out).relu_()


def _inner_runner(inner: nn.Module) -> Runner | None:
    """A layout-aware runner for a module acting on one ``(B, K, ...)`` tensor, or None (generic)."""
    bn = _bn_runner(inner, False)
    if bn is not None:
        return bn
    if _conv_ok(inner):
        return _conv_runner(inner)
    if isinstance(inner, ELEMENTWISE):
        return lambda x, k: inner(x)
    if isinstance(inner, _POOLS2D) and not getattr(inner, "return_indices", False):
        return _pool_runner(inner)
    return None


def _bn_runner(bn: nn.Module, relu: bool) -> Runner | None:
    if not isinstance(bn, _BatchNorm) or getattr(bn, "bbzo_batch_coupled", False):
        return None
    if bn.training or bn.running_mean is None:
        return lambda x, k: stacked_batch_norm(bn, x, relu)
    return lambda x, k: _eval_batch_norm(bn, x, k, relu)


def fused_runner(stage: nn.Module, nxt: nn.Module) -> Runner | None:
    """One runner for a BatchNorm stage and the ReLU stage after it (both plain, or both :class:`OnFirst`),
    the ReLU applied in place to BN's fresh output; None where the pair does not fuse."""
    if isinstance(stage, OnFirst) and isinstance(nxt, OnFirst):
        stage, nxt, on_first = stage.module, nxt.module, True
    elif isinstance(stage, OnFirst) or isinstance(nxt, OnFirst):
        return None
    else:
        on_first = False
    if type(nxt) is not nn.ReLU:
        return None
    run = _bn_runner(stage, True)
    if run is None:
        return None
    return _on_first(run) if on_first else run


def _on_first(run: Runner) -> Runner:
    """A runner for element 0 of a tuple activation, the other elements passed through."""
    return lambda act, k: (run(act[0], k), *act[1:])


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
            return _on_first(inner)
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
    return lambda act_k, k: _per_sample(stage, act_k, k)
