"""Chain-rule estimators: zeroth-order only where the black box is, autograd through the white-box model.

For ``L(theta) = mean_i l_i(f_theta(x_i))`` where everything after the model -- the objective, with its oracle,
its assembly of rows and its loss -- is a black box of the model's outputs ``z_i = f_theta(x_i)``, only that
black box needs finite differences. The estimators take ``v_i = d l_i / d z_i`` by finite differences in the
**output space** (:class:`~bbzo.probes.OutputProbes`): every probe moves one output coordinate
(``oracle_cge``) or one random direction per sample (``oracle_rge``) of *all* ``B`` samples at once, since
samples are independent -- and then pull ``v`` back through the model by autograd, the gradient of

    ``S(theta) = mean_i v_i . f_theta(x_i)``  (:meth:`bbzo.adapters.Evaluator.pullback`).

Any direct dependence of the loss on the outputs (an energy term, say) is part of the difference, so any
objective works: an :class:`~bbzo.objective.OracleObjective` or a plain ``fn(outputs, targets)``. The cost does
not depend on the model's size: ``width + 1`` queries per step (forward) for ``oracle_cge``, ``q + 1`` for
``oracle_rge``, ``width`` being the model's output values per sample. The probes are sharded, charged and
failure-handled like every other estimator's. A model inside a rollout (solver in the loop) has no such
split, and the step says so.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from ..errors import ConfigError
from ..probes import OutputProbes
from ..messages import Request, Told
from .base import EstimatorInfo, FiniteDifferences, Grads, Params
from .registry import register_estimator

__all__ = ["OracleCGE", "OracleRGE"]


class ChainState(NamedTuple):
    step: int
    width: int  # the model's output values per sample (0 until the first step has seen them)


class _ChainRule(FiniteDifferences):
    """Common part: output probes, ``v`` from the per-sample differences, the pullback through the model."""

    State = ChainState
    kind: str = "coordinate"

    def __init__(self, mu: float = 1e-3, difference: str = "forward", width: Optional[int] = None) -> None:
        super().__init__(mu=mu, difference=difference)
        if width is not None and width < 1:
            raise ConfigError(f"{self.info.name}: width must be >= 1, got {width}.")
        self.width = width

    def init(self, params: Params) -> ChainState:
        return ChainState(step=0, width=int(self.width or 0))

    def needs_output_width(self, state: NamedTuple) -> bool:
        return not state.width

    def with_output_width(self, state: NamedTuple, width: int) -> NamedTuple:
        if state.width and state.width != width:
            raise ConfigError(f"{self.info.name}: the model's outputs changed width from {state.width} to {width} "
                              "values per sample.")
        return state._replace(width=int(width))

    def _directions(self, state: NamedTuple) -> torch.Tensor:
        raise NotImplementedError

    def _seed(self, state: NamedTuple) -> int:
        return 0

    def ask(self, params: Params, state: NamedTuple) -> tuple[Request, NamedTuple]:
        if not state.width:
            raise ConfigError(f"{self.info.name}: the query cost depends on the model's output width; give width= or "
                              "let one step run first.")
        dirs = self._directions(state)
        m = int(dirs.numel())
        if self.difference == "central":
            dirs = dirs.repeat(2)
        probes = OutputProbes(self.kind, dirs, self._signed_deltas(m), width=int(state.width), seed=self._seed(state))
        return (Request(probes, base=self.needs_base, per_sample=True),
                state._replace(step=state.step + 1))

    def cotangent(self, diffs: torch.Tensor, probes: OutputProbes) -> torch.Tensor:
        """``v`` ``(B, width)`` from directional derivatives ``(m, B)`` along the probes."""
        raise NotImplementedError

    def tell(self, params: Params, request: Request, told: Told) -> Grads:
        assert told.per_sample is not None and told.pullback is not None
        probes = request.probes
        m = len(probes) if self.difference == "forward" else len(probes) // 2
        diffs = self.differences(told.per_sample, told.base_per_sample, m)  # (m, B)
        v = self.cotangent(diffs, probes.slice(0, m))
        return told.pullback(v, told.keep)


@register_estimator
class OracleCGE(_ChainRule):
    """Coordinate-wise differences in the model's output space, then autograd through the model (chain rule).

    Args:
        mu: Step in the model's output units.
        difference: ``forward`` (``width + 1`` queries) or ``central`` (``2 width``).
        width: The model's output values per sample (measured on the first step if not given).
    """

    info = EstimatorInfo(
        name="oracle_cge",
        description="chain rule: CGE over the model's output values (all samples at once), autograd through the model",
        cost="width + 1 (forward) | 2 width (central)",
        coordinatewise=False,
        supports_sparse=False,
    )
    kind = "coordinate"

    def _directions(self, state: NamedTuple) -> torch.Tensor:
        return torch.arange(state.width, dtype=torch.int64)

    def cotangent(self, diffs: torch.Tensor, probes: OutputProbes) -> torch.Tensor:
        v = torch.zeros(diffs.shape[1], probes.width, dtype=torch.float64)
        v[:, probes.index] = diffs.T  # probe j moved coordinate index[j] of every sample
        return v


@register_estimator
class OracleRGE(_ChainRule):
    """Random directions in the model's output space (independent per sample), then autograd through the model.

    Args:
        q: Directions per step (each moves every sample along its own Gaussian direction).
        mu, difference, width: As :class:`OracleCGE`.
        seed: Seed of the direction stream (step ``t`` uses ``(seed, t)``).
    """

    info = EstimatorInfo(
        name="oracle_rge",
        description="chain rule: RGE with q directions in the model's output space, autograd through the model",
        cost="q + 1 (forward) | 2q (central)",
        coordinatewise=False,
        supports_sparse=False,
    )
    kind = "gaussian"

    def __init__(self, q: int = 8, mu: float = 1e-3, difference: str = "forward", width: Optional[int] = None,
                 seed: int = 0) -> None:
        super().__init__(mu=mu, difference=difference, width=width)
        if q < 1:
            raise ConfigError(f"oracle_rge: q must be >= 1, got {q}.")
        self.q, self.seed = int(q), int(seed)

    def _directions(self, state: NamedTuple) -> torch.Tensor:
        return torch.arange(self.q, dtype=torch.int64)

    def query_cost(self, params: Params, state: Optional[NamedTuple] = None) -> int:
        return self.q + 1 if self.difference == "forward" else 2 * self.q  # whatever the output width

    def _seed(self, state: NamedTuple) -> int:
        return int(np.random.SeedSequence([self.seed, state.step, 0xC4A1]).generate_state(1)[0])

    def cotangent(self, diffs: torch.Tensor, probes: OutputProbes) -> torch.Tensor:
        b = diffs.shape[1]
        v = torch.zeros(b, probes.width, dtype=torch.float64)
        for j, k in enumerate(probes.index.tolist()):
            v.add_(probes.direction(k, b) * diffs[j][:, None])
        return v / len(probes)
