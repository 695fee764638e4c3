"""The first-order reference: backpropagation through the model *and* the objective.

Not a zeroth-order estimator and not applicable to a black box: it differentiates the loss, so the
objective must be white-box (an :class:`~bbzo.oracle.Oracle` refuses inputs that require grad and the
run fails with that message). It exists so that first-order baselines -- FO-SOL through PhiFlow's
torch backend, supervised NON, FO training of a classifier -- run through the same
:class:`~bbzo.trainer.Trainer`, checkpoints, ledger and logs as the zeroth-order methods, and say so:
``info.zeroth_order`` is False.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, NamedTuple, Optional

from ..errors import ConfigError
from ..messages import Request, Told
from .base import Estimator, EstimatorInfo, Grads, Params
from .registry import register_estimator

__all__ = ["Autograd"]


class AutogradState(NamedTuple):
    step: int


@register_estimator
class Autograd(Estimator):
    """Exact gradient by autograd (white-box reference, 0 queries).

    Args:
        context: Optional ``() -> context manager`` entered around the backward pass (e.g. PhiFlow's
            ``TORCH`` backend context, so the adjoint solve builds torch tensors).
    """

    info = EstimatorInfo(
        name="autograd",
        description="first-order reference: backpropagation through model and objective (white-box, not ZO)",
        cost="0 (one forward + backward)",
        coordinatewise=False,
        supports_sparse=False,
        zeroth_order=False,
    )
    State = AutogradState

    def __init__(self, context: Optional[Callable[[], ContextManager[Any]]] = None) -> None:
        if context is not None and not callable(context):
            raise ConfigError("autograd: context must be a callable returning a context manager.")
        self.context = context or contextlib.nullcontext

    def init(self, params: Params) -> AutogradState:
        return AutogradState(step=0)

    def ask(self, params: Params, state: NamedTuple) -> tuple[Request, NamedTuple]:
        return Request(gradient="objective", context=self.context), state._replace(step=state.step + 1)

    def tell(self, params: Params, request: Request, told: Told) -> Grads:
        assert told.grads is not None  # the step evaluates what the request asks for
        return dict(told.grads)
