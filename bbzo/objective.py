"""Objectives: what a parameter set is scored by, seeing the whole minibatch.

bbzo minimises ``L(theta) = mean_i objective(f_theta(x_i), x_i, y_i)``. An objective receives the model's
outputs *and* the minibatch's inputs and targets, all with one row per sample -- ``K x B`` rows when
``K`` perturbed parameter sets are evaluated side by side -- and returns per-sample losses ``(N,)``.
Nothing needs to be smuggled into the targets to reach the black box.

* :class:`Objective` -- the base: ``__call__(outputs, inputs, targets) -> (N,)``; ``needs_inputs`` says
  whether the inputs must be replicated for it (they cost ``K`` copies of the minibatch).
* :func:`as_objective` -- a plain ``fn(outputs, targets)`` or ``fn(outputs, inputs, targets)`` becomes one.
* :class:`OracleObjective` -- the split every white-box-model-in-front-of-a-black-box task has:
  ``rows = assemble(outputs, inputs, targets)`` -> ``answers = oracle.query(rows)`` ->
  ``loss(answers, outputs, inputs, targets)``. The chain-rule estimators use this split.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import ConfigError

__all__ = ["Objective", "FunctionObjective", "OracleObjective", "as_objective"]


class Objective:
    """Per-sample losses of model outputs on a minibatch.

    Attributes:
        needs_inputs: Whether ``__call__`` uses ``inputs`` (else adapters pass ``None`` and save the copies).
        oracles: The black boxes it queries (a run attaches them to its ledger).
    """

    needs_inputs: bool = True
    oracles: Sequence[Any] = ()

    def __call__(self, outputs: Any, inputs: Any, targets: Any) -> torch.Tensor:
        """``outputs``: model outputs ``(N, ...)``; ``inputs``/``targets``: the matching rows. Returns ``(N,)``."""
        raise NotImplementedError


class FunctionObjective(Objective):
    """A user function as an objective: ``fn(outputs, targets)`` or ``fn(outputs, inputs, targets)``."""

    def __init__(self, fn: Callable[..., torch.Tensor], takes_inputs: Optional[bool] = None) -> None:
        if not callable(fn):
            raise ConfigError(f"an objective must be callable, got {type(fn).__name__}.")
        self.fn = fn
        self.needs_inputs = _positional_arity(fn) >= 3 if takes_inputs is None else bool(takes_inputs)
        self.oracles = tuple(getattr(fn, "oracles", ()))

    def __call__(self, outputs: Any, inputs: Any, targets: Any) -> torch.Tensor:
        if self.needs_inputs:
            return self.fn(outputs, inputs, targets)
        return self.fn(outputs, targets)

    def __repr__(self) -> str:
        return f"FunctionObjective({getattr(self.fn, '__name__', self.fn)!r}, needs_inputs={self.needs_inputs})"


def _positional_arity(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return 2
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty])


def as_objective(fn: Any) -> Any:
    """An :class:`Objective` for ``fn``; objectives (and rollouts handed to a loop adapter) pass through.

    A function with three required positional parameters is called ``fn(outputs, inputs, targets)``,
    otherwise ``fn(outputs, targets)`` (the classic loss signature).
    """
    if isinstance(fn, Objective):
        return fn
    return FunctionObjective(fn)


class OracleObjective(Objective):
    """model -> oracle -> loss: ``loss(oracle.query(assemble(outputs, inputs, targets)), outputs, inputs, targets)``.

    Args:
        oracle: The black box; it sees ``N`` rows per call, never a tensor that requires grad.
        loss: ``loss(answers (N, ...), outputs, inputs, targets) -> (N,)`` per-sample losses.
        assemble: ``assemble(outputs, inputs, targets) -> rows (N, ...)``; default: the outputs.
        needs_inputs: Whether ``assemble`` or ``loss`` read the inputs (default True).
    """

    def __init__(self, oracle: Any, loss: Callable[..., torch.Tensor],
                 assemble: Optional[Callable[[Any, Any, Any], torch.Tensor]] = None, *, needs_inputs: bool = True) -> None:
        self.oracle = oracle
        self.loss = loss
        self.assemble = assemble or (lambda outputs, inputs, targets: outputs)
        self.needs_inputs = needs_inputs
        self.oracles = (oracle,)

    def rows(self, outputs: Any, inputs: Any, targets: Any) -> torch.Tensor:
        """The oracle's input rows for these samples."""
        return self.assemble(outputs, inputs, targets)

    def __call__(self, outputs: Any, inputs: Any, targets: Any) -> torch.Tensor:
        answers = self.oracle.query(self.rows(outputs, inputs, targets))
        return self.loss(answers, outputs, inputs, targets)

    def __repr__(self) -> str:
        return f"OracleObjective(oracle={getattr(self.oracle, 'name', self.oracle)!r})"
