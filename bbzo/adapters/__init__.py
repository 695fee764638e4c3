"""Model adapters: batched perturbation evaluation, with feature reuse for staged models.

* :class:`FunctionalAdapter` -- any ``nn.Module`` (``torch.func.vmap`` over stacked parameter sets);
* :class:`StagedAdapter` -- staged models (:mod:`bbzo.stages`): stage-level feature reuse and the
  Conv2d/Linear linear delta (:mod:`bbzo.adapters.linear_delta`);
* :class:`LoopAdapter` -- a model called inside a black-box loop (solver in the loop).

:func:`make_adapter` picks the best one for a model.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..errors import ConfigError, InefficientSettingsWarning
from ..stages import Fork, Merge, OnFirst, model_stages
from .common import Adapter, Evaluator, frozen_bn_stats
from .functional import FunctionalAdapter
from .loop import LoopAdapter
from .staged import StagedAdapter

__all__ = [
    "Adapter", "Evaluator", "FunctionalAdapter", "LoopAdapter", "StagedAdapter", "make_adapter", "model_stages",
    "Fork", "OnFirst", "Merge", "frozen_bn_stats",
]


def make_adapter(model: nn.Module, feature_reuse: Any = "auto", **kw: Any) -> Adapter:
    """The best adapter for ``model``.

    Args:
        feature_reuse: ``"auto"`` (reuse when the model is staged), ``True`` (require it) or ``False``.
        **kw: ``max_chunk_bytes`` / ``max_chunk`` (and ``linear_shortcut`` for a staged model).
    """
    if feature_reuse not in (False, "auto", True):
        raise ConfigError(f"feature_reuse must be 'auto', True or False, got {feature_reuse!r}.")
    staged = model_stages(model) is not None
    if feature_reuse is True or (feature_reuse == "auto" and staged):
        return StagedAdapter(model, **kw)
    if feature_reuse is False and staged:
        warnings.warn(
            f"{type(model).__name__} is staged but feature_reuse=False: coordinate probes will run the "
            "whole model. Use feature_reuse='auto' unless you are measuring the difference.",
            InefficientSettingsWarning, stacklevel=2,
        )
    kw.pop("linear_shortcut", None)
    return FunctionalAdapter(model, **kw)
