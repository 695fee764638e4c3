"""Model adapters: batched perturbation evaluation, with feature reuse for staged models."""

from .common import Adapter, Evaluator, frozen_bn_stats
from .functional import FunctionalAdapter
from .loop import LoopAdapter
from .staged import Fork, Merge, OnFirst, StagedAdapter, make_adapter, model_stages

__all__ = [
    "Adapter", "Evaluator", "FunctionalAdapter", "LoopAdapter", "StagedAdapter", "make_adapter", "model_stages",
    "Fork", "OnFirst", "Merge", "frozen_bn_stats",
]
