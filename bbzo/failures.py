"""What to do with rows a black box cannot answer (no convergence, "timestep too small", NaN).

A :class:`FailurePolicy` is given to the trainer (``bbzo train --on-oracle-error``):

* ``stop`` (the default) -- the run ends with an :class:`~bbzo.errors.OracleError` naming the rows;
* ``penalize`` -- a failed row's per-sample loss becomes ``penalty``, in every query alike;
* ``skip`` -- the samples with a failed row in *any* query of the step are dropped from the step for
  **every** perturbation (and the base), so the finite differences stay consistent: the step is
  evaluated again on the remaining samples (those queries are charged too).

Oracles attached to a run with ``penalize`` or ``skip`` answer failed rows with NaN instead of raising
(:attr:`bbzo.oracle.Oracle.allow_nonfinite`); an external program may also report rows it could not
answer (``ok <n> <d_out> failed=3,17``, protocol v1, backward compatible).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConfigError

__all__ = ["FailurePolicy", "SkipSamples", "POLICIES"]

POLICIES = ("stop", "penalize", "skip")


class SkipSamples(Exception):
    """Internal: samples of the bound minibatch to drop before the step is evaluated again."""

    def __init__(self, samples: torch.Tensor) -> None:
        super().__init__(f"{samples.numel()} samples failed")
        self.samples = samples


@dataclass
class FailurePolicy:
    """``mode`` (stop / penalize / skip) and ``penalty``; counts what it did this step and in all."""

    mode: str = "stop"
    penalty: float = 1e6
    failed_rows: int = 0  # this step
    skipped_samples: int = 0  # this step
    total_failed_rows: int = field(default=0)
    total_skipped_samples: int = field(default=0)

    def __post_init__(self) -> None:
        if self.mode not in POLICIES:
            raise ConfigError(f"--on-oracle-error must be one of {', '.join(POLICIES)}, got {self.mode!r}.")

    @property
    def tolerant(self) -> bool:
        return self.mode != "stop"

    def new_step(self) -> None:
        self.failed_rows = self.skipped_samples = 0

    def record_skip(self, n: int) -> None:
        """``n`` samples were dropped from this step (``skip``)."""
        self.skipped_samples += n
        self.total_skipped_samples += n

    def apply(self, per_sample: torch.Tensor, k: int, batch: int) -> torch.Tensor:
        """``(K*B,)`` per-sample losses with NaN/inf where rows failed -> what the policy makes of them."""
        bad = ~torch.isfinite(per_sample)
        if not bool(bad.any()) or self.mode == "stop":
            return per_sample
        n_bad = int(bad.sum())
        self.failed_rows += n_bad
        self.total_failed_rows += n_bad
        if self.mode == "penalize":
            return torch.where(bad, torch.full_like(per_sample, self.penalty), per_sample)
        samples = bad.view(k, batch).any(0).nonzero().flatten()
        raise SkipSamples(samples)
