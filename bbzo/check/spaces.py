"""What ``bbzo check`` looks at: a black box, its rows at the current point, and the spaces a step is taken in.

A :class:`Subject` is an oracle with the rows it answers at the current parameters (and their per-row
conditions), plus one or more coordinate :class:`Space` s in which an estimator takes its finite-difference
step:

* :class:`ParameterSpace` -- the model's trainable parameters (``cge``, ``sparse_cge``, ``rge``): moving one
  coordinate changes every output of the model, and the loss is the minibatch mean;
* :class:`OutputSpace` -- the model's outputs, the first argument of the objective (the chain-rule estimators
  ``oracle_cge`` / ``oracle_rge``): moving coordinate ``j`` moves it in every row at once, and each sample's
  loss is differenced on its own;
* :class:`RowSpace` -- the oracle's own input rows with a per-row loss of its answers (a bare oracle, or
  a solver in the loop whose single step is looked at alone);
* :class:`RolloutSpace` -- the parameters of a model that sits *inside* a loop with the oracle (a rollout,
  as :class:`~bbzo.adapters.LoopAdapter` trains): ``K`` perturbed models share each oracle call.

Every space evaluates ``K`` moved points in as few batched oracle calls as it can: ``evaluate(coords,
steps) -> (K, S)`` float64 losses, where point ``k`` moves coordinate ``coords[k]`` by ``steps[k]`` (0: the
current point). Nothing here knows a task; ``bbzo.cli.check`` builds subjects for ``bbzo train`` configs,
ZO-SOL and bare oracles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..oracle import Oracle

__all__ = ["Space", "ParameterSpace", "OutputSpace", "RowSpace", "RolloutSpace", "Subject", "projection_loss",
           "tile"]

#: Oracle rows per call the spaces aim for (a sweep of a few hundred points is cut into calls of about this many).
ROWS_PER_CALL = 65536


def tile(tree: Any, k: int) -> Any:
    """``k`` copies of a batch stacked along the first dimension (tensors; tuples/lists of them; None)."""
    if tree is None:
        return None
    if isinstance(tree, (tuple, list)):
        return type(tree)(tile(t, k) for t in tree)
    if isinstance(tree, torch.Tensor) and tree.dim() > 0:
        return tree.repeat(k, *([1] * (tree.dim() - 1)))
    return tree


def _chunks(k: int, rows_per_point: int, max_rows: int = ROWS_PER_CALL) -> list[slice]:
    size = max(1, max_rows // max(1, rows_per_point))
    return [slice(s, min(k, s + size)) for s in range(0, k, size)]


class Space:
    """A coordinate space for the finite-difference step.

    Attributes:
        name: ``parameters``, ``model outputs``, ``oracle inputs``.
        estimators: The estimators that take their step here (for the report).
        size: Number of coordinates.
        dtype: The dtype the coordinates live in (a step below its resolution is lost).
        mu: The step configured for this space (None: no estimator here is configured).
        per_sample: Whether ``evaluate`` returns each sample's loss (``S = B``) or the minibatch mean (``S = 1``).
    """

    name: str = "space"
    estimators: tuple[str, ...] = ()
    size: int = 0
    dtype: torch.dtype = torch.float32
    mu: Optional[float] = None
    per_sample: bool = False
    #: oracle rows per call at most (the points of an evaluation are cut into calls of this many rows): set it to
    #: what training sends per call (ZO-SOL: sets_per_call x batch), so jit traces and padding match
    max_rows: int = ROWS_PER_CALL
    #: the dtype the losses come in (set by :meth:`evaluate`): a loss is only resolved to one ulp of it
    loss_dtype: torch.dtype = torch.float64

    def evaluate(self, coords: Sequence[int], steps: Sequence[float]) -> torch.Tensor:
        """``(K, S)`` float64 losses at the current point with coordinate ``coords[k]`` moved by ``steps[k]``."""
        raise NotImplementedError

    def label(self, coord: int) -> str:
        return f"[{coord}]"

    def value(self, coord: int) -> float:
        """The coordinate's current value (scales the step of the noise measurement)."""
        raise NotImplementedError

    def scale(self) -> float:
        """A typical magnitude of the coordinates (RMS), for steps that must be visible in ``dtype``."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator) -> list[int]:
        """``n`` coordinates to look at (all if there are at most ``n``), seeded."""
        if self.size <= n:
            return list(range(self.size))
        return sorted(torch.randperm(self.size, generator=generator)[:n].tolist())


# ---------------------------------------------------------------------------- the model's parameters
class ParameterSpace(Space):
    """The trainable parameters of ``model`` in front of ``objective`` (outputs -> per-sample losses).

    ``K`` perturbed parameter sets are evaluated as ``K`` forwards of the model (``torch.func.functional_call``)
    whose outputs go to the objective -- and so to the oracle -- in one call of ``K x B`` rows (cut into calls of
    at most :data:`ROWS_PER_CALL`). The model is used in eval mode (no dropout, BatchNorm statistics frozen).
    """

    name = "parameters"
    estimators = ("cge", "sparse_cge", "rge")

    def __init__(self, model: nn.Module, objective: Callable[[Any, Any, Any], torch.Tensor], inputs: Any,
                 targets: Any, mu: Optional[float] = None, needs_inputs: bool = True) -> None:
        self.model, self.objective, self.inputs, self.targets = model, objective, inputs, targets
        self.params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ConfigError("the model has no trainable parameters: there is no step to check.")
        self.names = list(self.params)
        self.offsets = np.cumsum([0] + [p.numel() for p in self.params.values()])
        self.size = int(self.offsets[-1])
        self.dtype = next(iter(self.params.values())).dtype
        self.mu, self.needs_inputs = mu, needs_inputs
        self.batch = _batch_size(inputs)

    def _locate(self, coord: int) -> tuple[str, int]:
        t = int(np.searchsorted(self.offsets, coord, side="right") - 1)
        return self.names[t], int(coord - self.offsets[t])

    def label(self, coord: int) -> str:
        name, i = self._locate(coord)
        shape = tuple(self.params[name].shape)
        idx = np.unravel_index(i, shape) if shape else ()
        return f"{name}[{', '.join(map(str, idx))}]"

    def value(self, coord: int) -> float:
        name, i = self._locate(coord)
        return float(self.params[name].reshape(-1)[i])

    def scale(self) -> float:
        flat = torch.cat([p.reshape(-1).double() for p in self.params.values()])
        return float(flat.pow(2).mean().sqrt())

    def sample(self, n: int, generator: torch.Generator) -> list[int]:
        """Spread over the tensors: one coordinate from each of ``n`` tensors in turn (uniform inside a tensor)."""
        if self.size <= n:
            return list(range(self.size))
        order = [self.names[i] for i in np.linspace(0, len(self.names) - 1, min(n, len(self.names))).round().astype(int)]
        picks: set[int] = set()
        t = 0
        while len(picks) < n:
            name = order[t % len(order)]
            k = self.names.index(name)
            i = int(torch.randint(0, self.params[name].numel(), (1,), generator=generator))
            picks.add(int(self.offsets[k]) + i)
            t += 1
        return sorted(picks)

    def outputs(self, coords: Sequence[int], steps: Sequence[float]) -> Any:
        """The model's outputs ``(K x B, ...)`` for ``K`` perturbed parameter sets."""
        outs = []
        with torch.no_grad():
            for c, s in zip(coords, steps):
                name, i = self._locate(int(c))
                moved = self.params[name].clone()
                moved.view(-1)[i] += float(s)  # in the parameter's dtype, as the estimators do
                outs.append(torch.func.functional_call(self.model, {name: moved}, (self.inputs,)))
        return torch.cat(outs)

    def evaluate(self, coords: Sequence[int], steps: Sequence[float]) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            parts = []
            for sl in _chunks(len(coords), self.batch, self.max_rows):
                cs, ss = list(coords)[sl], list(steps)[sl]
                k = len(cs)
                out = self.outputs(cs, ss)
                with torch.no_grad():
                    per = self.objective(out, tile(self.inputs, k) if self.needs_inputs else None, tile(self.targets, k))
                self.loss_dtype = per.dtype
                parts.append(per.detach().to(torch.float64).view(k, self.batch).mean(1, keepdim=True))
            return torch.cat(parts)
        finally:
            self.model.train(was)


class RolloutSpace(ParameterSpace):
    """The parameters of a model inside a loop with the oracle: ``rollout(model_fn, inputs, targets) -> (N,)``.

    The rollout (the :class:`~bbzo.adapters.LoopAdapter` convention) calls ``model_fn`` on all ``K x B`` rows
    at once; ``model_fn`` applies parameter set ``k`` to rows ``k*B .. (k+1)*B - 1``, so the oracle inside the
    rollout sees every perturbed model in one call per loop step.
    """

    estimators = ("cge", "sparse_cge", "rge")

    def evaluate(self, coords: Sequence[int], steps: Sequence[float]) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        b = self.batch
        try:
            parts = []
            for sl in _chunks(len(coords), b, self.max_rows):
                cs, ss = list(coords)[sl], list(steps)[sl]
                k = len(cs)
                sets = []
                for c, s in zip(cs, ss):
                    name, i = self._locate(int(c))
                    moved = self.params[name].clone()
                    moved.view(-1)[i] += float(s)
                    sets.append({name: moved})

                def model_fn(x: torch.Tensor, sets: list = sets) -> torch.Tensor:
                    return torch.cat([torch.func.functional_call(self.model, sets[j], (x[j * b:(j + 1) * b],))
                                      for j in range(len(sets))])

                with torch.no_grad():
                    per = self.objective(model_fn, tile(self.inputs, k), tile(self.targets, k))
                self.loss_dtype = per.dtype
                parts.append(per.detach().to(torch.float64).view(k, b).mean(1, keepdim=True))
            return torch.cat(parts)
        finally:
            self.model.train(was)


# ---------------------------------------------------------------------------- the model's outputs / the oracle's rows
class _MovedRows(Space):
    """Common part: a ``(B, D)`` point whose coordinate ``j`` moves in every row at once; per-sample losses."""

    per_sample = True

    def __init__(self, point: torch.Tensor, mu: Optional[float]) -> None:
        self.point = point.detach()
        self.batch = int(point.shape[0])
        self.flat = self.point.reshape(self.batch, -1)
        self.size = int(self.flat.shape[1])
        self.dtype = point.dtype
        self.mu = mu

    def value(self, coord: int) -> float:
        return float(self.flat[:, coord].abs().max())

    def scale(self) -> float:
        return float(self.flat.double().pow(2).mean().sqrt())

    def moved(self, coords: Sequence[int], steps: Sequence[float]) -> torch.Tensor:
        """``(K x B, *point.shape[1:])``: the point with coordinate ``coords[k]`` of every row moved by ``steps[k]``."""
        k = len(coords)
        out = self.flat.unsqueeze(0).repeat(k, 1, 1)  # (K, B, D), in the point's dtype
        idx = torch.as_tensor(list(coords), dtype=torch.long)
        out[torch.arange(k), :, idx] += torch.as_tensor(list(steps), dtype=torch.float64).to(out.dtype)[:, None]
        return out.reshape(k * self.batch, *self.point.shape[1:])

    def losses(self, moved: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, coords: Sequence[int], steps: Sequence[float]) -> torch.Tensor:
        parts = []
        for sl in _chunks(len(coords), self.batch, self.max_rows):
            cs, ss = list(coords)[sl], list(steps)[sl]
            with torch.no_grad():
                per = self.losses(self.moved(cs, ss), len(cs))
            self.loss_dtype = per.dtype
            parts.append(per.detach().to(torch.float64).view(len(cs), self.batch))
        return torch.cat(parts)


class OutputSpace(_MovedRows):
    """The model's outputs at the current parameters, through ``objective(outputs, inputs, targets) -> (N,)``."""

    name = "model outputs"
    estimators = ("oracle_cge", "oracle_rge")

    def __init__(self, outputs: torch.Tensor, objective: Callable[[Any, Any, Any], torch.Tensor], inputs: Any,
                 targets: Any, mu: Optional[float] = None, needs_inputs: bool = True) -> None:
        super().__init__(outputs, mu)
        self.objective, self.inputs, self.targets, self.needs_inputs = objective, inputs, targets, needs_inputs

    def label(self, coord: int) -> str:
        shape = tuple(self.point.shape[1:])
        return f"output[{', '.join(map(str, np.unravel_index(coord, shape)))}]"

    def losses(self, moved: torch.Tensor, k: int) -> torch.Tensor:
        return self.objective(moved, tile(self.inputs, k) if self.needs_inputs else None, tile(self.targets, k))


def projection_loss(d_out: int, seed: int = 0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A loss for a bare oracle: a fixed random projection ``w . answer`` (``w ~ N(0, I / d_out)``, seeded).

    Locally every loss is some linear functional of the answers; a random one weighs all outputs alike.
    """
    w = torch.randn(d_out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / max(1, d_out) ** 0.5

    def loss(answers: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = answers.reshape(answers.shape[0], -1)
        return flat.to(torch.float64) @ w.to(flat.device)

    return loss


class RowSpace(_MovedRows):
    """The oracle's own input rows, answered with their conditions, scored by ``loss(answers, index) -> (N,)``.

    ``index`` ``(N,)`` says which of the ``B`` rows each answer belongs to (to gather targets).
    """

    name = "oracle inputs"
    estimators = ("oracle_cge", "oracle_rge")

    def __init__(self, oracle: Oracle, rows: torch.Tensor, conditions: Sequence[torch.Tensor] = (),
                 loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                 mu: Optional[float] = None, estimators: Optional[tuple[str, ...]] = None) -> None:
        super().__init__(rows, mu)
        self.oracle, self.conditions = oracle, tuple(conditions)
        self.loss = loss
        if estimators is not None:
            self.estimators = estimators

    def label(self, coord: int) -> str:
        shape = tuple(self.point.shape[1:])
        return f"input[{', '.join(map(str, np.unravel_index(coord, shape)))}]"

    def losses(self, moved: torch.Tensor, k: int) -> torch.Tensor:
        answers = self.oracle.query(moved, *(tile(c, k) for c in self.conditions))
        index = torch.arange(self.batch).repeat(k)
        if self.loss is None:
            self.loss = projection_loss(int(answers[0].numel()))
        return self.loss(answers, index)


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, (tuple, list)):
        return _batch_size(inputs[0])
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        raise ConfigError("the model inputs must be a tensor (or a tuple of tensors) with a batch dimension.")
    return int(inputs.shape[0])


# ---------------------------------------------------------------------------- the subject
@dataclass
class Subject:
    """An oracle at the current point, and the spaces its estimators take steps in.

    Attributes:
        oracle: The black box (only ever queried).
        rows: ``(B, *input_shape)`` the rows it answers at the current parameters.
        conditions: Per-row side inputs ``(B, ...)`` (e.g. a Reynolds number per state).
        spaces: Where the finite-difference step is checked (first: the configured estimator's space).
        label: One line naming what is checked (oracle, model, batch).
        estimators: ``[(name, queries per step, note)]`` for the cost table.
        spawn: ``spawn(copies) -> Oracle``: a fresh oracle with that many copies of the program (external
            programs only), to measure ``--oracle-workers``; None where copies do not apply.
        copies: How many copies of the program ``oracle`` itself runs (``--oracle-workers``).
        calls_per_query: Oracle calls one evaluation makes one after the other (a rollout: its unrolled steps).
        sets_per_call: Perturbed parameter sets that share one oracle call in training (None: all of a step's).
        info: Anything else worth recording in ``check.json`` (settings, model size).
    """

    oracle: Oracle
    rows: torch.Tensor
    conditions: tuple[torch.Tensor, ...] = ()
    spaces: list[Space] = field(default_factory=list)
    label: str = ""
    estimators: list[tuple[str, int, str]] = field(default_factory=list)
    spawn: Optional[Callable[[int], Oracle]] = None
    copies: int = 1
    calls_per_query: int = 1
    sets_per_call: Optional[int] = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.rows.shape[0])

    def query(self, index: torch.Tensor) -> torch.Tensor:
        """The oracle's answers to the rows ``index`` (with their conditions), in one call."""
        return self.oracle.query(self.rows[index], *(c[index] for c in self.conditions))
