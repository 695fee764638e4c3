"""Gradient estimators (registered by name) and the transforms that wrap them."""

from .base import Estimator, EstimatorInfo, FiniteDifferences
from .cge import CGE, CoordinateEstimator, normalize_coords
from .rge import RGE
from .autograd import Autograd
from .chain import OracleCGE, OracleRGE
from .transforms import (Chain, GradientTransform, Masked, SparseCGE, chain, clip_by_global_norm, masked, scale)
from .hybrid import Hybrid, HybridCGE, hybrid
from .registry import create_estimator, get_estimator_class, list_estimators, register_estimator

__all__ = [
    "Estimator", "EstimatorInfo", "FiniteDifferences", "CGE", "SparseCGE", "RGE", "Autograd", "OracleCGE",
    "OracleRGE", "HybridCGE", "Hybrid", "CoordinateEstimator", "normalize_coords",
    "Masked", "Chain", "GradientTransform", "masked", "chain", "clip_by_global_norm", "scale", "hybrid",
    "create_estimator", "get_estimator_class", "list_estimators", "register_estimator",
]
