"""Generic adapter: any ``nn.Module``, K perturbed parameter sets per call through ``torch.func``.

For a chunk of ``K`` probes only the parameters the chunk touches are stacked to ``(K, *shape)``
(``probes.stack``); every other parameter enters ``vmap`` unbatched, so a chunk of single-coordinate
probes costs ``K`` copies of one tensor, not of the model. ``vmap`` gives each of the K sets its own
BatchNorm batch statistics.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_map

from ..ledger import QueryLedger
from ..probes import Probes
from .common import Adapter, Evaluator, chunk_size, frozen_bn_stats, tree_bytes

__all__ = ["FunctionalAdapter", "FunctionalEvaluator"]


class FunctionalEvaluator(Evaluator):
    def __init__(self, adapter: "FunctionalAdapter", *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.adapter = adapter
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        self.all_params = {n: p.detach() for n, p in self.model.named_parameters()}

    def _base_losses(self) -> torch.Tensor:
        out = self.model(self.inputs)
        return self._loss(tree_map(lambda t: t.unsqueeze(0), out), 1)[0]

    def _per_set_bytes(self, touched_bytes: int) -> int:
        return self.adapter.activation_bytes(self.inputs) + touched_bytes

    def _chunk(self, touched_bytes: int) -> int:
        """Parameter sets per batched call."""
        return chunk_size(self._per_set_bytes(touched_bytes), self.max_chunk_bytes, self.max_chunk)

    def _chunk_size(self, probes: Probes) -> int:
        """Parameter sets per batched call (the same for any sub-batch of a step's probes)."""
        return self._chunk(probes.touched_bytes(self.params))

    def _run(self, stacked: dict[str, torch.Tensor]) -> Any:
        k = next(iter(stacked.values())).shape[0]
        fixed = {n: p for n, p in self.all_params.items() if n not in stacked}
        model, inputs, buffers = self.model, self.inputs, self.buffers

        def f(batched: dict[str, torch.Tensor]) -> Any:
            return functional_call(model, ({**fixed, **batched}, buffers), (inputs,))

        out = vmap(f, randomness="same")(stacked)
        return self._loss(out, k)

    def _probe_losses(self, probes: Probes) -> torch.Tensor:
        losses = torch.empty(len(probes), self.batch, dtype=torch.float64)
        for _, rows in self.chunks(probes):
            losses[rows] = self._run(probes.select(rows).stack(self.params))
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

    def bind(self, objective: Any, inputs: Any, targets: Any,
             ledger: Optional[QueryLedger] = None) -> FunctionalEvaluator:
        return FunctionalEvaluator(self, self.model, self.prepare_objective(objective), inputs, targets,
                                   self.trainable(), self.max_chunk_bytes, self.max_chunk, ledger=ledger)
