"""Sparsity from queries (DeepZero §4): pruning scores -> layer-wise ratios -> dynamic Sparse-CGE sets."""

from .lpr import KEEP_RULES, LayerRatios, ratios_from_scores, uniform_ratios
from .sampler import OTHERS, DynamicSparsity
from .recipe import dynamic_sparse_cge, layer_ratios, sparse_cge_from_score
from .scores import (ScoreInfo, ScoreResult, compute_score, list_scores, prunable_params, register_score,
                     score_accepts, score_options)

__all__ = [
    "LayerRatios", "ratios_from_scores", "uniform_ratios", "KEEP_RULES",
    "DynamicSparsity", "OTHERS", "layer_ratios", "dynamic_sparse_cge", "sparse_cge_from_score",
    "ScoreResult", "ScoreInfo", "compute_score", "list_scores", "register_score", "prunable_params",
    "score_accepts", "score_options",
]
