"""What every adapter shares: the ``Evaluator`` interface, loss reduction, chunk sizing, BN handling.

An *adapter* wraps a model once; ``adapter.bind(objective, inputs, targets, ledger)`` gives an
:class:`Evaluator` for one minibatch. An evaluator answers, as per-sample float64 losses (NaN where the black
box could not answer a row: the failure policy decides what that means, :mod:`bbzo.failures`):

* ``probe_losses(probes)`` -- ``(M, B)`` for a probe batch of any kind (:mod:`bbzo.probes`): parameter
  probes by the adapter's fastest path, :class:`~bbzo.probes.OutputProbes` on one forward of the model;
* ``base_losses()`` -- ``(B,)`` at the unperturbed parameters (computed once);
* ``gradient(kind)`` -- a white-box gradient: through the objective (first-order references) or its
  stop-gradient surrogate (:attr:`bbzo.objective.Objective.surrogate`);
* ``pullback(cotangent, keep)`` -- the chain rule through the white-box model for output probes.

Each batched loss call is charged to the :class:`~bbzo.ledger.QueryLedger` *before* it is made.

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

from ..errors import ConfigError, ShapeError
from ..ledger import QueryLedger
from ..objective import as_objective
from ..probes import OutputProbes, Probes

__all__ = [
    "Evaluator", "Adapter", "LossFn", "frozen_bn_stats", "per_sample_losses", "tree_bytes",
    "chunk_size", "repeat_targets", "flatten_k", "DEFAULT_MAX_CHUNK_BYTES", "DEFAULT_MAX_CHUNK", "dense_sets",
    "output_probe_losses", "surrogate_of",
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


def per_sample_losses(per_sample: Any, k: int, batch: int, what: str = "the objective") -> torch.Tensor:
    """``(K*B,)`` per-sample losses -> ``(K, B)`` float64, checked (NaN/inf stay: the failure policy resolves them)."""
    _check_per_sample(per_sample, k * batch, what, k, batch)
    return per_sample.detach().to(torch.float64).view(k, batch)


def surrogate_of(objective: Any) -> Any:
    """The objective's stop-gradient surrogate (:attr:`bbzo.objective.Objective.surrogate`), or a clear error."""
    sur = getattr(objective, "surrogate", None)
    if sur is None:
        raise ConfigError(
            f"this estimator needs the objective's stop-gradient surrogate (the same loss with every black-box call "
            f"entering as a constant), but {type(objective).__name__} has none. Give the objective a `surrogate` "
            "(bbzo.Rollout(fn, surrogate=...), or OracleObjective(..., surrogate=...)), or use sparse_cge.")
    return sur


def output_probe_losses(loss: Callable[[torch.Tensor, int], torch.Tensor], outputs: torch.Tensor, probes: OutputProbes,
                        max_chunk_bytes: int = CPU_CHUNK_BYTES, max_chunk: int = DEFAULT_MAX_CHUNK,
                        extra_bytes: int = 0) -> torch.Tensor:
    """``(M, B)`` per-sample losses at ``outputs`` ``(B, ...)`` moved by each of the ``M`` output probes.

    ``loss(moved (K, B, ...), K) -> (K, B)`` scores ``K`` moved copies at once (charging them); the copies are
    evaluated in chunks of ``3 x outputs + extra_bytes`` per copy that fit ``max_chunk_bytes``.
    """
    b = outputs.shape[0]
    flat = outputs.reshape(b, -1)
    if flat.shape[1] != probes.width:
        raise ShapeError(f"output probes of width {probes.width} for a model with {flat.shape[1]} output values per "
                         "sample: the model's outputs changed shape between steps.")
    per_set = max(1, 3 * flat.numel() * flat.element_size() + extra_bytes)
    k_max = chunk_size(per_set, max_chunk_bytes, max_chunk)
    losses = torch.empty(len(probes), b, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(probes), k_max):
            chunk = probes.slice(start, min(len(probes), start + k_max))
            k = len(chunk)
            moved = flat.unsqueeze(0) + chunk.perturbations(b, flat.dtype, flat.device)  # (K, B, width)
            losses[start:start + k] = loss(moved.view(k, *outputs.shape), k)
    return losses


class Evaluator(ABC):
    """Evaluates one bound minibatch (see the module docstring); charges queries before each call.

    Attributes:
        batch: ``B``, the minibatch size.
        calls: Batched calls of the objective this evaluator made.
        ledger: Where queries are charged (the run's ledger, or a private one).
    """

    def __init__(self, model: nn.Module, objective: Any, inputs: Any, targets: Any,
                 params: dict[str, torch.Tensor], max_chunk_bytes: int, max_chunk: int,
                 ledger: Optional[QueryLedger] = None) -> None:
        self.model = model
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
        self.calls = 0
        self._base: Optional[torch.Tensor] = None
        self._outputs: Optional[torch.Tensor] = None
        self._reps: dict[int, Any] = {}

    # -------------------------------------------------------------- public
    def base_losses(self) -> torch.Tensor:
        """``(B,)`` float64 per-sample losses at the unperturbed parameters (one query, computed once)."""
        if self._base is None:
            with torch.no_grad(), frozen_bn_stats(self.model):
                self._base = self._base_losses()
        return self._base

    def probe_losses(self, probes: Probes) -> torch.Tensor:
        """``(M, B)`` float64 per-sample losses of the ``M`` probes, in probe order."""
        if len(probes) == 0:
            return torch.zeros(0, self.batch, dtype=torch.float64)
        if isinstance(probes, OutputProbes):
            return self._output_losses(probes)
        with torch.no_grad(), frozen_bn_stats(self.model):
            return self._probe_losses(probes)

    def gradient(self, kind: str, context: Optional[Callable[[], Any]] = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(grads, per-sample losses (B,))`` of the mean loss by autograd (BN statistics untouched).

        ``kind="objective"``: through the model and the objective -- white-box, a first-order reference (no
        query is charged). ``kind="surrogate"``: through the objective's stop-gradient surrogate, whose forward
        pass is the unperturbed loss: it is charged as the base query. ``context()`` is entered around the
        backward pass (e.g. PhiFlow's torch backend for an adjoint solve).
        """
        objective = self.objective if kind == "objective" else surrogate_of(self.objective)
        if kind == "surrogate":
            self._charge(1)
        self.calls += 1
        with torch.enable_grad(), frozen_bn_stats(self.model):
            per = self._differentiable_losses(objective)
        _check_per_sample(per, self.batch, "the objective" if kind == "objective" else "its surrogate", 1, self.batch)
        live = {n: p for n, p in self.model.named_parameters() if n in self.params}
        if not per.requires_grad:  # nothing white-box on the way (a surrogate of a pure black box): zero
            return {n: torch.zeros_like(p) for n, p in live.items()}, per.detach().to(torch.float64)
        with (context or contextlib.nullcontext)():
            grads = torch.autograd.grad(per.mean(), list(live.values()), allow_unused=True)
        out = {n: (g.detach() if g is not None else torch.zeros_like(p)) for (n, p), g in zip(live.items(), grads)}
        return out, per.detach().to(torch.float64)

    def output_width(self) -> int:
        """Values per sample of the model's output: the space :class:`~bbzo.probes.OutputProbes` perturb."""
        out = self._model_outputs()
        return int(out.numel() // self.batch)

    def pullback(self, cotangent: torch.Tensor, keep: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Gradient of ``mean_{i in keep} cotangent_i . f_theta(x_i)`` by autograd through the white-box model.

        ``cotangent``: ``(B, width)`` (e.g. ``d loss_i / d outputs_i`` from output probes); ``keep``: ``(B,)``
        bool, the samples the step uses (all by default). The chain rule's second half.
        """
        out = self._model_outputs()
        flat = out.reshape(self.batch, -1)
        if cotangent.shape != flat.shape:
            raise ShapeError(f"pullback: cotangent of shape {tuple(cotangent.shape)} for outputs {tuple(flat.shape)}.")
        live = {n: p for n, p in self.model.named_parameters() if n in self.params}
        with torch.enable_grad():
            per = (cotangent.to(flat.dtype) * flat).sum(1)
            total = per.mean() if keep is None or bool(keep.all()) else per[keep.to(per.device)].mean()
            grads = torch.autograd.grad(total, list(live.values()), allow_unused=True, retain_graph=True)
        return {n: (g.detach() if g is not None else torch.zeros_like(p)) for (n, p), g in zip(live.items(), grads)}

    def chunks(self, probes: Probes) -> list[tuple[int, torch.Tensor]]:
        """The batched calls that evaluate ``probes``, in order: ``[(cost class, probe rows), ...]``.

        Evaluating any sub-batch made of whole chunks gives each of its probes the same numbers as evaluating all of
        ``probes``: a chunk is evaluated as one call whatever else is evaluated with it. The distributed executor
        deals whole chunks (round-robin within each cost class), so a distributed step equals a serial one bitwise.
        """
        m = len(probes)
        if isinstance(probes, OutputProbes):
            k = self._output_chunk()
        else:
            k = self._chunk_size(probes)
        return [(0, rows) for rows in torch.arange(m).split(max(1, k))]

    def _chunk_size(self, probes: Probes) -> int:
        return self.max_chunk

    def _output_chunk(self) -> int:
        out = self._model_outputs()
        per_set = max(1, 3 * out.numel() * out.element_size() + tree_bytes(self.inputs) + tree_bytes(self.targets))
        return chunk_size(per_set, self.max_chunk_bytes, self.max_chunk)

    # -------------------------------------------------------------- for the adapters
    def _charge(self, k: int) -> None:
        """Charge ``k`` queries to the ledger (raises BudgetExceeded first if they do not fit)."""
        self.ledger.charge_queries(k)

    def _inputs_for(self, k: int) -> Any:
        """The minibatch inputs repeated for ``k`` stacked sets, if the objective reads them."""
        if not getattr(self.objective, "needs_inputs", True):
            return None
        if k not in self._reps:
            self._reps = {k: repeat_targets(self.inputs, k)}  # keep one size: chunks mostly share it
        return self._reps[k]

    def _loss(self, outputs_k: Any, k: int) -> torch.Tensor:
        """Per-sample losses ``(K, B)`` float64 of ``K`` stacked output batches with leaves ``(K, B, ...)``."""
        self._charge(k)
        self.calls += 1
        per = self.objective(flatten_k(outputs_k), self._inputs_for(k), repeat_targets(self.targets, k))
        return per_sample_losses(per, k, self.batch)

    def _differentiable_losses(self, objective: Any) -> torch.Tensor:
        """``(B,)`` per-sample losses with autograd on (the model's own forward, then ``objective``)."""
        objective = as_objective(objective)
        out = self.model(self.inputs)
        return objective(out, self.inputs if objective.needs_inputs else None, self.targets)

    def _model_outputs(self) -> torch.Tensor:
        """One forward with autograd on (BN statistics untouched): the outputs output probes perturb and the
        graph :meth:`pullback` differentiates (computed once)."""
        if self._outputs is None:
            with torch.enable_grad(), frozen_bn_stats(self.model):
                out = self.model(self.inputs)
            if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != self.batch:
                raise ConfigError("the chain-rule estimators (oracle_cge / oracle_rge) perturb the model's outputs: the "
                                  f"model must return one tensor with a row per sample ({self.batch}), it returned "
                                  f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.")
            self._outputs = out
        return self._outputs

    def _output_losses(self, probes: OutputProbes) -> torch.Tensor:
        """``(M, B)``: the objective at the outputs moved by each probe (the model is not run again)."""
        return output_probe_losses(self._loss, self._model_outputs().detach(), probes, self.max_chunk_bytes,
                                   self.max_chunk, extra_bytes=tree_bytes(self.inputs) + tree_bytes(self.targets))

    @abstractmethod
    def _base_losses(self) -> torch.Tensor: ...

    @abstractmethod
    def _probe_losses(self, probes: Probes) -> torch.Tensor: ...


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
    def bind(self, objective: Any, inputs: Any, targets: Any, ledger: Optional[QueryLedger] = None) -> Evaluator: ...
