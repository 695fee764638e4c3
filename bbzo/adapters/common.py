"""What every adapter shares: the ``Evaluator`` interface, loss reduction, chunk sizing, BN handling.

An *adapter* wraps a model once; ``adapter.bind(objective, inputs, targets, ledger)`` gives an
:class:`Evaluator` for one minibatch, which evaluates probe batches (see :mod:`bbzo.probes`), charges
each batched loss call to the :class:`~bbzo.ledger.QueryLedger` *before* making it, and can also give
the differentiable loss at the current parameters (for the ``autograd`` reference estimator).

BatchNorm during queries (decided here, tested in ``tests/bbzo/test_adapters.py``):
    A model in **train mode** is queried with **per-perturbation batch statistics**: each perturbed
    parameter set normalizes its own ``B`` outputs with their own mean/variance, exactly as a
    train-mode forward at those parameters would. That makes every query a value of the very loss
    that first-order training differentiates (and that DeepZero's workers evaluated), so CGE
    converges to the train-mode gradient. A model in **eval mode** uses the running statistics.
    In both modes queries **never** update running statistics (``num_batches_tracked`` included):
    thousands of perturbed forwards per step would otherwise drag them around. The trainer updates
    them with one unperturbed forward per step instead (``update_bn_stats``), like FO training.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import NonFiniteError, ShapeError
from ..ledger import QueryLedger
from ..objective import as_objective
from ..probes import Probes

__all__ = [
    "Evaluator", "Adapter", "LossFn", "frozen_bn_stats", "per_set_losses", "tree_bytes",
    "chunk_size", "repeat_targets", "flatten_k", "DEFAULT_MAX_CHUNK_BYTES", "DEFAULT_MAX_CHUNK", "dense_sets",
]

LossFn = Callable[..., torch.Tensor]
#: Working-set bound of one batched call. On CPU, chunks that stay near the cache are faster per
#: probe than big ones (ResNet-20, batch 64: K=4 -> 0.13x a forward per coordinate, K=16 -> 0.17x);
#: a GPU wants big batches. ``None`` means "choose by device".
DEFAULT_MAX_CHUNK_BYTES = None
CPU_CHUNK_BYTES = 48 * 2**20
CUDA_CHUNK_BYTES = 2 * 2**30
DEFAULT_MAX_CHUNK = 1024


#: Dense activations counted per perturbed set past a coordinate's first mixing layer (the staged adapter's
#: chunk bound): the conv's input and output, BN's output, the block's skip, the merge's output and the next
#: conv's output are alive at once. Counting 2 (as before) let a CPU chunk outgrow the caches. Side by side on
#: 2 threads (``benchmarks/chunk_bound.py``): a ResNet-20 step (batch 64, 1% coordinates) 14.8 s at 6 against
#: 17.7 s at 2; the 3,700 / 6,670-parameter CNNs (batch 256) 3.6 / 7.5 s against 4.4 / 11.9 s in a fresh
#: process (as fast at 2 after a ResNet-20 run in the same process). CUDA keeps counting 2 (big batches).
DENSE_SETS_CPU = 6
DENSE_SETS_CUDA = 2


def default_chunk_bytes(device: torch.device) -> int:
    return CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES


def dense_sets(device: torch.device) -> int:
    """Dense activations per perturbed set that the chunk bound counts on ``device``."""
    return DENSE_SETS_CUDA if device.type == "cuda" else DENSE_SETS_CPU


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Queries never update BN running statistics.

    Train mode keeps batch statistics (``track_running_stats=False`` makes torch pass no running
    buffers); eval mode keeps using the running statistics. Restores the flags afterwards.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            saved.append(m)
            m.track_running_stats = False
    try:
        yield
    finally:
        for m in saved:
            m.track_running_stats = True


def tree_bytes(tree: Any) -> int:
    leaves, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def chunk_size(per_set_bytes: int, max_chunk_bytes: int, max_chunk: int) -> int:
    """How many perturbed parameter sets fit in one batched call."""
    return int(max(1, min(max_chunk, max_chunk_bytes // max(1, per_set_bytes))))


def repeat_targets(targets: Any, k: int) -> Any:
    """``targets`` (B, ...) -> (K*B, ...) matching K stacked output batches (also used for inputs)."""
    def rep(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.unsqueeze(0).expand(k, *t.shape).reshape(k * t.shape[0], *t.shape[1:])
        return t
    return tree_map(rep, targets)


def flatten_k(tree: Any) -> Any:
    """``(K, B, ...)`` leaves -> ``(K*B, ...)``."""
    return tree_map(lambda t: t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]), tree)


def _check_per_sample(per_sample: Any, n: int, what: str, k: int, batch: int) -> None:
    if not isinstance(per_sample, torch.Tensor) or per_sample.shape != (n,):
        shape = tuple(per_sample.shape) if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__
        raise ShapeError(
            f"{what} must return per-sample losses of shape (N,) = ({n},) for N = {k} parameter "
            f"sets x {batch} samples; it returned {shape}. Reduce over every dimension except the first "
            "(e.g. F.cross_entropy(..., reduction='none') or ((y - t) ** 2).flatten(1).mean(1))."
        )


def per_set_losses(per_sample: Any, k: int, batch: int, what: str = "the objective",
                   failures: Any = None) -> torch.Tensor:
    """``(K*B,)`` per-sample losses -> ``(K,)`` float64 mean loss of each parameter set (checked).

    ``failures``: a :class:`~bbzo.failures.FailurePolicy` for samples whose rows the oracle could not answer.
    """
    _check_per_sample(per_sample, k * batch, what, k, batch)
    per_sample = per_sample.detach()
    if failures is not None:
        per_sample = failures.apply(per_sample, k, batch)
    losses = per_sample.to(torch.float64).view(k, batch).mean(1)
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        raise NonFiniteError(
            f"loss is NaN/inf for {int(bad.sum())} of {k} perturbed parameter sets. The model or loss "
            "overflowed: lower mu, check the loss for log(0) / division by zero, or use float64."
        )
    return losses


def mean_loss(per_sample: Any, batch: int, what: str = "the objective") -> torch.Tensor:
    """Differentiable mean of ``(B,)`` per-sample losses (checked), for the autograd reference."""
    _check_per_sample(per_sample, batch, what, 1, batch)
    return per_sample.mean()


class Evaluator(ABC):
    """Evaluates probes on one bound minibatch; charges and counts queries (= parameter-set evaluations).

    Attributes:
        queries: Queries this evaluator made (the ledger holds the run's total).
        calls: Batched calls of the objective.
    """

    def __init__(self, model: nn.Module, objective: Any, inputs: Any, targets: Any,
                 params: dict[str, torch.Tensor], max_chunk_bytes: int, max_chunk: int,
                 ledger: Optional[QueryLedger] = None, failures: Any = None) -> None:
        self.model = model
        self.failures = failures
        self.objective = objective
        self.inputs = inputs
        self.targets = targets
        self.params = params
        self.max_chunk_bytes = max_chunk_bytes
        self.max_chunk = max_chunk
        self.ledger = ledger if ledger is not None else QueryLedger()
        leaves, _ = tree_flatten(inputs)
        if not leaves or not isinstance(leaves[0], torch.Tensor) or leaves[0].dim() == 0:
            raise ShapeError("inputs must be a tensor (or a tuple of tensors) with a batch dimension.")
        self.batch = int(leaves[0].shape[0])
        self.queries = 0
        self.calls = 0
        self._base: Optional[torch.Tensor] = None
        self._reps: dict[int, Any] = {}

    def _charge(self, k: int) -> None:
        """Charge ``k`` queries to the ledger (raises BudgetExceeded first if they do not fit)."""
        self.ledger.charge_queries(k)
        self.queries += k

    def base_loss(self) -> torch.Tensor:
        """Loss at the unperturbed parameters, float64 scalar (one query, computed once)."""
        if self._base is None:
            with torch.no_grad(), frozen_bn_stats(self.model):
                self._base = self._base_loss()
        return self._base

    def evaluate(self, probes: Probes) -> torch.Tensor:
        """Losses ``(M,)`` float64 of the ``M`` probes, in probe order."""
        if len(probes) == 0:
            return torch.zeros(0, dtype=torch.float64)
        with torch.no_grad(), frozen_bn_stats(self.model):
            return self._evaluate(probes)

    def differentiable_loss(self) -> torch.Tensor:
        """Mean loss at the current parameters with autograd enabled (white-box; BN statistics untouched)."""
        objective = as_objective(self.objective)
        with torch.enable_grad(), frozen_bn_stats(self.model):
            out = self.model(self.inputs)
            per = objective(out, self.inputs if objective.needs_inputs else None, self.targets)
        return mean_loss(per, self.batch)

    def _inputs_for(self, k: int) -> Any:
        """The minibatch inputs repeated for ``k`` stacked sets, if the objective reads them."""
        if not getattr(self.objective, "needs_inputs", True):
            return None
        if k not in self._reps:
            self._reps = {k: repeat_targets(self.inputs, k)}  # keep one size: chunks mostly share it
        return self._reps[k]

    def _loss(self, outputs_k: Any, k: int) -> torch.Tensor:
        """Mean per-sample loss ``(K,)`` float64 of ``K`` stacked output batches with leaves ``(K, B, ...)``."""
        self._charge(k)
        self.calls += 1
        per = self.objective(flatten_k(outputs_k), self._inputs_for(k), repeat_targets(self.targets, k))
        return per_set_losses(per, k, self.batch, failures=self.failures)

    @abstractmethod
    def _base_loss(self) -> torch.Tensor: ...

    @abstractmethod
    def _evaluate(self, probes: Probes) -> torch.Tensor: ...


class Adapter(ABC):
    """Wraps a model once; binds minibatches to evaluators."""

    reuses_features: bool = False
    #: The minibatch inputs are the model's inputs (False for LoopAdapter, whose inputs feed a rollout).
    inputs_are_model_inputs: bool = True

    def __init__(self, model: nn.Module, *, max_chunk_bytes: Optional[int] = DEFAULT_MAX_CHUNK_BYTES,
                 max_chunk: int = DEFAULT_MAX_CHUNK) -> None:
        self.model = model
        if max_chunk_bytes is None:
            p = next(model.parameters(), None)
            max_chunk_bytes = default_chunk_bytes(p.device if p is not None else torch.device("cpu"))
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.max_chunk = int(max_chunk)

    def trainable(self) -> dict[str, torch.Tensor]:
        """Trainable parameters (``requires_grad``), detached, keyed like ``named_parameters``."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def prepare_objective(self, objective: Any) -> Any:
        """The callable the evaluator scores with (plain losses become :class:`~bbzo.objective.Objective`)."""
        return as_objective(objective)

    @abstractmethod
    def bind(self, objective: Any, inputs: Any, targets: Any, ledger: Optional[QueryLedger] = None,
             failures: Any = None) -> Evaluator: ...
