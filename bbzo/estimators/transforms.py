"""Transforms that wrap an estimator instead of flagging it (optax's ``masked``, ``clip_by_global_norm``).

* :func:`masked` -- a coordinate-wise estimator restricted to a coordinate set per tensor, fixed or
  drawn per step by a schedule (``coords_at(step)``; DeepZero's dynamic sparsity is
  :class:`~bbzo.sparsity.DynamicSparsity`). Registered as ``sparse_cge`` (``masked(cge, ...)``).
* :func:`clip_by_global_norm` -- scale the estimate down to a maximal global L2 norm.

Both are estimators themselves, so they compose: ``clip_by_global_norm(masked(cge, sampler), 1.0)``.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping, NamedTuple, Optional, Protocol, Sequence, Union

import torch

from ..errors import ConfigError
from ..probes import Probes
from .base import Estimator, EstimatorInfo, Grads, Params
from .cge import CGE, CoordinateEstimator, CoordSpec, normalize_coords
from .registry import register_estimator

__all__ = ["masked", "clip_by_global_norm", "Masked", "SparseCGE", "ClipByGlobalNorm", "CoordSchedule"]


class CoordSchedule(Protocol):
    """A coordinate set per step: ``coords_at(step) -> {name: sorted int64 flat indices}``."""

    def coords_at(self, step: int) -> dict[str, torch.Tensor]: ...

    def draw_index(self, step: int) -> int: ...


class MaskedState(NamedTuple):
    step: int
    coords: dict  # name -> int64 flat indices (the fixed set; empty when a schedule draws them)


class Masked(Estimator):
    """``inner`` (coordinate-wise) on a coordinate set per parameter tensor; zero gradient elsewhere.

    Args:
        inner: A coordinate-wise estimator (``cge``); its ``mu`` and ``difference`` are used.
        coords: ``{param name: bool mask or int flat indices}`` (fixed), or a :class:`CoordSchedule`
            that draws the set of each step. Parameters not named get zero gradient unless they match
            ``dense``.
        dense: Glob patterns of parameters estimated on all coordinates every step (e.g.
            ``("*bn*", "*.bias")``: DeepZero trains BN and biases densely).

    Costs ``|S| + 1`` queries per step (forward) or ``2|S|`` (central).
    """

    info = EstimatorInfo(
        name="sparse_cge",
        description="CGE on a per-tensor coordinate set, zero elsewhere (DeepZero Sparse-CGE; masked(cge, ...))",
        cost="|S| + 1 (forward) | 2|S| (central)",
        coordinatewise=True,
        supports_sparse=True,
    )
    State = MaskedState

    def __init__(self, inner: Estimator, coords: Union[CoordSpec, CoordSchedule, None] = None,
                 dense: Sequence[str] = ()) -> None:
        if not isinstance(inner, CoordinateEstimator):
            raise ConfigError(f"masked() needs a coordinate-wise estimator such as 'cge', got {inner.info.name!r} "
                              "(random directions touch every coordinate).")
        super().__init__(mu=inner.mu, difference=inner.difference)
        self.inner = inner
        self.schedule: Optional[CoordSchedule] = coords if hasattr(coords, "coords_at") else None  # type: ignore[assignment]
        self._initial = None if self.schedule is not None else coords
        self.dense = tuple(dense)

    def init(self, params: Params) -> MaskedState:
        return MaskedState(step=0, coords=normalize_coords(self._initial or {}, params))  # type: ignore[arg-type]

    def coords(self, params: Params, state: NamedTuple) -> dict[str, torch.Tensor]:
        coords = self.schedule.coords_at(state.step) if self.schedule is not None else dict(state.coords)
        for n, p in params.items():
            if any(fnmatch.fnmatch(n, pat) for pat in self.dense):
                coords[n] = torch.arange(p.numel())
        return coords

    def num_probes(self, params: Params, state: NamedTuple) -> int:
        return self.inner.count_probes(self.coords(params, state))  # type: ignore[attr-defined]

    def ask(self, params: Params, state: NamedTuple) -> tuple[Probes, NamedTuple]:
        return self.inner.ask_coords(params, self.coords(params, state), state)  # type: ignore[attr-defined]

    def tell(self, params: Params, probes: Probes, losses: torch.Tensor,
             base_loss: Optional[torch.Tensor]) -> Grads:
        return self.inner.tell(params, probes, losses, base_loss)

    def step_info(self, params: Params, state: NamedTuple) -> dict[str, Any]:
        if self.schedule is None:
            return {}
        coords = self.coords(params, state)
        return {"sparsity_draw": self.schedule.draw_index(state.step),
                "coords": sum(int(v.numel()) for v in coords.values())}

    def set_coords(self, params: Params, coords: CoordSpec) -> None:
        """Replace the fixed coordinate set (keeps the step counter)."""
        if self.schedule is not None:
            raise ConfigError("this sparse estimator draws its coordinates from a schedule; set_coords does not apply.")
        state = self.ensure_state(params)
        self.state = state._replace(coords=normalize_coords(coords, params))

    def with_schedule(self, schedule: CoordSchedule) -> "Masked":
        """The same estimator, drawing its coordinate set of each step from ``schedule``."""
        return Masked(self.inner, schedule, self.dense)

    def __repr__(self) -> str:
        src = type(self.schedule).__name__ if self.schedule is not None else "fixed set"
        return f"masked({self.inner!r}, {src}, dense={self.dense})"


@register_estimator
class SparseCGE(Masked):
    """``masked(cge(mu, difference), coords, dense)`` by name: ``create_estimator("sparse_cge", coords=...)``.

    Args:
        coords: ``{param name: bool mask or int flat indices}`` (see :class:`Masked`).
        dense: Glob patterns of parameters estimated densely.
        mu, difference: As :class:`~bbzo.estimators.base.Estimator`.
    """

    def __init__(self, coords: Optional[CoordSpec] = None, dense: Sequence[str] = (),
                 mu: float = 5e-3, difference: str = "forward") -> None:
        super().__init__(CGE(mu=mu, difference=difference), coords, dense)


def masked(inner: Estimator, coords: Union[CoordSpec, CoordSchedule], dense: Sequence[str] = ()) -> Masked:
    """``inner`` restricted to ``coords`` (a fixed set or a per-step schedule); see :class:`Masked`."""
    return Masked(inner, coords, dense)


def _global_norm(grads: Mapping[str, torch.Tensor]) -> float:
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.detach().double().norm() for g in grads.values()])))


class ClipByGlobalNorm(Estimator):
    """``inner``'s estimate scaled down so that its global L2 norm is at most ``max_norm``."""

    def __init__(self, inner: Estimator, max_norm: float) -> None:
        if not max_norm > 0:
            raise ConfigError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm}.")
        self.inner = inner
        self.max_norm = float(max_norm)
        self.mu, self.difference = inner.mu, inner.difference
        self.state = None

    @property
    def info(self) -> EstimatorInfo:  # type: ignore[override]
        return self.inner.info

    @property
    def State(self) -> type:  # type: ignore[override]
        return self.inner.State

    @property
    def needs_base(self) -> bool:
        return self.inner.needs_base

    def init(self, params: Params) -> NamedTuple:
        return self.inner.init(params)

    def num_probes(self, params: Params, state: NamedTuple) -> int:
        return self.inner.num_probes(params, state)

    def query_cost(self, params: Params, state: Optional[NamedTuple] = None) -> int:
        state = state if state is not None else (self.state or self.init(params))
        return self.inner.query_cost(params, state)

    def ask(self, params: Params, state: NamedTuple) -> tuple[Probes, NamedTuple]:
        return self.inner.ask(params, state)

    def _clip(self, grads: Grads) -> Grads:
        total = _global_norm(grads)
        coef = self.max_norm / (total + 1e-6)
        if coef < 1.0:
            return {n: g * coef for n, g in grads.items()}
        return grads

    def tell(self, params: Params, probes: Probes, losses: torch.Tensor,
             base_loss: Optional[torch.Tensor]) -> Grads:
        return self._clip(self.inner.tell(params, probes, losses, base_loss))

    def estimate(self, evaluator: Any, params: Params, state: NamedTuple,
                 executor: Any = None) -> tuple[Grads, float, NamedTuple]:
        grads, loss, new_state = self.inner.estimate(evaluator, params, state, executor)
        return self._clip(grads), loss, new_state

    def step_info(self, params: Params, state: NamedTuple) -> dict[str, Any]:
        return self.inner.step_info(params, state)

    def __repr__(self) -> str:
        return f"clip_by_global_norm({self.inner!r}, {self.max_norm})"


def clip_by_global_norm(inner: Estimator, max_norm: float) -> ClipByGlobalNorm:
    """``inner``'s estimate with its global L2 norm clipped to ``max_norm`` (torch's ``clip_grad_norm_`` rule)."""
    return ClipByGlobalNorm(inner, max_norm)
