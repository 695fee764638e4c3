"""What to do with rows a black box cannot answer (no convergence, "timestep too small", NaN).

A :class:`FailurePolicy` is a setting of the run (``bbzo train --on-oracle-error``); the training step hands
it the step's :class:`~bbzo.messages.Evaluation` and it returns what the estimator is told
(:meth:`FailurePolicy.resolve`, a pure function: counts come back in the result, nothing is mutated).
Under ``penalize`` and ``skip`` the oracles answer a row they cannot produce with NaN
(:func:`bbzo.oracle.answering_failures_with_nan`); an external program may also report rows it could not
answer (``ok <n> <d_out> failed=3,17``, protocol v1, backward compatible). A *failed entry* is one
(probe, sample) pair whose loss is not finite.

* ``stop`` (the default) -- the run ends with an :class:`~bbzo.errors.OracleError` naming the rows;
* ``skip`` -- the samples with a failed entry in *any* probe of the step (or in the base) are dropped from
  the step for **every** probe and the base, so the finite differences stay consistent; the step uses the
  other samples (no query is repeated);
* ``penalize`` -- a failed entry is replaced by a loss that looks **uphill** from the base, as steep as the
  steepest answered entry along the same probe times ``penalty`` (default 1):
  ``loss_ik = base_i + |delta_k| * penalty * max_j |loss_jk - base_j| / |delta_k|``. The finite difference
  of a penalized entry is therefore bounded by the differences the black box really produced -- a fixed
  loss (say 1,000) divided by ``mu = 1e-3`` would be 1e6 and swamp the gradient. A sample whose *base*
  failed but some probes were answered gets a base just uphill of its highest answered probe, so those
  directions lead out of the failing region; a sample with no answered entry at all carries no information
  and is dropped as under ``skip``. Penalizing needs the base losses: an estimator with central differences
  gets the base query too (one more query per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import ConfigError, NonFiniteError, OracleError
from .messages import Told

__all__ = ["FailurePolicy", "POLICIES"]

POLICIES = ("stop", "penalize", "skip")


def _count(mask: Optional[torch.Tensor]) -> int:
    return 0 if mask is None else int(mask.sum())


@dataclass(frozen=True)
class FailurePolicy:
    """``mode`` (stop / penalize / skip) and, for ``penalize``, the slope multiplier ``penalty``."""

    mode: str = "stop"
    penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ConfigError(f"--on-oracle-error must be one of {', '.join(POLICIES)}, got {self.mode!r}.")
        if not self.penalty > 0:
            raise ConfigError(f"--oracle-error-penalty must be > 0 (a multiple of the steepest answered slope), "
                              f"got {self.penalty}.")

    @property
    def tolerant(self) -> bool:
        """Whether failed rows are resolved (``penalize`` / ``skip``) instead of stopping the run."""
        return self.mode != "stop"

    def resolve(self, ev: Any, request: Any) -> Any:
        """The :class:`~bbzo.messages.Told` of an evaluation: failed entries resolved by the policy, means over
        the samples kept. Raises for ``stop`` (or when nothing is left to estimate from)."""

        per, base_ps = ev.per_sample, ev.base
        if ev.direct_loss is not None and not bool(torch.isfinite(ev.direct_loss).all()):
            raise NonFiniteError(f"the loss of the white-box gradient pass is NaN/inf for "
                                 f"{_count(~torch.isfinite(ev.direct_loss))} samples: check the model's outputs and "
                                 "the loss (log(0), division by zero), or use float64.")
        if ev.grads is not None and not all(bool(torch.isfinite(g).all()) for g in ev.grads.values()):
            raise NonFiniteError("the white-box gradient is NaN/inf: check the model and the loss, or use float64.")
        batch = (per.shape[1] if per is not None else base_ps.numel() if base_ps is not None
                 else ev.direct_loss.numel() if ev.direct_loss is not None else 0)
        keep = torch.ones(batch, dtype=torch.bool)
        if not self.tolerant or per is None:
            return self._strict(ev, request, keep)
        bad = ~torch.isfinite(per)
        base_bad = ~torch.isfinite(base_ps) if base_ps is not None else torch.zeros(batch, dtype=torch.bool)
        failed = _count(bad) + _count(base_bad)
        penalized = 0
        if self.mode == "penalize" and bool(bad.any() | base_bad.any()):
            assert base_ps is not None and request.probes is not None  # the step asks for both under penalize
            per, base_ps, penalized, drop = self._penalize(per, base_ps, bad, base_bad, request.probes.delta)
        else:
            drop = bad.any(0) | base_bad
        keep = ~drop
        if not bool(keep.any()):
            why = ("every sample has an entry the black box could not answer" if self.mode == "skip" else
                   "the black box answered no row of any sample")
            raise OracleError(f"{why} ({failed} failed entries in this step): nothing is left to estimate from. Check "
                              "the model's outputs (are they in the simulator's valid range?) and the data"
                              + (", or use --on-oracle-error penalize." if self.mode == "skip" else "."))
        kept = per[:, keep]
        losses = kept.mean(1)
        base = base_ps[keep].mean() if base_ps is not None else None
        zero = torch.zeros((), dtype=per.dtype)
        return Told(losses=losses, base=base,
                    per_sample=torch.where(keep[None, :], per, zero) if request.per_sample else None,
                    base_per_sample=torch.where(keep, base_ps, zero) if base_ps is not None else None,
                    keep=keep, grads=ev.grads, pullback=ev.pullback,
                    loss=float(base) if base is not None else float(losses.mean()) if losses.numel() else float("nan"),
                    failed_rows=failed, dropped_samples=_count(drop), penalized_rows=penalized)

    def _penalize(self, per: torch.Tensor, base: torch.Tensor, bad: torch.Tensor, base_bad: torch.Tensor,
                  delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """``(per, base, penalized entries, dropped samples)`` with every failed entry replaced (module docstring).

        A failed *base* with answered probes is put uphill of its highest answered probe (so the answered directions
        lead out of the failing region); a sample with no answered entry at all carries no information and is dropped.
        """
        step = delta.abs().to(per.dtype)[:, None]  # (M, 1)
        ok = ~bad & ~base_bad[None, :]
        zero = torch.zeros_like(per)
        slope = torch.where(ok, (per - torch.where(base_bad, zero[0], base)) / step, zero).abs()  # (M, B)
        overall = float(slope.max()) if slope.numel() else 0.0
        steepest = torch.where(ok.any(1), slope.amax(1), torch.full_like(slope[:, 0], overall)) * self.penalty
        answered = ~bad
        lift = base_bad & answered.any(0)
        if bool(lift.any()):
            top = torch.where(answered, per, torch.full_like(per, -float("inf"))).amax(0)
            base = torch.where(lift, top + float(step.min()) * self.penalty * overall, base)
        drop = base_bad & ~answered.any(0)
        hit = bad & ~drop[None, :]
        per = torch.where(hit, base[None, :] + step * steepest[:, None], per)
        return per, base, _count(hit) + _count(lift), drop

    def _strict(self, ev: Any, request: Any, keep: torch.Tensor) -> Any:
        """``stop``: every loss must be finite (a failed oracle row has already raised; NaN here is the loss's)."""

        losses, base_ps = ev.losses, ev.base
        bad = ~torch.isfinite(losses)
        if bool(bad.any()) or (base_ps is not None and not bool(torch.isfinite(base_ps).all())):
            where = (f"{_count(bad)} of {losses.numel()} perturbed parameter sets" if bool(bad.any())
                     else "the unperturbed parameters")
            raise NonFiniteError(
                f"the loss is NaN/inf for {where}. The model or the loss overflowed: lower mu, check the loss for "
                "log(0) / division by zero, or use float64. (If the black box itself cannot answer some rows, "
                "--on-oracle-error skip|penalize carries on without them.)")
        base = base_ps.mean() if base_ps is not None else None
        if base is not None:
            loss = float(base)
        elif ev.direct_loss is not None:
            loss = float(ev.direct_loss.mean())
        else:
            loss = float(losses.mean()) if losses.numel() else float("nan")
        return Told(losses=losses, base=base, per_sample=ev.per_sample if request.per_sample else None,
                    base_per_sample=base_ps, keep=keep, grads=ev.grads, pullback=ev.pullback, loss=loss)
