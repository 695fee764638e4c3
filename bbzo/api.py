"""The one-call API for your own loop: ``grads, state = bbzo.estimate_grad(model, objective, x, y, est, state)``."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .adapters import Adapter, make_adapter
from .ledger import QueryLedger
from .parallel.executor import SerialExecutor
from .step import estimate

__all__ = ["estimate_grad", "write_grads"]


def estimate_grad(
    model: nn.Module,
    objective: Any,
    inputs: Any,
    targets: Any,
    estimator: Any,
    state: Any = None,
    *,
    feature_reuse: Any = "auto",
    n_shards: int = 1,
    set_grad: bool = True,
    adapter: Optional[Adapter] = None,
    ledger: Optional[QueryLedger] = None,
    policy: Any = None,
    **adapter_kw: Any,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Gradient of ``mean_b objective(model(inputs), inputs, targets)_b`` w.r.t. the trainable parameters.

    Args:
        model: Any ``nn.Module``, queried in the train/eval mode the caller set (see
            :mod:`bbzo.adapters.common` for BatchNorm). Only parameters with ``requires_grad`` count.
        objective: Per-sample losses ``(N,)``: an :class:`~bbzo.objective.Objective`, or a function
            ``fn(outputs, targets)`` / ``fn(outputs, inputs, targets)``. This is where a black-box
            oracle is queried (it receives ``K x B`` rows per batched call, never a tensor that
            requires grad).
        inputs: ``(B, ...)`` minibatch (or tuple of tensors), on the model's device.
        targets: ``(B, ...)`` targets (or None / any pytree of tensors with a batch dimension).
        estimator: From :func:`bbzo.create_estimator`, possibly wrapped (``masked``, ``chain``).
        state: The estimator's state from the previous call (None: ``estimator.init``, the first step).
        feature_reuse: ``"auto"``, ``True`` or ``False`` (see :func:`bbzo.adapters.make_adapter`).
        n_shards: Evaluate the probes in this many shards, as that many workers would (same result).
        set_grad: Also write the estimate into ``param.grad`` (so any ``torch.optim`` optimizer works).
        adapter: Reuse an adapter across calls instead of building one.
        ledger: Count the queries in this :class:`~bbzo.ledger.QueryLedger` (budgets apply).
        policy: A :class:`~bbzo.failures.FailurePolicy` for rows the black box cannot answer (default: stop).
        **adapter_kw: ``max_chunk_bytes`` / ``max_chunk`` memory bounds for the batched evaluation.

    Returns:
        ``(grads, state)``: ``{name: gradient}`` keyed like ``model.named_parameters()`` (trainable ones), same
        shapes, dtypes and devices, zero where the estimator estimates nothing (Sparse-CGE); and the state to
        pass to the next call (e.g. RGE's step counter).
    """
    adapter = adapter or make_adapter(model, feature_reuse=feature_reuse, **adapter_kw)
    res = estimate(adapter, estimator, objective, inputs, targets, state=state, ledger=ledger, policy=policy,
                   executor=SerialExecutor(n_shards))
    if set_grad:
        write_grads(model, res.grads)
    return res.grads, res.state


def write_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """Set ``param.grad`` from a gradient dict (overwrites; ZO estimates do not accumulate)."""
    for n, p in model.named_parameters():
        if n in grads:
            p.grad = grads[n].detach().clone()
