"""The values one step passes along its pipeline (:mod:`bbzo.step`): plain data, no behaviour beyond their own.

* :class:`Request` -- estimator -> executor: which probes (and base, white-box gradient) to evaluate;
* :class:`Evaluation` -- executor -> failure policy: what the evaluators answered, over every shard;
* :class:`Told` -- failure policy -> estimator: the losses on the samples kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional

import torch

from .errors import ConfigError
from .ledger import Spent
from .probes import Probes

__all__ = ["Request", "Evaluation", "Told", "GRADIENT_KINDS", "Grads"]

Grads = dict[str, torch.Tensor]

#: White-box gradients an estimator may ask for: ``objective`` -- autograd through the model *and* the
#: objective (first-order references only); ``surrogate`` -- autograd through the objective's stop-gradient
#: surrogate (:attr:`bbzo.objective.Objective.surrogate`: black-box calls enter as constants).
GRADIENT_KINDS = ("objective", "surrogate")


@dataclass(frozen=True)
class Request:
    """What an estimator asks to have evaluated in one step.

    Attributes:
        probes: Perturbations to evaluate (:mod:`bbzo.probes`), or None.
        base: Also the loss at the unperturbed parameters (one query).
        per_sample: ``tell`` needs the per-sample losses ``(M, B)``, not only their means (the chain rule).
        gradient: A white-box gradient (one of :data:`GRADIENT_KINDS`) or None. ``surrogate`` doubles as
            the base query: its forward pass is the unperturbed loss.
        context: ``() -> context manager`` entered around that gradient's backward pass.
    """

    probes: Optional[Probes] = None
    base: bool = False
    per_sample: bool = False
    gradient: Optional[str] = None
    context: Optional[Callable[[], ContextManager[Any]]] = None

    def __post_init__(self) -> None:
        if self.gradient is not None and self.gradient not in GRADIENT_KINDS:
            raise ConfigError(f"Request.gradient must be one of {GRADIENT_KINDS} or None, got {self.gradient!r}.")

    @property
    def num_probes(self) -> int:
        return 0 if self.probes is None else len(self.probes)

    @property
    def has_base(self) -> bool:
        """Whether the evaluation holds unperturbed losses (asked for, or the surrogate's forward)."""
        return self.base or self.gradient == "surrogate"

    @property
    def cost(self) -> int:
        """Queries: one per probe, one for the base (parameter-set evaluations of the minibatch loss)."""
        return self.num_probes + (1 if self.has_base else 0)


@dataclass
class Evaluation:
    """What the evaluators answered for one :class:`Request`, assembled over every shard in probe order.

    Attributes:
        losses: ``(M,)`` float64 mean loss of each probe over the minibatch (NaN where a row failed).
        per_sample: ``(M, B)`` float64 per-sample losses when the request or the failure policy needs them.
        base: ``(B,)`` float64 per-sample losses at the unperturbed parameters (if asked for).
        grads: The white-box gradient asked for (``{name: tensor}``), or None.
        direct_loss: ``(B,)`` per-sample losses of that gradient's forward pass (``objective`` kind).
        pullback: For :class:`~bbzo.probes.OutputProbes`: ``cotangent (B, width) -> grads`` of
            ``sum_i cotangent_i . f_theta(x_i)`` (autograd through the white-box model only).
        spent: Queries and oracle rows/calls this evaluation spent, summed over every process.
        calls: Batched calls of the objective, summed over every process.
        busy: Seconds each process spent evaluating; ``sizes``: probes each process evaluated.
    """

    losses: torch.Tensor
    per_sample: Optional[torch.Tensor] = None
    base: Optional[torch.Tensor] = None
    grads: Optional[Grads] = None
    direct_loss: Optional[torch.Tensor] = None
    pullback: Optional[Callable[[torch.Tensor], Grads]] = None
    spent: Spent = field(default_factory=Spent)
    calls: int = 0
    busy: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


@dataclass
class Told:
    """What an estimator is told: the evaluation after the failure policy, on the samples kept.

    Attributes:
        losses: ``(M,)`` float64 mean probe losses over the kept samples (failed rows resolved).
        base: float64 scalar mean base loss over the kept samples, or None.
        per_sample: ``(M, B)`` per-sample probe losses (dropped samples' columns are 0), when asked for.
        base_per_sample: ``(B,)`` likewise for the base.
        keep: ``(B,)`` bool: the samples the step uses.
        grads, pullback: As :class:`Evaluation`.
        loss: The loss at the unperturbed parameters (the mean probe loss for central differences).
        failed_rows, dropped_samples, penalized_rows: What the failure policy did this step.
    """

    losses: torch.Tensor
    base: Optional[torch.Tensor]
    per_sample: Optional[torch.Tensor]
    base_per_sample: Optional[torch.Tensor]
    keep: torch.Tensor
    grads: Optional[Grads]
    pullback: Optional[Callable[[torch.Tensor], Grads]]
    loss: float
    failed_rows: int = 0
    dropped_samples: int = 0
    penalized_rows: int = 0

    @property
    def kept(self) -> int:
        return int(self.keep.sum())
