"""The numerics of a finite difference, as pure functions on arrays: noise level, step sweep, the "V" curve.

* :func:`ecnoise` -- the noise level of a function from values along a line (Moré & Wild, "Estimating
  computational noise", SIAM J. Sci. Comput. 33(3), 2011): the k-th differences of a smooth function at a tiny
  spacing vanish, those of noise do not; ``sqrt(gamma_k mean((Delta^k f)^2))`` with ``gamma_k = (k!)^2/(2k)!``
  estimates the noise's standard deviation once three consecutive orders agree within a factor 4 and the
  differences change sign. It finds round-off (a float32 simulator's answers move by a few ulps when its
  inputs move by a few ulps) as well as a stochastic simulator's noise.
* :func:`analyse_sweep` -- forward and central differences over a sweep of steps ``mu``: the reference
  derivative is the central difference at the step that balances its two errors, the round-off
  ``noise / mu`` and the truncation (estimated from the change between neighbouring steps, a Richardson
  estimate), and the forward difference's error against it over ``mu`` is the familiar "V": round-off on
  the left, truncation (curvature, kinks) on the right. The recommended step is the bottom of the V.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["mu_grid", "ecnoise", "analyse_sweep", "ECNOISE_POINTS"]

#: Points along the line for :func:`ecnoise` (Moré & Wild use 7-9).
ECNOISE_POINTS = 9


def mu_grid(lo: float = 1e-9, hi: float = 1e-1, per_decade: int = 2, include: Sequence[float] = ()) -> list[float]:
    """Geometric steps from ``lo`` to ``hi`` (``per_decade`` per factor 10), plus the ``include`` values, sorted."""
    if not 0 < lo < hi or per_decade < 1:
        raise ValueError(f"need 0 < lo < hi and per_decade >= 1, got {lo}, {hi}, {per_decade}")
    n = int(round(math.log10(hi / lo) * per_decade))
    grid = {float(f"{lo * 10 ** (i / per_decade):.3g}") for i in range(n + 1)}
    grid |= {float(v) for v in include if v > 0}
    return sorted(grid)


def ecnoise(values: np.ndarray) -> tuple[float, int]:
    """Noise level of ``values`` ``(nf,)`` (or ``(nf, S)``: each column alone) taken at equally spaced points.

    Returns ``(level, inform)`` as Moré & Wild's ``ecnoise.m``: ``inform`` 1 -- noise detected (``level`` is its
    standard deviation); 2 -- the spacing is too small (half the first differences are exactly zero: move
    farther apart); 3 -- the spacing is too large (no agreement of three orders, or the values vary by more
    than 10%: move closer). For ``(nf, S)`` input the level is the median over the columns that detected noise.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 2:
        found = [ecnoise(v[:, s]) for s in range(v.shape[1])]
        ok = [lvl for lvl, inf in found if inf == 1]
        if ok:
            return float(np.median(ok)), 1
        informs = [inf for _, inf in found]
        return 0.0, max(set(informs), key=informs.count)
    nf = v.shape[0]
    fmin, fmax = float(v.min()), float(v.max())
    scale = max(abs(fmin), abs(fmax))
    if scale > 0 and (fmax - fmin) / scale > 0.1:
        return 0.0, 3
    levels = np.zeros(nf - 1)
    signs = np.zeros(nf - 1, dtype=bool)
    gamma = 1.0
    d = v.copy()
    for j in range(1, nf):
        d = d[1:] - d[:-1]
        if j == 1 and int((d == 0).sum()) >= nf / 2:
            return 0.0, 2
        gamma *= 0.5 * j / (2 * j - 1)
        levels[j - 1] = math.sqrt(gamma * float(np.mean(d ** 2)))
        signs[j - 1] = float(d.min()) * float(d.max()) < 0
    for k in range(nf - 3):
        window = levels[k:k + 3]
        if window.max() <= 4 * window.min() and signs[k]:
            return float(levels[k]), 1
    return 0.0, 3


def _rel(err: np.ndarray, ref: np.ndarray) -> float:
    """``||err|| / ||ref||`` over the finite entries (``||err||`` alone when the reference is zero)."""
    keep = np.isfinite(err) & np.isfinite(ref)
    if not keep.any():
        return float("nan")
    num = float(np.linalg.norm(err[keep]))
    den = float(np.linalg.norm(ref[keep]))
    return num / den if den > 0 else num


def analyse_sweep(mus: Sequence[float], forward: np.ndarray, central: np.ndarray, noise: np.ndarray | float,
                  configured: Optional[float] = None, good_factor: float = 2.0, tolerance: float = 0.01) -> dict[str, Any]:
    """The "V" curve of a finite-difference sweep, the reference derivative and the recommended step.

    Args:
        mus: ``(H,)`` increasing steps.
        forward: ``(C, H, S)`` forward differences ``(f(x + mu e_c) - f(x)) / mu`` for ``C`` coordinates and ``S``
            outputs each (``S = 1`` for a mean loss; the per-sample losses for the chain-rule estimators);
            NaN where an evaluation failed.
        central: ``(C, H, S)`` central differences ``(f(x + mu e_c) - f(x - mu e_c)) / (2 mu)``.
        noise: Noise level of ``f`` (a float, or ``(S,)`` per output): the round-off or sampling noise.
        configured: The step the estimator is configured with (must be one of ``mus``), to judge.
        good_factor, tolerance: Steps whose error is within ``good_factor`` times the best, or within ``tolerance``
            (relative error) of it, are "good": a gradient 1% off its direction trains as well as an exact one.
            So are steps within twice the reference's own error bound of the best (indistinguishable; at most 0.2).

    Returns:
        A dict: ``reference`` ``(C, S)`` and its step and error bound per coordinate, ``forward_error`` and
        ``central_error`` ``(H,)`` (relative to the reference's norm over every coordinate and output),
        ``recommended_mu``, ``good_range``, and for ``configured`` its error and a ``side``: ``good``,
        ``round-off`` (too small) or ``truncation`` (too large).
    """
    mus_a = np.asarray(mus, dtype=np.float64)
    fwd = np.asarray(forward, dtype=np.float64)
    cen = np.asarray(central, dtype=np.float64)
    c_n, h_n, s_n = fwd.shape
    eps = np.broadcast_to(np.asarray(noise, dtype=np.float64), (s_n,))
    # the central difference's error at each step: round-off eps / mu (two values of noise eps over 2 mu), plus the
    # truncation, estimated by how much the difference moves from the neighbouring smaller step (Richardson)
    change = np.full((c_n, h_n, s_n), np.inf)
    change[:, 1:] = np.abs(cen[:, 1:] - cen[:, :-1])
    change[:, 0] = change[:, 1] if h_n > 1 else 0.0
    bound = eps[None, None, :] / mus_a[None, :, None] + change  # (C, H, S)
    per_step = np.where(np.isfinite(bound), bound, np.inf).sum(axis=2)  # (C, H): summed over the outputs
    per_step[~np.isfinite(cen).all(axis=2)] = np.inf
    best = per_step.argmin(axis=1)  # (C,)
    ref = cen[np.arange(c_n), best]  # (C, S)
    ref_bound = bound[np.arange(c_n), best]  # (C, S)
    f_err = np.array([_rel(fwd[:, h] - ref, ref) for h in range(h_n)])
    c_err = np.array([_rel(cen[:, h] - ref, ref) for h in range(h_n)])
    finite = np.isfinite(f_err)
    if not finite.any():
        return {"mus": mus_a.tolist(), "forward_error": f_err.tolist(), "central_error": c_err.tolist(),
                "reference": ref.tolist(), "reference_mu": mus_a[best].tolist(), "recommended_mu": None,
                "good_range": None, "min_error": None, "reference_error": None}
    i_best = int(np.nanargmin(np.where(finite, f_err, np.nan)))
    e_best = float(f_err[i_best])
    ref_err = _rel(ref_bound, ref)
    ref_err = ref_err if math.isfinite(ref_err) else 0.0
    # errors closer than the reference's own uncertainty cannot be told apart: they are good too
    good = finite & (f_err <= max(good_factor * e_best, e_best + tolerance, e_best + 2 * min(ref_err, 0.1)))
    lo = hi = i_best  # the contiguous good run around the best step
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < h_n - 1 and good[hi + 1]:
        hi += 1
    out: dict[str, Any] = {
        "mus": mus_a.tolist(), "forward_error": f_err.tolist(), "central_error": c_err.tolist(),
        "reference": ref.tolist(), "reference_mu": mus_a[best].tolist(),
        "reference_error": ref_err,
        "recommended_mu": float(mus_a[i_best]), "min_error": e_best,
        "good_range": [float(mus_a[lo]), float(mus_a[hi])],
        "failed_from_mu": next((float(m) for m, ok in zip(mus_a, np.isfinite(fwd).all(axis=(0, 2))) if not ok), None),
    }
    if configured is not None:
        i = int(np.argmin(np.abs(np.log(mus_a / configured))))
        err = float(f_err[i])
        side = "good" if lo <= i <= hi else ("round-off" if i < lo else "truncation")
        if not np.isfinite(err):
            side = "failed"
        # the round-off part of the forward error at the configured step: two values of noise eps over mu
        roundoff = _rel(np.broadcast_to(2 * eps / configured, ref.shape), ref)
        out["configured"] = {"mu": float(configured), "error": err, "side": side, "roundoff_error": roundoff,
                             "vs_best": err / e_best if e_best > 0 else float("inf")}
    return out
