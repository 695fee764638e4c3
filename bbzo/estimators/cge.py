"""CGE: coordinate-wise finite differences (DeepZero Eq. (2)).

``g_i = (f(theta + mu e_i) - f(theta)) / mu`` for each coordinate ``i`` (forward), or
``(f(theta + mu e_i) - f(theta - mu e_i)) / (2 mu)`` (central). CGE estimates every coordinate of every
trainable parameter; ``masked(cge, coords)`` -- registered as ``sparse_cge`` -- only a coordinate set
per tensor, and returns zero elsewhere (DeepZero §4: the *gradient* is sparse, the model stays dense).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import torch

from ..errors import ConfigError, ShapeError
from ..probes import CoordinateProbes
from ..messages import Request, Told
from .base import EstimatorInfo, FiniteDifferences, Grads, Params
from .registry import register_estimator

__all__ = ["CGE", "CoordinateEstimator", "normalize_coords", "CoordSpec"]

CoordSpec = Mapping[str, torch.Tensor]


def normalize_coords(coords: CoordSpec, params: Params) -> dict[str, torch.Tensor]:
    """Turn ``{name: bool mask | flat indices}`` into ``{name: sorted unique int64 flat indices}``."""
    out: dict[str, torch.Tensor] = {}
    for name, spec in coords.items():
        if name not in params:
            raise ConfigError(
                f"coordinate set names parameter {name!r}, which is not trainable in this model. "
                f"Trainable parameters: {', '.join(list(params)[:8])}{' ...' if len(params) > 8 else ''}."
            )
        p = params[name]
        spec = torch.as_tensor(spec)
        if spec.dtype == torch.bool:
            if spec.shape != p.shape and spec.numel() != p.numel():
                raise ShapeError(f"mask for {name!r} has shape {tuple(spec.shape)}, parameter has {tuple(p.shape)}.")
            idx = spec.reshape(-1).nonzero().flatten()
        else:
            idx = torch.unique(spec.reshape(-1).to(torch.int64).cpu())
            if idx.numel() and (idx[0] < 0 or idx[-1] >= p.numel()):
                raise ShapeError(f"coordinate indices for {name!r} must lie in [0, {p.numel()}).")
        out[name] = idx.cpu()
    return out


class CGEState(NamedTuple):
    step: int


class CoordinateEstimator(FiniteDifferences):
    """Finite differences along coordinate axes; :meth:`ask_coords` takes an explicit coordinate set."""

    def coords(self, params: Params, state: NamedTuple) -> dict[str, torch.Tensor]:
        """The coordinate set of the step ``state`` is about to take (``{name: flat indices}``)."""
        raise NotImplementedError

    def ask(self, params: Params, state: NamedTuple) -> tuple[Request, NamedTuple]:
        return self.ask_coords(params, self.coords(params, state), state)

    def ask_coords(self, params: Params, coords: Mapping[str, torch.Tensor],
                   state: NamedTuple) -> tuple[Request, NamedTuple]:
        """The request for the coordinates ``coords`` (in parameter order), and the next state."""
        names = tuple(params)
        pidx, index = [], []
        for p, name in enumerate(names):
            idx = coords.get(name)
            if idx is None or idx.numel() == 0:
                continue
            pidx.append(torch.full((idx.numel(),), p, dtype=torch.int64))
            index.append(idx)
        pidx_t = torch.cat(pidx) if pidx else torch.zeros(0, dtype=torch.int64)
        index_t = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
        m = int(pidx_t.numel())
        if self.difference == "central":
            pidx_t, index_t = pidx_t.repeat(2), index_t.repeat(2)
        probes = CoordinateProbes(names, pidx_t, index_t, self._signed_deltas(m))
        return Request(probes, base=self.needs_base), state._replace(step=state.step + 1)

    def tell(self, params: Params, request: Request, told: Told) -> Grads:
        return self.coordinate_grads(params, request.probes, told.losses, told.base)

    def coordinate_grads(self, params: Params, probes: CoordinateProbes, losses: torch.Tensor,
                         base: Optional[torch.Tensor]) -> Grads:
        """``{name: gradient}`` with the finite difference of each probed coordinate, zero elsewhere."""
        m = len(probes) if self.difference == "forward" else len(probes) // 2
        if losses.shape != (len(probes),):
            raise ShapeError(f"{self.info.name}.tell: expected {len(probes)} losses, got shape {tuple(losses.shape)}.")
        d = self.differences(losses, base, m)
        names = probes.names
        flat = {n: torch.zeros(params[n].numel(), dtype=torch.float64) for n in names}
        pidx, index = probes.pidx[:m], probes.index[:m]
        for p, rows in CoordinateProbes(names, pidx, index, probes.delta[:m]).groups():
            flat[names[p]][index[rows]] = d[rows]
        return {n: flat[n].view(params[n].shape).to(device=params[n].device, dtype=params[n].dtype) for n in names}


@register_estimator
class CGE(CoordinateEstimator):
    """Coordinate-wise gradient estimate over every coordinate of every trainable parameter.

    Costs ``d + 1`` queries per step (forward) or ``2d`` (central), ``d`` = number of trainable scalars.

    Args:
        mu, difference: As :class:`~bbzo.estimators.base.FiniteDifferences`.
    """

    info = EstimatorInfo(
        name="cge",
        description="coordinate-wise finite differences over all d coordinates (DeepZero Eq. 2)",
        cost="d + 1 (forward) | 2d (central)",
        coordinatewise=True,
        supports_sparse=False,
    )
    State = CGEState

    def init(self, params: Params) -> CGEState:
        return CGEState(step=0)

    def coords(self, params: Params, state: NamedTuple) -> dict[str, torch.Tensor]:
        return {n: torch.arange(p.numel()) for n, p in params.items()}
