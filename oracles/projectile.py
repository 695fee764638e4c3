"""A black-box projectile simulator (numpy): launch parameters in, landing point out.

Explicit time stepping with quadratic air drag and horizontal wind, stopped at the first ground
crossing (linear interpolation inside the last step). It is written in numpy on purpose: nothing
can differentiate through it, so the only way to train a network that feeds it is to query it.

Input row: ``(angle [rad], speed [m/s], drag k [1/m], wind [m/s])``.
Output row: ``(landing distance x [m], flight time [s])``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from bbzo.oracle import Oracle

__all__ = ["ProjectileOracle", "simulate", "trajectories"]

G = 9.81


def _step(x, y, vx, vy, k, wind, dt):
    rvx = vx - wind
    speed = np.sqrt(rvx * rvx + vy * vy)
    vx = vx - dt * k * speed * rvx
    vy = vy - dt * (G + k * speed * vy)
    return x + dt * vx, y + dt * vy, vx, vy


def simulate(rows: np.ndarray, dt: float = 0.02, t_max: float = 8.0) -> np.ndarray:
    """``rows`` ``(N, 4)`` -> ``(N, 2)`` landing distance and flight time (float64)."""
    rows = np.asarray(rows, dtype=np.float64)
    angle, speed, k, wind = rows.T
    x = np.zeros(len(rows)); y = np.zeros(len(rows))
    vx, vy = speed * np.cos(angle), speed * np.sin(angle)
    land_x = np.full(len(rows), np.nan); land_t = np.full(len(rows), np.nan)
    alive = np.ones(len(rows), dtype=bool)
    t = 0.0
    for _ in range(int(t_max / dt)):
        nx, ny, vx, vy = _step(x, y, vx, vy, k, wind, dt)
        t += dt
        hit = alive & (ny < 0) & (t > dt)
        if hit.any():
            frac = y[hit] / (y[hit] - ny[hit])
            land_x[hit] = x[hit] + frac * (nx[hit] - x[hit])
            land_t[hit] = t - dt + frac * dt
            alive &= ~hit
        x, y = nx, ny
        if not alive.any():
            break
    # still flying at t_max: report where it is (a finite, clearly bad answer)
    land_x[alive], land_t[alive] = x[alive], t_max
    return np.stack([land_x, land_t], axis=1)


def trajectories(rows: np.ndarray, dt: float = 0.02, t_max: float = 8.0) -> list[np.ndarray]:
    """Flight paths ``[(T_i, 2)]`` for plotting (not used in training)."""
    out = []
    for r in np.asarray(rows, dtype=np.float64):
        angle, speed, k, wind = r
        x = y = 0.0
        vx, vy = speed * np.cos(angle), speed * np.sin(angle)
        pts = [(0.0, 0.0)]
        for _ in range(int(t_max / dt)):
            x, y, vx, vy = _step(x, y, vx, vy, k, wind, dt)
            pts.append((x, max(y, 0.0)))
            if y < 0:
                break
        out.append(np.array(pts))
    return out


class ProjectileOracle(Oracle):
    """The simulator as a query-only oracle: ``(N, 4)`` launch rows -> ``(N, 2)`` landing rows."""

    def __init__(self, dt: float = 0.02, t_max: float = 8.0, *, max_rows: Optional[int] = None,
                 name: str = "projectile-sim") -> None:
        super().__init__(name=name, max_rows=max_rows, input_shape=(4,), output_shape=(2,))
        self.dt, self.t_max = dt, t_max

    def _query(self, inputs: torch.Tensor) -> torch.Tensor:
        out = simulate(inputs.detach().cpu().numpy(), self.dt, self.t_max)
        return torch.from_numpy(out).to(device=inputs.device, dtype=inputs.dtype)
