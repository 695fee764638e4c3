"""Model-in-the-loop adapter: the white-box model is called *inside* a rollout through a black box.

Solver-in-the-loop training (Um et al. 2020; DeepZero §6.2) does not compute ``loss(model(x), y)``:
the model corrects the state after every step of a black-box solver, so it is called ``n`` times per
sample, interleaved with oracle queries. The user writes that loop once, as a *rollout*::

    def rollout(model_fn, inputs, targets) -> per_sample_losses  # (N,)
        state, re = inputs
        loss = 0
        for t in range(n):
            state = oracle.query(state, re)          # the black box, N rows
            state = state + model_fn(features(state, re))
            loss = loss + ((state - targets[:, t]) ** 2).flatten(1).mean(1)
        return loss / n

and the adapter evaluates ``K`` perturbed parameter sets at once: it hands the rollout ``K`` copies of
the minibatch stacked as ``N = K * B`` rows, and a ``model_fn`` that applies parameter set ``k`` to rows
``k*B ... (k+1)*B - 1`` (one ``vmap`` over ``functional_call``). Every oracle call therefore carries
``K * B`` states: one PhiFlow batch for K perturbed correctors.

The same rollout, given the plain model and autograd, is the first-order baseline (FO-SOL), and given
the plain model under ``no_grad`` it is the evaluation; nothing is written twice. Feature reuse does
not apply (a perturbed model changes its own later inputs).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..errors import ConfigError
from ..ledger import QueryLedger
from .common import Adapter, per_sample_losses, repeat_targets
from .functional import FunctionalEvaluator

__all__ = ["LoopAdapter", "LoopEvaluator", "RolloutFn"]

#: ``rollout(model_fn, inputs, targets) -> (N,)`` per-sample losses; ``model_fn`` maps ``(N, ...)`` rows.
RolloutFn = Callable[[Callable[[torch.Tensor], torch.Tensor], Any, Any], torch.Tensor]


class LoopEvaluator(FunctionalEvaluator):
    """Evaluates probes by running the user's rollout with ``K`` parameter sets side by side."""

    adapter: "LoopAdapter"

    def _base_losses(self) -> torch.Tensor:
        self._charge(1)
        self.calls += 1
        per_sample = self.objective(self.model, self.inputs, self.targets)
        return per_sample_losses(per_sample, 1, self.batch, "rollout")[0]

    def _differentiable_losses(self, objective: Any) -> torch.Tensor:
        """The rollout (or its surrogate) with the plain model and autograd (FO-SOL differentiates a white-box
        solver; the surrogate's black-box calls enter as constants)."""
        return objective(self.model, self.inputs, self.targets)

    def output_width(self) -> int:
        raise ConfigError("the chain-rule estimators (oracle_cge / oracle_rge) need the model -> black box split; a "
                          "model inside a rollout (solver in the loop) has no single output to perturb. Use cge / "
                          "sparse_cge / rge.")

    def _chunk(self, touched_bytes: int) -> int:
        return self.adapter.sets_per_call  # fixed: a jit-compiled black box traces once

    def _run(self, stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        k = next(iter(stacked.values())).shape[0]
        fixed = {n: p for n, p in self.all_params.items() if n not in stacked}
        model, buffers, b = self.model, self.buffers, self.batch

        def one(batched: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, ({**fixed, **batched}, buffers), (x,))

        many = vmap(one, randomness="same")

        def model_fn(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != k * b:
                raise ConfigError(
                    f"model_fn got {x.shape[0]} rows inside the rollout; it must be called on all N = K*B = "
                    f"{k}*{b} rows the rollout received (one row per stacked sample)."
                )
            out = many(stacked, x.reshape(k, b, *x.shape[1:]))
            return out.reshape(k * b, *out.shape[2:])

        self._charge(k)
        self.calls += 1
        per_sample = self.objective(model_fn, repeat_targets(self.inputs, k), repeat_targets(self.targets, k))
        return per_sample_losses(per_sample, k, b, "rollout")


class LoopAdapter(Adapter):
    """Batched perturbation evaluation for a model called inside a rollout (see the module docstring).

    Args:
        model: The white-box component (any ``nn.Module`` that works under ``torch.func.vmap``).
        sets_per_call: Parameter sets evaluated side by side; each oracle call in the rollout then
            carries ``sets_per_call * B`` rows. Keep it fixed so a jit-compiled black box traces once.

    The trainer's objective is the rollout: ``Trainer(model, rollout, ..., adapter=LoopAdapter(model))``.
    """

    reuses_features = False
    inputs_are_model_inputs = False  # the trainer cannot run model(inputs) to update BN statistics

    def __init__(self, model: nn.Module, *, sets_per_call: int = 32, **kw: Any) -> None:
        super().__init__(model, **kw)
        if sets_per_call < 1:
            raise ConfigError(f"sets_per_call must be >= 1, got {sets_per_call}.")
        self.sets_per_call = int(sets_per_call)

    def prepare_objective(self, objective: Any) -> Any:
        return objective  # a rollout(model_fn, inputs, targets), called as it is

    def bind(self, objective: Any, inputs: Any, targets: Any, ledger: Optional[QueryLedger] = None) -> LoopEvaluator:
        return LoopEvaluator(self, self.model, objective, inputs, targets, self.trainable(),
                             self.max_chunk_bytes, self.max_chunk, ledger=ledger)
