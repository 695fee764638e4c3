"""Transforms that wrap an estimator instead of flagging it (optax's ``masked``, ``chain``, ``clip_by_global_norm``).

* :func:`masked` -- a coordinate-wise estimator restricted to a coordinate set per tensor, fixed or drawn per
  step by a schedule (``coords_at(step)``; DeepZero's dynamic sparsity is
  :class:`~bbzo.sparsity.DynamicSparsity`). Registered as ``sparse_cge`` (``masked(cge, ...)``).
* :func:`chain` -- an estimator followed by gradient transforms: ``chain(est, clip_by_global_norm(1.0),
  scale(0.5))``. A :class:`GradientTransform` is a pure function of the gradient (and the parameters).

Wrapped estimators are estimators themselves (the same ``init`` / ``ask`` / ``tell``), so they compose:
``chain(masked(cge, sampler), clip_by_global_norm(1.0))``. Every state is a value the caller keeps.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence, Union

import torch

from ..errors import ConfigError
from ..messages import Request, Told
from .base import Estimator, EstimatorInfo, Grads, Params
from .cge import CGE, CoordinateEstimator, CoordSpec, normalize_coords
from .registry import register_estimator

__all__ = ["masked", "chain", "clip_by_global_norm", "scale", "Masked", "SparseCGE", "Chain", "GradientTransform",
           "CoordSchedule"]


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
            name = getattr(getattr(inner, "info", None), "name", type(inner).__name__)
            raise ConfigError(f"masked() needs a coordinate-wise estimator such as 'cge', got {name!r} "
                              "(random directions touch every coordinate).")
        self.inner = inner
        self.schedule: Optional[CoordSchedule] = coords if hasattr(coords, "coords_at") else None  # type: ignore[assignment]
        self._initial = None if self.schedule is not None else coords
        self.dense = tuple(dense)

    @property
    def mu(self) -> float:
        return self.inner.mu

    @property
    def difference(self) -> str:
        return self.inner.difference

    def init(self, params: Params) -> MaskedState:
        return MaskedState(step=0, coords=normalize_coords(self._initial or {}, params))  # type: ignore[arg-type]

    def coords(self, params: Params, state: NamedTuple) -> dict[str, torch.Tensor]:
        """The coordinate set of the step ``state`` is about to take (``{name: flat indices}``)."""
        coords = self.schedule.coords_at(state.step) if self.schedule is not None else dict(state.coords)
        for n, p in params.items():
            if any(fnmatch.fnmatch(n, pat) for pat in self.dense):
                coords[n] = torch.arange(p.numel())
        return coords

    def ask(self, params: Params, state: NamedTuple) -> tuple[Request, NamedTuple]:
        return self.inner.ask_coords(params, self.coords(params, state), state)  # type: ignore[attr-defined]

    def tell(self, params: Params, request: Request, told: Told) -> Grads:
        return self.inner.tell(params, request, told)

    def step_info(self, params: Params, state: NamedTuple) -> dict[str, Any]:
        if self.schedule is None:
            return {}
        coords = self.coords(params, state)
        return {"sparsity_draw": self.schedule.draw_index(state.step),
                "coords": sum(int(v.numel()) for v in coords.values())}

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
        mu, difference: As :class:`~bbzo.estimators.base.FiniteDifferences`.
    """

    def __init__(self, coords: Optional[CoordSpec] = None, dense: Sequence[str] = (),
                 mu: float = 5e-3, difference: str = "forward") -> None:
        super().__init__(CGE(mu=mu, difference=difference), coords, dense)


def masked(inner: Estimator, coords: Union[CoordSpec, CoordSchedule], dense: Sequence[str] = ()) -> Masked:
    """``inner`` restricted to ``coords`` (a fixed set or a per-step schedule); see :class:`Masked`."""
    return Masked(inner, coords, dense)


# ---------------------------------------------------------------------------- gradient transforms
@dataclass(frozen=True)
class GradientTransform:
    """A pure function of the estimate applied after ``tell``: ``fn(grads, params) -> grads``."""

    name: str
    fn: Callable[[Grads, Params], Grads]

    def __call__(self, grads: Grads, params: Params) -> Grads:
        return self.fn(grads, params)


def _global_norm(grads: Mapping[str, torch.Tensor]) -> float:
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.detach().double().norm() for g in grads.values()])))


def clip_by_global_norm(max_norm: float) -> GradientTransform:
    """Scale the estimate down so that its global L2 norm is at most ``max_norm`` (torch's ``clip_grad_norm_`` rule)."""
    if not max_norm > 0:
        raise ConfigError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm}.")

    def clip(grads: Grads, params: Params) -> Grads:
        coef = float(max_norm) / (_global_norm(grads) + 1e-6)
        return {n: g * coef for n, g in grads.items()} if coef < 1.0 else grads

    return GradientTransform(f"clip_by_global_norm({max_norm})", clip)


def scale(factor: float) -> GradientTransform:
    """Multiply the estimate by ``factor``."""
    return GradientTransform(f"scale({factor})", lambda grads, params: {n: g * factor for n, g in grads.items()})


class Chain(Estimator):
    """``inner`` followed by gradient transforms, applied in order (optax's ``chain``). Same state as ``inner``."""

    def __init__(self, inner: Estimator, *transforms: GradientTransform) -> None:
        for t in transforms:
            if not isinstance(t, GradientTransform):
                raise ConfigError(f"chain(): {t!r} is not a gradient transform (clip_by_global_norm(...), scale(...)).")
        self.inner = inner
        self.transforms = tuple(transforms)

    @property
    def info(self) -> EstimatorInfo:  # type: ignore[override]
        return self.inner.info

    @property
    def State(self) -> type:  # type: ignore[override]
        return self.inner.State

    def init(self, params: Params) -> NamedTuple:
        return self.inner.init(params)

    def ask(self, params: Params, state: NamedTuple) -> tuple[Request, NamedTuple]:
        return self.inner.ask(params, state)

    def tell(self, params: Params, request: Request, told: Told) -> Grads:
        grads = self.inner.tell(params, request, told)
        for t in self.transforms:
            grads = t(grads, params)
        return grads

    def query_cost(self, params: Params, state: Optional[NamedTuple] = None) -> int:
        return self.inner.query_cost(params, state)

    def step_info(self, params: Params, state: NamedTuple) -> dict[str, Any]:
        return self.inner.step_info(params, state)

    def needs_output_width(self, state: NamedTuple) -> bool:
        return self.inner.needs_output_width(state)

    def with_output_width(self, state: NamedTuple, width: int) -> NamedTuple:
        return self.inner.with_output_width(state, width)

    def state_dict(self, state: Optional[NamedTuple]) -> dict[str, Any]:
        return self.inner.state_dict(state)

    def load_state(self, sd: Mapping[str, Any]) -> Optional[NamedTuple]:
        return self.inner.load_state(sd)

    def __repr__(self) -> str:
        return f"chain({self.inner!r}, {', '.join(t.name for t in self.transforms)})"


def chain(inner: Estimator, *transforms: GradientTransform) -> Chain:
    """``inner``'s estimate passed through ``transforms`` in order: ``chain(est, clip_by_global_norm(1.0))``."""
    return Chain(inner, *transforms)
