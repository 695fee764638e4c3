"""The estimator protocol: pure ``init`` / ``ask`` / ``tell`` functions over an explicit state value.

A gradient estimate is one step of :func:`bbzo.step.estimate` (optax's explicit state, nevergrad's ask/tell)::

    request, state = est.ask(params, state)      # which probes (and base, white-box gradient) to evaluate
    ...                                           # evaluated by the step's executor, failures resolved
    grads = est.tell(params, request, told)       # combine what was told into a gradient

Estimators hold only their configuration (``mu``, ``q``, ...): the state is a small ``NamedTuple`` of ints
and tensors that the caller keeps (the :class:`~bbzo.trainer.Trainer`, or your own loop), so a checkpoint is a
dict of tensors (:meth:`Estimator.state_dict` / :meth:`Estimator.load_state`). An estimator never sees who
evaluates, how, or on how many processes. Transforms (:mod:`bbzo.estimators.transforms`: ``masked``,
``chain`` with ``clip_by_global_norm`` / ``scale``) wrap an estimator instead of flagging it.

Two kinds, both ask/tell: **zeroth-order** estimators ask for probes (``cge``, ``rge``, ``oracle_cge``, ...);
**white-box references** (``autograd``; ``info.zeroth_order`` is False) ask for an autograd gradient through
the objective, which a black box does not allow -- they exist for first-order baselines and say so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import torch

from ..errors import CheckpointError, ConfigError
from ..messages import Request, Told

__all__ = ["Estimator", "EstimatorInfo", "Params", "Grads", "FiniteDifferences"]

Params = Mapping[str, torch.Tensor]
Grads = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EstimatorInfo:
    """What an estimator is and what it costs (timm's ``OptimInfo``, nevergrad's qualifiers)."""

    name: str
    description: str
    cost: str  # human-readable queries-per-step formula
    coordinatewise: bool  # probes are single coordinates (feature reuse applies; masked() works)
    supports_sparse: bool
    zeroth_order: bool = True  # False: a white-box reference that differentiates the objective
    needs_surrogate: bool = False  # uses the objective's stop-gradient surrogate (bbzo.objective)


class Estimator(ABC):
    """Base class of every gradient estimator (see the module docstring)."""

    info: ClassVar[EstimatorInfo]
    State: ClassVar[type]

    @abstractmethod
    def init(self, params: Params) -> NamedTuple:
        """The state of the first step for these parameters."""

    @abstractmethod
    def ask(self, params: Params, state: NamedTuple) -> tuple[Request, NamedTuple]:
        """What to evaluate this step, and the state of the next step."""

    @abstractmethod
    def tell(self, params: Params, request: Request, told: Told) -> Grads:
        """The gradient, keyed like ``params`` (missing names mean zero), from what the step was told."""

    # ------------------------------------------------------------------ derived
    def query_cost(self, params: Params, state: Optional[NamedTuple] = None) -> int:
        """Queries per step: one query = one loss evaluation of one parameter set on the minibatch.

        The oracle sees ``query_cost * batch_size`` rows per step (a rollout: times its length).
        """
        return self.ask(params, state if state is not None else self.init(params))[0].cost

    def step_info(self, params: Params, state: NamedTuple) -> dict[str, Any]:
        """Numbers worth logging about the step that ``state`` is about to take (e.g. a sparsity draw)."""
        return {}

    def needs_output_width(self, state: NamedTuple) -> bool:
        """Whether ``ask`` needs the width of the model's outputs, not yet known (the chain-rule estimators)."""
        return False

    def with_output_width(self, state: NamedTuple, width: int) -> NamedTuple:
        """``state`` once the model's output width is known (the step owner measures it)."""
        return state

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, state: Optional[NamedTuple]) -> dict[str, Any]:
        """A checkpointable dict of ``state`` (tensors and plain numbers)."""
        return {"name": self.info.name, "state": None if state is None else dict(state._asdict())}

    def load_state(self, sd: Mapping[str, Any]) -> Optional[NamedTuple]:
        """The state a :meth:`state_dict` holds (checked to be this estimator's)."""
        if sd.get("name") != self.info.name:
            raise CheckpointError(
                f"checkpoint holds the state of estimator {sd.get('name')!r}, this run uses "
                f"{self.info.name!r}. Resume with the same estimator."
            )
        return None if sd["state"] is None else self.State(**sd["state"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FiniteDifferences(Estimator):
    """An estimator built from finite differences of step ``mu``.

    Args:
        mu: Finite-difference step (DeepZero: 5e-3).
        difference: ``"forward"`` -- ``(f(x+mu v) - f(x)) / mu``, all probes share one base query;
            ``"central"`` -- ``(f(x+mu v) - f(x-mu v)) / (2 mu)``, O(mu^2) bias, twice the probes.
    """

    def __init__(self, mu: float = 5e-3, difference: str = "forward") -> None:
        if not mu > 0:
            raise ConfigError(f"{self.info.name}: mu must be > 0, got {mu}.")
        if difference not in ("forward", "central"):
            raise ConfigError(
                f"{self.info.name}: difference must be 'forward' or 'central', got {difference!r}."
            )
        self.mu = float(mu)
        self.difference = difference

    @property
    def needs_base(self) -> bool:
        """Whether ``tell`` needs the loss at the unperturbed parameters (forward differences)."""
        return self.difference == "forward"

    def _signed_deltas(self, m: int) -> torch.Tensor:
        """``(M,)`` or ``(2M,)`` float64 signed steps: ``+mu`` (forward) or ``+mu`` then ``-mu`` (central)."""
        plus = torch.full((m,), self.mu, dtype=torch.float64)
        return plus if self.difference == "forward" else torch.cat([plus, -plus])

    def differences(self, losses: torch.Tensor, base: Optional[torch.Tensor], m: int) -> torch.Tensor:
        """Directional derivatives ``(m, ...)`` from probe losses ``(M, ...)`` (and the base ``(...)``)."""
        losses = losses.to(torch.float64)
        if self.difference == "forward":
            if base is None:
                raise ConfigError(f"{self.info.name}: forward differences need the base loss.")
            return (losses - base.to(torch.float64)) / self.mu
        return (losses[:m] - losses[m:]) / (2 * self.mu)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mu={self.mu}, difference={self.difference!r})"
