"""One gradient step, one owner: a pipeline of values.

Every gradient bbzo forms -- in the :class:`~bbzo.trainer.Trainer`, in :func:`bbzo.estimate_grad`, in a
pruning score, on one process or on every rank of a distributed run -- goes through :func:`estimate`::

    request, state = estimator.ask(params, state)          # pure: what to evaluate
    evaluation     = executor.evaluate(evaluator, request)  # a value: losses, what was spent, who did what
    ledger.settle(start, evaluation.spent)                  # the run's accounting, in one place
    told           = policy.resolve(evaluation, request)    # rows the black box could not answer, in one place
    grads          = estimator.tell(params, request, told)  # pure: the gradient

Estimators never see an executor, an evaluator or a ledger; executors wrap evaluators
(:mod:`bbzo.parallel`); evaluators (:mod:`bbzo.adapters`) know how to evaluate each kind of probe fast;
failures are values (NaN in per-sample losses) that :meth:`~bbzo.failures.FailurePolicy.resolve` turns into
the losses the estimator is told, never exceptions that change counters on the way up.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, NamedTuple, Optional

import torch

from .errors import ConfigError
from .failures import FailurePolicy
from .ledger import QueryLedger
from .messages import Evaluation, Grads, Request, Told
from .oracle import answering_failures_with_nan, common_random_numbers
from .parallel.executor import SerialExecutor

__all__ = ["Request", "Evaluation", "Told", "StepResult", "estimate", "query_cost"]


class StepResult(NamedTuple):
    """One estimate: the gradient, the next estimator state, and what the step cost and met."""

    grads: Grads
    state: Any
    loss: float
    queries: int
    calls: int
    failed_rows: int
    dropped_samples: int
    penalized_rows: int
    evaluation: Evaluation


def _with_failure_needs(request: Request, policy: Any) -> Request:
    """The request as the failure policy needs it: per-sample losses to resolve rows, a base to penalize against."""
    if policy is None or not policy.tolerant or request.num_probes == 0:
        return request
    return replace(request, per_sample=True, base=request.base or (policy.mode == "penalize" and not request.has_base))


def query_cost(estimator: Any, params: Mapping[str, torch.Tensor], state: Any, policy: Any = None) -> int:
    """Queries the next step costs with this failure policy (``penalize`` adds a base to central differences)."""
    return _with_failure_needs(estimator.ask(params, state)[0], policy).cost


def estimate(adapter: Any, estimator: Any, objective: Any, inputs: Any, targets: Any, *, state: Any = None,
             ledger: Optional[QueryLedger] = None, policy: Any = None, executor: Any = None,
             params: Optional[Mapping[str, torch.Tensor]] = None, seed: Optional[int] = None) -> StepResult:
    """One estimate on the minibatch ``(inputs, targets)`` (see the module docstring for the pipeline).

    Args:
        adapter: Wraps the model (:func:`bbzo.adapters.make_adapter`); its trainable parameters are estimated.
        estimator: A registered estimator (:func:`bbzo.create_estimator`), possibly wrapped by transforms.
        state: The estimator's state (None: ``estimator.init(params)``, the first step).
        ledger: Where queries and rows are counted and budgets checked (a private one if None).
        policy: :class:`~bbzo.failures.FailurePolicy` for rows the black box cannot answer (default: stop).
        executor: Who evaluates (:mod:`bbzo.parallel`; default: this process).
        params: The values the estimator asks and tells with (default: the adapter's trainable parameters);
            e.g. float64 copies, to get the gradient in float64.
        seed: Common random numbers: every oracle query of the step (base and probes, on every rank) is handed this
            seed (:func:`bbzo.oracle.common_random_numbers`); None hands none.

    Returns:
        A :class:`StepResult`; ``grads`` covers every trainable parameter (zero where nothing was estimated).
    """
    params = params if params is not None else adapter.trainable()
    if not params:
        raise ConfigError("the model has no trainable parameters (requires_grad=True): nothing to estimate.")
    state = state if state is not None else estimator.init(params)
    ledger = ledger if ledger is not None else QueryLedger()
    policy = policy if policy is not None else FailurePolicy()
    executor = executor if executor is not None else SerialExecutor()
    evaluator = adapter.bind(objective, inputs, targets, ledger=ledger)
    if estimator.needs_output_width(state):
        state = estimator.with_output_width(state, evaluator.output_width())
    request, new_state = estimator.ask(params, state)
    request = _with_failure_needs(request, policy)
    start = ledger.state_dict()
    with answering_failures_with_nan(policy.tolerant), common_random_numbers(seed):
        evaluation = executor.evaluate(evaluator, request)
    ledger.settle(start, evaluation.spent)
    told = policy.resolve(evaluation, request)
    grads = estimator.tell(params, request, told)
    grads = {n: grads[n] if n in grads else torch.zeros_like(p) for n, p in params.items()}
    return StepResult(grads=grads, state=new_state, loss=told.loss, queries=evaluation.spent.queries,
                      calls=evaluation.calls, failed_rows=told.failed_rows,
                      dropped_samples=told.dropped_samples, penalized_rows=told.penalized_rows, evaluation=evaluation)
