"""Black-box oracles shipped with bbzo (installed as ``bbzo.oracles``)."""

from .projectile import ProjectileOracle, simulate, trajectories

__all__ = ["ProjectileOracle", "simulate", "trajectories"]
