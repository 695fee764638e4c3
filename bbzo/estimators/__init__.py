"""Gradient estimators (registered by name) and the transforms that wrap them."""

from .base import Estimator, EstimatorInfo, evaluate_sharded
from .cge import CGE, CoordinateEstimator, normalize_coords
from .rge import RGE
from .autograd import Autograd
from .chain import OracleCGE, OracleRGE
from .transforms import ClipByGlobalNorm, Masked, SparseCGE, clip_by_global_norm, masked
from .registry import create_estimator, get_estimator_class, list_estimators, register_estimator

__all__ = [
    "Estimator", "EstimatorInfo", "CGE", "SparseCGE", "RGE", "Autograd", "OracleCGE", "OracleRGE", "CoordinateEstimator", "normalize_coords",
    "Masked", "ClipByGlobalNorm", "masked", "clip_by_global_norm", "evaluate_sharded",
    "create_estimator", "get_estimator_class", "list_estimators", "register_estimator",
]
