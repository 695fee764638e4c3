"""The one-call API: ``bbzo.estimate_grad(model, objective, inputs, targets, estimator)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .adapters import Adapter, make_adapter
from torch.utils._pytree import tree_map

from .errors import ConfigError, OracleError
from .estimators.base import Estimator, evaluate_sharded
from .failures import SkipSamples
from .ledger import QueryLedger

__all__ = ["estimate_grad", "estimate", "evaluate_sharded", "EstimateResult", "write_grads"]


@dataclass
class EstimateResult:
    """One gradient estimate.

    Attributes:
        grads: ``{name: tensor}`` keyed and shaped like the trainable ``named_parameters``.
        loss: Loss at the unperturbed parameters (float; the mean probe loss for central differences,
            which is within O(mu^2) of it).
        queries: Parameter-set evaluations on the minibatch (equals ``estimator.query_cost``).
        calls: Batched calls of the objective (the oracle sees ``queries * B`` rows over these calls).
    """

    grads: dict[str, torch.Tensor]
    loss: float
    queries: int
    calls: int


def _keep_rows(tree: Any, keep: torch.Tensor) -> Any:
    return tree_map(lambda t: t[keep] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, tree)


def estimate(adapter: Adapter, estimator: Estimator, objective: Any, inputs: Any, targets: Any,
             *, n_shards: int = 1, ledger: Optional[QueryLedger] = None, failures: Any = None,
             executor: Any = None) -> EstimateResult:
    """One estimate on the minibatch ``(inputs, targets)``, advancing ``estimator.state``.

    ``ledger``: where the queries are charged (and budgets checked); a private one if None.
    ``failures``: a :class:`~bbzo.failures.FailurePolicy` for rows the oracle cannot answer (``skip``
    evaluates the step again without the failed samples, for every perturbation alike).
    ``executor``: who evaluates the probes (:mod:`bbzo.parallel`; default: this process, in ``n_shards``).
    """
    params = adapter.trainable()
    if not params:
        raise ConfigError("the model has no trainable parameters (requires_grad=True): nothing to estimate.")
    state = estimator.ensure_state(params)
    queries = calls = 0
    while True:
        evaluator = adapter.bind(objective, inputs, targets, ledger=ledger, failures=failures)
        try:
            grads, loss, new_state = estimator.estimate(evaluator, params, state, executor if executor is not None else n_shards)
            break
        except SkipSamples as e:
            queries, calls = queries + evaluator.queries, calls + evaluator.calls
            keep = torch.ones(evaluator.batch, dtype=torch.bool)
            keep[e.samples.cpu()] = False
            failures.record_skip(int(e.samples.numel()))
            if not bool(keep.any()):
                raise OracleError(f"every sample of the minibatch has a row the oracle could not answer "
                                  f"({failures.failed_rows} failed rows): nothing is left to estimate from. Check the "
                                  "model's outputs (are they in the simulator's valid range?) or use "
                                  "--on-oracle-error penalize.") from None
            inputs, targets = _keep_rows(inputs, keep), _keep_rows(targets, keep)
    estimator.state = new_state
    for n, p in params.items():
        grads.setdefault(n, torch.zeros_like(p))
    return EstimateResult(grads=grads, loss=loss, queries=queries + evaluator.queries, calls=calls + evaluator.calls)


def estimate_grad(
    model: nn.Module,
    objective: Any,
    inputs: Any,
    targets: Any,
    estimator: Estimator,
    *,
    feature_reuse: Any = "auto",
    n_shards: int = 1,
    set_grad: bool = True,
    adapter: Optional[Adapter] = None,
    ledger: Optional[QueryLedger] = None,
    **adapter_kw: Any,
) -> dict[str, torch.Tensor]:
    """Gradient of ``mean_b objective(model(inputs), inputs, targets)_b`` w.r.t. the trainable params.

    Args:
        model: Any ``nn.Module``, queried in the train/eval mode the caller set (see
            :mod:`bbzo.adapters.common` for BatchNorm). Only parameters with ``requires_grad`` count.
        objective: Per-sample losses ``(N,)``: an :class:`~bbzo.objective.Objective`, or a function
            ``fn(outputs, targets)`` / ``fn(outputs, inputs, targets)``. This is where a black-box
            oracle is queried (it receives ``K x B`` rows per batched call, never a tensor that
            requires grad).
        inputs: ``(B, ...)`` minibatch (or tuple of tensors), on the model's device.
        targets: ``(B, ...)`` targets (or None / any pytree of tensors with a batch dimension).
        estimator: From :func:`bbzo.create_estimator`; its state (e.g. RGE's step) advances.
        feature_reuse: ``"auto"``, ``True`` or ``False`` (see :func:`bbzo.adapters.make_adapter`).
        n_shards: Evaluate the probes as this many independent shards (same result).
        set_grad: Also write the estimate into ``param.grad`` (so any ``torch.optim`` optimizer works).
        adapter: Reuse an adapter across calls instead of building one.
        ledger: Charge the queries to this :class:`~bbzo.ledger.QueryLedger` (budgets apply).
        **adapter_kw: ``max_chunk_bytes`` / ``max_chunk`` memory bounds for the batched evaluation.

    Returns:
        ``{name: gradient}`` keyed like ``model.named_parameters()`` (trainable ones), same shapes,
        dtypes and devices; zero where the estimator estimates nothing (Sparse-CGE).
    """
    adapter = adapter or make_adapter(model, feature_reuse=feature_reuse, **adapter_kw)
    result = estimate(adapter, estimator, objective, inputs, targets, n_shards=n_shards, ledger=ledger)
    if set_grad:
        write_grads(model, result.grads)
    return result.grads


def write_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """Set ``param.grad`` from a gradient dict (overwrites; ZO estimates do not accumulate)."""
    for n, p in model.named_parameters():
        if n in grads:
            p.grad = grads[n].detach().clone()
