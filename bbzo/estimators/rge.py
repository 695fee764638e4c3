"""RGE: randomized gradient estimate along q random directions (DeepZero Eq. (1)).

``g = (1/q) sum_k (f(theta + mu u_k) - f(theta)) / mu * u_k`` (forward) or with the central difference
``(f(theta + mu u_k) - f(theta - mu u_k)) / (2 mu)``. Directions have ``E[u u^T] = I`` (Gaussian, or
uniform on the sphere of radius sqrt(d)), so the estimate is unbiased for the smoothed loss.
``tensor_sphere`` (each tensor's block of unit norm, DeepZero's ZO-GraSP directions) is not isotropic:
its estimate is ``blockdiag(I / d_l) g`` in expectation, a per-tensor rescaled gradient.
Directions are regenerated from a per-step seed, never stored.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from ..errors import ConfigError, ShapeError
from ..probes import DISTRIBUTIONS, DirectionProbes, make_directions
from ..messages import Request, Told
from .base import EstimatorInfo, FiniteDifferences, Grads, Params
from .registry import register_estimator

__all__ = ["RGE", "combine_directions"]


class RGEState(NamedTuple):
    seed: int
    step: int


@register_estimator
class RGE(FiniteDifferences):
    """Randomized gradient estimate with ``q`` directions per step.

    Args:
        q: Directions per step (default ``d``, the number of trainable scalars: the same queries per
            step as CGE, the comparison DeepZero's Fig. 2 makes).
        distribution: ``"gaussian"`` (u ~ N(0, I)), ``"sphere"`` (uniform, radius sqrt(d)) or
            ``"tensor_sphere"`` (unit norm per tensor; not isotropic, see the module docstring).
        seed: Seed of the direction stream; step ``t`` uses directions derived from ``(seed, t)``.
        seeding: ``"per_step"`` (default: a fresh stream each step, derived from ``(seed, t)``) or
            ``"given"`` (``seed`` itself seeds the directions: one estimate whose directions the caller
            chose, as ZO-GraSP's two estimates with seeds ``2s`` and ``2s + 1``).
        mu, difference: as :class:`~bbzo.estimators.base.Estimator`.

    Costs ``q + 1`` queries per step (forward) or ``2q`` (central).
    """

    info = EstimatorInfo(
        name="rge",
        description="randomized finite differences along q Gaussian/sphere directions (DeepZero Eq. 1)",
        cost="q + 1 (forward) | 2q (central)",
        coordinatewise=False,
        supports_sparse=False,
    )
    State = RGEState

    def __init__(self, q: Optional[int] = None, distribution: str = "gaussian", seed: int = 0,
                 mu: float = 5e-3, difference: str = "forward", seeding: str = "per_step") -> None:
        super().__init__(mu=mu, difference=difference)
        if q is not None and q < 1:
            raise ConfigError(f"rge: q must be >= 1, got {q}.")
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(f"rge: distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}.")
        if seeding not in ("per_step", "given"):
            raise ConfigError(f"rge: seeding must be 'per_step' or 'given', got {seeding!r}.")
        self.q = int(q) if q is not None else None
        self.distribution = distribution
        self.seed = int(seed)
        self.seeding = seeding

    def init(self, params: Params) -> RGEState:
        return RGEState(seed=self.seed, step=0)

    def _step_seed(self, state: RGEState) -> int:
        if self.seeding == "given":
            return int(state.seed)
        return int(np.random.SeedSequence([state.seed, state.step, 0x5EED]).generate_state(1)[0])

    def directions(self, params: Params) -> int:
        """``q``: as given, or ``d`` (the trainable scalars: the same queries per step as CGE)."""
        return self.q if self.q is not None else sum(int(p.numel()) for p in params.values())

    def ask(self, params: Params, state: RGEState) -> tuple[Request, RGEState]:
        q = self.directions(params)
        dirs = torch.arange(q, dtype=torch.int64)
        if self.difference == "central":
            dirs = dirs.repeat(2)
        probes = DirectionProbes(
            names=tuple(params),
            shapes=tuple(p.shape for p in params.values()),
            seed=self._step_seed(state),
            dirs=dirs,
            delta=self._signed_deltas(q),
            distribution=self.distribution,
        )
        return Request(probes, base=self.needs_base), state._replace(step=state.step + 1)

    def tell(self, params: Params, request: Request, told: Told) -> Grads:
        probes, losses = request.probes, told.losses
        if losses.shape != (len(probes),):
            raise ShapeError(f"rge.tell: expected {len(probes)} losses, got shape {tuple(losses.shape)}.")
        q = len(probes) if self.difference == "forward" else len(probes) // 2
        coef = self.differences(losses, told.base, q) / q
        return {n: a.to(device=params[n].device, dtype=params[n].dtype)
                for n, a in zip(probes.names, combine_directions(probes, coef))}


#: Directions regenerated per block when an estimate is combined (bounds the ``(block, d)`` float64 matrix).
COMBINE_BLOCK_BYTES = 64 * 2**20


def combine_directions(probes: DirectionProbes, coef: torch.Tensor) -> list[torch.Tensor]:
    """``sum_k coef[k] u_k`` over directions ``k = 0..q-1`` of ``probes``' step, as float64 tensors of the parameters'
    shapes: the directions are regenerated in blocks (:func:`~bbzo.probes.make_directions`) and combined by one
    matrix-vector product per block."""
    sizes = [int(torch.Size(s).numel()) for s in probes.shapes]
    d, q = sum(sizes), int(coef.numel())
    block = max(1, min(q, COMBINE_BLOCK_BYTES // max(1, 8 * d)))
    acc = torch.zeros(d, dtype=torch.float64)
    coef = coef.to(torch.float64)
    for a in range(0, q, block):
        b = min(q, a + block)
        u = make_directions(probes.seed, range(a, b), probes.shapes, probes.distribution)  # (block, d)
        acc.addmv_(u.T, coef[a:b])
    return [t.view(s) for t, s in zip(acc.split(sizes), probes.shapes)]
