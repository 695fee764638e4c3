"""``hybrid_cge``: Sparse-CGE completed by the objective's free stop-gradient gradient.

Sparse-CGE (DeepZero) estimates a drawn coordinate set by finite differences and puts **zero** on every other
coordinate. Often a gradient of part of the loss is free: the same loss with every black-box call entering as a
constant -- the *stop-gradient surrogate* (:attr:`bbzo.objective.Objective.surrogate`). For a solver in the loop
that is NOG's gradient (List et al., CMAME 2025): the unrolled loss with the solver's outputs detached, one
backward pass through the white-box corrector, no query beyond the base rollout. ``hybrid_cge`` uses

* the finite differences of the inner Sparse-CGE on its sampled coordinates (they see the black box), and
* the surrogate's gradient on every other coordinate (it sees only the white-box paths),

at Sparse-CGE's query cost: the surrogate's forward pass *is* the base query (forward differences). In
expectation over the draws the surrogate part is biased (it misses what flows through the black box), the
finite-difference part is not; DeepZero's Sparse-CGE is the special case of a zero surrogate.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch

from ..errors import ConfigError
from ..probes import CoordinateProbes
from ..messages import Request, Told
from .base import Estimator, EstimatorInfo, Grads, Params
from .cge import CGE, CoordSpec
from .registry import register_estimator
from .transforms import CoordSchedule, Masked

__all__ = ["HybridCGE", "hybrid"]


class Hybrid(Estimator):
    """``inner`` (a :class:`~bbzo.estimators.transforms.Masked` estimator) on its coordinates, the objective's
    stop-gradient surrogate gradient on all others (see the module docstring)."""

    info = EstimatorInfo(
        name="hybrid_cge",
        description="Sparse-CGE on the drawn coordinates, the objective's stop-gradient surrogate gradient elsewhere",
        cost="|S| + 1 (forward) | 2|S| + 1 (central)",
        coordinatewise=True,
        supports_sparse=True,
        needs_surrogate=True,
    )

    def __init__(self, inner: Masked) -> None:
        if not isinstance(inner, Masked):
            raise ConfigError("hybrid() completes a sparse coordinate estimator: pass masked(cge, coords or schedule).")
        self.inner = inner

    @property
    def State(self) -> type:  # type: ignore[override]
        return self.inner.State

    @property
    def mu(self) -> float:
        return self.inner.mu

    def init(self, params: Params) -> NamedTuple:
        return self.inner.init(params)

    def ask(self, params: Params, state: NamedTuple) -> tuple[Request, NamedTuple]:
        request, nxt = self.inner.ask(params, state)
        return replace(request, base=False, gradient="surrogate"), nxt  # the surrogate's forward is the base

    def tell(self, params: Params, request: Request, told: Told) -> Grads:
        fd = self.inner.tell(params, request, told)
        assert told.grads is not None
        probes: CoordinateProbes = request.probes  # type: ignore[assignment]
        out: Grads = {}
        for n, p in params.items():
            sampled = torch.zeros(p.numel(), dtype=torch.bool)
            rows = probes.pidx == probes.names.index(n)
            sampled[probes.index[rows]] = True
            sur = told.grads[n].reshape(-1).to(torch.float64)
            g = torch.where(sampled, fd[n].reshape(-1).to(torch.float64), sur.cpu())
            out[n] = g.view(p.shape).to(device=p.device, dtype=p.dtype)
        return out

    def step_info(self, params: Params, state: NamedTuple) -> dict[str, Any]:
        return self.inner.step_info(params, state)

    def with_schedule(self, schedule: CoordSchedule) -> "Hybrid":
        return Hybrid(self.inner.with_schedule(schedule))

    def state_dict(self, state: Optional[NamedTuple]) -> dict[str, Any]:
        return {"name": self.info.name, "state": None if state is None else dict(state._asdict())}

    def __repr__(self) -> str:
        return f"hybrid({self.inner!r})"


@register_estimator
class HybridCGE(Hybrid):
    """``hybrid(masked(cge(mu, difference), coords, dense))`` by name: ``create_estimator("hybrid_cge", ...)``.

    Args:
        coords: ``{param name: bool mask or int flat indices}`` estimated by finite differences (a schedule of
            draws: ``.with_schedule(DynamicSparsity(...))``).
        dense: Glob patterns of parameters estimated by finite differences on every coordinate.
        mu, difference: As :class:`~bbzo.estimators.base.FiniteDifferences`.
    """

    def __init__(self, coords: Optional[CoordSpec] = None, dense: Sequence[str] = (),
                 mu: float = 5e-3, difference: str = "forward") -> None:
        super().__init__(Masked(CGE(mu=mu, difference=difference), coords, dense))


def hybrid(inner: Masked) -> Hybrid:
    """``inner``'s finite differences on its coordinates, the objective's surrogate gradient elsewhere."""
    return Hybrid(inner)
