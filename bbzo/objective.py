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
  ``loss(answers, outputs, inputs, targets)``.
* :class:`Rollout` -- a model called *inside* a loop with a black box (solver in the loop), for
  :class:`~bbzo.adapters.LoopAdapter`: ``rollout(model_fn, inputs, targets) -> (N,)``.

An objective may carry a **stop-gradient surrogate** (``surrogate``): the same loss, differentiable, with every
black-box call entering as a constant (for a rollout: the solver's outputs detached, NOG). Its value equals the
objective's; its gradient is what the white-box parts alone give, for free. ``hybrid_cge`` uses it
(:mod:`bbzo.estimators.hybrid`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import ConfigError

__all__ = ["Objective", "FunctionObjective", "OracleObjective", "Rollout", "as_objective"]


class Objective:
    """Per-sample losses of model outputs on a minibatch.

    Attributes:
        needs_inputs: Whether ``__call__`` uses ``inputs`` (else adapters pass ``None`` and save the copies).
        oracles: The black boxes it queries (a run's trainings attach them to their ledgers).
        surrogate: The stop-gradient surrogate (same signature, differentiable), or None.
    """

    needs_inputs: bool = True
    oracles: Sequence[Any] = ()
    surrogate: Optional[Callable[..., torch.Tensor]] = None

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
        self.surrogate = getattr(fn, "surrogate", None)

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
        surrogate: Optional stop-gradient surrogate ``fn(outputs, inputs, targets) -> (N,)`` (see the module docstring).
    """

    def __init__(self, oracle: Any, loss: Callable[..., torch.Tensor],
                 assemble: Optional[Callable[[Any, Any, Any], torch.Tensor]] = None, *, needs_inputs: bool = True,
                 surrogate: Optional[Callable[..., torch.Tensor]] = None) -> None:
        self.oracle = oracle
        self.loss = loss
        self.assemble = assemble or (lambda outputs, inputs, targets: outputs)
        self.needs_inputs = needs_inputs
        self.oracles = (oracle,)
        self.surrogate = surrogate

    def rows(self, outputs: Any, inputs: Any, targets: Any) -> torch.Tensor:
        """The oracle's input rows for these samples."""
        return self.assemble(outputs, inputs, targets)

    def __call__(self, outputs: Any, inputs: Any, targets: Any) -> torch.Tensor:
        answers = self.oracle.query(self.rows(outputs, inputs, targets))
        return self.loss(answers, outputs, inputs, targets)

    def __repr__(self) -> str:
        return f"OracleObjective(oracle={getattr(self.oracle, 'name', self.oracle)!r})"


class Rollout:
    """A solver-in-the-loop objective: ``fn(model_fn, inputs, targets) -> (N,)`` per-sample losses.

    ``model_fn`` maps ``(N, ...)`` rows (the :class:`~bbzo.adapters.LoopAdapter` hands ``K`` perturbed models
    side by side); the plain model works too (evaluation, first-order baselines).

    Args:
        fn: The rollout, querying the black box inside.
        surrogate: The same rollout with every black-box output detached (NOG), or None.
        oracles: The black boxes it queries.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], surrogate: Optional[Callable[..., torch.Tensor]] = None,
                 oracles: Sequence[Any] = ()) -> None:
        if not callable(fn) or (surrogate is not None and not callable(surrogate)):
            raise ConfigError("Rollout(fn, surrogate=None): fn and surrogate must be callables "
                              "(model_fn, inputs, targets) -> (N,) losses.")
        self.fn, self.surrogate, self.oracles = fn, surrogate, tuple(oracles)

    def __call__(self, model_fn: Any, inputs: Any, targets: Any) -> torch.Tensor:
        return self.fn(model_fn, inputs, targets)

    def __repr__(self) -> str:
        return f"Rollout({getattr(self.fn, '__name__', self.fn)!r}, surrogate={self.surrogate is not None})"
