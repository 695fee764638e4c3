"""Sparsity from queries (DeepZero §4): pruning scores -> layer-wise ratios -> dynamic Sparse-CGE sets."""

from .lpr import KEEP_RULES, LayerRatios, ratios_from_scores, uniform_ratios
from .sampler import OTHERS, DynamicSparsity
from .scores import (ScoreInfo, ScoreResult, compute_score, list_scores, prunable_params, register_score,
                     score_accepts, score_options)

__all__ = [
    "LayerRatios", "ratios_from_scores", "uniform_ratios", "KEEP_RULES",
    "DynamicSparsity", "OTHERS",
    "ScoreResult", "ScoreInfo", "compute_score", "list_scores", "register_score", "prunable_params",
    "score_accepts", "score_options",
]
