"""The one-call API: ``bbzo.estimate_grad(model, loss_fn, inputs, targets, estimator)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .adapters.common import Adapter, Evaluator, LossFn
from .adapters.staged import make_adapter
from .errors import ConfigError
from .estimators.base import Estimator
from .probes import Probes, concat_losses

__all__ = ["estimate_grad", "estimate", "evaluate_sharded", "EstimateResult"]


@dataclass
class EstimateResult:
    """One ZO gradient estimate.

    Attributes:
        grads: ``{name: tensor}`` keyed and shaped like the trainable ``named_parameters``.
        loss: Loss at the unperturbed parameters (float; the mean probe loss for central differences,
            which is within O(mu^2) of it).
        queries: Parameter-set evaluations on the minibatch (equals ``estimator.query_cost``).
        calls: Batched calls of ``loss_fn`` (the oracle sees ``queries * B`` rows over these calls).
    """

    grads: dict[str, torch.Tensor]
    loss: float
    queries: int
    calls: int


def evaluate_sharded(evaluator: Evaluator, probes: Probes, n_shards: int = 1) -> torch.Tensor:
    """Evaluate ``probes`` as ``n_shards`` independent shards and combine them exactly.

    Each shard is self-contained (a slice of small index tensors), so the same call works when shards
    run on other processes or machines: every worker evaluates ``probes.shard(rank, world)`` and the
    losses are concatenated in shard order.
    """
    if n_shards < 1:
        raise ConfigError(f"n_shards must be >= 1, got {n_shards}.")
    return concat_losses([evaluator.evaluate(probes.shard(i, n_shards)) for i in range(n_shards)])


def estimate(adapter: Adapter, estimator: Estimator, loss_fn: LossFn, inputs: Any, targets: Any,
             *, n_shards: int = 1) -> EstimateResult:
    """ask -> evaluate (sharded) -> tell, advancing ``estimator.state``."""
    params = adapter.trainable()
    if not params:
        raise ConfigError("the model has no trainable parameters (requires_grad=True): nothing to estimate.")
    state = estimator.ensure_state(params)
    evaluator = adapter.bind(loss_fn, inputs, targets)
    probes, new_state = estimator.ask(params, state)
    base = evaluator.base_loss() if estimator.needs_base else None
    losses = evaluate_sharded(evaluator, probes, n_shards)
    grads = estimator.tell(params, probes, losses, base)
    estimator.state = new_state
    for n, p in params.items():
        grads.setdefault(n, torch.zeros_like(p))
    loss = float(base) if base is not None else float(losses.mean())
    return EstimateResult(grads=grads, loss=loss, queries=evaluator.queries, calls=evaluator.calls)


def estimate_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any,
    estimator: Estimator,
    *,
    feature_reuse: Any = "auto",
    n_shards: int = 1,
    set_grad: bool = True,
    adapter: Optional[Adapter] = None,
    **adapter_kw: Any,
) -> dict[str, torch.Tensor]:
    """Zeroth-order gradient of ``mean_b loss_fn(model(inputs), targets)_b`` w.r.t. the trainable params.

    Args:
        model: Any ``nn.Module``, queried in the train/eval mode the caller set (see
            :mod:`bbzo.adapters.common` for BatchNorm). Only parameters with ``requires_grad`` count.
        loss_fn: ``loss_fn(outputs, targets) -> (N,)`` per-sample losses; this is where a black-box
            oracle is queried (it receives ``K x B`` rows per batched call, never a tensor that
            requires grad).
        inputs: ``(B, ...)`` minibatch (or tuple of tensors), on the model's device.
        targets: ``(B, ...)`` targets (or None / any pytree of tensors with a batch dimension).
        estimator: From :func:`bbzo.create_estimator`; its state (e.g. RGE's step) advances.
        feature_reuse: ``"auto"``, ``True`` or ``False`` (see :func:`bbzo.adapters.make_adapter`).
        n_shards: Evaluate the probes as this many independent shards (same result).
        set_grad: Also write the estimate into ``param.grad`` (so any ``torch.optim`` optimizer works).
        adapter: Reuse an adapter across calls instead of building one.
        **adapter_kw: ``max_chunk_bytes`` / ``max_chunk`` memory bounds for the batched evaluation.

    Returns:
        ``{name: gradient}`` keyed like ``model.named_parameters()`` (trainable ones), same shapes,
        dtypes and devices; zero where the estimator estimates nothing (Sparse-CGE).
    """
    adapter = adapter or make_adapter(model, feature_reuse=feature_reuse, **adapter_kw)
    result = estimate(adapter, estimator, loss_fn, inputs, targets, n_shards=n_shards)
    if set_grad:
        write_grads(model, result.grads)
    return result.grads


def write_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """Set ``param.grad`` from a gradient dict (overwrites; ZO estimates do not accumulate)."""
    for n, p in model.named_parameters():
        if n in grads:
            p.grad = grads[n].detach().clone()
