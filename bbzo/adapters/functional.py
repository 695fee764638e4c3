"""Generic adapter: any ``nn.Module``, K perturbed parameter sets per call through ``torch.func``.

For a chunk of ``K`` probes only the parameters the chunk touches are stacked to ``(K, *shape)``; every
other parameter enters ``vmap`` unbatched, so a chunk of single-coordinate probes costs ``K`` copies of
one tensor, not of the model. ``vmap`` gives each of the K sets its own BatchNorm batch statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_map

from ..probes import BlockProbes, CoordinateProbes, DirectionProbes, Probes
from .common import Adapter, Evaluator, LossFn, chunk_size, frozen_bn_stats, tree_bytes

__all__ = ["FunctionalAdapter", "FunctionalEvaluator", "stack_coordinate_params", "stack_block_params"]


def stack_coordinate_params(
    params: dict[str, torch.Tensor], probes: CoordinateProbes, name_of: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """``(K, *shape)`` copies of each parameter the K probes touch, each with its one coordinate moved."""
    k = len(probes)
    stacked: dict[str, torch.Tensor] = {}
    rows_all = torch.arange(k)
    for p, rows in probes.groups():
        name = name_of[p]
        base = params[name]
        s = base.reshape(1, -1).expand(k, -1).clone()
        idx = probes.index[rows].to(base.device)
        r = rows_all[rows].to(base.device)
        s[r, idx] += probes.step[rows].to(device=base.device, dtype=base.dtype)
        stacked[name] = s.view(k, *base.shape)
    return stacked


def stack_direction_params(params: dict[str, torch.Tensor], probes: DirectionProbes) -> dict[str, torch.Tensor]:
    """``(K, *shape)`` parameter sets ``theta + step_k u_{dir_k}`` for K direction probes."""
    k = len(probes)
    out = {n: params[n].unsqueeze(0).repeat(k, *([1] * params[n].dim())) for n in probes.names}
    for j in range(k):
        u = probes.direction(int(probes.dirs[j]))
        step = float(probes.step[j])
        for n, un in zip(probes.names, u):
            out[n][j].add_(un.to(device=out[n].device, dtype=out[n].dtype), alpha=step)
    return out


def stack_block_params(params: dict[str, torch.Tensor], probes: BlockProbes) -> dict[str, torch.Tensor]:
    """``(K, *shape)`` copies of the one perturbed tensor: ``theta + step_k * dir_k``."""
    base = params[probes.name]
    d = probes.dirs.to(device=base.device, dtype=base.dtype) * probes.step.to(device=base.device, dtype=base.dtype)[:, None]
    return {probes.name: (base.reshape(1, -1) + d).view(len(probes), *base.shape)}


class FunctionalEvaluator(Evaluator):
    def __init__(self, adapter: "FunctionalAdapter", *args: Any) -> None:
        super().__init__(*args)
        self.adapter = adapter
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        self.all_params = {n: p.detach() for n, p in self.model.named_parameters()}

    def _base_loss(self) -> torch.Tensor:
        out = self.model(self.inputs)
        return self._loss(tree_map(lambda t: t.unsqueeze(0), out), 1)[0]

    def _per_set_bytes(self, touched_bytes: int) -> int:
        return self.adapter.activation_bytes(self.inputs) + touched_bytes

    def _chunk(self, touched_bytes: int) -> int:
        """Parameter sets per batched call."""
        return chunk_size(self._per_set_bytes(touched_bytes), self.max_chunk_bytes, self.max_chunk)

    def _run(self, stacked: dict[str, torch.Tensor]) -> Any:
        k = next(iter(stacked.values())).shape[0]
        fixed = {n: p for n, p in self.all_params.items() if n not in stacked}
        model, inputs, buffers = self.model, self.inputs, self.buffers

        def f(batched: dict[str, torch.Tensor]) -> Any:
            return functional_call(model, ({**fixed, **batched}, buffers), (inputs,))

        out = vmap(f, randomness="same")(stacked)
        return self._loss(out, k)

    def _evaluate(self, probes: Probes) -> torch.Tensor:
        m = len(probes)
        losses = torch.empty(m, dtype=torch.float64)
        if isinstance(probes, BlockProbes):
            touched = self.params[probes.name].numel() * self.params[probes.name].element_size()
        elif isinstance(probes, CoordinateProbes):
            touched = max(self.params[probes.names[p]].numel() * self.params[probes.names[p]].element_size()
                          for p in torch.unique(probes.pidx).tolist())
        else:
            touched = sum(p.numel() * p.element_size() for p in self.params.values())
        k = self._chunk(touched)
        for start in range(0, m, k):
            chunk = probes.slice(start, min(m, start + k))
            if isinstance(chunk, BlockProbes):
                stacked = stack_block_params(self.params, chunk)
            elif isinstance(chunk, CoordinateProbes):
                stacked = stack_coordinate_params(self.params, chunk, probes.names)
            else:
                stacked = stack_direction_params(self.params, chunk)
            losses[start:start + len(chunk)] = self._run(stacked)
        return losses


class FunctionalAdapter(Adapter):
    """Batched perturbation evaluation for any ``nn.Module`` (no feature reuse)."""

    reuses_features = False

    def __init__(self, model: nn.Module, **kw: Any) -> None:
        super().__init__(model, **kw)
        self._act_bytes: dict[tuple, int] = {}

    def activation_bytes(self, inputs: Any) -> int:
        """Peak activation bytes of one forward on ``inputs`` (cached per input shape/dtype)."""
        leaves, _ = tree_flatten(inputs)
        key = tuple((tuple(t.shape), t.dtype, str(t.device)) for t in leaves if isinstance(t, torch.Tensor))
        if key not in self._act_bytes:
            sizes: list[int] = []
            hooks = [m.register_forward_hook(lambda _m, _i, o: sizes.append(tree_bytes(o)))
                     for m in self.model.modules() if not list(m.children())]
            try:
                with torch.no_grad(), frozen_bn_stats(self.model):
                    self.model(inputs)
            finally:
                for h in hooks:
                    h.remove()
            self._act_bytes[key] = 3 * max(sizes, default=tree_bytes(inputs))
        return self._act_bytes[key]

    def bind(self, loss_fn: LossFn, inputs: Any, targets: Any) -> FunctionalEvaluator:
        return FunctionalEvaluator(self, self.model, loss_fn, inputs, targets, self.trainable(),
                                   self.max_chunk_bytes, self.max_chunk)
