"""Staged models and feature reuse (DeepZero §5, "feature reuse").

A *staged model* is an ordered list of stages whose composition is the model's forward:
``forward(x) == s[n-1](...s[1](s[0](x)))``. Activations between stages may be tensors or tuples of
tensors (a residual block forks into ``(h, skip)`` and merges back). A model declares its stages with
a ``bbzo_stages() -> list[nn.Module]`` method; an ``nn.Sequential`` is staged by its (flattened)
children.

For a coordinate in stage ``i`` the evaluator computes the activations before ``i`` once per minibatch
and runs only stages ``i..n-1`` on a ``K x B`` batch (K perturbed parameter sets at once). When stage
``i`` is a ``Conv2d``/``Linear`` (optionally inside :class:`OnFirst`), the layer is linear in its
weights, so the perturbed output is ``base_out + mu * delta`` where ``delta`` is one input patch
written into one output channel: the perturbed stage itself costs a gather, not a convolution.

Stages that contain a train-mode BatchNorm couple the samples of a batch; they run under ``vmap``
so every perturbed set gets its own batch statistics. All other stages run on the flattened
``(K*B, ...)`` batch. A custom stage that couples samples some other way must set
``bbzo_batch_coupled = True``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map

from ..errors import ConfigError, InefficientSettingsWarning
from ..probes import BlockProbes, CoordinateProbes, Probes
from .common import Adapter, Evaluator, LossFn, chunk_size, frozen_bn_stats, tree_bytes
from .functional import FunctionalAdapter, stack_block_params, stack_coordinate_params

__all__ = ["Fork", "OnFirst", "Merge", "model_stages", "StagedAdapter", "StagedEvaluator"]


# ---------------------------------------------------------------------------- stage building blocks
class Fork(nn.Module):
    """``x -> (x, x)``: start a residual branch (element 0 is the branch, element 1 the skip)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x, x)


class OnFirst(nn.Module):
    """Apply ``module`` to element 0 of a tuple activation, pass the rest through."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, act: tuple) -> tuple:
        return (self.module(act[0]), *act[1:])


class Merge(nn.Module):
    """``(h, skip) -> post(h + shortcut(skip))``: close a residual branch."""

    def __init__(self, shortcut: Optional[nn.Module] = None, post: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.post = post if post is not None else nn.Identity()

    def forward(self, act: tuple) -> torch.Tensor:
        return self.post(act[0] + self.shortcut(act[1]))


def _flatten_sequential(mods: Sequence[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in mods:
        if isinstance(m, nn.Sequential):
            out.extend(_flatten_sequential(list(m)))
        elif hasattr(m, "bbzo_stages"):
            out.extend(m.bbzo_stages())
        else:
            out.append(m)
    return out


def model_stages(model: nn.Module) -> Optional[list[nn.Module]]:
    """The model's stages, or None if it declares none (then only the generic adapter applies)."""
    if hasattr(model, "bbzo_stages"):
        return list(model.bbzo_stages())
    if isinstance(model, nn.Sequential):
        return _flatten_sequential(list(model))
    return None


def _is_coupled(stage: nn.Module) -> bool:
    if getattr(stage, "bbzo_batch_coupled", False):
        return True
    return any((isinstance(m, _BatchNorm) and m.training) or getattr(m, "bbzo_batch_coupled", False)
               for m in stage.modules())


def _linear_core(stage: nn.Module) -> tuple[Optional[nn.Module], Optional[int]]:
    """``(layer, tuple position)`` if the stage is a plain Conv2d/Linear (optionally in OnFirst)."""
    pos = None
    if isinstance(stage, OnFirst):
        stage, pos = stage.module, 0
    if isinstance(stage, nn.Linear):
        return stage, pos
    if (isinstance(stage, nn.Conv2d) and stage.padding_mode == "zeros"
            and not isinstance(stage.padding, str)):
        return stage, pos
    return None, None


# ---------------------------------------------------------------------------- perturbed linear layers
# Stacked activations in this module use the layout (B, K, ...): sample-major, so that (B*K, ...) is a
# free view for per-sample stages and (B, K*C, ...) a free view for BatchNorm with per-k statistics.

def _conv_weight_delta(conv: nn.Conv2d, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def _linear_perturbed(layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor, local: Sequence[str],
                      index: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Outputs ``(B, K, ...)`` of a Conv2d/Linear whose K probes each move one weight or bias entry.

    Exact: the layer is linear in its parameters, so ``out_k = base_out + step_k * d(out)/d(theta_k)``.
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
            o, delta = _conv_weight_delta(layer, x, idx)  # (Kw, B, Ho, Wo)
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


def _block_perturbed(layer: nn.Module, x: torch.Tensor, base_out: torch.Tensor, local: str,
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


# ---------------------------------------------------------------------------- stages on B x K batches
def _grouped_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Train-mode BN of ``(B, K, C, ...)`` with separate batch statistics per k (no stat updates).

    Equal to ``vmap(bn, in_dims=1)(x)``; runs torch's native BN kernel on the free view
    ``(B, K*C, ...)`` (vmap's rule is ~2x slower on CPU, a ``var_mean`` over (B, H, W) ~4x).
    """
    b, k, c = x.shape[:3]
    x = x.contiguous()
    w = bn.weight.repeat(k) if bn.affine else None
    bias = bn.bias.repeat(k) if bn.affine else None
    y = F.batch_norm(x.view(b, k * c, *x.shape[3:]), None, None, w, bias, True, 0.0, bn.eps)
    return y.view(x.shape)


def _flat(tree: Any) -> Any:
    """``(B, K, ...)`` -> ``(B*K, ...)``."""
    return tree_map(lambda t: t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]), tree)


def _unflat(tree: Any, k: int) -> Any:
    return tree_map(lambda t: t.view(t.shape[0] // k, k, *t.shape[1:]), tree)


def stage_runner(stage: nn.Module) -> Callable[[Any, int], Any]:
    """How to run an unperturbed stage on K stacked batches ``(B, K, ...)``, keeping the K sets apart.

    Decided once per bound minibatch (it depends on the train/eval mode), not once per chunk.
    """
    inner, pos = (stage.module, 0) if isinstance(stage, OnFirst) else (stage, None)
    if isinstance(inner, _BatchNorm) and inner.training and not getattr(stage, "bbzo_batch_coupled", False):
        if pos is None:
            return lambda act_k, k: _grouped_batch_norm(inner, act_k)
        return lambda act_k, k: (_grouped_batch_norm(inner, act_k[0]), *act_k[1:])
    if _is_coupled(stage):
        batched = vmap(stage, in_dims=1, out_dims=1, randomness="same")
        return lambda act_k, k: batched(act_k)
    return lambda act_k, k: _unflat(stage(_flat(act_k)), k)


# ---------------------------------------------------------------------------- adapter / evaluator
class StagedAdapter(Adapter):
    """Feature-reuse adapter for staged models (``nn.Sequential`` or ``bbzo_stages()``).

    Args:
        model: The staged model.
        linear_shortcut: Use ``base_out + mu * delta`` for Conv2d/Linear stages (exact; on by default).
        max_chunk_bytes, max_chunk: Bound the K perturbed sets evaluated per batched call.
    """

    reuses_features = True

    def __init__(self, model: nn.Module, *, linear_shortcut: bool = True, **kw: Any) -> None:
        super().__init__(model, **kw)
        stages = model_stages(model)
        if stages is None:
            raise ConfigError(
                f"{type(model).__name__} declares no stages, so features cannot be reused. Give it a "
                "bbzo_stages() method returning its stages in order (see bbzo.adapters.staged), wrap it "
                "in nn.Sequential, or use feature_reuse=False (the generic torch.func adapter)."
            )
        self.stages = stages
        self.linear_shortcut = linear_shortcut
        owner: dict[int, tuple[int, str]] = {}
        for i, st in enumerate(stages):
            for local, p in st.named_parameters():
                if id(p) in owner and owner[id(p)][0] != i:
                    raise ConfigError(
                        f"parameter {local!r} appears in stages {owner[id(p)][0]} and {i}; shared weights "
                        "cannot use feature reuse. Use feature_reuse=False."
                    )
                owner.setdefault(id(p), (i, local))
        self.stage_of: dict[str, tuple[int, str]] = {}
        for name, p in model.named_parameters():
            if id(p) in owner:
                self.stage_of[name] = owner[id(p)]
        self.fallback = FunctionalAdapter(model, max_chunk_bytes=self.max_chunk_bytes, max_chunk=self.max_chunk)

    def bind(self, loss_fn: LossFn, inputs: Any, targets: Any) -> "StagedEvaluator":
        return StagedEvaluator(self, self.model, loss_fn, inputs, targets, self.trainable(),
                               self.max_chunk_bytes, self.max_chunk)


class StagedEvaluator(Evaluator):
    def __init__(self, adapter: StagedAdapter, *args: Any) -> None:
        super().__init__(*args)
        self.adapter = adapter
        self.stages = adapter.stages
        self._runners = [stage_runner(st) for st in self.stages]
        self._acts: Optional[list[Any]] = None
        self._fallback: Optional[Evaluator] = None

    # -------------------------------------------------------------- cached activations
    @property
    def acts(self) -> list[Any]:
        """``acts[i]`` = input of stage ``i``; ``acts[n]`` = model output (computed once per batch)."""
        if self._acts is None:
            acts = [self.inputs]
            with torch.no_grad(), frozen_bn_stats(self.model):
                for st in self.stages:
                    acts.append(st(acts[-1]))
            self._acts = acts
        return self._acts

    def _base_loss(self) -> torch.Tensor:
        return self._loss(tree_map(lambda t: t.unsqueeze(0), self.acts[-1]), 1)[0]

    def _downstream_bytes(self, i: int) -> int:
        """Rough peak bytes per perturbed set when running stages ``i..n-1``."""
        return 2 * max(tree_bytes(a) for a in self.acts[i + 1:])

    def _run_downstream(self, i: int, act_k: Any, k: int) -> Any:
        for run in self._runners[i + 1:]:
            act_k = run(act_k, k)
        return act_k

    def _perturbed_stage(self, i: int, probes: CoordinateProbes, locals_: list[str]) -> Any:
        st = self.stages[i]
        k = len(probes)
        act = self.acts[i]
        layer, pos = _linear_core(st) if self.adapter.linear_shortcut else (None, None)
        if layer is not None:
            x = act if pos is None else act[pos]
            base_out = self.acts[i + 1] if pos is None else self.acts[i + 1][pos]
            out = _linear_perturbed(layer, x, base_out, locals_, probes.index, probes.step)
            if pos is None:
                return out
            rest = tuple(t.unsqueeze(1).expand(t.shape[0], k, *t.shape[1:]) for t in self.acts[i + 1][1:])
            return (out, *rest)
        return self._vmapped_stage(i, stack_coordinate_params(self.params, probes, probes.names))

    def _vmapped_stage(self, i: int, stacked_global: dict[str, torch.Tensor]) -> Any:
        """Stage ``i`` under ``vmap`` over K stacked copies of the touched parameters -> ``(B, K, ...)``."""
        st, act = self.stages[i], self.acts[i]
        local_params = {n: p.detach() for n, p in st.named_parameters()}
        stacked = {self.adapter.stage_of[g][1]: v for g, v in stacked_global.items()}
        fixed = {n: p for n, p in local_params.items() if n not in stacked}
        buffers = dict(st.named_buffers())

        def f(batched: dict[str, torch.Tensor]) -> Any:
            return functional_call(st, ({**fixed, **batched}, buffers), (act,))

        return vmap(f, out_dims=1, randomness="same")(stacked)

    def _perturbed_block(self, i: int, probes: BlockProbes) -> Any:
        st = self.stages[i]
        local = self.adapter.stage_of[probes.name][1]
        layer, pos = _linear_core(st) if self.adapter.linear_shortcut else (None, None)
        if layer is not None:
            x = self.acts[i] if pos is None else self.acts[i][pos]
            base_out = self.acts[i + 1] if pos is None else self.acts[i + 1][pos]
            out = _block_perturbed(layer, x, base_out, local, probes.dirs, probes.step)
            if out is not None:
                if pos is None:
                    return out
                k = len(probes)
                rest = tuple(t.unsqueeze(1).expand(t.shape[0], k, *t.shape[1:]) for t in self.acts[i + 1][1:])
                return (out, *rest)
        return self._vmapped_stage(i, stack_block_params(self.params, probes))

    def _evaluate_block(self, probes: BlockProbes) -> torch.Tensor:
        if probes.name not in self.adapter.stage_of:
            return self._fallback_eval(probes)
        i = self.adapter.stage_of[probes.name][0]
        m = len(probes)
        losses = torch.empty(m, dtype=torch.float64)
        k = chunk_size(self._downstream_bytes(i), self.max_chunk_bytes, self.max_chunk)
        for start in range(0, m, k):
            chunk = probes.slice(start, min(m, start + k))
            out = self._run_downstream(i, self._perturbed_block(i, chunk), len(chunk))
            out = tree_map(lambda t: t.movedim(1, 0), out)
            losses[start:start + len(chunk)] = self._loss(out, len(chunk))
        return losses

    def _evaluate(self, probes: Probes) -> torch.Tensor:
        if isinstance(probes, BlockProbes):
            return self._evaluate_block(probes)
        if not isinstance(probes, CoordinateProbes):
            return self._fallback_eval(probes)
        m = len(probes)
        losses = torch.empty(m, dtype=torch.float64)
        names = probes.names
        stage_idx = torch.tensor([self.adapter.stage_of.get(n, (-1, ""))[0] for n in names], dtype=torch.int64)
        probe_stage = stage_idx[probes.pidx]
        if bool((probe_stage < 0).any()):
            rows = (probe_stage < 0).nonzero().flatten()
            losses[rows] = self._fallback_eval(probes.select(rows))
        for i in torch.unique(probe_stage[probe_stage >= 0]).tolist():
            rows = (probe_stage == i).nonzero().flatten()
            sub = probes.select(rows)
            k = chunk_size(self._downstream_bytes(i), self.max_chunk_bytes, self.max_chunk)
            for start in range(0, len(sub), k):
                chunk = sub.slice(start, min(len(sub), start + k))
                locals_ = [self.adapter.stage_of[names[p]][1] for p in chunk.pidx.tolist()]
                out = self._perturbed_stage(i, chunk, locals_)
                out = self._run_downstream(i, out, len(chunk))
                out = tree_map(lambda t: t.movedim(1, 0), out)  # (K, B, ...) for the loss
                losses[rows[start:start + len(chunk)]] = self._loss(out, len(chunk))
        return losses

    def _fallback_eval(self, probes: Probes) -> torch.Tensor:
        if self._fallback is None:
            self._fallback = self.adapter.fallback.bind(self.loss_fn, self.inputs, self.targets)
        before = self._fallback.calls
        out = self._fallback._evaluate(probes)
        self.calls += self._fallback.calls - before
        return out


def make_adapter(model: nn.Module, feature_reuse: Any = "auto", **kw: Any) -> Adapter:
    """The best adapter for ``model``.

    Args:
        feature_reuse: ``"auto"`` (reuse when the model is staged), ``True`` (require it) or ``False``.
    """
    staged = model_stages(model) is not None
    if feature_reuse is True or (feature_reuse == "auto" and staged):
        return StagedAdapter(model, **kw)
    if feature_reuse not in (False, "auto", True):
        raise ConfigError(f"feature_reuse must be 'auto', True or False, got {feature_reuse!r}.")
    if feature_reuse is False and staged:
        warnings.warn(
            f"{type(model).__name__} is staged but feature_reuse=False: coordinate probes will run the "
            "whole model. Use feature_reuse='auto' unless you are measuring the difference.",
            InefficientSettingsWarning, stacklevel=2,
        )
    return FunctionalAdapter(model, **kw)
