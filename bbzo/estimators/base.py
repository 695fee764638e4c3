"""Estimator base class: pure ``init`` / ``ask`` / ``tell`` functions over explicit state.

A zeroth-order gradient estimate is three steps (optax's explicit state, nevergrad's ask/tell):

1. ``probes, state = est.ask(params, state)`` -- which perturbed parameter sets to evaluate;
2. ``losses = evaluator.evaluate(probes)`` -- done by an adapter, batched, possibly in shards;
3. ``grads = est.tell(params, probes, losses, base_loss)`` -- combine into a gradient.

:meth:`Estimator.estimate` runs the three on one bound minibatch; an estimator that is not built from
probes (the ``autograd`` reference) overrides it. States are small ``NamedTuple`` s of ints and
tensors, so a checkpoint is a dict of tensors. For convenience the object also keeps the current state
in ``self.state`` (the one-call API and the trainer advance it); ``state_dict`` / ``load_state_dict``
make it checkpointable. Transforms (:mod:`bbzo.estimators.transforms`: ``masked``,
``clip_by_global_norm``) wrap an estimator instead of flagging it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import torch

from ..errors import CheckpointError, ConfigError
from ..parallel.executor import as_executor, evaluate_sharded
from ..probes import Probes

__all__ = ["Estimator", "EstimatorInfo", "Params", "Grads", "evaluate_sharded"]

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


class Estimator(ABC):
    """Base class of every gradient estimator.

    Args:
        mu: Finite-difference step (DeepZero: 5e-3).
        difference: ``"forward"`` -- ``(f(x+mu v) - f(x)) / mu``, all probes share one base query;
            ``"central"`` -- ``(f(x+mu v) - f(x-mu v)) / (2 mu)``, O(mu^2) bias, twice the probes.
    """

    info: ClassVar[EstimatorInfo]
    State: ClassVar[type]

    def __init__(self, mu: float = 5e-3, difference: str = "forward") -> None:
        if not mu > 0:
            raise ConfigError(f"{self.info.name}: mu must be > 0, got {mu}.")
        if difference not in ("forward", "central"):
            raise ConfigError(
                f"{self.info.name}: difference must be 'forward' or 'central', got {difference!r}."
            )
        self.mu = float(mu)
        self.difference = difference
        self.state: Optional[NamedTuple] = None

    # ------------------------------------------------------------------ pure API
    @property
    def needs_base(self) -> bool:
        """Whether ``tell`` needs the loss at the unperturbed parameters (forward differences)."""
        return self.difference == "forward"

    @abstractmethod
    def init(self, params: Params) -> NamedTuple:
        """Initial state for these parameters."""

    @abstractmethod
    def num_probes(self, params: Params, state: NamedTuple) -> int:
        """Probes per step (perturbed parameter sets), excluding the shared base query."""

    def query_cost(self, params: Params, state: Optional[NamedTuple] = None) -> int:
        """Queries per step: one query = one loss evaluation of one parameter set on the minibatch.

        The oracle sees ``query_cost * batch_size`` rows per step.
        """
        state = state if state is not None else (self.state or self.init(params))
        return self.num_probes(params, state) + (1 if self.needs_base else 0)

    @abstractmethod
    def ask(self, params: Params, state: NamedTuple) -> tuple[Probes, NamedTuple]:
        """The probes to evaluate this step, and the state for the next step."""

    @abstractmethod
    def tell(
        self,
        params: Params,
        probes: Probes,
        losses: torch.Tensor,
        base_loss: Optional[torch.Tensor],
    ) -> Grads:
        """Combine probe losses ``(M,)`` (float64, probe order) into gradients keyed like ``params``."""

    def estimate(self, evaluator: Any, params: Params, state: NamedTuple,
                 executor: Any = None) -> tuple[Grads, float, NamedTuple]:
        """``(grads, loss, new state)`` on the evaluator's minibatch: ask -> evaluate (by the executor) -> tell.

        ``executor``: who evaluates the probes (:mod:`bbzo.parallel`): ``None`` -- this process; an int
        -- this process in that many shards; a :class:`~bbzo.parallel.DistributedExecutor` -- the ranks
        of a process group, each its shard. ``loss`` is the loss at the unperturbed parameters (the mean
        probe loss for central differences, which is within O(mu^2) of it).
        """
        probes, new_state = self.ask(params, state)
        base, losses = as_executor(executor).evaluate(evaluator, probes, self.needs_base)
        grads = self.tell(params, probes, losses, base)
        loss = float(base) if base is not None else float(losses.mean())
        return grads, loss, new_state

    def step_info(self, params: Params, state: NamedTuple) -> dict[str, Any]:
        """Numbers worth logging about the step that ``state`` is about to take (e.g. a sparsity draw)."""
        return {}

    # ------------------------------------------------------------------ helpers
    def _signed_steps(self, m: int) -> torch.Tensor:
        """``(M,)`` or ``(2M,)`` float64 steps: ``+mu`` (forward) or ``+mu`` then ``-mu`` (central)."""
        plus = torch.full((m,), self.mu, dtype=torch.float64)
        return plus if self.difference == "forward" else torch.cat([plus, -plus])

    def _differences(self, losses: torch.Tensor, base_loss: Optional[torch.Tensor], m: int) -> torch.Tensor:
        """Finite-difference directional derivatives ``(m,)`` from the probe losses."""
        losses = losses.to(torch.float64)
        if self.difference == "forward":
            if base_loss is None:
                raise ConfigError(f"{self.info.name}: forward differences need the base loss.")
            return (losses - base_loss.to(torch.float64)) / self.mu
        return (losses[:m] - losses[m:]) / (2 * self.mu)

    # ------------------------------------------------------------------ stateful facade
    def ensure_state(self, params: Params) -> NamedTuple:
        if self.state is None:
            self.state = self.init(params)
        return self.state

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.info.name, "state": None if self.state is None else dict(self.state._asdict())}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd.get("name") != self.info.name:
            raise CheckpointError(
                f"checkpoint holds the state of estimator {sd.get('name')!r}, this run uses "
                f"{self.info.name!r}. Resume with the same estimator."
            )
        self.state = None if sd["state"] is None else self.State(**sd["state"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mu={self.mu}, difference={self.difference!r})"
